"""The ``esper-async demo`` command line: options, and clear refusals of bad ones."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
import torch

from esper_async.apps.cli import build_parser, format_surgery, main, store_lookups
from esper_async.apps.demo import DemoConfig, run_demo
from esper_async.control._controller import ControllerConfig
from esper_async.seeds import SeedState
from esper_async.telemetry import SPAN_RUN, SPAN_STORE_GET, Telemetry, TelemetryConfig

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


# --- the command line itself ---------------------------------------------------------------

CLI = [sys.executable, "-m", "esper_async.apps.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert re.fullmatch(r"esper-async \S+.*\n", capsys.readouterr().out)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help() -> None:
    missing = [
        f"{prog} {'/'.join(a.option_strings) or a.dest}"
        for prog, parser in _parsers(build_parser())
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction) and not a.help
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["demo"], False),
        (["-v", "demo"], True),
        (["demo", "-v"], True),
        (["demo", "--verbose", "--epochs", "3"], True),
        (["trace", "RUN", "-v"], True),
        (["store", "-v", "ls"], True),
    ],
)
def test_global_flags_are_taken_before_or_after_the_command(
    argv: list[str], verbose: bool
) -> None:
    assert build_parser().parse_args(argv).verbose is verbose


def test_store_refuses_a_missing_path_unless_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "nonexistent"
    assert main(["store", "--path", str(target), "ls"]) == 2
    err = capsys.readouterr().err
    assert f"no kernel store at {target}" in err and "--create" in err
    assert not target.exists()
    assert main(["store", "--path", str(target), "--create", "stats"]) == 0
    assert target.is_dir()
    assert main(["store", "--path", str(target), "ls"]) == 0


def test_surgery_results_read_as_sentences() -> None:
    op = {"op": "widen_slot", "target": "conv1", "width": 6, "seed": 6}
    assert format_surgery(op) == "widen_slot conv1 (width 6, seed 6)"
    assert format_surgery({"op": "skip"}) == "skip"


def test_store_counts_come_from_the_run_trace(tmp_path: Path) -> None:
    assert store_lookups(tmp_path) == (0, 0)
    config = TelemetryConfig(otlp=False, processor="simple")
    with Telemetry.create(run_dir=tmp_path, config=config, env={}) as tel:
        for hit in (True, False, True):
            with tel.span(SPAN_STORE_GET, store__hit=hit):
                pass
    assert store_lookups(tmp_path) == (2, 1)


def test_trace_into_a_closed_pipe_ends_without_a_traceback(tmp_path: Path) -> None:
    config = TelemetryConfig(otlp=False, step_every=1)
    with Telemetry.create(run_dir=tmp_path, config=config, env={}) as tel:
        with tel.span(SPAN_RUN):
            for step in range(6000):  # some 600 kB of tree: far more than a pipe holds
                with tel.step_span(step, epoch=0):
                    pass
    with subprocess.Popen(
        [*CLI, "trace", str(tmp_path), "--max-siblings", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # what `| head -1` does
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=60)
    assert first.startswith(b"trace "), (first, err[-2000:])
    assert code == 141, err[-2000:]
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.timeout(240)
def test_sigterm_stops_the_demo_cleanly(tmp_path: Path) -> None:
    with subprocess.Popen(
        [*CLI, "demo", "-v", "--epochs", "40", "--no-store", "--run-dir", str(tmp_path / "r")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, text=True,
    ) as proc:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # wait until training runs, then stop it
            lines.append(line)
            if " epoch " in line and "val_loss" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    err = "".join(lines) + rest
    assert code == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.timeout(240)
def test_resume_says_where_it_resumed_and_counts_no_store_kernels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "r"
    assert main(["demo", "--epochs", "2", "--no-store", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "compiled (no store)" in out and "loaded from the store" not in out
    spans = {p.name: p.stat().st_size for p in run.glob("spans-*.jsonl")}
    # A finished run: its results again, and nothing trained (static_final included).
    assert main(["demo", "--resume", str(run)]) == 0
    captured = capsys.readouterr()
    assert "the demo had finished all 2 epochs of its three runs; nothing to resume" in (
        captured.out
    )
    assert "compiled (no store)" in captured.out and "static_final" in captured.out
    assert "epoch" not in captured.err and "resumed" not in captured.err
    assert {p.name: p.stat().st_size for p in run.glob("spans-*.jsonl")} == spans  # no spans
    config = json.loads((run / "demo.json").read_text())
    (run / "demo.json").write_text(json.dumps({**config, "epochs": 3}))
    assert main(["demo", "--resume", str(run)]) == 0
    captured = capsys.readouterr()
    err = captured.err
    assert "static: resumed from its checkpoint after epoch 2 of 3, continuing at epoch 3" in err
    assert "growth: resumed from its checkpoint after epoch 2 of 3" in err
    assert "static_final: trains again from scratch (it keeps no checkpoint)" in err
    assert "static_final: resumed" not in err
    assert "compiled (no store)" in captured.out
