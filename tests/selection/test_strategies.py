"""Tests of the bandit strategies: legality, determinism, persistence and learning."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper_async.errors import NoLegalArmError, SelectionError
from esper_async.selection import (
    DiscountedUCB,
    EpsilonGreedy,
    LinUCB,
    SlidingWindowUCB,
    Softmax,
    Strategy,
    ThompsonBeta,
    ThompsonGaussian,
    make_strategy,
    strategy_names,
)

ALL_NAMES = (
    "ucb1",
    "discounted_ucb",
    "sliding_window_ucb",
    "thompson_beta",
    "thompson_gaussian",
    "epsilon_greedy",
    "softmax",
    "linucb",
)
N_FEATURES = 3
ARMS = tuple((f"slot{i // 4}", f"bp-{i % 4}") for i in range(12))


def _features(arm: tuple[str, str]) -> np.ndarray:
    """A fixed feature vector per arm, so contextual and plain strategies share one driver."""
    i = ARMS.index(arm)
    return np.array([1.0, (i % 4) / 4.0, (i // 4) / 3.0])


def _drive(strategy: Strategy, script: list[tuple[list[int], float]]) -> list[tuple[str, str]]:
    """Offer the arm subsets of ``script`` in turn, reward each choice, return the choices."""
    chosen = []
    for offered_idx, reward in script:
        offered = tuple(ARMS[i] for i in offered_idx)
        ctx = {a: _features(a) for a in offered}
        arm = strategy.select(offered, ctx)
        chosen.append(arm)
        strategy.update(arm, reward, _features(arm))
    return chosen


scripts = st.lists(
    st.tuples(
        st.lists(st.integers(0, len(ARMS) - 1), min_size=1, max_size=len(ARMS), unique=True),
        st.floats(0.0, 1.0),
    ),
    min_size=1,
    max_size=40,
)


def test_registry_names_every_strategy() -> None:
    assert set(strategy_names()) == set(ALL_NAMES)


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(SelectionError, match=r"valid names are: .*thompson_beta.*ucb1"):
        make_strategy("ucb2")


def test_unknown_parameter_lists_the_accepted_ones() -> None:
    with pytest.raises(SelectionError, match="takes no parameter gama; it takes: gamma, c, seed"):
        make_strategy("discounted_ucb", gama=0.9)


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ALL_NAMES])
def test_no_arms_raises_no_legal_arm(name: str) -> None:
    with pytest.raises(NoLegalArmError, match="no arms"):
        make_strategy(name).select((), {})


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ALL_NAMES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, seed=st.integers(0, 2**32 - 1))
def test_select_returns_an_offered_arm(name: str, script, seed: int) -> None:
    strategy = make_strategy(name, seed=seed)
    for (offered_idx, _), arm in zip(script, _drive(strategy, script), strict=True):
        assert arm in {ARMS[i] for i in offered_idx}


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ALL_NAMES])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts, seed=st.integers(0, 2**32 - 1))
def test_same_seed_same_choices(name: str, script, seed: int) -> None:
    assert _drive(make_strategy(name, seed=seed), script) == _drive(
        make_strategy(name, seed=seed), script
    )


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ALL_NAMES])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=scripts, then=scripts, seed=st.integers(0, 2**32 - 1))
def test_state_round_trip_through_json_continues_identically(
    name: str, first, then, seed: int
) -> None:
    original = make_strategy(name, seed=seed)
    _drive(original, first)
    restored = make_strategy(name, seed=seed + 1)  # a different seed: the state must carry the RNG
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    assert _drive(restored, then) == _drive(original, then)


def test_loading_another_strategys_state_is_refused() -> None:
    with pytest.raises(SelectionError, match="cannot load a 'ucb1' state into a 'softmax'"):
        make_strategy("softmax").load_state_dict(make_strategy("ucb1").state_dict())


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ALL_NAMES])
@pytest.mark.parametrize(
    "bad", [pytest.param(float("nan"), id="nan"), pytest.param(np.inf, id="inf")]
)
def test_non_finite_reward_is_refused(name: str, bad: float) -> None:
    with pytest.raises(SelectionError, match="finite"):
        make_strategy(name).update(ARMS[0], bad, _features(ARMS[0]))


def _bernoulli_run(strategy: Strategy, means: list[float], rounds: int, switch_at: int | None):
    """Run a Bernoulli bandit; return the arms chosen (as indices) per round."""
    rng = np.random.default_rng(7)
    arms = tuple(("s", f"a{i}") for i in range(len(means)))
    ctx = np.ones((len(arms), 1))
    mu = list(means)
    picks = []
    for t in range(rounds):
        if switch_at is not None and t == switch_at:
            mu = mu[::-1]
        arm = strategy.select(arms, ctx)
        i = arms.index(arm)
        picks.append(i)
        strategy.update(arm, float(rng.random() < mu[i]), np.ones(1))
    return np.array(picks)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(make_strategy("ucb1"), id="ucb1"),
        pytest.param(DiscountedUCB(gamma=0.99), id="discounted_ucb"),
        pytest.param(SlidingWindowUCB(window=300), id="sliding_window_ucb"),
        pytest.param(ThompsonBeta(seed=1), id="thompson_beta"),
        pytest.param(ThompsonGaussian(noise_var=0.25, seed=1), id="thompson_gaussian"),
        pytest.param(EpsilonGreedy(epsilon=0.1, seed=1), id="epsilon_greedy"),
        pytest.param(
            EpsilonGreedy(epsilon=1.0, decay=0.99, min_epsilon=0.02, seed=1), id="eps_decay"
        ),
        pytest.param(Softmax(tau=0.05, seed=1), id="softmax"),
        pytest.param(LinUCB(alpha=0.5), id="linucb"),
    ],
)
def test_finds_the_best_bernoulli_arm(strategy: Strategy) -> None:
    picks = _bernoulli_run(strategy, [0.2, 0.5, 0.8], rounds=1500, switch_at=None)
    assert np.mean(picks[-500:] == 2) > 0.6


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(DiscountedUCB(gamma=0.98), id="discounted_ucb"),
        pytest.param(SlidingWindowUCB(window=200), id="sliding_window_ucb"),
    ],
)
def test_non_stationary_strategies_follow_a_switch(strategy: Strategy) -> None:
    picks = _bernoulli_run(strategy, [0.2, 0.5, 0.8], rounds=2000, switch_at=1000)
    # Uniform play would give 1/3; an arm stuck on the old best would give about 0.
    assert np.mean(picks[-400:] == 0) > 0.5


def test_ucb1_tries_each_offered_arm_first() -> None:
    strategy = make_strategy("ucb1")
    arms = ARMS[:5]
    seen = []
    for _ in arms:
        arm = strategy.select(arms)
        seen.append(arm)
        strategy.update(arm, 1.0)
    assert seen == list(arms)


def test_epsilon_decays_to_its_floor() -> None:
    strategy = EpsilonGreedy(epsilon=0.5, decay=0.9, min_epsilon=0.05)
    eps = []
    for _ in range(40):
        eps.append(strategy.current_epsilon)
        strategy.update(strategy.select(ARMS), 0.0)
    assert eps[0] == 0.5 and eps[1] == pytest.approx(0.45)
    assert all(a >= b for a, b in itertools.pairwise(eps)) and eps[-1] == 0.05


def test_thompson_beta_needs_unit_rewards_or_a_threshold() -> None:
    with pytest.raises(SelectionError, match="outside \\[0, 1\\]; set threshold="):
        ThompsonBeta().update(ARMS[0], 1.5)
    binarised = ThompsonBeta(threshold=0.0)
    binarised.update(ARMS[0], 3.0)
    binarised.update(ARMS[0], -2.0)
    arrays = binarised.state_dict()["arrays"]
    assert arrays["_alpha"] == [2.0] and arrays["_beta"] == [2.0]


def test_linucb_needs_context() -> None:
    with pytest.raises(SelectionError, match="linucb is contextual"):
        LinUCB().select(ARMS)
    with pytest.raises(SelectionError, match="no context given for arm"):
        LinUCB().select(ARMS[:2], {ARMS[0]: np.ones(2)})
    with pytest.raises(SelectionError, match="needs its context vector"):
        LinUCB().update(ARMS[0], 1.0)


def test_linucb_learns_which_arm_suits_which_context() -> None:
    """Arm 0 pays in context A, arm 1 in context B; a plain bandit cannot tell them apart."""
    rng = np.random.default_rng(3)
    strategy = LinUCB(alpha=0.3)
    arms = (("s", "a0"), ("s", "a1"))
    contexts = {"A": np.array([1.0, 0.0]), "B": np.array([0.0, 1.0])}
    correct = []
    for t in range(600):
        name = "A" if rng.random() < 0.5 else "B"
        x = contexts[name]
        arm = strategy.select(arms, {a: x for a in arms})
        good = (arm == arms[0]) == (name == "A")
        strategy.update(arm, float(good) + 0.1 * rng.standard_normal(), x)
        if t >= 400:
            correct.append(good)
    assert np.mean(correct) > 0.9
