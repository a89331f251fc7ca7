from __future__ import annotations

import pytest
import torch

from esper_async.errors import SurgeryError
from esper_async.seeds import wrap
from esper_async.surgery import ModelSurgeon, SurgeryPolicy, SurgeryPolicyConfig, Widen, WidenSlot

from ._helpers import tiny_mlp, train, vectors


class _Steps:
    """An injectable step counter the test advances by hand."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def _policy(**overrides: object) -> tuple[SurgeryPolicy, _Steps]:
    steps = _Steps()
    limits: dict[str, object] = {"fossil_threshold": 2, "cooldown_steps": 10, **overrides}
    config = SurgeryPolicyConfig(**limits)  # type: ignore[arg-type]
    return SurgeryPolicy(config, step=steps), steps


def test_a_layer_whose_seeds_keep_fossilizing_is_widened() -> None:
    policy, steps = _policy()
    model = tiny_mlp()
    policy.record_fossilized("2")
    assert policy.propose(model) is None
    steps.now = 3
    policy.record_fossilized("2")
    assert policy.propose(model) == Widen("2", 24, seed=3)


def test_cooldown_counts_from_the_last_surgery() -> None:
    policy, steps = _policy()
    model = tiny_mlp()
    for layer in ("0", "0", "2", "2"):
        policy.record_fossilized(layer)
    first = policy.propose(model)
    assert first is not None
    policy.rejected(first)
    assert policy.propose(model) is None
    steps.now = 9
    assert policy.propose(model) is None
    steps.now = 10
    proposal = policy.propose(model)
    assert proposal is not None and proposal.target != first.target


def test_growth_stops_at_the_cap() -> None:
    policy, steps = _policy(growth_factor=1.5, max_growth=2.0, cooldown_steps=0)
    model = tiny_mlp()
    widths = []
    for step in range(6):
        steps.now = step
        policy.record_fossilized("0")
        policy.record_fossilized("0")
        op = policy.propose(model)
        if op is None:
            break
        model[0] = torch.nn.Linear(8, op.width)  # stands for a committed widening
        model[2] = torch.nn.Linear(op.width, 16)
        policy.committed(op)
        widths.append(op.width)
    assert widths == [24, 32]


def test_only_recent_fossils_count_within_the_window() -> None:
    policy, steps = _policy(window_steps=5)
    policy.record_fossilized("0")
    steps.now = 5
    policy.record_fossilized("0")
    assert policy.fossil_count("0") == 1
    assert policy.propose(tiny_mlp()) is None


def test_the_operation_limit_holds() -> None:
    policy, _ = _policy(max_operations=1, cooldown_steps=0)
    model = tiny_mlp()
    policy.record_fossilized("0")
    policy.record_fossilized("0")
    op = policy.propose(model)
    assert op is not None
    policy.committed(op)
    policy.record_fossilized("2")
    policy.record_fossilized("2")
    assert policy.propose(model) is None


def test_layers_that_cannot_be_widened_are_skipped() -> None:
    policy, _ = _policy()
    for layer in ("1", "1", "missing", "missing"):
        policy.record_fossilized(layer)
    assert policy.propose(tiny_mlp()) is None


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"fossil_threshold": 0}, id="threshold"),
        pytest.param({"growth_factor": 1.0}, id="factor"),
        pytest.param({"max_growth": 0.5}, id="cap"),
        pytest.param({"cooldown_steps": -1}, id="cooldown"),
        pytest.param({"window_steps": 0}, id="window"),
    ],
)
def test_bad_limits_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(SurgeryError):
        SurgeryPolicyConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_proposal_runs_through_the_surgeon_and_training_goes_on() -> None:
    torch.manual_seed(0)
    policy, steps = _policy()
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = vectors(64)
    train(model, opt, data, 10)
    steps.now = 10
    policy.record_fossilized("2")
    policy.record_fossilized("2")
    op = policy.propose(model)
    assert op is not None
    await ModelSurgeon().apply(model, opt, op, probe=data[0][:4])
    policy.committed(op)
    assert model[2].out_features == 24
    losses = train(model, opt, data, 10)
    assert losses[-1] < losses[0]


def test_a_fossilized_slot_is_proposed_as_a_slot_widening_after_one_fossil() -> None:
    steps = _Steps()
    policy = SurgeryPolicy(SurgeryPolicyConfig(cooldown_steps=0), step=steps)
    assert policy.config.fossil_threshold == 1  # a slot can fossilize only once
    model = tiny_mlp()
    wrap(model, ["2"], example_input=torch.zeros(2, 8))
    steps.now = 7
    policy.record_fossilized("2")
    op = policy.propose(model)
    assert op == WidenSlot("2", 24, seed=7)
    policy.committed(op)
    assert policy.propose(model) is None  # the fossil bought one widening


def test_the_policy_state_round_trips() -> None:
    policy, steps = _policy(max_operations=3)
    model = tiny_mlp()
    policy.record_fossilized("0")
    policy.record_fossilized("0")
    op = policy.propose(model)
    assert op is not None
    policy.committed(op)
    steps.now = 4
    policy.record_fossilized("2")
    state = policy.state_dict()
    copy = SurgeryPolicy(policy.config, step=steps)
    copy.load_state_dict(state)
    assert copy.state_dict() == state
    steps.now = 10
    policy.record_fossilized("2")
    copy.record_fossilized("2")
    assert copy.propose(model) == policy.propose(model) == Widen("2", 24, seed=10)
