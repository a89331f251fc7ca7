"""docs/telemetry.md names as emitted only the spans that esper_async's code emits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from esper_async import telemetry
from esper_async.telemetry import _attributes

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "telemetry.md").read_text(encoding="utf-8")
SRC = ROOT / "src" / "esper_async"
#: Where a constant is only defined or read (re-exported, shown), never emitted.
NOT_EMITTERS = ("telemetry", "apps/trace_view.py", "apps/dashboard.py", "apps/dashboard_data.py")
#: Spans emitted through a helper of Telemetry rather than by name.
HELPERS = {"SPAN_STEP": ".step_span("}


def _table(start: str, end: str) -> list[str]:
    section = DOC[DOC.index(start) : DOC.index(end, DOC.index(start))]
    return re.findall(r"\| `[\w.]+` \| `(SPAN_\w+)` \|", section)


EMITTED = _table("Spans esper_async emits", "The run span ends")
RESERVED = _table("Names reserved for", "The viewer's growth timeline")


def _users(constant: str) -> list[str]:
    value = getattr(telemetry, constant)
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(NOT_EMITTERS):
            continue
        text = path.read_text(encoding="utf-8")
        helper = HELPERS.get(constant)
        if (
            re.search(rf"\b{constant}\b", text)
            or f'"{value}"' in text
            or (helper is not None and helper in text)
        ):
            found.append(rel)
    return found


def test_the_tables_cover_every_span_constant() -> None:
    spans = {n for n in _attributes.__all__ if n.startswith("SPAN_")}
    assert sorted(EMITTED + RESERVED) == sorted(spans)


@pytest.mark.parametrize("constant", EMITTED)
def test_a_span_documented_as_emitted_has_an_emitter(constant: str) -> None:
    assert _users(constant), f"{constant} is documented as emitted but no code emits it"


@pytest.mark.parametrize("constant", RESERVED)
def test_a_reserved_span_is_not_emitted(constant: str) -> None:
    assert _users(constant) == [], f"{constant} is emitted now: move it to the emitted table"
