from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.apps.demo import DigitsHost
from esper_async.blueprints import Blueprint
from esper_async.errors import SurgeryError
from esper_async.kernels import Kernel, export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap
from esper_async.surgery import ModelSurgeon, WidenSlot
from esper_async.surgery._widen_slot import SlotConsumer, find_slot_consumers

from ._helpers import assert_same, evaluate, fingerprint

X = torch.rand(16, 1, 8, 8)
Y = torch.arange(16) % 10
_KERNELS: dict[tuple[str, str], Kernel] = {}


def _kernel(slot: SeedSlot, blueprint: Blueprint) -> Kernel:
    assert slot.contract is not None
    key = (slot.slot_name, blueprint.name)
    if key not in _KERNELS:
        _KERNELS[key] = export_kernel(blueprint, slot.contract, seed=0)
    return _KERNELS[key]


def _seed(slot: SeedSlot, state: SeedState, opt: torch.optim.Optimizer) -> None:
    """Put a real kernel in ``slot`` and walk it to ``state`` (non-zero weights, so that a seed
    dropped or mis-spread by the surgery would show in the output)."""
    blueprint = Blueprint("bottleneck") if isinstance(slot.host, nn.Conv2d) else Blueprint("mlp")
    slot.germinate(blueprint)
    kernel = _kernel(slot, blueprint)
    module = load_kernel(kernel)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.3)
    slot.graft(module, kernel.kernel_id)
    opt.add_param_group({"params": list(module.parameters())})
    if state is SeedState.TRAINING:
        return
    slot.start_blending(4)
    slot.on_step()  # alpha = 1/4
    if state is SeedState.BLENDING:
        return
    for _ in range(3):
        slot.on_step()
    slot.fossilize("test")


def _model(states: dict[str, SeedState]) -> tuple[DigitsHost, torch.optim.Adam]:
    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    slots = find_slots(model)
    for name, state in states.items():
        _seed(slots[name], state, opt)
    _steps(model, opt, 2)
    return model, opt


def _steps(model: nn.Module, opt: torch.optim.Optimizer, n: int) -> list[float]:
    model.train()
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


