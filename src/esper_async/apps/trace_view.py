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
import dataclasses
import math
import statistics
import string
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

from .._files import write_atomic
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
#: Attribute values longer than this are cut in the terminal view (reasons are shown whole).
_MAX_VALUE_CHARS: Final = 40
#: A lifecycle event's reason ("helps: val loss 0.3924 with, 0.4858 without"): never cut, the
#: figures at its end are the point of it.
_ATTR_REASON: Final = "esper.reason"
#: Tree levels indented; deeper spans stay at this indent and say their depth, so a parent chain
#: thousands deep prints lines of bounded width.
_MAX_INDENT: Final = 32
#: The longest ``--watch`` period accepted (a day): longer is a typo, and ``time.sleep`` overflows.
_MAX_WATCH_S: Final = 86_400.0
#: Characters that would act on a terminal rather than print (ESC, BEL, BS, CR ...), line
#: separators, and the bidirectional overrides that reorder what a line shows.
_UNPRINTABLE: Final = frozenset(
    [*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)), "\u2028", "\u2029",
     *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]
)


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
        """This node and every descendant, depth first (without recursion: a trace may nest
        deeper than Python's stack)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))


def build_forest(records: Sequence[SpanRecord]) -> list[SpanNode]:
    """Link spans to their parents across all processes.

    Parent links that form a loop (a span naming itself or a descendant as its parent: a damaged
    or forged file) are cut, and the span is shown as an orphan, so every span is shown once.

    :param records: spans of one run, any order.
    :returns: the root nodes (true roots and orphans), by start time.
    """
    nodes = {(r.trace_id, r.span_id): SpanNode(r) for r in records}
    ordered = sorted(nodes.values(), key=lambda n: n.record.start_ns)
    parents: dict[int, SpanNode] = {}
    roots: list[SpanNode] = []
    for node in ordered:
        rec = node.record
        parent = nodes.get((rec.trace_id, rec.parent_span_id)) if rec.parent_span_id else None
        if parent is None or parent is node:
            node.orphan = rec.parent_span_id is not None
            roots.append(node)
        else:
            parent.children.append(node)
            parents[id(node)] = parent
    reached = {id(n) for root in roots for n in root.walk()}
    for node in ordered:  # the spans left are on loops of parent links: cut each loop once
        if id(node) not in reached:
            parents[id(node)].children.remove(node)
            node.orphan = True
            roots.append(node)
            reached.update(id(n) for n in node.walk())
    roots.sort(key=lambda n: n.record.start_ns)
    return roots


def _escape(text: str) -> str:
    """``text`` with every character that would act on a terminal written as an escape."""
    if _UNPRINTABLE.isdisjoint(text):
        return text
    return "".join(
        (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") if c in _UNPRINTABLE
        else c
        for c in text
    )


def _short(key: str) -> str:
    return key[len("esper.") :] if key.startswith("esper.") else key


def _fmt_value(value: Any, *, whole: bool = False) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"  # non-finite ones as text: nan, inf, -inf
    elif isinstance(value, list | tuple):  # flat: the reader refuses nested lists
        text = "[" + ",".join(_fmt_value(v) for v in value) + "]"
    else:
        text = str(value)
    if whole or len(text) <= _MAX_VALUE_CHARS:
        return text
    return text[: _MAX_VALUE_CHARS - 1] + "…"


def _fmt_duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f}ms"
    return f"{seconds * 1e6:.0f}µs"


def _fmt_attrs(attributes: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    skipped = set(skip)
    return " ".join(
        f"{_short(k)}={_fmt_value(v, whole=k == _ATTR_REASON)}"
        for k, v in attributes.items()
        if k not in skipped
    )


def _pid(record: SpanRecord) -> Any:
    return record.resource.get("process.pid")


def _interesting(roots: Sequence[SpanNode]) -> set[int]:
    """The ids of the nodes whose subtree holds a growth event or an error (one pass, from the
    leaves up, without recursion)."""
    order = [n for root in roots for n in root.walk()]
    marked: set[int] = set()
    for node in reversed(order):  # children before their parents
        rec = node.record
        if (
            rec.name in GROWTH_SPAN_NAMES
            or rec.status == "ERROR"
            or any(id(c) in marked for c in node.children)
        ):
            marked.add(id(node))
    return marked


def _visible_children(
    node: SpanNode, max_siblings: int, interesting: set[int]
) -> tuple[list[SpanNode], dict[str, list[SpanNode]]]:
    """Children to show, and the folded ones by name."""
    shown: list[SpanNode] = []
    folded: dict[str, list[SpanNode]] = defaultdict(list)
    seen: Counter[str] = Counter()
    for child in node.children:
        name = child.record.name
        seen[name] += 1
        if seen[name] <= max_siblings or id(child) in interesting:
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
    roots = build_forest(records)
    interesting = _interesting(roots)
    # An explicit stack, not recursion: a parent chain may be thousands of spans deep.
    # Entries: (span or folded group, its parent, line prefix, last among siblings, depth).
    Entry = tuple[
        SpanNode | tuple[str, list[SpanNode]], SpanNode | None, str, bool, int
    ]
    for root in roots:
        lines.append(f"trace {root.record.trace_id}")
        stack: list[Entry] = [(root, None, "", True, 0)]
        while stack:
            entry, parent, prefix, last, depth = stack.pop()
            branch = "" if parent is None else ("└─ " if last else "├─ ")
            if not isinstance(entry, SpanNode):
                name, group = entry
                durations = [n.record.duration_s for n in group]
                lines.append(
                    prefix + branch + f"… {len(group)} more {name}"
                    f" (median {_fmt_duration(statistics.median(durations))},"
                    f" total {_fmt_duration(sum(durations))})"
                )
                continue
            deep = f"(depth {depth}) " if depth > _MAX_INDENT else ""
            lines.append(prefix + branch + deep + _node_label(entry, parent))
            child_prefix = prefix
            if parent is not None and depth <= _MAX_INDENT:
                child_prefix = prefix + ("   " if last else "│  ")
            shown, folded = _visible_children(entry, max_siblings, interesting)
            children: list[SpanNode | tuple[str, list[SpanNode]]] = [*shown, *folded.items()]
            for i in reversed(range(len(children))):
                stack.append((children[i], entry, child_prefix, i == len(children) - 1, depth + 1))
    return "\n".join(_escape(line) for line in lines)


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
        arms = sorted(
            zip(_as_list(a[ATTR_ARM_NAMES]), _as_list(a[ATTR_ARM_VALUES]), strict=False),
            key=lambda p: -_sort_value(p[1]),
        )
        shown = " ".join(f"{n}={_fmt_value(v)}" for n, v in arms[:4])
        more = f" (+{len(arms) - 4} arms)" if len(arms) > 4 else ""
        rest = _fmt_attrs(a, skip=(ATTR_CHOSEN, ATTR_ARM_NAMES, ATTR_ARM_VALUES))
        return f"chose {a[ATTR_CHOSEN]}  arms {shown}{more}" + ("  " + rest if rest else "")
    return _fmt_attrs(a)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _sort_value(value: Any) -> float:
    """An arm's value as a sort key: numbers by size, NaN and non-numbers last."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return -math.inf


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
    return "\n".join(_escape(line) for line in lines)


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as text (``"nan"``, ``"inf"``, ``"-inf"``): JSON has
    no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _finite_map(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) for k, v in attributes.items()}


