"""Tiny hosts for the host-growth tests: the project's GPT, and a transformer written as a user
would write it (RMSNorm, a gated SwiGLU MLP, learned positions as a plain parameter, a tied head,
separate q/k/v projections), plus a training step and a save/replay/load round trip."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper_async.apps.gpt import GPT, GPTConfig
from esper_async.surgery import replay_operations

VOCAB = 29
T = 12


def tiny_gpt(n_layer: int = 2, n_embd: int = 32, n_head: int = 2, bias: bool = False) -> GPT:
    """The project's GPT at a test size (head size 16)."""
    return GPT(
        GPTConfig(VOCAB, block_size=T, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias)
    )


class UserAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (
            w(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            for w in (self.wq, self.wk, self.wv)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class UserBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d)
        self.attn = UserAttention(d, heads)
        self.norm2 = nn.RMSNorm(d)
        self.mlp = SwiGLU(d, 3 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UserLM(nn.Module):
    """A small Llama-like LM as a user writes it."""

    def __init__(self, d: int = 32, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(T, d) * 0.02)
        self.layers = nn.ModuleList(UserBlock(d, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def tokens(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of token ids and next-token targets."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def lm_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any) -> float:
    """One training step of next-token cross entropy."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    logits = model(batch[0])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the usual two groups: decay on matrices, none on vectors."""
    params = list(model.parameters())
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )


def resumed(
    build: Callable[[], nn.Module],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    records: list[dict[str, Any]],
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model and optimizer built by ``build``, with ``records`` replayed and ``model``'s
    and ``optimizer``'s saved state loaded (what a resume from a checkpoint does)."""
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = copy.deepcopy(optimizer.state_dict())  # a checkpoint holds copies
    fresh = build()
    fresh_opt = adamw(fresh)
    replay_operations(fresh, fresh_opt, records)
    fresh.load_state_dict(model_state)
    fresh_opt.load_state_dict(optim_state)
    return fresh, fresh_opt


def new_grads(model: nn.Module, known: set[int]) -> dict[str, torch.Tensor]:
    """Gradients of the parameters that are not in ``known`` (ids), by name."""
    return {n: p.grad for n, p in model.named_parameters() if id(p) not in known}


def trained(build: Any, steps: int = 3) -> tuple[nn.Module, torch.optim.AdamW]:
    """``build()`` seeded, then ``steps`` AdamW steps on token batches (moments not zero)."""
    torch.manual_seed(0)
    model = build()
    opt = adamw(model)
    for i in range(steps):
        lm_step(model, opt, tokens(seed=i))
    return model, opt