STATES = [
    pytest.param(SeedState.TRAINING, id="training"),
    pytest.param(SeedState.BLENDING, id="blending"),
    pytest.param(SeedState.FOSSILIZED, id="fossilized"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("target", ["conv1", "conv2", "fc1"])
async def test_widening_a_slot_with_a_seed_preserves_the_output(
    state: SeedState, target: str
) -> None:
    model, opt = _model({"conv1": state, "conv2": state, "fc1": state})
    slot = find_slots(model)[target]
    seed = slot.seed
    assert seed is not None
    expected = evaluate(model, X)
    width = slot.host.out_features if target == "fc1" else slot.host.out_channels  # type: ignore[union-attr]

    def seed_grads() -> list[torch.Tensor]:
        # A TRAINING slot outputs exactly h, so only the seed's gradient shows its unit map: the
        # widened units' consumer fractions sum to one, so it must not change.
        model.eval()
        model.zero_grad(set_to_none=True)
        model(X).logsumexp(dim=1).mean().backward()
        return [p.grad.clone() for p in seed.parameters() if p.grad is not None]

    grads = seed_grads()
    await ModelSurgeon().apply(model, opt, WidenSlot(target, width + 3, seed=5), probe=X[:8])
    after = seed_grads()
    assert grads and len(after) == len(grads)
    for g0, g1 in zip(grads, after, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-6)

    assert slot.seed is seed and slot.state is state
    assert slot.unit_map is not None and len(slot.unit_map.index) == width + 3
    assert slot.unit_map.index[:width].tolist() == list(range(width))
    torch.testing.assert_close(evaluate(model, X), expected, rtol=1e-5, atol=1e-6)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    assert "unit_map.index" in dict(slot.named_buffers())


@pytest.mark.asyncio
async def test_widening_twice_composes_the_unit_map() -> None:
    model, opt = _model({"conv1": SeedState.FOSSILIZED})
    expected = evaluate(model, X)
    surgeon = ModelSurgeon()
    await surgeon.apply(model, opt, WidenSlot("conv1", 6, seed=1), probe=X[:8])
    first = find_slots(model)["conv1"].unit_map
    assert first is not None
    await surgeon.apply(model, opt, WidenSlot("conv1", 9, seed=2), probe=X[:8])
    second = find_slots(model)["conv1"].unit_map
    assert second is not None and second.features == 4 and len(second.index) == 9
    assert second.index[:6].tolist() == first.index.tolist()
    assert int(second.index.max()) < 4
    torch.testing.assert_close(evaluate(model, X), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.asyncio
async def test_a_dormant_slot_is_widened_and_a_later_seed_still_fits() -> None:
    model, opt = _model({})
    expected = evaluate(model, X)
    await ModelSurgeon().apply(model, opt, WidenSlot("fc1", 12), probe=X[:8])
    torch.testing.assert_close(evaluate(model, X), expected, rtol=1e-5, atol=1e-6)
    slot = find_slots(model)["fc1"]
    _seed(slot, SeedState.BLENDING, opt)  # the kernel is built for the contract width, 8
    out = evaluate(model, X)
    assert out.shape == (16, 10) and bool(torch.isfinite(out).all())


@pytest.mark.asyncio
@pytest.mark.parametrize("state", STATES)
async def test_a_failed_widening_rolls_back_bitwise(state: SeedState) -> None:
    model, opt = _model({"conv1": state, "conv2": state, "fc1": state})
    before = fingerprint(model, opt)
    with pytest.raises(RuntimeError, match="abandoned"):
        async with ModelSurgeon().transaction(model, opt, probe=X[:8]) as tx:
            await tx.stage(WidenSlot("conv1", 7))
            await tx.stage(WidenSlot("conv2", 5))
            await tx.stage(WidenSlot("fc1", 11))
            assert find_slots(model)["conv1"].unit_map is not None
            raise RuntimeError("abandoned")
    assert_same(before, fingerprint(model, opt))
    assert all(s.unit_map is None for s in find_slots(model).values())


@pytest.mark.asyncio
async def test_training_goes_on_and_every_parameter_learns() -> None:
    model, opt = _model({"conv1": SeedState.BLENDING, "fc1": SeedState.TRAINING})
    await ModelSurgeon().apply(model, opt, WidenSlot("conv1", 8, seed=3), probe=X[:8])
    await ModelSurgeon().apply(model, opt, WidenSlot("fc1", 12, seed=4), probe=X[:8])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _steps(model, opt, 30)
    assert losses[-1] < losses[0]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    # The replicas diverge: new unit 4 started as a copy of unit unit_map[4].
    slot = find_slots(model)["conv1"]
    assert slot.unit_map is not None
    source = int(slot.unit_map.index[4])
    assert not torch.equal(slot.host.weight[4], slot.host.weight[source])  # type: ignore[index]


def test_consumers_are_found_through_slots_and_flatten() -> None:
    model, _ = _model({})
    norms, consumers = find_slot_consumers(model, "conv1", 4, operation="t", unit_major=True)
    assert (norms, consumers) == ([], [SlotConsumer("conv2.host")])
    _, consumers = find_slot_consumers(model, "conv2", 4, operation="t", unit_major=True)
    assert consumers == [SlotConsumer("fc1.host", block=16)]
    _, consumers = find_slot_consumers(model, "fc1", 8, operation="t", unit_major=False)
    assert consumers == [SlotConsumer("head")]


class _Added(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) + self.b(x))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "width", "message"),
    [
        pytest.param("nope", 8, "no module named", id="unknown"),
        pytest.param("conv1.host", 8, "not a SeedSlot", id="not-a-slot"),
        pytest.param("conv1", 4, "must exceed", id="not-wider"),
        pytest.param("head", 12, "reaches return", id="model-output"),
    ],
)
async def test_bad_widenings_are_refused_and_change_nothing(
    target: str, width: int, message: str
) -> None:
    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1", "head"], example_input=torch.zeros(2, 1, 8, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _steps(model, opt, 1)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match=message):
        await ModelSurgeon().apply(model, opt, WidenSlot(target, width), probe=X[:8])
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_an_addition_downstream_is_refused() -> None:
    model = _Added()
    wrap(model, ["a"], example_input=torch.zeros(2, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = fingerprint(model, opt)
    with pytest.raises(SurgeryError, match="cannot simply take a wider input"):
        await ModelSurgeon().apply(model, opt, WidenSlot("a", 6), probe=torch.randn(3, 4))
    assert_same(before, fingerprint(model, opt))
