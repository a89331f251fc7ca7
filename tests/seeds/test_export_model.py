"""export_model: a trained model with its slots inlined, loadable and runnable with torch alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.apps.demo import DigitsHost
from esper_async.errors import ExportError
from esper_async.seeds import SeedSlot, SeedState, export_program
from esper_async.seeds._slot import UnitMap

X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def graft(slot: SeedSlot, blueprint: ea.Blueprint, *, until: SeedState) -> None:
    """Drive ``slot`` from DORMANT to ``until`` with a real kernel, as the trainer would."""
    assert slot.contract is not None
    slot.germinate(blueprint)
    kernel = ea.export_kernel(blueprint, slot.contract, seed=3)
    slot.graft(ea.load_kernel(kernel), kernel.kernel_id)
    assert slot.seed is not None
    with torch.no_grad():  # trained weights: no seed starts out as zero here
        gen = torch.Generator().manual_seed(7)
        for p in slot.seed.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    if until is SeedState.TRAINING:
        return
    slot.start_blending(steps=2)
    slot.on_step()
    if until is SeedState.BLENDING:
        return
    slot.on_step()
    if until is SeedState.PROBATION:
        return
    slot.fossilize("kept")


def grown(live: SeedState | None = None) -> tuple[DigitsHost, dict[str, SeedSlot]]:
    """A digits host with conv1 and fc1 fossilized, conv2 dormant (or holding a ``live`` seed)."""
    torch.manual_seed(0)
    model = DigitsHost()
    slots = ea.wrap(model, ["conv1", "conv2", "fc1"], example_input=X[:2])
    graft(slots["conv1"], ea.Blueprint("residual_conv"), until=SeedState.FOSSILIZED)
    graft(slots["fc1"], ea.Blueprint("low_rank", {"rank": 2}), until=SeedState.FOSSILIZED)
    if live is not None:
        graft(slots["conv2"], ea.Blueprint("conv_norm"), until=live)
    return model.eval(), slots


@torch.no_grad()
def host_alone(model: nn.Module, slots: dict[str, SeedSlot], x: torch.Tensor) -> torch.Tensor:
    for slot in slots.values():
        slot._ablated = True
    try:
        return model(x)
    finally:
        for slot in slots.values():
            slot._ablated = False


def test_the_export_computes_what_the_model_does_bitwise() -> None:
    model, slots = grown()
    exported = ea.export_model(model, example_input=X)
    with torch.no_grad():
        want = model(X)
        got = exported(X)
        other = torch.randn(11, 1, 8, 8)
        assert torch.equal(exported(other), model(other))
    assert torch.equal(got, want)
    # The seeds matter: without them the model computes something else.
    assert (host_alone(model, slots, X) - want).abs().max() > 1e-3
    assert not exported.training and model.training is False


def test_the_export_holds_nothing_of_esper_async() -> None:
    model, slots = grown()
    exported = ea.export_model(model)
    classes = {f"{type(m).__module__}.{type(m).__name__}" for m in exported.modules()}
    assert not [c for c in classes if c.startswith("esper_async")], classes
    assert not any(isinstance(m, SeedSlot) for m in exported.modules())
    assert "torch.nn.modules.conv.Conv2d" in classes
    # Its state_dict is the model's, for what it kept: the seeds' weights are in it.
    sd, full = exported.state_dict(), model.state_dict()
    assert set(sd) <= set(full) and any(".seed." in k for k in sd)
    assert all(torch.equal(v, full[k]) for k, v in sd.items())
    assert not any(k.startswith("conv2.seed") for k in sd)  # the dormant slot: its host only
    # Parameters are copies: changing the model afterwards leaves the export as it was.
    before = exported(X)
    with torch.no_grad():
        next(slots["conv1"].seed.parameters()).add_(1.0)  # type: ignore[union-attr]
    assert torch.equal(exported(X), before)


_FRESH = r"""
import sys
sys.modules["esper_async"] = None  # import esper_async now fails, whatever sys.path holds
try:
    import esper_async
except ImportError:
    pass
else:
    raise SystemExit("esper_async is importable")
