"""A hand-written loop with a Grower, killed with SIGKILL between epochs, resumes exactly: its
checkpoint is ``grower.state_dict()``, the one state path (model, optimizer, seeds and their
kernels, controller, governor, breakers, counters, record, RNGs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
CHILD = HERE / "_own_loop_child.py"
EPOCHS = 5
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(
        p for p in (str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH")) if p
    ),
}


def _run(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(CHILD), *args], env=ENV, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_own_loop_killed_between_epochs_resumes_exactly(tmp_path: Path) -> None:
    _run(str(tmp_path / "ref"), str(tmp_path / "ref.pt"), str(EPOCHS))
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            str(killed_dir),
            str(tmp_path / "never.pt"),
            str(EPOCHS),
            "--hang-after",
            "2",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "saved 2":
                break
        else:
            raise AssertionError("the child ended before its checkpoint of epoch 2")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.pt").exists()

    _run(str(killed_dir), str(tmp_path / "resumed.pt"), str(EPOCHS), "--resume")
    ref = torch.load(tmp_path / "ref.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert any(target == "fossilized" or target == "blending" for *_, target in ref["events"])
    assert resumed["step"] == ref["step"]
    assert resumed["val"] == ref["val"] and len(ref["val"]) == EPOCHS
    assert resumed["events"] == ref["events"]
    assert ref["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(ref["model"][k], resumed["model"][k]) for k in ref["model"])
