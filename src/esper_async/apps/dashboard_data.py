"""What the growth dashboard shows, gathered from a run's spans into plain JSON-ready data.

One :class:`RunView` per run of the trace. The spans of one run share a trace id; the demo's
static and growth runs are two traces, told apart by the run span's ``esper.grow``. Traces of one
label (a killed run and its resumption) are merged into one run, epoch by epoch (a later trace's
figures win), so a killed run is one block, not many orphans.

Per-epoch figures come from ``esper.epoch.figures`` span events
(:meth:`~esper_async.telemetry.Telemetry.epoch_figures`); where a trace has none, the validation
loss is read from the epoch span's ``esper.loss``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ..telemetry import (
    ATTR_ARM_NAMES,
    ATTR_ARM_VALUES,
    ATTR_BLUEPRINT,
    ATTR_CHOSEN,
    ATTR_EPOCH,
    ATTR_LIFECYCLE_FROM,
    ATTR_LIFECYCLE_TO,
    ATTR_LOSS,
    ATTR_OUTCOME,
    ATTR_PARAMS,
    ATTR_PARAMS_ADDED,
    ATTR_SLOT,
    ATTR_STEP,
    ATTR_STORE_HIT,
    ATTR_SURGERY_OP,
    ATTR_TRAIN_LOSS,
    ATTR_VAL_ACC,
    ATTR_VAL_LOSS,
    EVENT_EPOCH_FIGURES,
    SPAN_COMPILE,
    SPAN_COMPILE_WORKER,
    SPAN_EPOCH,
    SPAN_LIFECYCLE,
    SPAN_RUN,
    SPAN_SELECT,
    SPAN_STEP,
    SPAN_STORE_GET,
    SPAN_SURGERY,
    SpanRecord,
)

__all__ = ("FIGURES", "RunView", "dashboard_data")

#: The per-epoch figures, as (key in :attr:`RunView.figures`, attribute of the figures event).
FIGURES: Final = (
    ("train_loss", ATTR_TRAIN_LOSS),
    ("val_loss", ATTR_VAL_LOSS),
    ("val_acc", ATTR_VAL_ACC),
    ("params", ATTR_PARAMS),
)
#: Transitions marked on the curves (the others show in the lanes and the event table).
_MARKED: Final = frozenset({"germinated", "fossilized", "culled"})
_ATTR_REASON: Final = "esper.reason"
_ATTR_GROW: Final = "esper.grow"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(slots=True)
class RunView:
    """One run of the trace, as the dashboard draws it.

    :ivar label: ``growth``, ``static`` or the run span's label; ``run N`` when unknown.
    :ivar traces: the trace ids merged into this run.
    :ivar complete: every trace of the run has its run span (``False``: killed or still going).
    :ivar figures: per figure name, ``{epoch: value}``.
    :ivar step_loss: ``[step, loss]`` pairs of the step spans that carry ``esper.loss``.
    :ivar events: lifecycle transitions: epoch (0-based, the epoch it happened in, as
        ``esper-async trace`` and :class:`~esper_async.training.GrowthEvent` number it), ``at``
        (where in that epoch, fractional, for the lanes), step, slot, from, to, blueprint, full
        reason, and ``marked`` for those drawn on the curves.
    :ivar lanes: per slot, ``[at, state]`` segments, each to the next one's start.
    :ivar selections: selector choices: epoch (0-based), chosen arm, ``{arm: value}``.
    :ivar compiles: compiles per worker process id (the run's own pid when compiled in-process).
    :ivar store: kernel-store lookups: ``hit`` and ``miss`` counts.
    :ivar surgeries: epoch (0-based), op, outcome, params added.
    :ivar last_epoch: the highest epoch the run reached.
    """

    label: str
    traces: list[str] = field(default_factory=list)
    complete: bool = True
    figures: dict[str, dict[int, float]] = field(default_factory=dict)
    step_loss: list[list[float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    lanes: dict[str, list[list[Any]]] = field(default_factory=dict)
    selections: list[dict[str, Any]] = field(default_factory=list)
    compiles: dict[str, int] = field(default_factory=dict)
    store: dict[str, int] = field(default_factory=lambda: {"hit": 0, "miss": 0})
    surgeries: list[dict[str, Any]] = field(default_factory=list)
    last_epoch: int = -1

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data (epochs as string keys)."""
        data = asdict(self)
        data["figures"] = {
            name: {str(e): v for e, v in sorted(series.items())}
            for name, series in self.figures.items()
        }
        return data


def _label(records: Sequence[SpanRecord], index: int) -> tuple[str, bool]:
    runs = [r for r in records if r.name == SPAN_RUN]
    if runs:
        attrs = runs[0].attributes
        if "esper.label" in attrs:
            return str(attrs["esper.label"]), True
        if _ATTR_GROW in attrs:
            return ("growth" if attrs[_ATTR_GROW] else "static"), True
        return f"run {index + 1}", True
    # No run span (killed before it ended): growth runs leave lifecycle or compile spans.
    grew = any(r.name in (SPAN_LIFECYCLE, SPAN_COMPILE, SPAN_STORE_GET) for r in records)
    return ("growth" if grew else "static"), False


def _epoch_position(rec: SpanRecord, epochs: Mapping[int, SpanRecord]) -> float | None:
    """Where ``rec`` sits on the epoch axis: its epoch (or the epoch span it ended in) plus the
    fraction of that epoch's span that had passed when it ended; ``None`` when unknown."""
    epoch = rec.attributes.get(ATTR_EPOCH)
    if not isinstance(epoch, int):  # no epoch attribute: the epoch span it ended in
        epoch = next((e for e, s in epochs.items() if s.start_ns <= rec.end_ns <= s.end_ns), None)
        if epoch is None:
            return None
    span = epochs.get(epoch)
    if span is None or span.end_ns <= span.start_ns:
        return float(epoch)
    frac = (rec.end_ns - span.start_ns) / (span.end_ns - span.start_ns)
    return epoch + min(max(frac, 0.0), 0.999)


def _epoch_of(rec: SpanRecord, epochs: Mapping[int, SpanRecord]) -> int | None:
    """The 0-based epoch ``rec`` happened in (its ``esper.epoch``, or the epoch span it ended
    in): the number the CLI shows. ``None`` when unknown."""
    at = _epoch_position(rec, epochs)
    return None if at is None else int(at)


def _collect(view: RunView, records: Sequence[SpanRecord]) -> None:
    epochs = {
        r.attributes[ATTR_EPOCH]: r
        for r in records
        if r.name == SPAN_EPOCH and isinstance(r.attributes.get(ATTR_EPOCH), int)
    }
    figures_seen: set[int] = set()
    for rec in sorted(records, key=lambda r: r.end_ns):
        for event in rec.events:
            if event.get("name") != EVENT_EPOCH_FIGURES:
                continue
            attrs = event.get("attributes") or {}
            epoch = attrs.get(ATTR_EPOCH)
            if not isinstance(epoch, int):
                continue
            figures_seen.add(epoch)
            view.last_epoch = max(view.last_epoch, epoch)
            for name, key in FIGURES:
                value = _number(attrs.get(key))
                if value is not None:
                    view.figures.setdefault(name, {})[epoch] = value
    for epoch, rec in epochs.items():
        view.last_epoch = max(view.last_epoch, epoch)
        loss = _number(rec.attributes.get(ATTR_LOSS))
        if epoch not in figures_seen and loss is not None:
            view.figures.setdefault("val_loss", {})[epoch] = loss
    for rec in records:
        if rec.name == SPAN_RUN:
            params = _number(rec.attributes.get(ATTR_PARAMS))
            series = view.figures.setdefault("params", {})
            if params is not None and view.last_epoch >= 0 and view.last_epoch not in series:
                series[view.last_epoch] = params
            if not series:
                del view.figures["params"]
    for rec in records:
        a = rec.attributes
        if rec.name == SPAN_STEP and _number(a.get(ATTR_LOSS)) is not None:
            view.step_loss.append([float(a.get(ATTR_STEP, 0)), float(a[ATTR_LOSS])])
        elif rec.name == SPAN_LIFECYCLE and ATTR_LIFECYCLE_TO in a:
            target = str(a[ATTR_LIFECYCLE_TO]).lower()
            view.events.append(
                {
                    "epoch": _epoch_of(rec, epochs),
                    "at": _epoch_position(rec, epochs),
                    "step": a.get(ATTR_STEP),
                    "slot": str(a.get(ATTR_SLOT, "?")),
                    "from": str(a.get(ATTR_LIFECYCLE_FROM, "?")).lower(),
                    "to": target,
                    "blueprint": a.get(ATTR_BLUEPRINT),
                    "reason": str(a.get(_ATTR_REASON, "")),
                    "marked": target in _MARKED,
                    "t_ns": rec.end_ns,
                }
            )
        elif rec.name == SPAN_SELECT and ATTR_CHOSEN in a:
            names, values = a.get(ATTR_ARM_NAMES) or [], a.get(ATTR_ARM_VALUES) or []
            view.selections.append(
                {
                    "epoch": _epoch_of(rec, epochs),
                    "chosen": str(a[ATTR_CHOSEN]),
                    "arms": dict(zip(map(str, names), values, strict=False)),
                }
            )
        elif rec.name == SPAN_SURGERY:
            view.surgeries.append(
                {
                    "epoch": _epoch_of(rec, epochs),
                    "op": str(a.get(ATTR_SURGERY_OP, "?")),
                    "outcome": str(a.get(ATTR_OUTCOME, "error" if rec.status == "ERROR" else "?")),
                    "params_added": a.get(ATTR_PARAMS_ADDED),
                }
            )
        elif rec.name == SPAN_STORE_GET and ATTR_STORE_HIT in a:
            view.store["hit" if a[ATTR_STORE_HIT] else "miss"] += 1
    workers = [r for r in records if r.name == SPAN_COMPILE_WORKER]
    compiles: Counter[str] = Counter(str(r.resource.get("process.pid", "?")) for r in workers)
    if not workers:  # compiled in-process (or the workers' files are missing)
        compiles.update(
            str(r.resource.get("process.pid", "?")) for r in records if r.name == SPAN_COMPILE
        )
    view.compiles.update(compiles)


def _lanes(events: Sequence[Mapping[str, Any]]) -> dict[str, list[list[Any]]]:
    lanes: dict[str, list[list[Any]]] = defaultdict(list)
    for event in sorted(events, key=lambda e: e["t_ns"]):
        if event["at"] is None:
            continue
        lane = lanes[event["slot"]]
        if not lane and event["from"] not in ("?", ""):
            lane.append([0.0, event["from"]])
        lane.append([event["at"], event["to"]])
    return dict(sorted(lanes.items()))


def dashboard_data(records: Sequence[SpanRecord]) -> list[RunView]:
    """Gather the runs of a trace.

    :param records: every span of a run directory (any order).
    :returns: one view per run label, in the order the runs started.
    """
    by_trace: dict[str, list[SpanRecord]] = defaultdict(list)
    for rec in records:
        by_trace[rec.trace_id].append(rec)
    ordered = sorted(by_trace.items(), key=lambda item: min(r.start_ns for r in item[1]))
    views: dict[str, RunView] = {}
    for index, (trace_id, spans) in enumerate(ordered):
        label, complete = _label(spans, index)
        view = views.setdefault(label, RunView(label))
        view.traces.append(trace_id)
        view.complete = view.complete and complete
        _collect(view, spans)
    for view in views.values():
        view.lanes = _lanes(view.events)
        view.events.sort(key=lambda e: e["t_ns"])
        for event in view.events:
            del event["t_ns"]
        view.step_loss.sort()
    return list(views.values())
