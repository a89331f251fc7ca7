from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path

import pytest

from esper_async.apps.trace_view import (
    add_trace_parser,
    build_forest,
    render_html,
    render_timeline,
    render_tree,
)
from esper_async.telemetry import (
    SPAN_CHECKPOINT,
    SPAN_COMPILE,
    SPAN_COMPILE_WORKER,
    SPAN_EPOCH,
    SPAN_LIFECYCLE,
    SPAN_ROLLBACK,
    SPAN_RUN,
    SPAN_SELECT,
    SPAN_SURGERY,
    Telemetry,
    TelemetryConfig,
    gate_attributes,
    inject_context,
    read_span_records,
    selection_attributes,
)
from telemetry._worker import run_worker

STEPS_PER_EPOCH = 30
TRANSITIONS = [
    ("l1", "DORMANT", "GERMINATED", {}),
    ("l1", "GERMINATED", "TRAINING", {}),
    ("l2", "DORMANT", "GERMINATED", {}),
    ("l1", "TRAINING", "BLENDING", {"val_loss_delta": -0.031, "alpha": 0.0}),
    ("l1", "BLENDING", "PROBATION", {"alpha": 1.0}),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real recorded run: JSONL files of the run process and of a spawned compile worker."""
    directory = tmp_path_factory.mktemp("run")
    config = TelemetryConfig(otlp=False, step_every=1)
    with Telemetry.create(run_dir=directory, config=config, run_id="viewer", env={}) as tel:
        with tel.span(SPAN_RUN):
            for epoch in range(2):
                with tel.span(SPAN_EPOCH, epoch=epoch):
                    for step in range(STEPS_PER_EPOCH):
                        with tel.step_span(epoch * STEPS_PER_EPOCH + step, epoch=epoch):
                            pass
                    if epoch == 0:
                        arms = {"l1/conv3x3": 0.82, "l2/mlp": 0.41, "l1/<b>odd</b>": 0.1}
                        with tel.span(
                            SPAN_SELECT,
                            selection_attributes(strategy="ucb1", chosen="l1/conv3x3", arms=arms),
                        ):
                            pass
                        with tel.span(SPAN_COMPILE, blueprint="conv3x3"):
                            assert run_worker(tel, inject_context()) == 0
                    for slot, source, target, gates in TRANSITIONS[epoch * 3 : epoch * 3 + 3]:
                        with tel.span(
                            SPAN_LIFECYCLE,
                            gate_attributes(gates),
                            slot=slot,
                            lifecycle__from=source,
                            lifecycle__to=target,
                        ):
                            pass
            try:
                with tel.span(SPAN_SURGERY, surgery__op="widen"):
                    with tel.span(SPAN_ROLLBACK, surgery__op="widen"):
                        pass
                    raise RuntimeError("widen broke function preservation")
            except RuntimeError:
                pass
            with tel.span(SPAN_CHECKPOINT, checkpoint__path=str(directory / "ckpt.pt")):
                pass
    return directory


def test_recorded_run_has_one_file_per_process(run_dir: Path) -> None:
    names = sorted(p.name.split("-")[1] for p in run_dir.glob("spans-*.jsonl"))
    assert names == ["run", "worker"]


def test_tree_links_worker_spans_under_the_compile_and_folds_steps(run_dir: Path) -> None:
    text = render_tree(read_span_records(run_dir))
    lines = text.splitlines()
    assert lines[0].startswith("trace ") and lines[1].startswith(SPAN_RUN)
    (compile_line,) = [i for i, line in enumerate(lines) if f"─ {SPAN_COMPILE} " in line]
    worker_line = lines[compile_line + 1]
    assert SPAN_COMPILE_WORKER in worker_line and "[worker pid " in worker_line
    assert "orphan" not in text and "parent not recorded" not in text
    folded = re.findall(r"… (\d+) more esper\.step", text)
    assert folded == [str(STEPS_PER_EPOCH - 8)] * 2
    assert "✗ ERROR" in next(line for line in lines if f"─ {SPAN_SURGERY}" in line)


def test_max_siblings_controls_folding(run_dir: Path) -> None:
    records = read_span_records(run_dir)
    everything = render_tree(records, max_siblings=1000)
    assert "more esper.step" not in everything
    assert everything.count("esper.step ") == 2 * STEPS_PER_EPOCH


def test_timeline_lists_growth_events_in_order_with_details(run_dir: Path) -> None:
    text = render_timeline(read_span_records(run_dir))
    lines = text.splitlines()[1:]
    offsets = [float(re.match(r"\+\s*([\d.]+)s", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert offsets == sorted(offsets)
    names = [re.search(r"s  (esper\.[\w.]+)", line).group(1) for line in lines]  # type: ignore[union-attr]
    assert names == [
        SPAN_SELECT,
        SPAN_COMPILE,
        "esper.validate",  # in the worker, inside the compile
        *[SPAN_LIFECYCLE] * 5,
        SPAN_SURGERY,  # starts before the rollback it contains
        SPAN_ROLLBACK,
        SPAN_CHECKPOINT,
    ]
    assert "chose l1/conv3x3  arms l1/conv3x3=0.82 l2/mlp=0.41" in text
    assert "l1: TRAINING → BLENDING  gates val_loss_delta=-0.031 alpha=0" in text


def test_html_is_self_contained_and_escaped(run_dir: Path) -> None:
    page = render_html(read_span_records(run_dir), title="run <1>")
    assert page.startswith("<!DOCTYPE html>")
    # scripts are inline: nothing is loaded from a file or the network
    assert "<script src" not in page and "<link" not in page and "@import" not in page
    assert "run &lt;1&gt;" in page
    assert "<b>odd</b>" not in page and "\\u003cb\\u003eodd" in page
    data = json.loads(re.search(r"<script id='esper-data'[^>]*>(.*?)</script>", page).group(1))  # type: ignore[union-attr]
    (run,) = data["runs"]
    # one lane per slot, one segment per transition (each lane opens with the state left first)
    assert {slot: [s for _, s in lane] for slot, lane in run["lanes"].items()} == {
        "l1": ["dormant", "germinated", "training", "blending", "probation"],
        "l2": ["dormant", "germinated"],
    }
    assert run["selections"][0]["arms"]["l1/conv3x3"] == 0.82


def test_forest_marks_spans_whose_parent_is_missing(run_dir: Path) -> None:
    records = [r for r in read_span_records(run_dir) if r.name != SPAN_COMPILE]
    roots = build_forest(records)
    orphans = [n.record.name for n in roots if n.orphan]
    assert orphans == [SPAN_COMPILE_WORKER]
    assert "(parent not recorded)" in render_tree(records)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="esper-async")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_prints_tree_and_timeline(run_dir: Path) -> None:
    code, out, err = _cli(["trace", str(run_dir)])
    assert (code, err) == (0, "")
    assert SPAN_COMPILE_WORKER in out and "growth events" in out


def test_cli_events_only(run_dir: Path) -> None:
    code, out, _ = _cli(["trace", str(run_dir), "--events-only"])
    assert code == 0
    assert out.startswith("growth events") and "esper.step" not in out


def test_cli_writes_html(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "t.html"
    code, out, _ = _cli(["trace", str(run_dir), "--html", str(target)])
    assert code == 0 and str(target) in out
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_cli_default_html_goes_into_the_run_dir(tmp_path: Path) -> None:
    with Telemetry.create(run_dir=tmp_path, config=TelemetryConfig(otlp=False), env={}) as tel:
        with tel.span(SPAN_RUN):
            pass
    code, _, _ = _cli(["trace", str(tmp_path), "--html"])
    assert code == 0 and (tmp_path / "trace.html").is_file()


@pytest.mark.parametrize(
    ("make", "extra", "expected_code", "message"),
    [
        pytest.param(False, [], 2, "no trace at", id="missing-dir"),
        pytest.param(True, [], 1, "no spans", id="empty-dir"),
        pytest.param(True, ["--trace-id", "0" * 32], 1, "no spans", id="unknown-trace"),
    ],
)
def test_cli_errors(
    tmp_path: Path, make: bool, extra: list[str], expected_code: int, message: str
) -> None:
    target = tmp_path / "run"
    if make:
        target.mkdir()
    code, out, err = _cli(["trace", str(target), *extra])
    assert code == expected_code and out == ""
    assert message in err
