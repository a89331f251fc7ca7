from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.blueprints import Blueprint, SlotKind
from esper_async.errors import BlueprintError, LifecycleError
from esper_async.kernels import export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap
from esper_async.seeds._slot import UnitMap


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.head(torch.relu(self.fc(x.flatten(1))))


X = torch.randn(5, 1, 6, 6)


def wrapped() -> tuple[Host, dict[str, SeedSlot]]:
    torch.manual_seed(0)
    model = Host()
    slots = wrap(model, ["conv", nn.Linear], example_input=X)
    return model, slots


def graft(slot: SeedSlot, blueprint: Blueprint) -> nn.Module:
    assert slot.contract is not None
    slot.germinate(blueprint)
    kernel = export_kernel(blueprint, slot.contract, seed=0)
    module = load_kernel(kernel)
    # Non-zero weights everywhere, so that a seed that leaked into the output would show.
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    slot.graft(module, kernel.kernel_id)
    return module


def test_wrap_finds_slots_and_their_contracts() -> None:
    model, slots = wrapped()
    assert list(slots) == ["conv", "fc", "head"]
    assert slots["conv"].contract.kind is SlotKind.CONV
    assert slots["conv"].contract.shape == (4, 6, 6)
    assert slots["fc"].contract.shape == (8,)
    assert find_slots(model) == slots


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        pytest.param(["nope"], "no module named", id="unknown-name"),
        pytest.param([nn.GRU], "no module of the model matches", id="no-type-match"),
        pytest.param([], "at least one target", id="empty"),
    ],
)
def test_wrap_rejects_bad_targets(targets: list, message: str) -> None:
    with pytest.raises(BlueprintError, match=message):
        wrap(Host(), targets, example_input=X)


def test_wrapping_a_slot_twice_says_it_is_a_slot_already() -> None:
    model, _ = wrapped()
    with pytest.raises(BlueprintError, match="'conv' is a seed slot already") as info:
        wrap(model, ["conv"], example_input=X)
    assert "no module named" not in str(info.value)


def test_dormant_slots_change_nothing() -> None:
    torch.manual_seed(0)
    plain = Host()
    model, _ = wrapped()
    assert torch.equal(plain(X), model(X))


@pytest.mark.parametrize("slot_name", ["conv", "fc"])
def test_training_seed_preserves_function_and_host_gradients_but_learns(slot_name: str) -> None:
    model, slots = wrapped()
    before = model(X)
    model.zero_grad()
    before.square().sum().backward()
    host_grads = [p.grad.clone() for p in model.parameters()]

    blueprint = Blueprint("bottleneck") if slot_name == "conv" else Blueprint("mlp")
    seed = graft(slots[slot_name], blueprint)
    assert slots[slot_name].state is SeedState.TRAINING
    model.zero_grad()
    after = model(X)
    after.square().sum().backward()

    assert torch.equal(after, before)  # bitwise: α = 0 changes nothing
    host_params = [p for n, p in model.named_parameters() if ".seed." not in n]
    for p, g in zip(host_params, host_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.parameters())


def test_blending_ramps_alpha_then_probation() -> None:
    model, slots = wrapped()
    slot = slots["fc"]
    graft(slot, Blueprint("mlp"))
    base = model(X).detach()
    slot.start_blending(steps=4)
    outs = []
    for _ in range(4):
        slot.on_step()
        outs.append(model(X).detach())
    assert slot.state is SeedState.PROBATION and slot.alpha == 1.0
    drift = [float((o - base).abs().max()) for o in outs]
    assert drift == sorted(drift) and drift[0] > 0
    with slot.ablated():
        torch.testing.assert_close(model(X), base)


def test_cull_frees_the_seed_and_restores_the_host() -> None:
    model, slots = wrapped()
    slot = slots["conv"]
    base = model(X).detach()
    graft(slot, Blueprint("residual_conv"))
    slot.start_blending(steps=1)
    slot.on_step()
    assert not torch.equal(model(X), base)
    removed = slot.cull("test")
    assert removed is not None and slot.seed is None
    assert not any(".seed." in n for n, _ in model.named_parameters())
    assert torch.equal(model(X), base)
    slot.embargo()
    slot.release()
    assert slot.state is SeedState.DORMANT


def test_fossilized_seed_stays() -> None:
    model, slots = wrapped()
    slot = slots["fc"]
    graft(slot, Blueprint("low_rank"))
    slot.start_blending(steps=1)
    slot.on_step()
    slot.fossilize("kept")
    assert slot.state is SeedState.FOSSILIZED
    with pytest.raises(LifecycleError):
        slot.cull()
    assert any(".seed." in n for n, _ in model.named_parameters())


def test_germinate_checks_the_contract() -> None:
    _, slots = wrapped()
    with pytest.raises(BlueprintError, match="fits conv slots"):
        slots["fc"].germinate(Blueprint("residual_conv"))
    assert slots["fc"].state is SeedState.DORMANT


@pytest.mark.parametrize("slot_name", ["conv", "fc"])
@pytest.mark.parametrize("state", ["training", "blending", "fossilized"])
def test_a_unit_map_spreads_the_seed_over_a_wider_host(slot_name: str, state: str) -> None:
    _, slots = wrapped()
    slot = slots[slot_name]
    blueprint = Blueprint("bottleneck") if slot_name == "conv" else Blueprint("mlp")
    seed = graft(slot, blueprint)
    if state != "training":
        slot.start_blending(steps=2)
        slot.on_step()
    if state == "fossilized":
        slot.on_step()
        slot.fossilize()
    x = X if slot_name == "conv" else torch.randn(5, 4 * 6 * 6)
    dim = 1 if slot_name == "conv" else -1
    width = slot.contract.shape[0]
    index = torch.tensor([*range(width), 1, 0, 1])
    # A wider host whose first units are the old ones, as Net2Wider makes it.
    old = slot.host
    wider = nn.Conv2d(1, width + 3, 3, padding=1) if slot_name == "conv" else nn.Linear(144, 11)
    with torch.no_grad():
        wider.weight.copy_(old.weight.index_select(0, index))
        wider.bias.copy_(old.bias.index_select(0, index))
    slot.host = wider
    slot.unit_map = UnitMap(index, dim=dim, features=width)

    h = wider(x)
    s = seed(h.narrow(dim, 0, width)).index_select(dim, index)
    expected = {"training": h, "blending": h + 0.5 * s, "fossilized": h + s}[state]
    out = slot(x)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.parameters())
    assert "unit_map.index" in slot.state_dict()
