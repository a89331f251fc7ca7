"""The controller records each selection as an ``esper.select`` span with the arms' values."""

from __future__ import annotations

from pathlib import Path

import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch import nn

from esper_async import Blueprint, ControllerConfig, EpochReport, HeuristicController
from esper_async.control import Germinate
from esper_async.seeds import find_slots, wrap
from esper_async.telemetry import (
    ATTR_ARM_NAMES,
    ATTR_ARM_VALUES,
    ATTR_CHOSEN,
    ATTR_SLOT,
    ATTR_STRATEGY,
    SPAN_RUN,
    SPAN_SELECT,
    Telemetry,
    TelemetryConfig,
    read_span_records,
)

BLUEPRINTS = (Blueprint("low_rank", {"rank": 2}), Blueprint("linear_norm"))


def _report(epoch: int) -> EpochReport:
    return EpochReport(epoch=epoch, train_loss=1.0, val_loss=1.0, val_acc=0.5)


def test_each_germination_emits_one_select_span_with_every_legal_arm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0", "2"], example_input=torch.zeros(2, 4))
    slots = find_slots(model)
    exporter = InMemorySpanExporter()
    config = ControllerConfig(plateau_patience=1, plateau_tolerance=1.0, max_live_seeds=3)
    with Telemetry.create(
        config=TelemetryConfig(jsonl=False, otlp=False, processor="simple"),
        run_id="select-test", span_exporters=[exporter], env={},
    ) as telemetry:
        controller = HeuristicController(config, blueprints=BLUEPRINTS, telemetry=telemetry)
        # A reward on one arm, so its value differs from the never-rewarded ones.
        controller.selector.choose(
            {n: (s.contract, False, False, [0.0] * 4) for n, s in slots.items()},
            BLUEPRINTS, live_count=0,
        )
        controller.selector.update("0", BLUEPRINTS[0], contribution=0.25, param_count=0)
        decisions = controller.decide(_report(1), [_report(0)], slots)
    germinate = [d for d in decisions if isinstance(d, Germinate)]
    spans = [s for s in exporter.get_finished_spans() if s.name == SPAN_SELECT]
    assert len(germinate) == 1 and len(spans) == 1
    attrs = spans[0].attributes
    assert attrs is not None
    chosen = f"{germinate[0].slot}/{germinate[0].blueprint.name}"
    assert attrs[ATTR_CHOSEN] == chosen and attrs[ATTR_SLOT] == germinate[0].slot
    assert attrs[ATTR_STRATEGY] == "thompson_gaussian"
    arms = dict(zip(attrs[ATTR_ARM_NAMES], attrs[ATTR_ARM_VALUES], strict=True))
    names = {f"{slot}/{bp.name}" for slot in ("0", "2") for bp in BLUEPRINTS}
    assert set(arms) == names
    assert arms["0/low_rank(rank=2)"] == 0.25
    assert arms["2/linear_norm()"] == 0.0


def test_without_telemetry_no_span_is_needed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0"], example_input=torch.zeros(2, 4))
    config = ControllerConfig(plateau_patience=1, plateau_tolerance=1.0)
    controller = HeuristicController(config, blueprints=BLUEPRINTS)
    decisions = controller.decide(_report(1), [_report(0)], find_slots(model))
    assert [type(d) for d in decisions] == [Germinate]


def test_the_dashboard_reads_the_selection_from_the_trace_file(tmp_path: Path) -> None:
    from esper_async.apps.dashboard_data import dashboard_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0"], example_input=torch.zeros(2, 4))
    config = ControllerConfig(plateau_patience=1, plateau_tolerance=1.0)
    tel_config = TelemetryConfig(otlp=False, processor="simple")
    with Telemetry.create(run_dir=tmp_path, config=tel_config, run_id="r", env={}) as telemetry:
        controller = HeuristicController(config, blueprints=BLUEPRINTS, telemetry=telemetry)
        with telemetry.span(SPAN_RUN):
            decisions = controller.decide(_report(1), [_report(0)], find_slots(model))
    (germinate,) = decisions
    assert isinstance(germinate, Germinate)
    (view,) = dashboard_data(read_span_records(tmp_path))
    (selection,) = view.selections
    assert selection["chosen"] == f"0/{germinate.blueprint.name}"
    assert selection["arms"] == {f"0/{bp.name}": 0.0 for bp in BLUEPRINTS}
