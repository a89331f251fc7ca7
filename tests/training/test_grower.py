"""The Grower in a hand-written loop, reproducible growth, settling seeds, and a quiet library.

These start compile worker processes (or a Python subprocess): marked slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.compiler import OptimizerOptions

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = pytest.mark.slow


def test_the_own_loop_example_grows_seeds() -> None:
    import own_loop

    result = anyio.run(own_loop.train, 4, 0, 300)
    targets = [e.target for e in result.events]
    assert "germinated" in targets and "training" in targets and "blending" in targets
    assert len(result.history) == 4
    # 4 short epochs (3 steps each) leave accuracy near chance, but the loop does train.
    assert result.history[-1].val_loss < result.history[0].val_loss
    assert all(r.metrics["accuracy"] == r.val_acc for r in result.history)
    assert all(r.steps > 0 and r.train_loss is not None for r in result.history)


async def _grown(
    seed: int, settle: ea.training.trainer.Settle = "keep", graft: str = "auto", epochs: int = 5
) -> tuple[ea.FitResult, dict[str, torch.Tensor]]:
    torch.manual_seed(123)  # the host's init: the same in both runs
    data = digits_loaders(seed=0, limit=300)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    # The optimizer times each kernel's execution forms and keeps the fastest: on a busy machine
    # conv kernels may run channels-last in one run and not the other, and the two differ in the
    # last bits of a gradient. A bitwise-reproducible run fixes the form.
    compiler = ea.BlueprintCompiler(options=OptimizerOptions(forms=("export",)))
    trainer = ea.Trainer(
        model, seed=seed, compiler=compiler, graft=graft,  # type: ignore[arg-type]
        controller=ea.HeuristicController(ea.ControllerConfig.eager(), seed=seed),
    )
    result = await trainer.fit(data.train, data.val, epochs=epochs, settle=settle)
    return result, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("graft", "grafted"),
    [
        # the default: seeds train at once as their blueprint's eager module
        pytest.param(
            "auto", "started as its blueprint's eager module; kernel compiling", id="auto"
        ),
        pytest.param("epoch", "kernel ready", id="epoch"),  # kernels waited for at the boundary
    ],
)
def test_a_growth_run_is_reproducible_from_its_seed(graft: str, grafted: str) -> None:
    a, weights_a = anyio.run(_grown, 7, "keep", graft)
    b, weights_b = anyio.run(_grown, 7, "keep", graft)
    assert a.events and [e.target for e in a.events].count("training") >= 1
    assert a.events == b.events
    assert {e.reason for e in a.events} >= {grafted}
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_settle_cull_leaves_no_live_seed() -> None:
    result, _ = anyio.run(_grown, 0, "cull", "auto", 4)  # ends with a seed blending
    settled = [e for e in result.events if e.reason.startswith("settled at the end")]
    assert settled, "no seed was alive at the end: the run is too short to test settling"
    last_state = {e.slot: e.target for e in result.events}
    assert set(last_state.values()) <= {"embargoed", "fossilized", "dormant"}


_QUIET = """
import anyio, torch
from torch import nn
import esper_async as ea
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
ea.wrap(model, ["0"], example_input=torch.zeros(2, 4))
x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
trainer = ea.Trainer(model, controller=ea.HeuristicController(ea.ControllerConfig.eager()),
                     progress="off")
result = anyio.run(lambda: trainer.fit([(x, y)] * 2, [(x, y)], epochs=3))
assert result.events, "no growth happened: the test would not show a quiet growth run"
"""


def test_a_growth_run_prints_nothing() -> None:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _QUIET], capture_output=True, text=True, env=env, timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "" and done.stderr == ""
