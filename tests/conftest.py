from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
import torch

# Two cores on CI: keep torch from oversubscribing them when tests run beside worker processes.
torch.set_num_threads(1)


@pytest.fixture
def deterministic_cudnn() -> Iterator[None]:
    """cuDNN picks deterministic algorithms for the test (bitwise comparisons on a GPU)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Each test starts from the logging configuration the session had: a test that configures
    logging (the CLI's ``main`` does) must not leave later tests writing to its captured stream."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
