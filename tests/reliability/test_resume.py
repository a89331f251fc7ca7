"""Kill a real training process with SIGKILL mid-run, then resume it from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
import torch
from _resume_child import EAGER, config

from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.control._controller import HeuristicController
from esper_async.reliability import CheckpointStore
from esper_async.seeds import find_slots, wrap
from esper_async.training.trainer import Trainer

HERE = Path(__file__).parent
LIVE = {"training", "blending", "probation", "fossilized"}


def _seeded(payload: dict) -> set[str]:
    slots = json.loads(payload["slots"])
    return {s["state"] for s in slots.values() if s["has_seed"]}


def _wait_for_checkpoint_with_seeds(
    directory: Path, proc: subprocess.Popen, limit_s: float
) -> None:
    deadline = time.monotonic() + limit_s
    store = CheckpointStore(directory)
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the child ended before it could be killed"
        paths = store.paths()
        if paths:
            try:
                payload = store.load(paths[-1])
            except Exception:
                payload = None
            if payload is not None and _seeded(payload) & LIVE and payload["epoch"] >= 4:
                return
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint with a grafted seed in {directory} after {limit_s} s")


@pytest.mark.timeout(240)
def test_sigkill_mid_epoch_then_resume_restores_structure_and_statistics(tmp_path: Path) -> None:
    run_dir, store_dir = tmp_path / "run", tmp_path / "store"
    ckpt_dir = run_dir / "checkpoints" / "growth"
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    log = tmp_path / "child.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_resume_child.py"), str(run_dir), str(store_dir), "16"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            _wait_for_checkpoint_with_seeds(ckpt_dir, proc, limit_s=180)
            time.sleep(0.05)  # into the next epoch
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]

    payload = CheckpointStore(ckpt_dir).load()
    saved_slots = json.loads(payload["slots"])
    cfg = config(str(run_dir), str(store_dir), 16)

    async def resume() -> None:
        torch.manual_seed(cfg.seed)
        data = digits_loaders(batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit)
        model = DigitsHost()
        wrap(model, cfg.slots, example_input=torch.zeros(2, 1, 8, 8))
        controller = HeuristicController(EAGER, seed=cfg.seed)
        trainer = Trainer(model, seed=cfg.seed, controller=controller)
        restored = trainer.restore(ckpt_dir)
        # Structure: every slot's lifecycle, counters, history, kernel and blend position.
        for name, slot in find_slots(model).items():
            saved = saved_slots[name]
            assert slot.state.value == saved["state"]
            assert slot.kernel_id == saved["kernel_id"]
            assert (slot.lifecycle.epochs_in_state, slot.lifecycle.steps_in_state) == (
                saved["epochs_in_state"], saved["steps_in_state"])
            assert [[a.value, b.value, r] for a, b, r in slot.lifecycle.history] == saved["history"]
            assert slot.alpha == saved["alpha"]
            assert (slot.seed is not None) == saved["has_seed"]
        # Parameters, selector/tracker statistics, counters.
        state = model.state_dict()
        assert state.keys() == payload["model"].keys()
        assert all(torch.equal(state[k], payload["model"][k]) for k in state)
        assert controller.state_dict() == payload["stateful"]["controller"]
        assert (trainer.step, restored.epoch) == (payload["step"], payload["epoch"])
        assert trainer.compiler.compiles == 0  # seeds came from the checkpoint's bytes
        # Training continues from there.
        fit = await trainer.fit(
            data.train, data.val, epochs=payload["epoch"] + 2, checkpoint_dir=ckpt_dir,
            resume=True,
        )
        assert len(fit.history) == payload["epoch"] + 2
        assert trainer.step > payload["step"]
        assert CheckpointStore(ckpt_dir).load()["epoch"] == payload["epoch"] + 2

    anyio.run(resume)

    # The command line resumes it too, to the end of the run (a store outside the run directory
    # is named again on the command line: demo.json may only name one inside it).
    done = subprocess.run(
        [sys.executable, "-m", "esper_async.apps.cli", "demo", "--resume", str(run_dir),
         "--store", str(store_dir)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "growth vs static" in done.stdout
    assert CheckpointStore(ckpt_dir).load()["epoch"] == 16