import torch
folder = sys.argv[1]
model = torch.load(folder + "/exported.pt", weights_only=False)
x = torch.load(folder + "/x.pt")
out = model(x)
model.load_state_dict(torch.load(folder + "/state.pt"))
assert torch.equal(model(x), out)
torch.save(out, folder + "/out.pt")
left = sorted(n for n in sys.modules if n.startswith("esper_async") and sys.modules[n] is not None)
print("modules:", left)
"""


@pytest.mark.slow
def test_the_export_loads_and_runs_in_a_process_without_esper_async(tmp_path: Path) -> None:
    model, _ = grown()
    exported = ea.export_model(model)
    torch.save(exported, tmp_path / "exported.pt")
    torch.save(exported.state_dict(), tmp_path / "state.pt")
    torch.save(X, tmp_path / "x.pt")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "exported.pt"))
    assert unsafe and all(name.startswith("torch.") for name in unsafe), unsafe
    done = subprocess.run(
        [sys.executable, "-I", "-c", _FRESH, str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "modules: []" in done.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(X))


def test_the_export_program_round_trips_with_a_dynamic_batch(tmp_path: Path) -> None:
    model, _ = grown()
    program = export_program(model, X)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for x in (X, torch.randn(3, 1, 8, 8)):
            torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0.0)
    # Built from the export as well.
    again = export_program(ea.export_model(model), X)
    with torch.no_grad():
        torch.testing.assert_close(again.module()(X), model(X), atol=1e-6, rtol=0.0)


@pytest.mark.parametrize(
    "state", [SeedState.TRAINING, SeedState.BLENDING, SeedState.PROBATION]
)
def test_live_seeds_are_refused_or_dropped(state: SeedState) -> None:
    model, slots = grown(live=state)
    assert slots["conv2"].state is state
    with pytest.raises(ExportError, match=r"conv2.*live seed") as caught:
        ea.export_model(model)
    assert caught.value.slot == "conv2"
    dropped = ea.export_model(model, live="drop")
    assert not any(k.startswith("conv2.seed") for k in dropped.state_dict())
    with torch.no_grad():
        slots["conv2"]._ablated = True
        want = model(X)
        slots["conv2"]._ablated = False
        assert torch.equal(dropped(X), want)
        if state is not SeedState.TRAINING:  # there the seed's value is exactly zero
            assert not torch.equal(dropped(X), model(X))


def test_a_germinated_slot_is_live_too() -> None:
    model, slots = grown()
    slots["conv2"].germinate(ea.Blueprint("conv_norm"))
    with pytest.raises(ExportError, match=r"conv2.*germinated"):
        ea.export_model(model)


def test_culled_and_embargoed_slots_export_their_host() -> None:
    model, slots = grown(live=SeedState.BLENDING)
    slots["conv2"].cull("worse")
    exported = ea.export_model(model, example_input=X)
    assert not any(k.startswith("conv2.seed") for k in exported.state_dict())
    slots["conv2"].embargo()
    with torch.no_grad():
        assert torch.equal(ea.export_model(model)(X), model(X))


def test_bad_options_and_untraceable_models_are_refused() -> None:
    model, _ = grown()
    with pytest.raises(ValueError, match="live must be"):
        ea.export_model(model, live="keep")  # type: ignore[arg-type]

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            return y if y.sum() > 0 else -y  # data-dependent: fx cannot trace it

    branchy = Branchy()
    ea.wrap(branchy, ["fc"], example_input=torch.randn(2, 4))
    with pytest.raises(ExportError, match="could not trace Branchy"):
        ea.export_model(branchy)


def test_a_widened_fossilized_slot_keeps_its_unit_map() -> None:
    model, slots = grown()
    slot = slots["fc1"]
    index = torch.tensor([*range(8), 3, 0])
    old = slot.host
    wider = nn.Linear(old.in_features, 10)  # type: ignore[arg-type]
    with torch.no_grad():
        wider.weight.copy_(old.weight.index_select(0, index))  # type: ignore[operator]
        wider.bias.copy_(old.bias.index_select(0, index))  # type: ignore[operator]
    slot.host = wider
    slot.unit_map = UnitMap(index, dim=-1, features=8)
    model.head = nn.Linear(10, 10)
    exported = ea.export_model(model, example_input=X)
    assert "fc1.unit_map.index" in exported.state_dict()
    with torch.no_grad():
        assert torch.equal(exported(X), model(X))


class TinyLM(nn.Module):
    """(N, T) tokens → embedding (N, T, D) → proj (a token slot) → logits (N, T, V)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 11)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.embed(tokens))))


@pytest.mark.parametrize("blueprint", ["lora", "attn_heads"])
def test_a_token_slot_exports(blueprint: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    tokens = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(2))
    slots = ea.wrap(model, ["proj"], example_input=tokens[:2])
    slot = slots["proj"]
    assert slot.contract is not None and slot.contract.kind is ea.SlotKind.TOKEN
    graft(slot, next(b for b in ea.library(ea.SlotKind.TOKEN) if b.name.startswith(blueprint)),
          until=SeedState.FOSSILIZED)
    model.eval()
    exported = ea.export_model(model, example_input=tokens)
    with torch.no_grad():
        assert torch.equal(exported(tokens), model(tokens))
        longer = torch.randint(0, 11, (2, 9))
        assert torch.equal(exported(longer), model(longer))
        slot._ablated = True
        assert not torch.equal(model(tokens), exported(tokens))
        slot._ablated = False
    program = export_program(exported, tokens)
    torch.export.save(program, tmp_path / "lm.pt2")
    loaded = torch.export.load(tmp_path / "lm.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-6, rtol=0.0)


def test_a_seed_in_another_execution_form_exports_its_program() -> None:
    # channels_last: the program (and its layout) is exported. (inductor keeps its program the
    # same way; compiling it takes most of a minute, so it is not run here.)
    form = "channels_last"
    torch.manual_seed(0)
    model = DigitsHost()
    slot = ea.wrap(model, ["conv1"], example_input=X[:2])["conv1"]
    assert slot.contract is not None
    blueprint = ea.Blueprint("residual_conv")
    slot.germinate(blueprint)
    kernel = ea.export_kernel(blueprint, slot.contract, seed=3)
    slot.graft(ea.load_kernel(kernel, form=form), kernel.kernel_id)
    slot.start_blending(steps=1)
    slot.on_step()
    slot.fossilize()
    exported = ea.export_model(model.eval())
    assert all(k.startswith(("conv1.seed.program.", "conv1.host.", "conv2.", "fc1.",
                             "head.")) for k in exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(exported(X), model(X), atol=1e-6, rtol=0.0)
