"""``esper-async trace`` on span files that a damaged disk or a hostile user wrote."""

from __future__ import annotations

import argparse
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from esper_async.apps.trace_view import add_trace_parser, build_forest, render_tree
from esper_async.telemetry import SPAN_LIFECYCLE, SPAN_RUN, read_span_records

TRACE = "ab" * 16


def _span(span_id: int, parent: int | None = None, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": "esper.work",
        "trace_id": TRACE,
        "span_id": f"{span_id:016x}",
        "parent_span_id": None if parent is None else f"{parent:016x}",
        "start_ns": 1_000 + span_id,
        "end_ns": 2_000_000 + span_id,
        "status": "OK",
        "attributes": {},
    }
    record.update(fields)
    return record


def _write(path: Path, lines: list[str]) -> Path:
    path.mkdir(exist_ok=True)
    file = path / "spans-run-1.jsonl"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return file


def _cli(argv: list[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="esper-async")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


GOOD = json.dumps(_span(1, name=SPAN_RUN))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param(
            json.dumps(_span(2, 1, attributes=["a", 1])),
            "attributes must be a JSON",
            id="attributes-list",
        ),
        pytest.param(
            json.dumps(_span(2, 1)).replace('"start_ns": 1002', '"start_ns": Infinity'),
            "start_ns must be an integer",
            id="start-infinity",
        ),
        pytest.param(
            json.dumps(_span(2, 1, start_ns=1.5)), "start_ns must be an integer", id="start-float"
        ),
        pytest.param(
            json.dumps(_span(2, 1, end_ns=10**30)), "end_ns must be an integer", id="end-huge"
        ),
        pytest.param(json.dumps(_span(2, 1, end_ns=1)), "before start_ns", id="end-before-start"),
        pytest.param(
            json.dumps(_span(2, 1, attributes={"x": {"y": 1}})),
            "attributes['x']",
            id="attribute-object",
        ),
        pytest.param(
            json.dumps(_span(2, 1, attributes={"x": [[1]]})),
            "attributes['x']",
            id="attribute-nested-list",
        ),
        pytest.param(
            json.dumps(_span(2, 1, attributes={"x": 10**40})),
            "attributes['x']",
            id="attribute-huge-int",
        ),
        pytest.param(
            '{"name": "x", "attributes": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}",
            "nested too deep",
            id="deep-nesting",
        ),
        pytest.param(json.dumps(_span(2, 1, name=7)), "name must be", id="name-int"),
        pytest.param(json.dumps(_span(2, 1, trace_id="zz")), "trace_id must be", id="trace-id"),
        pytest.param(json.dumps(_span(2, 1, status="FINE")), "status must be", id="status"),
        pytest.param(
            json.dumps(_span(2, 1, events={"a": 1})), "events must be a list", id="events-object"
        ),
        pytest.param(
            json.dumps(_span(2, 1, events=[{"name": "e", "time_ns": "x"}])),
            "events[0].time_ns",
            id="event-time",
        ),
        pytest.param(json.dumps({"resource": [1, 2]}), "resource must be", id="header-resource"),
        pytest.param("[1, 2]", "must be a JSON object", id="not-an-object"),
        pytest.param(json.dumps({"name": "x"}), "'trace_id' is missing", id="missing-field"),
    ],
)
def test_a_bad_record_is_reported_by_file_and_line_with_exit_2(
    tmp_path: Path, line: str, message: str
) -> None:
    file = _write(tmp_path / "run", [GOOD, line, GOOD])
    code, out, err = _cli(["trace", str(tmp_path / "run")])
    assert (code, out) == (2, "")
    assert err.startswith(f"esper-async trace: {file}:2 is not a span record")
    assert message in err and "Traceback" not in err


def test_a_parent_chain_5000_deep_renders_without_recursion(tmp_path: Path) -> None:
    depth = 5_000
    lines = [json.dumps(_span(1, name=SPAN_RUN))]
    lines += [json.dumps(_span(i, i - 1)) for i in range(2, depth + 1)]
    _write(tmp_path / "run", lines)
    code, out, err = _cli(["trace", str(tmp_path / "run")])
    assert (code, err) == (0, "")
    tree = out.split("\n\n")[0].splitlines()
    assert len(tree) == depth + 1  # the trace line, then one line per span
    assert f"(depth {depth - 1}) esper.work" in tree[-1]
    assert max(len(line) for line in tree) < 200  # the indent stops growing


