"""Tiny models and exact-state fingerprints shared by the surgery tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class Block(nn.Module):
    """A ResNet-style basic block (traceable), with a projected shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.short = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.short(x))


class TinyNet(nn.Module):
    """3x8x8 images → 4 classes: a conv stem, two blocks, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, 1, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer1 = nn.Sequential(Block(6, 6), Block(6, 8, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layer1(self.stem(x)))
        return self.head(torch.flatten(x, 1))


def tiny_mlp() -> nn.Sequential:
    """8 → 16 → 16 → 4 with ReLUs."""
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def images(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: the class is the quadrant of the brightest pixel."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    flat = x.sum(1).flatten(1).argmax(1)
    row, col = flat // 8, flat % 8
    return x, (row >= 4).long() * 2 + (col >= 4).long()


def vectors(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy regression-as-classification task for the MLP."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=generator)
    return x, (x[:, :4].argmax(1))


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
) -> list[float]:
    """Full-batch training steps; returns the losses."""
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(data[0]), data[1])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    return losses


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Everything rollback must restore, copied: tensors, identities, structure, optimizer state."""
    result: dict[str, Any] = {
        "params": [
            (n, id(p), p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
        ],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "modules": [(n, type(m), id(m), m.training) for n, m in model.named_modules()],
        "repr": repr(model),
    }
    if optimizer is not None:
        result["groups"] = [
            ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ]
        result["optimizer"] = copy.deepcopy(optimizer.state_dict())
        result["state_ids"] = sorted(id(p) for p in optimizer.state)
    return result


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bitwise equality of two fingerprints."""
    assert before["repr"] == after["repr"]
    assert before["modules"] == after["modules"]
    assert [(n, i, g) for n, i, _, g in before["params"]] == [
        (n, i, g) for n, i, _, g in after["params"]
    ]
    for (_, _, a, _), (_, _, b, _) in zip(before["params"], after["params"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert [n for n, _ in before["buffers"]] == [n for n, _ in after["buffers"]]
    for (_, a), (_, b) in zip(before["buffers"], after["buffers"], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    if "optimizer" in before:
        assert before["groups"] == after["groups"]
        assert before["state_ids"] == after["state_ids"]
        _assert_equal_tree(before["optimizer"], after["optimizer"])


def _assert_equal_tree(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_equal_tree(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal_tree(x, y)
    else:
        assert a == b


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode output, restoring its train flags after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model(x)
    finally:
        for m, flag in flags:
            m.training = flag
