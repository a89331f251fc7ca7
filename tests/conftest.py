from __future__ import annotations

from collections.abc import Callable, Iterator

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


@pytest.fixture
def tiny_gpt2() -> Callable[[], torch.nn.Module]:
    """Builds a Hugging Face ``GPT2LMHeadModel`` from a tiny config (seeded; nothing is
    downloaded); skips where ``transformers`` is not installed."""
    transformers = pytest.importorskip("transformers")

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
            bos_token_id=0, eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(config)

    return build
