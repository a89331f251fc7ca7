"""``examples/digits_growth.py`` is the demo written out: its three runs end where
``esper-async demo``'s do (issue 24: it claimed to be the demo and ended elsewhere)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from esper_async.apps.demo import DemoConfig, run_demo

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(static|growth|static_final):\s+test acc ([0-9.]+), (\d+) parameters")


@pytest.mark.slow
def test_the_example_ends_where_the_demo_does(tmp_path: Path) -> None:
    epochs = 4
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits_growth.py"), "--epochs", str(epochs)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    example = {
        m.group(1): (float(m.group(2)), int(m.group(3)))
        for m in map(LINE.match, done.stdout.splitlines())
        if m
    }
    demo = anyio.run(run_demo, DemoConfig(epochs=epochs, seed=0, use_store=False))
    expected = {
        run.label: (round(run.test_acc, 4), run.params)
        for run in (demo.static, demo.growth, demo.static_final)
    }
    assert example == expected
