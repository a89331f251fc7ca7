"""Shared fixtures of the store tests: a few real kernels, exported once per session."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from esper_async.blueprints import Blueprint, SlotContract, library
from esper_async.kernels import Kernel, export_kernel
from esper_async.store import KernelRequest

#: A small linear contract: exports take about 0.1 s each.
CONTRACT = SlotContract("linear", (8,))


def request_for(blueprint: Blueprint, **optimizer_options: object) -> KernelRequest:
    """The store request of ``blueprint`` on ``CONTRACT`` for this process's torch on CPU."""
    return KernelRequest(
        blueprint,
        CONTRACT,
        torch_version=torch.__version__,
        device_kind="cpu",
        optimizer_options=optimizer_options,
    )


def key_for(blueprint: Blueprint, **optimizer_options: object) -> str:
    """The store key of ``blueprint`` on ``CONTRACT`` (``request_for(...).key``)."""
    return request_for(blueprint, **optimizer_options).key


@pytest.fixture(scope="session")
def kernels() -> list[Kernel]:
    """Six real kernels: three linear blueprints, two seeds each (all artifacts distinct)."""
    blueprints = library("linear")[:3]
    return [export_kernel(bp, CONTRACT, seed=seed) for bp in blueprints for seed in (0, 1)]


@pytest.fixture(scope="session")
def kernels_file(kernels: list[Kernel], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's kernels pickled, for worker processes (so they need not export)."""
    path = tmp_path_factory.mktemp("kernels") / "kernels.pkl"
    path.write_bytes(pickle.dumps(kernels))
    return path
