"""A tiny transformer classifier whose (N, T, D) Linears hold slots grows through the real
Trainer: seeds germinate, blend and fossilize; a -inf causal mask buffer leaves snapshots on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper_async import Trainer
from esper_async.blueprints import SlotContract
from esper_async.compiler import BlueprintCompiler
from esper_async.control import ControllerConfig, HeuristicController
from esper_async.seeds import SeedState, wrap
from esper_async.seeds._wrap import SEQUENCE_KIND

VOCAB, T, D = 8, 6, 16


class TinyClassifier(nn.Module):
    """Embedding, one pre-norm attention + MLP block of Linears on (N, T, D), mean-pool, head."""

    mask: torch.Tensor

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D)
        self.ff1 = nn.Linear(D, 2 * D)
        self.ff2 = nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 2)
        mask = torch.full((T, T), float("-inf")).triu(1) if causal else torch.zeros(T, T)
        self.register_buffer("mask", mask)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(D) + self.mask).softmax(dim=-1)
        x = x + self.proj(att @ v)
        x = x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))
        return self.head(x.mean(dim=1))


def _batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random token sequences; the class is whether token 0 occurs (about half do)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, T), generator=gen)
    labels = (tokens == 0).any(dim=1).long()
    return [(tokens[i : i + 32], labels[i : i + 32]) for i in range(0, n, 32)]


def _trainer(causal: bool) -> Trainer:
    torch.manual_seed(0)
    model = TinyClassifier(causal)
    slots = wrap(model, ["proj", "ff2"], example_input=torch.zeros(2, T, dtype=torch.long))
    assert all(s.contract == SlotContract(SEQUENCE_KIND, (D,)) for s in slots.values())
    config = ControllerConfig.eager()
    return Trainer(
        model, controller=HeuristicController(config), compiler=BlueprintCompiler(workers=1),
        grow=True, seed=0,
    )


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_a_transformer_classifier_grows_seeds_on_its_sequence_slots() -> None:
    trainer = _trainer(causal=False)
    train, val = _batches(192, 0), _batches(64, 1)
    fit = await trainer.fit(train, val, epochs=8)
    for state in (SeedState.GERMINATED, SeedState.TRAINING, SeedState.BLENDING,
                  SeedState.FOSSILIZED):
        assert fit.count(state) >= 1, (state, [(e.slot, e.target) for e in fit.events])
    assert fit.count(SeedState.CULLED) == 0, fit.incidents
    fossils = [s for s in trainer.slots.values() if s.state is SeedState.FOSSILIZED]
    assert fossils and all(s.seed is not None and s.alpha == 1.0 for s in fossils)
    assert all(math.isfinite(r.val_loss) for r in fit.history)
    assert fit.history[-1].val_loss < fit.history[0].val_loss


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_minus_inf_mask_buffer_leaves_rollback_snapshots_on() -> None:
    trainer = _trainer(causal=True)
    assert not torch.isfinite(trainer.model.mask).all()
    train, val = _batches(64, 0), _batches(32, 1)
    fit = await trainer.fit(train, val, epochs=2)
    assert all(math.isfinite(r.val_loss) for r in fit.history)
    assert trainer.governor.snapshots_refused == 0
    assert trainer.governor.snapshot is not None