def test_parent_loops_are_cut_and_every_span_shown_once(tmp_path: Path) -> None:
    lines = [
        json.dumps(_span(1, name=SPAN_RUN)),
        json.dumps(_span(2, 2, name="esper.self")),  # its own parent
        json.dumps(_span(3, 4, name="esper.a")),  # 3 -> 4 -> 3
        json.dumps(_span(4, 3, name="esper.b")),
    ]
    _write(tmp_path / "run", lines)
    roots = build_forest(read_span_records(tmp_path / "run"))
    names = sorted(n.record.name for root in roots for n in root.walk())
    assert names == ["esper.a", "esper.b", SPAN_RUN, "esper.self"]
    text = render_tree(read_span_records(tmp_path / "run"))
    assert text.count("esper.a") == text.count("esper.b") == text.count("esper.self") == 1


def test_non_finite_numbers_render_as_text_also_in_html(tmp_path: Path) -> None:
    line = json.dumps(
        _span(
            2,
            1,
            attributes={"esper.loss": float("nan"), "g": float("inf"), "v": [1.0, float("-inf")]},
        )
    )
    assert "NaN" in line and "Infinity" in line  # what json.dumps writes for them
    _write(tmp_path / "run", [GOOD, line])
    code, out, err = _cli(["trace", str(tmp_path / "run")])
    assert (code, err) == (0, "")
    assert "loss=nan g=inf v=[1,-inf]" in out
    target = tmp_path / "page.html"
    code, out, err = _cli(["trace", str(tmp_path / "run"), "--html", str(target)])
    assert (code, err) == (0, "")
    page = target.read_text(encoding="utf-8")
    data = re.search(r"<script id='esper-data'[^>]*>(.*?)</script>", page)
    assert data is not None
    json.loads(data.group(1), parse_constant=lambda c: pytest.fail(f"bare {c} in the page"))


def test_control_characters_are_shown_escaped(tmp_path: Path) -> None:
    hostile = "a\x1b[2Jb\x07c\x08d\u202ee"
    lines = [
        GOOD,
        json.dumps(_span(2, 1, name="esper.\x1b]0;title\x07", attributes={"k\x1b": hostile})),
        json.dumps(_span(3, 1, name=SPAN_LIFECYCLE, attributes={"esper.slot": hostile})),
    ]
    _write(tmp_path / "run", lines)
    code, out, err = _cli(["trace", str(tmp_path / "run")])
    assert (code, err) == (0, "")
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u202e]", out)
    assert "a\\x1b[2Jb\\x07c\\x08d\\u202ee" in out
    assert "esper.\\x1b]0;title\\x07" in out


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e9"])
def test_watch_needs_a_finite_positive_period(tmp_path: Path, value: str) -> None:
    _write(tmp_path / "run", [GOOD])
    code, out, err = _cli(["trace", str(tmp_path / "run"), "--html", "--watch", value])
    assert (code, out) == (2, "")
    assert "--watch needs" in err


def test_trace_id_takes_a_unique_prefix(tmp_path: Path) -> None:
    other = "ac" + "0" * 30
    third = "ad" + "1" * 30
    _write(
        tmp_path / "run",
        [
            GOOD,
            json.dumps(_span(5, name="esper.other", trace_id=other)),
            json.dumps(_span(6, name="esper.third", trace_id=third)),
        ],
    )
    code, out, err = _cli(["trace", str(tmp_path / "run"), "--trace-id", "AC0"])
    assert (code, err) == (0, "")
    assert f"trace {other}" in out and "esper.third" not in out and SPAN_RUN not in out
    code, out, err = _cli(["trace", str(tmp_path / "run"), "--trace-id", "a"])
    assert (code, out) == (2, "")
    assert "ambiguous: 3 traces" in err and other in err
    code, _, err = _cli(["trace", str(tmp_path / "run"), "--trace-id", "xyz"])
    assert code == 2 and "hex digits" in err
    code, _, err = _cli(["trace", str(tmp_path / "run"), "--trace-id", "ff"])
    assert code == 1 and "starting ff" in err


def test_reasons_are_shown_whole(tmp_path: Path) -> None:
    reason = "helps: val loss 0.3924 with, 0.4858 without (margin 0.0100)"
    _write(
        tmp_path / "run",
        [
            GOOD,
            json.dumps(
                _span(
                    2,
                    1,
                    name=SPAN_LIFECYCLE,
                    attributes={
                        "esper.slot": "conv1",
                        "esper.lifecycle.from": "PROBATION",
                        "esper.lifecycle.to": "FOSSILIZED",
                        "esper.reason": reason,
                    },
                )
            ),
        ],
    )
    code, out, err = _cli(["trace", str(tmp_path / "run")])
    assert (code, err) == (0, "")
    assert out.count(f"reason={reason}") == 2  # in the tree and in the timeline
