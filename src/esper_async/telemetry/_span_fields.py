"""The fields of one span line, checked: what a span file may hold, whoever wrote it.

A span file is input like any other: a viewer must not crash on a line that another program, a
damaged disk or a hostile user wrote. A line is a span record when its fields have the types the
JSON-lines exporter writes (OpenTelemetry's own rules for attribute values: a string, a bool, a
64-bit integer, a float, or a flat list of these). Anything else is refused with a ``ValueError``
that names the field, so the reader can report the file and line.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any, Final

__all__ = ("check_resource", "span_fields")

#: Span statuses the exporter writes.
_STATUSES: Final = frozenset({"UNSET", "OK", "ERROR"})
#: Attribute integers are 64-bit in OpenTelemetry; a larger one cannot be a recorded value (and
#: would overflow a float where the viewer draws it).
_INT_LIMIT: Final = 2**63
#: Hex digits of an id (trace ids have 32, span ids 16).
_HEX: Final = frozenset(string.hexdigits)
_MAX_ID_CHARS: Final = 32


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_int(field: str, value: object, *, least: int = -_INT_LIMIT) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not least <= value < _INT_LIMIT:
        raise ValueError(
            f"{field} must be an integer in [{least}, 2**63), got {_kind(value)} {value!r:.60}"
        )
    return value


def _check_id(field: str, value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_ID_CHARS or not set(value) <= _HEX:
        raise ValueError(f"{field} must be up to 32 hex digits, got {_kind(value)} {value!r:.60}")
    return value.lower()


def _scalar(value: object) -> bool:
    if isinstance(value, bool | str | float):
        return True
    return isinstance(value, int) and -_INT_LIMIT <= value < _INT_LIMIT


def _check_attributes(field: str, value: object) -> Mapping[str, Any]:
    """A flat attribute map: string keys; scalar values or flat lists of scalars."""
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object, got {_kind(value)}")
    for key, item in value.items():
        if isinstance(item, list):
            if all(_scalar(v) for v in item):
                continue
        elif _scalar(item):
            continue
        raise ValueError(
            f"{field}[{key!r:.60}] must be a string, bool, 64-bit integer, number or a flat list "
            f"of these, got {_kind(item)}"
        )
    return value


def check_resource(value: object) -> Mapping[str, Any]:
    """A header line's (or a span's) resource attributes, checked.

    :param value: the decoded ``resource`` field.
    :returns: ``value``.
    :raises ValueError: if it is not a flat attribute map.
    """
    return _check_attributes("resource", value)


def span_fields(raw: object, resource: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``SpanRecord`` for one decoded span line.

    :param raw: the decoded JSON of the line.
    :param resource: the resource of the file's header line (used when the span has none).
    :returns: ``name``, ``trace_id``, ``span_id``, ``parent_span_id``, ``start_ns``, ``end_ns``,
        ``status``, ``attributes``, ``events`` and ``resource``.
    :raises ValueError: naming the first field that is missing or of the wrong type.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a span line must be a JSON object, got {_kind(raw)}")
    for key in ("name", "trace_id", "span_id", "start_ns", "end_ns"):
        if key not in raw:
            raise ValueError(f"field {key!r} is missing")
    name = raw["name"]
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {_kind(name)} {name!r:.60}")
    parent = raw.get("parent_span_id")
    start_ns = _check_int("start_ns", raw["start_ns"], least=0)
    end_ns = _check_int("end_ns", raw["end_ns"], least=0)
    if end_ns < start_ns:
        raise ValueError(f"end_ns {end_ns} is before start_ns {start_ns}")
    status = raw.get("status", "UNSET")
    if status not in _STATUSES:
        raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {status!r:.60}")
    events = raw.get("events", [])
    if not isinstance(events, list):
        raise ValueError(f"events must be a list, got {_kind(events)}")
    for i, event in enumerate(events):
        if not isinstance(event, dict):
            raise ValueError(f"events[{i}] must be a JSON object, got {_kind(event)}")
        if not isinstance(event.get("name"), str):
            raise ValueError(f"events[{i}].name must be a string")
        _check_int(f"events[{i}].time_ns", event.get("time_ns"), least=0)
        _check_attributes(f"events[{i}].attributes", event.get("attributes", {}))
    return {
        "name": name,
        "trace_id": _check_id("trace_id", raw["trace_id"]),
        "span_id": _check_id("span_id", raw["span_id"]),
        "parent_span_id": None if parent is None else _check_id("parent_span_id", parent),
        "start_ns": start_ns,
        "end_ns": end_ns,
        "status": status,
        "attributes": _check_attributes("attributes", raw.get("attributes", {})),
        "events": tuple(events),
        "resource": check_resource(raw["resource"]) if "resource" in raw else resource,
    }
