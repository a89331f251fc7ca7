"""A tiny wrapped host with real kernels grafted into it (no worker processes)."""

from __future__ import annotations

import torch
from torch import nn

from esper_async import Blueprint, Kernel, export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap
from esper_async.training._optim import add_module_params, remove_module_params

FEATURES = 8
_KERNELS: dict[tuple[str, int], Kernel] = {}


def host() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, FEATURES), nn.ReLU(), nn.Linear(FEATURES, FEATURES), nn.ReLU(),
        nn.Linear(FEATURES, 3),
    )
    wrap(model, ["0", "2"], example_input=torch.zeros(2, 4))
    return model


def kernel(rank: int, slot: SeedSlot) -> Kernel:
    key = (slot.slot_name, rank)
    if key not in _KERNELS:
        assert slot.contract is not None
        _KERNELS[key] = export_kernel(Blueprint("low_rank", {"rank": rank}), slot.contract)
    return _KERNELS[key]


def grow(model: nn.Module, opt: torch.optim.Optimizer, name: str, rank: int) -> Kernel:
    """Germinate and graft a low-rank seed in slot ``name``, as the trainer does."""
    slot = find_slots(model)[name]
    k = kernel(rank, slot)
    slot.germinate(k.blueprint, "test")
    module = load_kernel(k)
    slot.graft(module, k.kernel_id)
    add_module_params(opt, module)
    return k


def cull(model: nn.Module, opt: torch.optim.Optimizer, name: str) -> None:
    slot = find_slots(model)[name]
    seed = slot.cull("test")
    assert seed is not None
    remove_module_params(opt, seed)
    slot.embargo("test")


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for slot in find_slots(model).values():
            slot.on_step()


def structure(model: nn.Module) -> dict[str, tuple[str, str | None, int, int, float]]:
    return {
        n: (s.state.value, s.kernel_id, s.lifecycle.epochs_in_state, s.lifecycle.steps_in_state,
            s.alpha)
        for n, s in find_slots(model).items()
    }


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = opt.state_dict()["state"]
    return [t for i in sorted(state) for t in state[i].values() if isinstance(t, torch.Tensor)]


__all__ = ["SeedState"]
