"""Bounds and checks for untrusted blueprint and contract input, and short echoes of bad values.

Blueprints and slot contracts arrive from JSON (the kernel store, checkpoints, compile workers) as
well as from code, so everything about them is checked strictly and bounded: names, option counts,
string lengths, list lengths, integer magnitudes, slot sizes and dtypes. An error message quotes
the offending value through :func:`clip_repr`, so it stays a few hundred characters long however
large or deeply nested the value is.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from .._exceptions import BlueprintError

__all__ = (
    "DTYPES",
    "MAX_JSON_CHARS",
    "MAX_LIST_ITEMS",
    "MAX_NAME_CHARS",
    "MAX_OPTIONS",
    "MAX_SLOT_SIZE",
    "MAX_STR_CHARS",
    "check_name",
    "clip_repr",
    "clip_text",
    "freeze_option",
    "is_int",
)

#: Longest family name or option key.
MAX_NAME_CHARS = 64
#: Most options one blueprint may carry.
MAX_OPTIONS = 32
#: Longest string option value.
MAX_STR_CHARS = 128
#: Most items of a list option value (lists hold scalars only: no nesting).
MAX_LIST_ITEMS = 16
#: Largest integer option value, in magnitude (a signed 64-bit integer).
MAX_INT = 2**63 - 1
#: Longest blueprint JSON text :meth:`Blueprint.from_json` parses.
MAX_JSON_CHARS = 1 << 17
#: Largest size of one per-sample dimension of a slot contract.
MAX_SLOT_SIZE = 1 << 20
#: The dtypes a slot contract may name: the floating dtypes every family can be built in.
DTYPES = ("float32", "float64", "float16", "bfloat16")

#: How much of a bad value an error message quotes.
_ECHO_CHARS = 80


class _ShortRepr(reprlib.Repr):
    """``reprlib`` limits, and no ``repr`` of an integer too large to print (Python refuses)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxstring = self.maxother = self.maxlong = 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT = _ShortRepr()


def clip_text(text: str, limit: int = _ECHO_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clip_repr(value: Any, limit: int = _ECHO_CHARS) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, safe for any value: deeply nested,
    enormous, an integer too large to print, or an object whose ``repr`` raises."""
    try:
        text = _SHORT.repr(value)
    except Exception:  # a repr that raises must not replace the error being reported
        text = f"<{type(value).__name__}>"
    return clip_text(text, limit)


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(value: Any, what: str) -> str:
    """``value`` if it is a non-empty string of at most :data:`MAX_NAME_CHARS` characters.

    :param value: the name to check.
    :param what: what it names, for the message (``"a blueprint family"``).
    :raises BlueprintError: otherwise.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise BlueprintError(
            f"{what} must be a non-empty string of at most {MAX_NAME_CHARS} characters, "
            f"got {clip_repr(value)}"
        )
    return value


def _scalar(family: str, key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise BlueprintError(
                f"{family}: option {key!r} must lie within ±(2**63 - 1), got {clip_repr(value)}",
                blueprint=family,
            )
        return int(value)  # an int subclass (an IntEnum) becomes a plain, JSON-stable int
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BlueprintError(
                f"{family}: option {key!r} must be finite, got {value}", blueprint=family
            )
        return float(value)
    if isinstance(value, str):
        if len(value) > MAX_STR_CHARS:
            raise BlueprintError(
                f"{family}: option {key!r} is a string of {len(value)} characters; at most "
                f"{MAX_STR_CHARS} are allowed",
                blueprint=family,
            )
        return str(value)
    raise BlueprintError(
        f"{family}: option {key!r} has type {type(value).__name__} ({clip_repr(value)}); "
        "blueprint parameters must be bool, int, float, str, None or flat lists of those",
        blueprint=family,
    )


def freeze_option(family: str, key: str, value: Any) -> Any:
    """One option value made hashable and JSON-canonical: a scalar, or a flat list (a tuple)
    of at most :data:`MAX_LIST_ITEMS` scalars.

    :raises BlueprintError: if the value is of another type, nested, too long, non-finite or an
        integer beyond 64 bits.
    """
    if isinstance(value, list | tuple):
        if len(value) > MAX_LIST_ITEMS:
            raise BlueprintError(
                f"{family}: option {key!r} is a list of {len(value)} items; at most "
                f"{MAX_LIST_ITEMS} are allowed",
                blueprint=family,
            )
        items = []
        for i, item in enumerate(value):
            if isinstance(item, list | tuple):
                raise BlueprintError(
                    f"{family}: option {key!r} holds a nested list at [{i}]; list options hold "
                    "scalars only",
                    blueprint=family,
                )
            items.append(_scalar(family, f"{key}[{i}]", item))
        return tuple(items)
    return _scalar(family, key, value)
