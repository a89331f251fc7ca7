"""Compile workers that die starting, or mid-call: typed errors that say why (issues 24 and 25)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faulty_families  # noqa: F401  (registers the test families in this process too)
import pytest

from esper_async import Blueprint, SlotContract, SlotKind
from esper_async.compiler import (
    BlueprintCompiler,
    OptimizerOptions,
    ProcessPool,
    WorkerStartError,
)
from esper_async.errors import CompileError, EsperError

ROOT = Path(__file__).resolve().parents[2]

#: A user's script as a new user writes it: training at the top level, no `__main__` guard.
NO_GUARD = """\
import anyio, torch
from torch import nn
import esper_async as ea

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
ea.wrap(model, ["0"], example_input=torch.zeros(2, 4))
x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
trainer = ea.Trainer(model, controller=ea.HeuristicController(ea.ControllerConfig.eager()))
result = anyio.run(lambda: trainer.fit([(x, y)] * 2, [(x, y)], epochs=3))
print("trained", len(result.events), "events")
"""


@pytest.mark.slow
def test_a_script_without_the_main_guard_fails_with_the_fix(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(NO_GUARD)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0, done.stdout
    assert "trained" not in done.stdout
    lines = done.stderr.strip().splitlines()
    error = next(line for line in reversed(lines) if line.startswith("esper_async."))
    # Found before any worker is spawned: the run ends at its first compile, however short.
    assert error.startswith(
        "esper_async.compiler._pool.WorkerStartError: compile workers not started"
    )
    assert f'{script} has no `if __name__ == "__main__":` guard' in error
    assert 'if __name__ == "__main__":\n        anyio.run(main)' in done.stderr


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_worker_whose_import_fails_is_a_start_error_naming_it() -> None:
    async with ProcessPool(imports=["esper_async_no_such_module"], prestart=False) as pool:
        with pytest.raises(WorkerStartError, match="esper_async_no_such_module") as caught:
            await pool.run(os.getpid)
    assert isinstance(caught.value, EsperError)
    assert "ModuleNotFoundError" in str(caught.value)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_killed_worker_is_reported_with_its_signal_not_code_none() -> None:
    compiler = BlueprintCompiler(
        workers=1,
        imports=["faulty_families"],
        options=OptimizerOptions(repeats=3, batch=8),
        retries=0,
    )
    async with compiler as c:
        with pytest.raises(CompileError) as caught:
            await c.compile(Blueprint("test_kills_worker"), SlotContract(SlotKind.LINEAR, (8,)))
    assert "was killed by signal SIGKILL" in str(caught.value)
    assert "None" not in str(caught.value)


def _main_module(monkeypatch: pytest.MonkeyPatch, path: Path, spec_name: str | None) -> None:
    """Make ``path`` the ``__main__`` module, as ``python path`` (or ``-m spec_name``) would."""
    import types

    main = types.ModuleType("__main__")
    main.__file__ = str(path)
    main.__spec__ = None if spec_name is None else types.SimpleNamespace(name=spec_name)
    monkeypatch.setitem(sys.modules, "__main__", main)


@pytest.mark.parametrize(
    ("name", "source", "spec_name", "refused"),
    [
        ("train.py", "import anyio\nanyio.run(main)\n", None, True),
        ("train.py", 'if __name__ == "__main__":\n    anyio.run(main)\n', None, False),
        ("train.py", "if '__main__' == __name__:\n    anyio.run(main)\n", None, False),
        (
            "train.py",
            "import multiprocessing as mp\nif mp.parent_process() is None:\n    go()\n",
            None,
            False,
        ),
        ("train.py", "anyio.run(main)\n", "train", True),  # python -m train: re-imported
        ("__main__.py", "anyio.run(main)\n", "pkg.__main__", False),  # python -m pkg: not
        ("__main__.py", "anyio.run(main)\n", "__main__", False),  # python dir/: not re-run
        ("train.py", "def broken(:\n", None, False),  # cannot parse: no claim
        ("train.pyc", "", None, False),  # not a source file: no claim
    ],
)
def test_the_guard_check_refuses_only_scripts_spawn_would_rerun_unguarded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    source: str,
    spec_name: str | None,
    refused: bool,
) -> None:
    from esper_async.compiler._pool import _unguarded_main

    script = tmp_path / name
    script.write_text(source)
    _main_module(monkeypatch, script, spec_name)
    assert _unguarded_main() == (str(script) if refused else None)
