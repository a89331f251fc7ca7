"""Host growth beside seed slots: dormant slots follow the growth, slots holding seeds refuse it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.blueprints import library
from esper_async.seeds import find_slots, wrap
from esper_async.surgery import (
    GrowthCouplingError,
    InsertIdentityBlocks,
    ModelSurgeon,
    StackBlocks,
    WidenResidual,
)

from ._helpers import assert_same, evaluate, fingerprint
from ._host_models import adamw, tiny_gpt, tokens

SLOTS = ["blocks.0.mlp.proj", "blocks.0.mlp.fc", "blocks.1.attn.proj", "blocks.1.out"]


def _wrapped():
    torch.manual_seed(0)
    model = tiny_gpt()
    wrap(model, SLOTS, example_input=tokens()[0])
    return model, adamw(model)


@pytest.mark.asyncio
async def test_dormant_slots_follow_width_and_depth_growth() -> None:
    model, opt = _wrapped()
    x = tokens(seed=2)[0]
    before = evaluate(model, x)
    async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
        await tx.stage(WidenResidual(48))
        await tx.stage(StackBlocks("blocks", 2, "interleave"))
    slots = find_slots(model)
    # the writers' and the stream identity's contracts take the new width; the MLP's input
    # projection still writes 4 x 32 features
    assert slots["blocks.0.mlp.proj"].contract.shape == (48,)
    assert slots["blocks.2.out"].contract.shape == (48,)  # moved from blocks.1 by the stacking
    assert slots["blocks.0.mlp.fc"].contract.shape == (128,)
    # interleaved copies are slots of their own, named after their place
    assert sorted(slots) == sorted(
        f"blocks.{i}.{rest}" for i in range(4) for rest in ("mlp.proj", "mlp.fc") if i < 2
    ) + sorted(f"blocks.{i}.{rest}" for i in (2, 3) for rest in ("attn.proj", "out"))
    for name, slot in slots.items():
        assert slot.slot_name == slot.lifecycle.slot == name
        assert model.get_submodule(name) is slot
    assert evaluate(model, x).shape == before.shape


@pytest.mark.asyncio
async def test_a_slot_holding_a_seed_refuses_growth_that_touches_it() -> None:
    model, opt = _wrapped()
    slot = find_slots(model)["blocks.0.mlp.proj"]
    assert slot.contract is not None
    slot.germinate(library(slot.contract.kind)[0])
    slot.graft(nn.Linear(32, 32), "test-kernel")
    before = fingerprint(model, opt)
    surgeon = ModelSurgeon()
    for op in (WidenResidual(48), StackBlocks("blocks", 2), InsertIdentityBlocks(after=(0,))):
        with pytest.raises(GrowthCouplingError, match="holds a seed") as info:
            await surgeon.apply(model, opt, op, probe=tokens()[0])
        assert info.value.module == "blocks.0.mlp.proj"
        assert_same(before, fingerprint(model, opt))
    # growth that does not move or widen the seed's slot goes ahead
    await surgeon.apply(model, opt, InsertIdentityBlocks(after=(-1,)), probe=tokens()[0])
    assert len(model.blocks) == 3 and find_slots(model)["blocks.0.mlp.proj"] is slot
