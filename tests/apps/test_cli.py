"""The ``esper-async demo`` command line: options, and clear refusals of bad ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
import torch

from esper_async.apps.cli import main
from esper_async.apps.demo import DemoConfig, run_demo
from esper_async.control._controller import ControllerConfig
from esper_async.seeds import SeedState

EAGER = ControllerConfig.eager()


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    """``main`` configures structlog to print to the stream that is ``sys.stderr`` now (pytest's
    capture, closed after the test): put the configuration back for the tests that follow."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_an_unknown_device_is_refused_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "bogus", "--epochs", "1", "--no-store"]) == 2
    assert "bad --device 'bogus'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_without_cuda_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cuda", "--epochs", "1", "--no-store"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_auto_device_resolves_to_what_is_there() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert DemoConfig(device="auto").resolved_device().type == expected


def test_demo_with_surgery_widens_the_slots_whose_seeds_fossilized(tmp_path: Path) -> None:
    config = DemoConfig(epochs=10, seed=0, limit=900, controller=EAGER, surgery=True,
                        store=str(tmp_path / "kernels"))
    result = anyio.run(run_demo, config)
    fossils = [e.slot for e in result.growth.fit.events
               if e.target == SeedState.FOSSILIZED.value]
    assert fossils, "no seed fossilized, so nothing could be widened"
    widened = [op["target"] for op in result.growth.surgeries]
    assert widened and set(widened) <= set(fossils)
    assert all(op["op"] == "widen_slot" for op in result.growth.surgeries)
    assert result.static.surgeries == ()
    assert 0.0 <= result.growth.test_acc <= 1.0
