"""``esper-async trace RUN_DIR``: a run's span tree and growth timeline, in the terminal or as HTML.

Reads the JSON-lines span files of a run directory (every process's, so a compile's worker span
sits under the run's compile span), rebuilds the trees from the parent links and renders:

* the span tree of each trace, where long runs of same-named siblings (training steps) are
  folded into one summary line unless they hold a growth event or an error;
* a timeline of growth events (selection, compile, lifecycle, surgery, checkpoint ...), times
  relative to the start of the run;
* with ``--html``, one self-contained HTML file (no scripts, no external resources): a Gantt of
  the spans, one lane per seed slot coloured by lifecycle state, and the growth-event table.

The CLI prints; the render functions return strings.
"""

from __future__ import annotations

import argparse
import html
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from ..errors import TelemetryConfigError
from ..telemetry._attributes import (
    ATTR_ARM_NAMES,
    ATTR_ARM_VALUES,
    ATTR_CHOSEN,
    ATTR_GATE_PREFIX,
    ATTR_LIFECYCLE_FROM,
    ATTR_LIFECYCLE_TO,
    ATTR_SLOT,
    GROWTH_SPAN_NAMES,
    SPAN_LIFECYCLE,
)
from ..telemetry._exporters import SpanRecord, read_span_records

__all__ = (
    "SpanNode",
    "add_trace_parser",
    "build_forest",
    "render_html",
    "render_timeline",
    "render_tree",
    "run_trace_command",
)

#: Same-named siblings shown before the rest are folded into one line.
_DEFAULT_MAX_SIBLINGS: Final = 8
#: Attribute values longer than this are cut in the terminal view.
_MAX_VALUE_CHARS: Final = 40
#: Spans drawn in the HTML Gantt at most (a long run has many step spans).
_MAX_HTML_ROWS: Final = 1500
_STATE_COLOURS: Final = {
    "DORMANT": "#d0d0d0",
    "GERMINATED": "#9ecae1",
    "TRAINING": "#4292c6",
    "BLENDING": "#807dba",
    "PROBATION": "#fdae6b",
    "FOSSILIZED": "#41ab5d",
    "CULLED": "#ef3b2c",
    "EMBARGOED": "#969696",
}


