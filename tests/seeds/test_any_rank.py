"""Slots on outputs of any rank: (N, T, D) Linears, Conv1d and Conv3d; argument forwarding; an
atomic wrap(); modules their parent never calls (MultiheadAttention.out_proj)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.blueprints import Blueprint, SlotContract, SlotKind, library
from esper_async.errors import BlueprintError, SeedRuntimeError
from esper_async.kernels import export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap
from esper_async.seeds._wrap import SEQUENCE_KIND


def _conv_ranks_supported() -> bool:
    """Whether SlotContract takes conv shapes with 1 and 3 spatial dims (blueprints/_contract)."""
    try:
        SlotContract(SlotKind.CONV, (4, 9))
        SlotContract(SlotKind.CONV, (4, 3, 4, 5))
    except BlueprintError:
        return False
    return True


needs_conv_ranks = pytest.mark.xfail(
    not _conv_ranks_supported(), raises=BlueprintError, strict=True,
    reason="SlotContract (blueprints/_contract.py, not this branch's) accepts only (C, H, W) "
    "conv shapes; it needs ranks 2-4",
)


class Tokens(nn.Module):
    """Linears on (N, T, D): what a transformer block's projections see."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))).mean(1))


class Convs(nn.Module):
    """A Conv1d on (N, C, L) and a Conv3d on (N, C, D, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seq, vol = x
        a = torch.relu(self.c1(seq)).mean(-1)
        b = torch.relu(self.c3(vol)).mean(dim=(2, 3, 4))
        return self.head(torch.cat([a, b], 1))


SEQ = torch.randn(5, 7, 8)
VOL = torch.randn(5, 4, 3, 4, 5)


def _graft(slot: SeedSlot, blueprint: Blueprint) -> nn.Module:
    """A real kernel for the slot's contract (exported and loaded), with non-zero weights so a
    leak into the output at α = 0 would show."""
    assert slot.contract is not None
    slot.germinate(blueprint)
    kernel = export_kernel(blueprint, slot.contract, seed=0)
    module = load_kernel(kernel)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    slot.graft(module, kernel.kernel_id)
    return module


def _check_training_seed(
    model: nn.Module, slot: SeedSlot, blueprint: Blueprint, *x: object
) -> None:
    """At α = 0 the output and host gradients are bitwise those of the dormant model, the seed
    gets gradients; blended in, it changes the output."""
    before = model(*x)
    model.zero_grad()
    before.square().sum().backward()
    host_grads = [p.grad.clone() for p in model.parameters()]
    seed = _graft(slot, blueprint)
    model.zero_grad()
    after = model(*x)
    after.square().sum().backward()
    assert torch.equal(after, before)
    host = [p for n, p in model.named_parameters() if ".seed." not in n]
    for p, g in zip(host, host_grads, strict=True):
        assert torch.equal(p.grad, g)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.parameters())
    slot.start_blending(steps=1)
    slot.on_step()
    assert slot.state is SeedState.PROBATION
    assert not torch.allclose(model(*x), before)


def test_sequence_linears_get_slots_of_their_feature_width() -> None:
    slots = wrap(Tokens(), [nn.Linear], example_input=SEQ)
    assert list(slots) == ["up", "down", "head"]
    assert slots["up"].contract == SlotContract(SEQUENCE_KIND, (16,))
    assert slots["down"].contract == SlotContract(SEQUENCE_KIND, (8,))
    assert slots["head"].contract == SlotContract(SlotKind.LINEAR, (3,))


@pytest.mark.parametrize("blueprint", library(SlotKind.LINEAR)[:3], ids=str)
def test_a_linear_kernel_serves_a_sequence_slot(blueprint: Blueprint) -> None:
    torch.manual_seed(0)
    model = Tokens()
    # The contract spelled out: LINEAR whatever SEQUENCE_KIND says (the flattening is the test).
    slot = SeedSlot(model.down, name="down", contract=SlotContract(SlotKind.LINEAR, (8,)))
    model.down = slot
    _check_training_seed(model, slot, blueprint, SEQ)
    # The seed ran on every position alone: (N, T, D) -> (N*T, D) -> (N, T, D).
    h = slot.host(torch.relu(model.up(SEQ)))
    assert slot.seed is not None
    expected = h + slot.seed(h.reshape(-1, 8)).reshape(h.shape)
    torch.testing.assert_close(slot(torch.relu(model.up(SEQ))), expected)
    # 4-D leading dims go through the same kernel.
    h4 = torch.randn(2, 3, 4, 16)
    assert slot(h4).shape == (2, 3, 4, 8)


def test_wrapped_sequence_slot_trains_a_seed_from_its_library() -> None:
    torch.manual_seed(0)
    model = Tokens()
    slot = wrap(model, ["down"], example_input=SEQ)["down"]
    assert slot.contract is not None
    _check_training_seed(model, slot, library(slot.contract.kind)[0], SEQ)


@pytest.mark.parametrize("kind", [SlotKind.LINEAR, SEQUENCE_KIND])
def test_a_seed_of_the_wrong_width_fails_as_a_seed_error(kind: SlotKind) -> None:
    model = Tokens()
    slot = SeedSlot(model.down, name="down", contract=SlotContract(kind, (8,)))
    model.down = slot
    slot.germinate(library(kind)[0])
    slot.graft(nn.Linear(8, 5), "bad")
    with pytest.raises(SeedRuntimeError, match="'down'"):
        model(SEQ)


@needs_conv_ranks
def test_conv1d_and_conv3d_get_slots_of_their_rank() -> None:
    slots = wrap(Convs(), [nn.Conv1d, nn.Conv3d], example_input=((SEQ[:, :2], VOL[:, :1]),))
    assert slots["c1"].contract == SlotContract(SlotKind.CONV, (4, 8))
    assert slots["c3"].contract == SlotContract(SlotKind.CONV, (4, 3, 4, 5))


@needs_conv_ranks
@pytest.mark.parametrize("name", ["c1", "c3"])
@pytest.mark.parametrize(
    "blueprint", [Blueprint("bottleneck"), Blueprint("squeeze_excitation", {"reduction": 1})],
    ids=str,
)
def test_conv1d_and_conv3d_slots_train_real_kernels(name: str, blueprint: Blueprint) -> None:
    torch.manual_seed(0)
    model = Convs()
    x = (SEQ[:, :2], VOL[:, :1])
    slot = wrap(model, [name], example_input=(x,))[name]
    _check_training_seed(model, slot, blueprint, x)


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return (x + 2 * y) * scale


class UsesTwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = TwoInputs()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.head(self.mix(x, y, scale=scale))


def test_a_slot_forwards_every_argument_to_its_host() -> None:
    torch.manual_seed(0)
    model = UsesTwoInputs()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    plain = model(x, y, 3.0)
    slot = wrap(model, ["mix"], example_input=(x, y), example_kwargs={"scale": 0.5})["mix"]
    assert slot.contract == SlotContract(SlotKind.LINEAR, (4,))
    assert torch.equal(slot(x, y, scale=3.0), (x + 2 * y) * 3.0)
    assert torch.equal(model(x, y, 3.0), plain)
    _check_training_seed(model, slot, Blueprint("mlp"), x, y, 3.0)


class Mixed(nn.Module):
    """Linears, an LSTM (returns a tuple) last, and a MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc2 = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.register_buffer("mask", torch.full((7, 7), float("-inf")).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h + self.attn(h, h, h, attn_mask=self.mask, need_weights=False)[0]
        out, _ = self.lstm(self.fc2(h))
        return out.mean(1)


def _fingerprint(model: nn.Module) -> tuple[str, list[tuple[str, type]], dict[str, torch.Tensor]]:
    return (
        repr(model),
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        pytest.param(["fc1", "fc2", "lstm"], "returns a tuple", id="tuple-output-last"),
        pytest.param(["fc1", "fc2", "attn.out_proj"], "'attn' \\(MultiheadAttention\\)",
                     id="parent-reads-params"),
        pytest.param(["fc1", nn.Linear, "nope"], "no module named", id="unknown-name"),
    ],
)
def test_a_failing_target_late_in_the_list_leaves_the_model_unchanged(
    targets: list, message: str
) -> None:
    torch.manual_seed(0)
    model = Mixed()
    before = _fingerprint(model)
    out = model(SEQ)
    with pytest.raises(BlueprintError, match=message):
        wrap(model, targets, example_input=SEQ)
    after = _fingerprint(model)
    assert after[:2] == before[:2]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][k], v) for k, v in before[2].items())
    assert find_slots(model) == {}
    assert model.training  # the probe's eval() was undone
    assert torch.equal(model(SEQ), out)


