"""export_model on a model torch.fx cannot trace: a Hugging Face GPT-2 goes through torch.export
(issue 24). Built from a tiny config: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import esper_async as ea
from esper_async.errors import ExportError
from esper_async.seeds import SeedSlot, export_program

transformers = pytest.importorskip("transformers")

NO_CACHE = {"use_cache": False}  # a DynamicCache is no output torch.export can carry


def _grown_gpt2(model: torch.nn.Module) -> tuple[torch.nn.Module, SeedSlot]:
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    slot = ea.wrap(model, ["transformer.h.0.mlp"], example_input=ids)["transformer.h.0.mlp"]
    assert slot.contract is not None and slot.contract.kind is ea.SlotKind.TOKEN
    blueprint = ea.Blueprint("lora", {"rank": 2})
    slot.germinate(blueprint)
    kernel = ea.export_kernel(blueprint, slot.contract, seed=3)
    slot.graft(ea.load_kernel(kernel), kernel.kernel_id)
    with torch.no_grad():  # trained weights: a seed that contributes something
        for p in slot.seed.parameters():  # type: ignore[union-attr]
            p.add_(0.2 * torch.randn_like(p))
    slot.start_blending(steps=1)
    slot.on_step()
    slot.fossilize("kept")
    return model.eval(), slot


def test_a_gpt2_fx_cannot_trace_exports_through_torch_export(tmp_path: Path, tiny_gpt2) -> None:
    model, slot = _grown_gpt2(tiny_gpt2())
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ExportError, match=r"pass example_input= .* through torch.export"):
        ea.export_model(model)  # no example: torch.export has nothing to trace with
    plain = ea.export_model(model, example_input=ids, example_kwargs=NO_CACHE)
    keys = plain.state_dict()
    assert "transformer.h.0.mlp.host.c_fc.weight" in keys
    assert any(k.startswith("transformer.h.0.mlp.seed.program.") for k in keys)
    assert not any(type(m).__module__.startswith("esper_async") for m in plain.modules())
    three = torch.randint(0, 32, (3, 12))  # another batch size (the length is fixed)
    with torch.no_grad():
        want = model(three, use_cache=False).logits
        torch.testing.assert_close(plain(three, use_cache=False).logits, want, atol=1e-6, rtol=0)
        with slot.ablated():  # the seed is in the export: without it the model differs
            assert not torch.allclose(model(three, use_cache=False).logits, want)
    torch.export.save(export_program(plain, ids, example_kwargs=NO_CACHE), tmp_path / "g.pt2")
    loaded = torch.export.load(tmp_path / "g.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(three, use_cache=False).logits, want, atol=1e-6, rtol=0)


def test_when_both_tracers_fail_the_error_names_both_and_the_way_out(tiny_gpt2) -> None:
    model, _ = _grown_gpt2(tiny_gpt2())
    ids = torch.randint(0, 32, (2, 12))
    with pytest.raises(
        ExportError,
        match=r"torch.fx could not trace GPT2LMHeadModel .* "
        r"torch.export failed on the example input too.*'use_cache': False",
    ):
        ea.export_model(model, example_input=ids)  # with the cache in its outputs
