"""A seed's eager module and its validated kernel are interchangeable (``graft="eager"``)."""

from __future__ import annotations

import pytest
import torch

from esper_async.blueprints import Blueprint, SlotContract, library
from esper_async.errors import SeedRuntimeError
from esper_async.kernels import export_kernel, load_kernel
from esper_async.seeds import adopt_parameters, eager_seed

CONTRACTS = {
    "conv": SlotContract("conv", (4, 5, 5)),
    "linear": SlotContract("linear", (12,)),
    "token": SlotContract("token", (32,)),
}


def _train(module: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    (module(x) ** 2).sum().backward()
    opt.step()


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blueprint", library(), ids=lambda bp: bp.name)
def test_the_kernel_takes_over_mid_training_bit_for_bit(blueprint: Blueprint, device: str) -> None:
    contract = CONTRACTS[blueprint.slot_kind.value]
    kernel = load_kernel(export_kernel(blueprint, contract, seed=5), device=device)
    alone = eager_seed(blueprint, contract, seed=5, device=device)
    swapped = eager_seed(blueprint, contract, seed=5, device=device)
    opt_alone = torch.optim.Adam(alone.parameters(), lr=1e-2)
    opt_swapped = torch.optim.Adam(swapped.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        x = torch.randn(contract.batch_shape(3, 4), generator=gen).to(device)
        if step == 3:  # the kernel arrives: it runs on the eager module's parameters from here
            adopt_parameters(kernel, swapped)
        _train(alone, opt_alone, x)
        _train(kernel if step >= 3 else swapped, opt_swapped, x)
    # Same weights and the same Adam moments as a module that was never replaced.
    for a, b in zip(alone.parameters(), swapped.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt_alone.state[a]["exp_avg_sq"], opt_swapped.state[b]["exp_avg_sq"])
    assert all(p is q for p, q in zip(kernel.parameters(), swapped.parameters(), strict=True))


def test_a_kernel_of_another_layout_is_refused_before_anything_changes() -> None:
    contract = CONTRACTS["linear"]
    kernel = load_kernel(export_kernel(Blueprint("mlp", {"hidden_mult": 2}), contract, seed=1))
    other = eager_seed(Blueprint("mlp", {"hidden_mult": 4}), contract, seed=1, device="cpu")
    before = [p.clone() for p in kernel.parameters()]
    with pytest.raises(SeedRuntimeError, match="does not lay out its parameters"):
        adopt_parameters(kernel, other, slot="fc1")
    assert all(torch.equal(a, b) for a, b in zip(before, kernel.parameters(), strict=True))