def test_selecting_by_type_skips_modules_their_parent_never_calls() -> None:
    model = Mixed()
    slots = wrap(model, [nn.Linear], example_input=SEQ)
    assert list(slots) == ["fc1", "fc2"]  # attn.out_proj is read by MHA, never called
    assert isinstance(model.attn.out_proj, nn.Linear)
    assert torch.isfinite(model(SEQ)).all()


class ReadsChildWeight(nn.Module):
    """A parent that uses its child's parameters without calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.inner.weight.t(), self.inner.bias)


def test_a_parent_that_never_calls_its_child_is_named_by_the_probe() -> None:
    model = nn.Sequential(ReadsChildWeight(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(BlueprintError, match="'0' \\(ReadsChildWeight\\)"):
        wrap(model, ["0.inner"], example_input=torch.randn(3, 8))
    assert list(wrap(model, [nn.Linear], example_input=torch.randn(3, 8))) == ["1", "2"]


def test_modules_inside_slots_are_not_wrapped_again() -> None:
    model = Tokens()
    wrap(model, ["down"], example_input=SEQ)
    assert list(wrap(model, [nn.Linear], example_input=SEQ)) == ["up", "head"]
    with pytest.raises(BlueprintError, match="inside a seed slot"):
        wrap(model, ["down.host"], example_input=SEQ)


def test_a_model_that_raises_on_the_example_is_left_unchanged() -> None:
    model = Tokens()
    with pytest.raises(BlueprintError, match="raised RuntimeError"):
        wrap(model, [nn.Linear], example_input=torch.randn(5, 7, 3))
    assert find_slots(model) == {}