def _finite_records(records: Sequence[SpanRecord]) -> list[SpanRecord]:
    """``records`` with every non-finite number in their attributes, events and resources
    turned into text, for the dashboard's JSON."""
    return [
        dataclasses.replace(
            r,
            attributes=_finite_map(r.attributes),
            events=tuple(
                {**e, "attributes": _finite_map(e.get("attributes") or {})} for e in r.events
            ),
            resource=_finite_map(r.resource),
        )
        for r in records
    ]


def render_html(records: Sequence[SpanRecord], *, title: str = "esper_async trace") -> str:
    """The growth dashboard of ``records`` (see :func:`.dashboard.render_dashboard`).

    :param records: the spans of a run directory.
    :param title: the page title.
    :returns: the HTML document.
    """
    return render_dashboard(_finite_records(records), title=title)


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
    parser.add_argument(
        "--trace-id", metavar="ID",
        help="show only this trace: its 32 hex digits, or a prefix that only it has",
    )
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
    if args.watch is not None and (
        html_target is None or not (math.isfinite(args.watch) and 0 < args.watch <= _MAX_WATCH_S)
    ):
        print("esper-async trace: --watch needs --html (or -o FILE) and a number of seconds "
              f"above 0 and at most {_MAX_WATCH_S:.0f}, got {args.watch}", file=stderr)
        return 2
    if args.max_siblings < 0:
        print(f"esper-async trace: --max-siblings must be 0 or more, got {args.max_siblings}",
              file=stderr)
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
            _finite_records(records), title=f"esper_async run: {path.name}", refresh_s=args.watch
        )
        write_atomic(target, page.encode("utf-8"), durable=False)  # whole, never via a link
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
    if not records:
        print(f"esper-async trace: no spans in {path}", file=stderr)
        return 1, []
    if trace_id is not None:
        return _select_trace(records, trace_id, path, stderr)
    return 0, records


def _select_trace(
    records: list[SpanRecord], prefix: str, path: Path, stderr: TextIO
) -> tuple[int, list[SpanRecord]]:
    """The spans of the one trace whose id starts with ``prefix``."""
    wanted = prefix.lower()
    if not wanted or not set(wanted) <= set(string.hexdigits.lower()):
        print(f"esper-async trace: --trace-id takes hex digits, got {prefix!r}", file=stderr)
        return 2, []
    ids = sorted({r.trace_id for r in records if r.trace_id.startswith(wanted)})
    if not ids:
        print(f"esper-async trace: no trace in {path} has an id starting {wanted}", file=stderr)
        return 1, []
    if len(ids) > 1:
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        print(f"esper-async trace: --trace-id {wanted} is ambiguous: {len(ids)} traces start "
              f"with it ({shown}); give more digits", file=stderr)
        return 2, []
    return 0, [r for r in records if r.trace_id == ids[0]]
