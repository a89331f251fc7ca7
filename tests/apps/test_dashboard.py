"""The growth dashboard of a real tiny run: its data, and the page loaded in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import torch

from esper_async.apps.dashboard import render_dashboard
from esper_async.apps.dashboard_data import dashboard_data
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.blueprints import Blueprint
from esper_async.control._controller import Cull, Decision, EpochReport, Fossilize
from esper_async.kernels import export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, wrap
from esper_async.surgery import SurgeryPolicyConfig
from esper_async.telemetry import (
    SPAN_RUN,
    Telemetry,
    TelemetryConfig,
    read_span_records,
)
from esper_async.training import GrowthEvent
from esper_async.training.trainer import Trainer

EPOCHS = 3


class _KeepOnProbation:
    """Fossilizes every seed on probation and culls every seed in training, at the end of
    epoch 0 (two marked events at one epoch), and decides nothing else."""

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        if report.epoch != 0:
            return []
        decisions: list[Decision] = [
            Fossilize(name, "helps: kept by the test controller")
            for name, s in slots.items()
            if s.state is SeedState.PROBATION
        ]
        decisions += [
            Cull(name, "hurts: culled by the test controller")
            for name, s in slots.items()
            if s.state is SeedState.TRAINING
        ]
        return decisions


@dataclass
class Run:
    directory: Path
    val_loss: list[float]
    train_loss: list[float | None]
    val_acc: list[float]
    params: list[int]
    events: list[GrowthEvent]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A real fit: after epoch 0 a seed on probation is fossilized (its slot then widened) and
    one in training is culled."""
    directory = tmp_path_factory.mktemp("dash")
    torch.manual_seed(0)
    model = DigitsHost()
    slots = wrap(model, ["conv1", "conv2"], example_input=torch.zeros(2, 1, 8, 8))
    slot = slots["conv1"]
    assert slot.contract is not None
    kernel = export_kernel(Blueprint("bottleneck"), slot.contract, seed=0)
    slot.germinate(kernel.blueprint)
    slot.graft(load_kernel(kernel), kernel.kernel_id)
    slot.start_blending(1)
    slot.on_step()  # α = 1: probation
    other = slots["conv2"]
    assert other.contract is not None
    culled = export_kernel(Blueprint("bottleneck"), other.contract, seed=1)
    other.germinate(culled.blueprint)
    other.graft(load_kernel(culled), culled.kernel_id)  # training
    data = digits_loaders(batch_size=64, seed=0, limit=200)
    figures: dict[str, list] = {
        "val_loss": [],
        "train_loss": [],
        "val_acc": [],
        "params": [],
        "events": [],
    }
    config = TelemetryConfig(otlp=False, step_every=1, processor="simple")

    async def fit() -> None:
        async with Telemetry.create(run_dir=directory, config=config, env={}) as tel:
            trainer = Trainer(
                model,
                seed=0,
                telemetry=tel,
                controller=_KeepOnProbation(),
                surgery=SurgeryPolicyConfig(cooldown_steps=0),
            )
            trainer.kernels[kernel.kernel_id] = kernel
            trainer.kernels[culled.kernel_id] = culled

            def on_epoch(report: EpochReport, _: object) -> None:
                params = trainer.param_count()
                tel.epoch_figures(report, params=params)
                figures["val_loss"].append(report.val_loss)
                figures["train_loss"].append(report.train_loss)
                figures["val_acc"].append(report.val_acc)
                figures["params"].append(params)

            fit = await trainer.fit(data.train, data.val, epochs=EPOCHS, on_epoch=on_epoch)
            figures["events"] = fit.events

    anyio.run(fit)
    return Run(directory, **figures)


def test_dashboard_data_holds_the_run_figures_and_growth(tiny_run: Run) -> None:
    (view,) = dashboard_data(read_span_records(tiny_run.directory))
    assert view.label == "growth" and view.complete
    assert [view.figures["val_loss"][e] for e in range(EPOCHS)] == tiny_run.val_loss
    assert [view.figures["val_acc"][e] for e in range(EPOCHS)] == tiny_run.val_acc
    assert [view.figures["params"][e] for e in range(EPOCHS)] == tiny_run.params
    (fossil,) = [e for e in view.events if e["to"] == "fossilized"]
    assert fossil["slot"] == "conv1" and fossil["marked"]
    assert fossil["reason"] == "helps: kept by the test controller"  # in full, not cut
    assert view.lanes["conv1"][-1][1] == "fossilized"
    assert [s["op"] for s in view.surgeries] and view.surgeries[0]["outcome"] == "committed"


