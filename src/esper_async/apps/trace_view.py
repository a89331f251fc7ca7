"""``esper-async trace RUN_DIR``: a run's span tree and growth timeline, in the terminal or as HTML.

Reads the JSON-lines span files of a run directory (every process's, so a compile's worker span
sits under the run's compile span), rebuilds the trees from the parent links and renders:

* the span tree of each trace, where long runs of same-named siblings (training steps) are
  folded into one summary line unless they hold a growth event or an error;
* a timeline of growth events (selection, compile, lifecycle, surgery, checkpoint ...), times
  relative to the start of the run;
* with ``--html``, the growth dashboard (:mod:`.dashboard`): one self-contained HTML page that
  loads nothing; ``--watch`` rewrites it while a run goes and the page reloads itself.

The CLI prints; the render functions return strings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from ..errors import TelemetryConfigError
from ..telemetry import (
    ATTR_ARM_NAMES,
    ATTR_ARM_VALUES,
    ATTR_CHOSEN,
    ATTR_GATE_PREFIX,
    ATTR_LIFECYCLE_FROM,
    ATTR_LIFECYCLE_TO,
    ATTR_SLOT,
    GROWTH_SPAN_NAMES,
    SPAN_LIFECYCLE,
    SpanRecord,
    read_span_records,
)
from .dashboard import render_dashboard

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


def render_html(records: Sequence[SpanRecord], *, title: str = "esper_async trace") -> str:
    """The growth dashboard of ``records`` (see :func:`.dashboard.render_dashboard`).

    :param records: the spans of a run directory.
    :param title: the page title.
    :returns: the HTML document.
    """
    return render_dashboard(records, title=title)


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
        help="write the growth dashboard, one self-contained HTML page (to PATH, or -o FILE, "
        "default RUN_DIR/trace.html)",
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE",
        help="where --html writes the page (implies --html)",
    )
    parser.add_argument(
        "--watch", type=float, default=None, metavar="SECONDS",
        help="with --html: rewrite the page every SECONDS while the run goes (the page reloads "
        "itself); stop with Ctrl-C",
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
    html_target = args.output if args.output is not None else args.html
    if args.watch is not None and (html_target is None or args.watch <= 0):
        print("esper-async trace: --watch needs --html (or -o FILE) and a positive number of "
              f"seconds, got {args.watch}", file=stderr)
        return 2
    while True:
        code, records = _read(path, args.trace_id, stderr)
        if code:
            return code
        if html_target is None:
            if not args.events_only:
                print(render_tree(records, max_siblings=args.max_siblings), file=stdout)
                print(file=stdout)
            print(render_timeline(records), file=stdout)
            return 0
        target = (
            Path(html_target)
            if str(html_target)
            else (path if path.is_dir() else path.parent) / "trace.html"
        )
        page = render_dashboard(
            records, title=f"esper_async run: {path.name}", refresh_s=args.watch
        )
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text(page, encoding="utf-8")
        temporary.replace(target)  # a reloading browser never reads half a page
        print(f"wrote {target}", file=stdout, flush=True)
        if args.watch is None:
            return 0
        time.sleep(args.watch)


def _read(
    path: Path, trace_id: str | None, stderr: TextIO
) -> tuple[int, list[SpanRecord]]:
    try:
        records = read_span_records(path)
    except TelemetryConfigError as exc:
        print(f"esper-async trace: {exc}", file=stderr)
        return 2, []
    if trace_id:
        records = [r for r in records if r.trace_id == trace_id.lower()]
    if not records:
        print(f"esper-async trace: no spans in {path}", file=stderr)
        return 1, []
    return 0, records
