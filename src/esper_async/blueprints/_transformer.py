"""Transformer blueprint families: seeds for token slots, ``(N, T, D) -> (N, T, D)``.

A token slot wraps a sequence model's sublayer output (in :mod:`esper_async.apps.gpt`:
``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.proj``, ``blocks.{i}.out``); the seed sees the whole
sequence, so it may mix tokens, and attention seeds do so causally (position ``t`` reads positions
``<= t`` only). Every family's output path starts at zero, so the slot's output ``h + seed(h)``
equals ``h`` when the seed is born, and the zero-initialised projections get gradients from the
first step on:

==============  =================================================================================
family          seed(h)
==============  =================================================================================
``lora``        ``up(down(h))``: a rank-``r`` adapter, ``up`` zero (LoRA)
``mlp_expand``  ``proj(gelu(fc(LN(h))))``: ``expansion·D`` extra hidden units, ``proj`` zero
``attn_heads``  ``proj(SDPA(q, k, v, causal))`` of ``LN(h)``: extra heads, ``proj`` zero
``block``       ``a + m`` with ``a = attn(h)``, ``m = mlp(h + a)``: a pre-norm block's residual
                branches, so ``h + seed(h)`` is the block's output (depth growth); both
                output projections zero
``norm``        ``h · tanh(gate(LN(h)))``: a per-token, per-feature rescaling of ``h``, ``gate``
                zero
==============  =================================================================================
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._contract import SlotContract, SlotKind
from ._families import Family, Option, _zero, register_family

__all__ = ()


class _LoRA(nn.Module):
    def __init__(self, d: int, rank: int) -> None:
        super().__init__()
        r = min(rank, d)
        self.down = nn.Linear(d, r, bias=False)
        self.up = _zero(nn.Linear(r, d, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class _ExpandMLP(nn.Module):
    def __init__(self, d: int, expansion: int, norm: bool) -> None:
        super().__init__()
        # Pre-norm by default, as in the host's own MLP: the branch then sees unit-scale
        # features whatever the scale of the sublayer output it is attached to.
        self.norm: nn.Module = nn.LayerNorm(d) if norm else nn.Identity()
        self.fc = nn.Linear(d, d * expansion)
        self.proj = _zero(nn.Linear(d * expansion, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(self.norm(h))))


class _CausalHeads(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.proj = _zero(nn.Linear(heads * head_dim, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.norm(h)).unflatten(-1, (3, self.heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(2))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, expansion: int) -> None:
        super().__init__()
        self.attn = _CausalHeads(d, heads, head_dim)
        self.mlp = _ExpandMLP(d, expansion, norm=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attn(h)
        return a + self.mlp(h + a)


class _NormGate(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.gate = _zero(nn.Linear(d, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # tanh of a zero gate: starts at zero and can scale each feature of each token up or down.
        return h * torch.tanh(self.gate(self.norm(h)))


_T = SlotKind.TOKEN


def _heads(contract: SlotContract, heads: int, head_dim: int) -> _CausalHeads:
    return _CausalHeads(contract.channels, heads, head_dim)


for _family in (
    Family(
        "lora",
        _T,
        {"rank": Option(int, 4, 1, 4096)},
        lambda c, rank: _LoRA(c.channels, rank),
        "low-rank adapter on a token projection (down, zero up)",
    ),
    Family(
        "mlp_expand",
        _T,
        {"expansion": Option(int, 2, 1, 8), "norm": Option(bool, True)},
        lambda c, expansion, norm: _ExpandMLP(c.channels, expansion, norm),
        "extra GELU hidden units per token (pre-norm)",
    ),
    Family(
        "attn_heads",
        _T,
        {"heads": Option(int, 2, 1, 64), "head_dim": Option(int, 16, 1, 256)},
        _heads,
        "extra causal self-attention heads (pre-norm)",
    ),
    Family(
        "block",
        _T,
        {
            "heads": Option(int, 2, 1, 64),
            "head_dim": Option(int, 16, 1, 256),
            "expansion": Option(int, 2, 1, 8),
        },
        lambda c, heads, head_dim, expansion: _Block(c.channels, heads, head_dim, expansion),
        "identity-initialised pre-norm transformer block (depth growth)",
    ),
    Family(
        "norm",
        _T,
        {"eps": Option(float, 1e-5, 1e-8, 1e-2)},
        lambda c, eps: _NormGate(c.channels, eps),
        "LayerNorm-conditioned gated rescaling, zero gate",
    ),
):
    register_family(_family)

del _family
