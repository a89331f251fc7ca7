"""The README's runnable blocks run: each is extracted, shortened and run as a script.

Shortened means ``epochs=40`` → a few epochs with the eager controller
(:meth:`~esper_async.ControllerConfig.eager`), so that seeds grow, blend and are judged within
them; everything else is the README's text. Each replacement must match exactly once, so a
README edit that moves them away fails here rather than running the long version.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
EAGER = "ea.Trainer(model, controller=ea.HeuristicController(ea.ControllerConfig.eager()))"
EVENT = re.compile(r"^\d+ \w+ \w+ -> \w+ .+$")


def block(heading: str) -> str:
    """The first ``python`` block of the README section under ``## heading``."""
    text = README.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    found = re.search(r"```python\n(.*?)```", text[start:end], re.S)
    assert found, f"README section {heading!r} has no python block"
    return found.group(1)


def shortened(code: str, epochs: int) -> str:
    for old, new in (("epochs=40", f"epochs={epochs}"), ("ea.Trainer(model)", EAGER)):
        assert code.count(old) == 1, f"expected {old!r} once in the README block"
        code = code.replace(old, new)
    return code


def run(code: str, tmp_path: Path) -> list[str]:
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


@pytest.mark.slow
def test_the_api_in_one_screen_runs_and_prints_its_growth_events(tmp_path: Path) -> None:
    lines = run(shortened(block("The API in one screen"), epochs=4), tmp_path)
    assert lines, "the block printed no growth events"
    assert all(EVENT.match(line) for line in lines), lines
    assert any("dormant -> germinated" in line for line in lines), lines


@pytest.mark.slow
def test_leaving_the_framework_runs_and_writes_both_files(tmp_path: Path) -> None:
    lines = run(shortened(block("Leaving the framework"), epochs=5), tmp_path)
    assert len(lines) == 2, lines
    fossilized = re.fullmatch(r"fossilized: \[(.*)\]", lines[0])
    assert fossilized, lines
    exported = re.fullmatch(r"exported (\d+) parameters; max \|diff\| (\S+)", lines[1])
    assert exported, lines
    assert float(exported.group(2)) <= 1e-6
    assert (tmp_path / "digits.pt").stat().st_size > 0
    assert (tmp_path / "digits.pt2").stat().st_size > 0
    # The DigitsHost alone has 798 parameters; each fossilized seed adds its own.
    params = int(exported.group(1))
    assert (params > 798) == bool(fossilized.group(1)), lines


def own_loop_block() -> str:
    """The README's own-loop example (the python block after "Growth in your own loop")."""
    text = README.read_text()
    start = text.index("**Growth in your own loop.**")
    found = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert found, "the own-loop paragraph has no python block"
    return found.group(1)


@pytest.mark.slow
def test_the_own_loop_example_trains_in_train_mode_and_checkpoints(tmp_path: Path) -> None:
    code = own_loop_block()
    assert code.count("range(12)") == 1
    # As written, but 3 epochs, and a check that every training step runs in train mode.
    code = code.replace("range(12)", "range(3)").replace(
        "            for x, y in data.train:\n",
        "            for x, y in data.train:\n                assert model.training\n",
    )
    lines = run(code, tmp_path)
    assert len(lines) == 3, lines
    assert [int(line.split()[0]) for line in lines] == [0, 1, 2]
    payload = torch.load(tmp_path / "grower.pt", weights_only=False)
    assert payload["epoch"] == 3 and payload["step"] > 0
