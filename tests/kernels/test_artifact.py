from __future__ import annotations

import dataclasses

import pytest
import torch

from esper_async.blueprints import Blueprint, SlotContract, SlotKind, build
from esper_async.errors import KernelIntegrityError
from esper_async.kernels import Kernel, KernelMetadata, export_kernel, load_kernel

CONTRACT = SlotContract(SlotKind.CONV, (4, 6, 6))
BP = Blueprint("residual_conv")


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    return export_kernel(BP, CONTRACT, seed=1)


def test_round_trip_matches_eager_for_any_batch_size(kernel: Kernel) -> None:
    eager = build(BP, CONTRACT, seed=1)
    module = load_kernel(kernel)
    # Give the zero-initialised last layer weights so the comparison is not trivially 0 == 0.
    with torch.no_grad():
        for p_eager, p_kernel in zip(eager.parameters(), module.parameters(), strict=True):
            p_eager.normal_()
            p_kernel.copy_(p_eager)
    for batch in (1, 2, 7):
        h = torch.randn(batch, *CONTRACT.shape)
        torch.testing.assert_close(module(h), eager(h))


def test_reloaded_kernel_trains(kernel: Kernel) -> None:
    module = load_kernel(kernel)
    params = list(module.parameters())
    assert params and all(p.requires_grad for p in params)
    h = torch.randn(3, *CONTRACT.shape)
    (module(h) * torch.randn_like(h)).sum().backward()
    # The last layer starts at zero, so its gradient is the one that must be non-zero at once.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_metadata_describes_the_kernel(kernel: Kernel) -> None:
    meta = kernel.metadata
    assert meta.input_shape == meta.output_shape == CONTRACT.shape
    assert meta.param_count == sum(p.numel() for p in build(BP, CONTRACT).parameters())
    assert meta.torch_version == torch.__version__
    assert kernel.blueprint == BP and kernel.contract == CONTRACT
    assert KernelMetadata.from_json(meta.to_json()) == meta


def test_tampered_bytes_are_refused(kernel: Kernel) -> None:
    flipped = bytearray(kernel.artifact)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(KernelIntegrityError, match="refusing to load"):
        load_kernel(dataclasses.replace(kernel, artifact=bytes(flipped)))


def test_train_and_eval_do_not_break_the_exported_graph(kernel: Kernel) -> None:
    parent = torch.nn.Sequential(load_kernel(kernel))
    parent.eval()
    parent.train()
    assert parent[0].training
