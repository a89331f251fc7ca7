"""Width growth on a gated MLP's projection is refused with a typed error naming the module and
why (issue 24): the gate's width is coupled to the up projection's."""

from __future__ import annotations

import anyio
import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.surgery import CoupledWidthError, find_slot_consumers

from ._host_models import SwiGLU


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = SwiGLU(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinySwiGLULM(nn.Module):
    """A user's own small transformer: embedding, two blocks with SwiGLU MLPs, a head."""

    def __init__(self, vocab: int = 16, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


def _model() -> TinySwiGLULM:
    torch.manual_seed(0)
    model = TinySwiGLULM()
    ea.wrap(model, ["blocks.0.mlp.gate"], example_input=torch.zeros(2, 8, dtype=torch.long))
    return model


def test_the_gate_projection_is_refused_naming_the_up_projection() -> None:
    with pytest.raises(CoupledWidthError) as caught:
        find_slot_consumers(_model(), "blocks.0.mlp.gate", 32, operation="widen", unit_major=False)
    error = caught.value
    assert error.slot == "blocks.0.mlp.gate" and error.coupled == "blocks.0.mlp.up"
    assert "gated (SwiGLU, GLU) MLP" in str(error) and "width_slots" in str(error)
    assert isinstance(error, ea.EsperError)


@pytest.mark.slow
def test_width_growth_on_a_gate_ends_the_run_with_the_reason() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(1)
    data = [(t, t) for t in (torch.randint(0, 16, (4, 8), generator=gen) for _ in range(4))]
    config = ea.ControllerConfig(
        plateau_patience=1,
        plateau_tolerance=1.0,
        width_growth=True,
        width_slots=("blocks.0.mlp.gate",),
    )
    trainer = ea.Trainer(
        model,
        task=ea.training.LanguageModelTask(),
        controller=ea.HeuristicController(config, blueprints=()),
    )
    before = model.blocks[0].mlp.gate.host.out_features
    with pytest.raises(CoupledWidthError, match=r"'blocks\.0\.mlp\.gate' cannot be widened alone"):
        anyio.run(lambda: trainer.fit(data, data, epochs=4))
    assert model.blocks[0].mlp.gate.host.out_features == before  # nothing was changed
