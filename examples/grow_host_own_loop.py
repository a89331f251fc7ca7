"""Grow your own transformer's depth from your own training loop, with a GrowthSchedule.

    python examples/grow_host_own_loop.py                      # 2 blocks, stacked to 4 at 20 %
    python examples/grow_host_own_loop.py --steps 600 --text my_corpus.txt
    python examples/grow_host_own_loop.py --checkpoint ckpt.pt            # save every 100 steps
    python examples/grow_host_own_loop.py --checkpoint ckpt.pt --resume   # replay, then go on

The model below is written as a user would write one (RMSNorm, a gated SwiGLU MLP, learned
positions, an untied head); nothing in it comes from esper_async. The loop is plain PyTorch. Three
lines involve esper_async: the schedule is built once, ``schedule.maybe_grow(...)`` is called
before each step (it stacks the trained blocks when the stage is due, G_stack style, with their
AdamW moments, and sets the learning rate), and ``schedule.state_dict()`` goes into the checkpoint.
The data is any text file, read as bytes (default: this repository's README).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from esper_async.surgery import GrowthLR, GrowthSchedule, GrowthStage, StackBlocks

ROOT = Path(__file__).resolve().parent.parent


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(
        self, vocab: int = 256, dim: int = 64, depth: int = 2, heads: int = 2, context: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@dataclass
class Result:
    losses: list[float]
    val_loss: float
    depth: int
    grown_at: int | None
    model: TinyLM


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=gen)
        window = torch.stack([data[s : s + context + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def train(
    steps: int = 300,
    seed: int = 0,
    *,
    text: Path | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    save_every: int = 100,
) -> Result:
    """Train a 2-block TinyLM for ``steps`` steps, stacked to 4 blocks at 20 % of them; with
    ``checkpoint``, save every ``save_every`` steps and at the end (``resume``: go on from it)."""
    torch.manual_seed(seed)
    raw = (text or ROOT / "README.md").read_bytes()
    data = torch.tensor(list(raw), dtype=torch.long)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    batch, context = 16, 64
    model = TinyLM(context=context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))

    # -- esper_async: the schedule (G_stack: stack the trained blocks x2 at 20 % of the steps) --
    schedule = GrowthSchedule(
        model,
        optimizer,
        stages=[
            GrowthStage([StackBlocks("blocks", factor=2)], at_step=steps // 5, name="2 -> 4 blocks")
        ],
        probe=train_data[: 2 * context].view(2, context),
        lr=GrowthLR(peak=3e-3, total_steps=steps, warmup_steps=steps // 20, min_lr=3e-4),
    )
    start = 0
    if resume and checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        schedule.load_state_dict(saved["schedule"])
        model = schedule.replay()  # the grown structure, before the tensors load
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]

    gen = torch.Generator().manual_seed(seed + start)
    stream = batches(train_data, batch, context, gen)
    losses: list[float] = []
    for step in range(start, steps):
        schedule.maybe_grow(
            step=step, tokens=step * batch * context, loss=losses[-1] if losses else None
        )
        model = schedule.model
        x, y = next(stream)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if checkpoint is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step + 1,
                },
                checkpoint,
            )
        if step % 50 == 0 or step == steps - 1:
            print(
                f"step {step:4d}  loss {losses[-1]:.3f}  depth {len(model.blocks)}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}"
            )

    model.eval()
    with torch.no_grad():
        val = torch.stack(
            [
                val_data[s : s + context + 1]
                for s in range(0, val_data.numel() - context - 1, context)
            ][:64]
        )
        val_loss = F.cross_entropy(model(val[:, :-1]).flatten(0, 1), val[:, 1:].flatten()).item()
    print(f"validation loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.3f} bits)")
    return Result(losses, val_loss, len(model.blocks), schedule.grown_at, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=None, help="a text file (default README.md)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    train(args.steps, args.seed, text=args.text, checkpoint=args.checkpoint, resume=args.resume)


if __name__ == "__main__":
    main()