def test_dashboard_numbers_epochs_as_the_cli_does(tiny_run: Run) -> None:
    """Each transition's epoch is the 0-based whole epoch of the fit's record (what
    ``esper-async trace`` prints), not a position such as 0.99 (read as epoch 1)."""
    (view,) = dashboard_data(read_span_records(tiny_run.directory))
    shown = [(e["epoch"], e["slot"], e["to"]) for e in view.events]
    assert shown == [(e.epoch, e.slot, e.target) for e in tiny_run.events]
    assert {(e["epoch"], e["to"]) for e in view.events if e["marked"]} == {
        (0, "fossilized"),
        (0, "culled"),
    }
    assert all(0 <= e["at"] - e["epoch"] < 1 for e in view.events)  # the lanes' positions
    assert all(isinstance(s["epoch"], int) for s in view.surgeries)


def test_a_killed_run_and_its_resumption_are_one_block(tiny_run: Run) -> None:
    records = read_span_records(tiny_run.directory)
    (trace_id,) = {r.trace_id for r in records}
    killed = [r for r in records if r.name != SPAN_RUN]  # a kill loses the unfinished run span
    (view,) = dashboard_data(killed)
    assert view.label == "growth" and not view.complete and view.traces == [trace_id]
    assert sorted(view.figures["val_loss"]) == list(range(EPOCHS))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = (
            "chromium is not installed (`make test` installs it with apt-get when run as root; "
            "or `apt-get install chromium`)"
        )
        if os.environ.get("CI"):
            pytest.fail(f"on CI the browser test must run: {reason}")
        pytest.skip(reason)
    return found


def _load(page: Path, profile: Path, fragment: str = "") -> tuple[str, str]:
    """The DOM after the page's scripts ran, and Chromium's log (console messages included)."""
    done = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,900",
            "--dump-dom",
            page.as_uri() + fragment,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


@pytest.mark.timeout(180)
def test_the_page_draws_the_run_numbers_in_chromium_without_errors(
    tiny_run: Run, tmp_path: Path
) -> None:
    page = tmp_path / "dash.html"
    page.write_text(render_dashboard(read_span_records(tiny_run.directory)), encoding="utf-8")
    dom, log = _load(page, tmp_path / "profile")
    console = [line for line in log.splitlines() if "CONSOLE" in line]
    assert console == [], console
    status = re.search(r"<body[^>]*data-status=\"(\w+)\"", dom)
    assert status is not None and status.group(1) == "ok", dom[:2000]
    drawn_text = re.search(r"<pre id=\"esper-drawn\"[^>]*>(.*?)</pre>", dom, re.S)
    assert drawn_text is not None
    drawn = json.loads(drawn_text.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert drawn["chart-loss"]["epoch"] == list(range(EPOCHS))
    assert drawn["chart-loss"]["growth val_loss"] == tiny_run.val_loss
    assert drawn["chart-loss"]["growth train_loss"] == tiny_run.train_loss
    assert drawn["chart-acc"]["growth val_acc"] == tiny_run.val_acc
    assert drawn["chart-params"]["growth params"] == tiny_run.params
    # uPlot drew into canvases; the lane of conv1 ends fossilized
    assert dom.count("<canvas") >= 3
    assert "state-fossilized" in dom
    assert "helps: kept by the test controller" in dom
    # the fossilization and the cull of epoch 0 are both drawn, side by side, neither hidden
    marked = [m for m in drawn["markers"]["chart-loss"] if m["epoch"] == 0]
    assert sorted(m["to"] for m in marked) == ["culled", "fossilized"]
    (a, b) = marked
    assert abs(a["x"] - b["x"]) >= 5 and abs(a["y"] - b["y"]) >= 12
    # the event table numbers epochs as the CLI does: "0", never "0.99"
    cells = re.findall(r"<tr><td>(\d+)</td><td>growth</td><td>([^<]*)</td>", dom)
    assert sorted(cells) == [("1", "0"), ("2", "0")], cells
    assert drawn["chart-loss"]["scale"] == "linear"


@pytest.mark.timeout(180)
def test_the_loss_chart_offers_a_log_scale(tiny_run: Run, tmp_path: Path) -> None:
    page = tmp_path / "dash.html"
    page.write_text(render_dashboard(read_span_records(tiny_run.directory)), encoding="utf-8")
    dom, _ = _load(page, tmp_path / "profile", fragment="#log")
    drawn_text = re.search(r"<pre id=\"esper-drawn\"[^>]*>(.*?)</pre>", dom, re.S)
    assert drawn_text is not None
    drawn = json.loads(drawn_text.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert drawn["chart-loss"]["scale"] == "log"  # uPlot's y scale is logarithmic
    assert drawn["chart-loss"]["growth val_loss"] == tiny_run.val_loss
    assert drawn["chart-acc"]["scale"] == "linear"  # only the loss axis
    assert 'id="log-loss"' in dom  # the switch