@dataclass(slots=True)
class SpanNode:
    """A span and its children, as rebuilt from the parent links.

    :ivar record: the span.
    :ivar children: child nodes, by start time.
    :ivar orphan: the span names a parent that is not in the files (it was dropped or the
        parent process did not flush).
    """

    record: SpanRecord
    children: list[SpanNode] = field(default_factory=list)
    orphan: bool = False

    def walk(self) -> Iterable[SpanNode]:
        """This node and every descendant, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()


def build_forest(records: Sequence[SpanRecord]) -> list[SpanNode]:
    """Link spans to their parents across all processes.

    :param records: spans of one run, any order.
    :returns: the root nodes (true roots and orphans), by start time.
    """
    nodes = {(r.trace_id, r.span_id): SpanNode(r) for r in records}
    roots: list[SpanNode] = []
    for node in sorted(nodes.values(), key=lambda n: n.record.start_ns):
        rec = node.record
        parent = nodes.get((rec.trace_id, rec.parent_span_id)) if rec.parent_span_id else None
        if parent is None:
            node.orphan = rec.parent_span_id is not None
            roots.append(node)
        else:
            parent.children.append(node)
    return roots


def _short(key: str) -> str:
    return key[len("esper.") :] if key.startswith("esper.") else key


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, list | tuple):
        text = "[" + ",".join(_fmt_value(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


def _fmt_duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds * 1e6:.0f}µs"


def _fmt_attrs(attributes: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    skipped = set(skip)
    return " ".join(
        f"{_short(k)}={_fmt_value(v)}" for k, v in attributes.items() if k not in skipped
    )


def _pid(record: SpanRecord) -> Any:
    return record.resource.get("process.pid")


def _interesting(node: SpanNode) -> bool:
    return any(
        n.record.name in GROWTH_SPAN_NAMES or n.record.status == "ERROR" for n in node.walk()
    )


def _visible_children(
    node: SpanNode, max_siblings: int
) -> tuple[list[SpanNode], dict[str, list[SpanNode]]]:
    """Children to show, and the folded ones by name."""
    shown: list[SpanNode] = []
    folded: dict[str, list[SpanNode]] = defaultdict(list)
    seen: Counter[str] = Counter()
    for child in node.children:
        name = child.record.name
        seen[name] += 1
        if seen[name] <= max_siblings or _interesting(child):
            shown.append(child)
        else:
            folded[name].append(child)
    return shown, folded


def _node_label(node: SpanNode, parent: SpanNode | None) -> str:
    rec = node.record
    parts = [rec.name, _fmt_duration(rec.duration_s)]
    if rec.status == "ERROR":
        parts.append("✗ ERROR")
    if parent is not None and _pid(parent.record) != _pid(rec):
        role = rec.resource.get("esper.process.role", "process")
        parts.append(f"[{role} pid {_pid(rec)}]")
    if node.orphan:
        parts.append("(parent not recorded)")
    attrs = _fmt_attrs(rec.attributes, skip=(ATTR_ARM_NAMES, ATTR_ARM_VALUES))
    if attrs:
        parts.append(attrs)
    return "  ".join(parts)


def render_tree(records: Sequence[SpanRecord], *, max_siblings: int = _DEFAULT_MAX_SIBLINGS) -> str:
    """The span tree of every trace in ``records``.

    :param records: the spans of a run.
    :param max_siblings: same-named siblings shown before the rest are folded.
    :returns: the text, one span per line.
    """
    lines: list[str] = []

    def emit(node: SpanNode, parent: SpanNode | None, prefix: str, last: bool) -> None:
        branch = "" if parent is None else ("└─ " if last else "├─ ")
        lines.append(prefix + branch + _node_label(node, parent))
        child_prefix = prefix if parent is None else prefix + ("   " if last else "│  ")
        shown, folded = _visible_children(node, max_siblings)
        entries: list[SpanNode | tuple[str, list[SpanNode]]] = [*shown, *folded.items()]
        for i, entry in enumerate(entries):
            is_last = i == len(entries) - 1
            if isinstance(entry, SpanNode):
                emit(entry, node, child_prefix, is_last)
            else:
                name, group = entry
                durations = [n.record.duration_s for n in group]
                lines.append(
                    child_prefix + ("└─ " if is_last else "├─ ") + f"… {len(group)} more {name}"
                    f" (median {_fmt_duration(statistics.median(durations))},"
                    f" total {_fmt_duration(sum(durations))})"
                )

    for root in build_forest(records):
        lines.append(f"trace {root.record.trace_id}")
        emit(root, None, "", True)
    return "\n".join(lines)


def _growth_records(records: Sequence[SpanRecord]) -> list[SpanRecord]:
    return [r for r in records if r.name in GROWTH_SPAN_NAMES]


def _growth_summary(rec: SpanRecord) -> str:
    a = rec.attributes
    if rec.name == SPAN_LIFECYCLE:
        gates = {
            k[len(ATTR_GATE_PREFIX) :]: v for k, v in a.items() if k.startswith(ATTR_GATE_PREFIX)
        }
        source, target = a.get(ATTR_LIFECYCLE_FROM, "?"), a.get(ATTR_LIFECYCLE_TO, "?")
        text = f"{a.get(ATTR_SLOT, '?')}: {source} → {target}"
        if gates:
            text += "  gates " + " ".join(f"{k}={_fmt_value(v)}" for k, v in gates.items())
        rest = _fmt_attrs(
            a,
            skip=(
                ATTR_SLOT,
                ATTR_LIFECYCLE_FROM,
                ATTR_LIFECYCLE_TO,
                *(ATTR_GATE_PREFIX + g for g in gates),
            ),
        )
        return text + ("  " + rest if rest else "")
    if ATTR_CHOSEN in a and ATTR_ARM_NAMES in a and ATTR_ARM_VALUES in a:
        arms = sorted(zip(a[ATTR_ARM_NAMES], a[ATTR_ARM_VALUES], strict=False), key=lambda p: -p[1])
        shown = " ".join(f"{n}={_fmt_value(v)}" for n, v in arms[:4])
        more = f" (+{len(arms) - 4} arms)" if len(arms) > 4 else ""
        rest = _fmt_attrs(a, skip=(ATTR_CHOSEN, ATTR_ARM_NAMES, ATTR_ARM_VALUES))
        return f"chose {a[ATTR_CHOSEN]}  arms {shown}{more}" + ("  " + rest if rest else "")
    return _fmt_attrs(a)


def render_timeline(records: Sequence[SpanRecord]) -> str:
    """The growth events of a run, by start time, relative to the run's first span.

    :param records: the spans of a run.
    :returns: the text; a line saying so when the run had no growth events.
    """
    growth = _growth_records(records)
    if not growth:
        return "no growth events recorded"
    origin = min(r.start_ns for r in records)
    width = max(len(r.name) for r in growth)
    lines = ["growth events (time from run start, duration, event, details)"]
    for rec in growth:
        offset = (rec.start_ns - origin) / 1e9
        flag = "✗ ERROR  " if rec.status == "ERROR" else ""
        lines.append(
            f"+{offset:10.3f}s  {_fmt_duration(rec.duration_s):>9}  {rec.name:<{width}}  {flag}"
            f"{_growth_summary(rec)}"
        )
    return "\n".join(lines)


def _slot_lanes(
    records: Sequence[SpanRecord], end_ns: int
) -> dict[str, list[tuple[int, int, str]]]:
    """Per slot: (start, end, state) segments from the lifecycle transitions."""
    transitions: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for rec in records:
        if (
            rec.name == SPAN_LIFECYCLE
            and ATTR_SLOT in rec.attributes
            and ATTR_LIFECYCLE_TO in rec.attributes
        ):
            transitions[str(rec.attributes[ATTR_SLOT])].append(
                (rec.end_ns, str(rec.attributes[ATTR_LIFECYCLE_TO]))
            )
    lanes: dict[str, list[tuple[int, int, str]]] = {}
    for slot, items in sorted(transitions.items()):
        items.sort()
        lanes[slot] = [
            (t, items[i + 1][0] if i + 1 < len(items) else end_ns, state)
            for i, (t, state) in enumerate(items)
        ]
    return lanes


_CSS: Final = """
body{font:13px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:18px}h2{font-size:15px;margin-top:1.6em}
.row{display:flex;align-items:center;height:18px}
.label{width:34em;flex:none;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;font-family:monospace;font-size:12px}
.track{position:relative;flex:1;height:14px;background:#f4f4f4}
.bar{position:absolute;top:1px;height:12px;min-width:2px;border-radius:2px;background:#9aa7b8}
.bar.growth{background:#e6842a}.bar.worker{background:#8e5fbf}.bar.error{background:#d62728}
.seg{position:absolute;top:0;height:14px;min-width:2px}
table{border-collapse:collapse;font-size:12px}
td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-family:monospace}
.legend span{display:inline-block;padding:0 6px;margin-right:4px;border-radius:2px}
"""


def _pct(ns: int, origin: int, total: int) -> float:
    return 100.0 * (ns - origin) / total


def render_html(records: Sequence[SpanRecord], *, title: str = "esper_async trace") -> str:
    """A self-contained HTML page: span Gantt, per-slot lifecycle lanes, growth-event table.

    :param records: the spans of a run.
    :param title: the page title.
    :returns: the HTML document.
    """
    esc = html.escape
    origin = min((r.start_ns for r in records), default=0)
    end = max((r.end_ns for r in records), default=1)
    total = max(end - origin, 1)
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f"<p>{len(records)} spans, {total / 1e9:.3f} s, "
        f"{len({r.trace_id for r in records})} trace(s), "
        f"{len({_pid(r) for r in records})} process(es)</p>",
    ]

    lanes = _slot_lanes(records, end)
    if lanes:
        out.append("<h2>Seed slots</h2><div class='legend'>")
        out += [f"<span style='background:{c}'>{esc(s)}</span>" for s, c in _STATE_COLOURS.items()]
        out.append("</div>")
        for slot, segments in lanes.items():
            out.append(f"<div class='row'><div class='label'>{esc(slot)}</div><div class='track'>")
            for start, stop, state in segments:
                left = _pct(start, origin, total)
                width = max(_pct(stop, origin, total) - left, 0.0)
                colour = _STATE_COLOURS.get(state, "#bbb")
                out.append(
                    f"<div class='seg' style='left:{left:.3f}%;width:{width:.3f}%;"
                    f"background:{colour}'"
                    f" title='{esc(slot)} {esc(state)} from +{(start - origin) / 1e9:.3f}s'></div>"
                )
            out.append("</div></div>")

    out.append("<h2>Spans</h2>")
    rows = 0
    for root in build_forest(records):
        stack: list[tuple[SpanNode, int, SpanNode | None]] = [(root, 0, None)]
        while stack and rows < _MAX_HTML_ROWS:
            node, depth, parent = stack.pop()
            rec = node.record
            classes = ["bar"]
            if rec.status == "ERROR":
                classes.append("error")
            elif parent is not None and _pid(parent.record) != _pid(rec):
                classes.append("worker")
            elif rec.name in GROWTH_SPAN_NAMES:
                classes.append("growth")
            left = _pct(rec.start_ns, origin, total)
            width = _pct(rec.end_ns, origin, total) - left
            tip = f"{rec.name} {_fmt_duration(rec.duration_s)} pid={_pid(rec)} " + _fmt_attrs(
                rec.attributes
            )
            out.append(
                f"<div class='row'><div class='label' style='padding-left:{depth}em'>"
                f"{esc(rec.name)}"
                f" <small>{esc(_fmt_duration(rec.duration_s))}</small></div><div class='track'>"
                f"<div class='{' '.join(classes)}' style='left:{left:.3f}%;width:{width:.3f}%'"
                f" title='{esc(tip)}'></div></div></div>"
            )
            rows += 1
            shown, folded = _visible_children(node, _DEFAULT_MAX_SIBLINGS)
            for name, group in folded.items():
                out.append(
                    f"<div class='row'><div class='label' style='padding-left:{depth + 1}em'>"
                    f"… {len(group)} more {esc(name)}</div><div class='track'></div></div>"
                )
            stack.extend((child, depth + 1, node) for child in reversed(shown))
    if rows >= _MAX_HTML_ROWS:
        out.append(f"<p>(first {_MAX_HTML_ROWS} spans shown)</p>")

    out.append("<h2>Growth events</h2>")
    growth = _growth_records(records)
    if growth:
        out.append("<table><tr><th>time</th><th>duration</th><th>event</th><th>details</th></tr>")
        for rec in growth:
            out.append(
                f"<tr><td class='num'>+{(rec.start_ns - origin) / 1e9:.3f}s</td>"
                f"<td class='num'>{esc(_fmt_duration(rec.duration_s))}</td><td>{esc(rec.name)}</td>"
                f"<td>{esc(_growth_summary(rec))}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>no growth events recorded</p>")
    out.append("</body></html>")
    return "\n".join(out)


def add_trace_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``trace`` sub-command to an ``argparse`` sub-parser set.

    The parser's default ``func`` is :func:`run_trace_command`, so a main CLI can dispatch with
    ``return args.func(args)``.

    :param subparsers: the object ``ArgumentParser.add_subparsers()`` returned.
    :returns: the new sub-parser.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "trace",
        help="show a run's span tree and growth timeline",
        description="Print the span tree and the growth-event timeline of a recorded run "
        "(the spans-*.jsonl files of RUN_DIR), or write them as one HTML file.",
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory or a span file"
    )
    parser.add_argument(
        "--html",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write a self-contained HTML timeline (default RUN_DIR/trace.html)",
    )
    parser.add_argument("--trace-id", help="show only this trace (32 hex digits)")
    parser.add_argument(
        "--max-siblings",
        type=int,
        default=_DEFAULT_MAX_SIBLINGS,
        help=f"same-named sibling spans shown before folding (default {_DEFAULT_MAX_SIBLINGS})",
    )
    parser.add_argument("--events-only", action="store_true", help="print only the growth timeline")
    parser.set_defaults(func=run_trace_command)
    return parser


def run_trace_command(
    args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run ``esper-async trace``.

    :param args: parsed by the parser of :func:`add_trace_parser`.
    :param stdout: where the views go (``sys.stdout``).
    :param stderr: where errors go (``sys.stderr``).
    :returns: 0 on success, 1 when there is no trace to show, 2 when it cannot be read.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    path = Path(args.run_dir)
    try:
        records = read_span_records(path)
    except TelemetryConfigError as exc:
        print(f"esper-async trace: {exc}", file=stderr)
        return 2
    if args.trace_id:
        records = [r for r in records if r.trace_id == args.trace_id.lower()]
    if not records:
        print(f"esper-async trace: no spans in {path}", file=stderr)
        return 1
    if args.html is not None:
        target = (
            Path(args.html)
            if args.html
            else (path if path.is_dir() else path.parent) / "trace.html"
        )
        target.write_text(
            render_html(records, title=f"esper_async trace: {path.name}"), encoding="utf-8"
        )
        print(f"wrote {target}", file=stdout)
        return 0
    if not args.events_only:
        print(render_tree(records, max_siblings=args.max_siblings), file=stdout)
        print(file=stdout)
    print(render_timeline(records), file=stdout)
    return 0
