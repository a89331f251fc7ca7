"""fit's progress display: a live bar on a terminal, one line per epoch otherwise, or off."""

from __future__ import annotations

import io
import os
import pty
import re
import sys
import threading
from pathlib import Path

import anyio
import pytest
import torch
from rich.console import Console
from torch import nn

from esper_async.control import EpochReport
from esper_async.errors import TelemetryConfigError
from esper_async.training import FitResult, Trainer
from esper_async.training._progress import REFRESH_S, FitProgress

EPOCHS = 3


def _fit(progress: object = "auto", epochs: int = EPOCHS) -> list[EpochReport]:
    """A tiny static fit (no compiles); returns its reports."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    kwargs = {} if progress == "default" else {"progress": progress}
    trainer = Trainer(model, grow=False, loop_lag_interval_s=None, **kwargs)  # type: ignore[arg-type]
    reports: list[EpochReport] = []

    def on_epoch(report: EpochReport, _: FitResult) -> None:
        reports.append(report)

    anyio.run(lambda: trainer.fit([(x, y)] * 4, [(x, y)], epochs=epochs, on_epoch=on_epoch))
    return reports


@pytest.mark.parametrize(
    "mode", [pytest.param("lines", id="lines"), pytest.param("default", id="auto-not-a-terminal")]
)
def test_without_a_terminal_fit_writes_one_line_per_epoch_to_stderr(
    mode: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # set by some CI services: still not a terminal
    reports = _fit(mode)
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == EPOCHS, err
    for line, report in zip(lines, reports, strict=True):
        assert line.startswith(f"epoch {report.epoch + 1}/{EPOCHS}  ")
        assert f"val loss {report.val_loss:.4f}" in line
        assert f"accuracy {report.metrics['accuracy']:.4f}" in line
        assert "params 67" in line
        assert "\x1b" not in line  # plain text: no colour codes in a log file


@pytest.mark.parametrize("mode", [pytest.param("off", id="off"), pytest.param(False, id="False")])
def test_progress_off_writes_nothing(mode: object, capfd: pytest.CaptureFixture[str]) -> None:
    _fit(mode)
    assert capfd.readouterr() == ("", "")


def test_an_unknown_progress_mode_is_refused() -> None:
    with pytest.raises(TelemetryConfigError, match=r"'auto'.*'bar', 'lines' or 'off'"):
        Trainer(nn.Linear(2, 2), grow=False, progress="verbose")  # type: ignore[arg-type]


def test_on_a_terminal_fit_draws_a_live_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr is a pseudo-terminal: the default mode draws rich's bar and the epoch lines."""
    master, slave = pty.openpty()
    received = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the slave side was closed
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    terminal = open(slave, "w", encoding="utf-8", closefd=True)  # closed below
    try:
        monkeypatch.setenv("TERM", "xterm-256color")
        for name in ("NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "FORCE_COLOR"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(sys, "stderr", terminal)
        assert sys.stderr.isatty()
        reports = _fit("default")
    finally:
        monkeypatch.undo()
        terminal.close()
        reader.join(timeout=10)
        os.close(master)
    text = received.decode("utf-8", errors="replace")
    assert "\x1b[?25l" in text  # rich's live display hid the cursor to redraw in place
    assert "━" in text  # the bar
    assert f"{4 * EPOCHS}/{4 * EPOCHS}" in text  # every step counted
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    for report in reports:
        assert f"epoch {report.epoch + 1}/{EPOCHS}  train loss" in plain
        assert f"val loss {report.val_loss:.4f}" in plain


def test_the_bar_redraws_at_most_every_refresh_interval() -> None:
    now = [0.0]
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with FitProgress(
        "bar", epochs=2, steps_per_epoch=10, console=console, clock=lambda: now[0]
    ) as progress:
        assert progress.mode == "bar"
        drawn = out.getvalue()
        for _ in range(5):  # no time passes: no redraw
            progress.step(0.5)
        assert out.getvalue() == drawn
        now[0] += REFRESH_S
        progress.step(0.25)  # the running loss of the six steps
        assert "6/20" in out.getvalue() and "loss 0.4583" in out.getvalue()
    assert out.getvalue().endswith("\x1b[?25h")  # closed: the cursor is shown again


def test_auto_is_a_bar_only_on_a_terminal() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    assert FitProgress("auto", epochs=1, console=terminal).mode == "bar"
    plain = Console(file=io.StringIO(), force_terminal=False)
    assert FitProgress("auto", epochs=1, console=plain).mode == "lines"


def test_a_growth_line_names_the_transitions() -> None:
    from esper_async.training import GrowthEvent

    out = io.StringIO()
    progress = FitProgress("lines", epochs=2, console=Console(file=out, force_terminal=False))
    report = EpochReport(epoch=0, train_loss=0.5, val_loss=0.25, steps=4)
    events = [
        GrowthEvent(0, 4, "conv1", "dormant", "germinated", "why"),
        GrowthEvent(0, 4, "conv2", "training", "culled", "why not"),
    ]
    progress.epoch(report, events, 100)
    progress.epoch(EpochReport(epoch=1, train_loss=0.4, val_loss=0.2, steps=4), events, 100)
    first, second = out.getvalue().splitlines()
    assert first.endswith("growth: conv1 germinated, conv2 culled")
    assert "growth" not in second  # already shown


class _FossilizeOnProbation:
    """Fossilizes every seed on probation and decides nothing else."""

    def decide(self, report: EpochReport, history: object, slots: dict) -> list:
        from esper_async.control import Fossilize
        from esper_async.seeds import SeedState

        return [
            Fossilize(name, "helps: kept by the test controller")
            for name, s in slots.items()
            if s.state is SeedState.PROBATION
        ]


def test_a_growth_fit_shows_its_events_in_the_lines_and_the_loggers(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A real fit whose seed is fossilized after epoch 0: the epoch line names it, and the
    trainer hands it to an event logger (TensorBoard's text, read back)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from esper_async.apps.data import digits_loaders
    from esper_async.apps.demo import DigitsHost
    from esper_async.blueprints import Blueprint
    from esper_async.kernels import export_kernel, load_kernel
    from esper_async.seeds import wrap
    from esper_async.telemetry import TensorBoardLogger

    torch.manual_seed(0)
    model = DigitsHost()
    slot = wrap(model, ["conv1"], example_input=torch.zeros(2, 1, 8, 8))["conv1"]
    assert slot.contract is not None
    kernel = export_kernel(Blueprint("bottleneck"), slot.contract, seed=0)
    slot.germinate(kernel.blueprint)
    slot.graft(load_kernel(kernel), kernel.kernel_id)
    slot.start_blending(1)
    slot.on_step()  # α = 1: probation
    data = digits_loaders(batch_size=64, seed=0, limit=200)
    trainer = Trainer(
        model,
        seed=0,
        controller=_FossilizeOnProbation(),
        progress="lines",
        loggers=[TensorBoardLogger(tmp_path / "tb")],
        loop_lag_interval_s=None,
    )
    trainer.kernels[kernel.kernel_id] = kernel
    result = anyio.run(lambda: trainer.fit(data.train, data.val, epochs=2))
    (event,) = [e for e in result.events if e.target == "fossilized"]
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("growth: conv1 fossilized") and "growth" not in lines[1]
    board = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    board.Reload()
    texts = [
        (t.step, t.tensor_proto.string_val[0].decode())
        for t in board.Tensors("growth/events/text_summary")
    ]
    assert (
        event.step,
        f"epoch 0 step {event.step} conv1: probation -> fossilized "
        "(helps: kept by the test controller)",
    ) in texts
    assert [(s.step, s.value) for s in board.Scalars("growth/fossilized")] == [(event.step, 1.0)]
