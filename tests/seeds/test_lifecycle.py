from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from esper_async.errors import LifecycleError
from esper_async.seeds import LIVE_STATES, TRANSITIONS, Lifecycle, SeedState

S = SeedState


def test_the_happy_path_reaches_fossilized() -> None:
    life = Lifecycle("s")
    for target in (S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATION, S.FOSSILIZED):
        life.to(target)
    assert life.state is S.FOSSILIZED and len(life.history) == 5


@pytest.mark.parametrize("live", [pytest.param(s, id=s.value) for s in sorted(LIVE_STATES)])
def test_every_live_state_can_be_culled_and_returns_to_dormant(live: SeedState) -> None:
    life = Lifecycle("s")
    path = [S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATION]
    for target in path[: path.index(live) + 1]:
        life.to(target)
    for target in (S.CULLED, S.EMBARGOED, S.DORMANT):
        life.to(target)
    assert life.state is S.DORMANT


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        pytest.param([], S.TRAINING, id="dormant-to-training"),
        pytest.param([], S.CULLED, id="cull-dormant"),
        pytest.param([S.GERMINATED], S.FOSSILIZED, id="skip-to-fossilized"),
        pytest.param(
            [S.GERMINATED, S.TRAINING, S.BLENDING, S.PROBATION, S.FOSSILIZED],
            S.CULLED,
            id="cull-fossilized",
        ),
        pytest.param([S.GERMINATED, S.CULLED], S.DORMANT, id="skip-embargo"),
    ],
)
def test_illegal_transitions_raise(path: list[SeedState], bad: SeedState) -> None:
    life = Lifecycle("slot-a")
    for target in path:
        life.to(target)
    before = (life.state, list(life.history))
    with pytest.raises(LifecycleError, match="slot-a") as info:
        life.to(bad)
    assert info.value.source is before[0] and info.value.target is bad
    assert (life.state, life.history) == before  # a refused move changes nothing


@given(st.lists(st.sampled_from(list(SeedState)), max_size=40))
def test_random_sequences_follow_the_transition_table(targets: list[SeedState]) -> None:
    life = Lifecycle("s")
    for target in targets:
        legal = target in TRANSITIONS[life.state]
        before = life.state
        if legal:
            life.to(target)
            assert life.state is target and life.history[-1][:2] == (before, target)
            assert life.epochs_in_state == life.steps_in_state == 0
        else:
            with pytest.raises(LifecycleError):
                life.to(target)
            assert life.state is before
        assert life.live == (life.state in LIVE_STATES)
    # History is a connected path from DORMANT through legal moves only.
    state = S.DORMANT
    for source, target, _ in life.history:
        assert source is state and target in TRANSITIONS[source]
        state = target
    assert state is life.state


def test_fossilized_is_terminal() -> None:
    assert TRANSITIONS[S.FOSSILIZED] == frozenset()
