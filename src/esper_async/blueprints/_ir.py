"""The blueprint IR: a frozen, hashable, declarative description of a seed sub-network."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .._exceptions import BlueprintError
from ._checks import (
    DTYPES,
    MAX_JSON_CHARS,
    MAX_OPTIONS,
    MAX_SLOT_SIZE,
    check_name,
    clip_repr,
    clip_text,
    freeze_option,
    is_int,
)

__all__ = ("Blueprint", "SlotContract", "SlotKind")

#: Bumped when the meaning of a blueprint's JSON changes, so old ids never alias new modules.
IR_VERSION = 1


class SlotKind(StrEnum):
    """The kind of host module a slot wraps, and so the layout of the tensors a seed sees."""

    CONV = "conv"
    """Per-sample shape ``(C, H, W)``: the output of a Conv2d or a convolutional block."""
    LINEAR = "linear"
    """Per-sample shape ``(F,)``: the output of a Linear layer or an MLP block."""


@dataclass(frozen=True)
class SlotContract:
    """What a seed in a slot receives and must return.

    A seed reads the host module's output ``h`` and returns a tensor of the same shape, which the
    slot adds to ``h`` scaled by the blending factor α. Shapes exclude the batch dimension.

    :param kind: the slot's kind.
    :param shape: the per-sample shape of the host's output, e.g. ``(16, 8, 8)`` or ``(64,)``.
    :param dtype: the dtype of that output, by name: one of ``float32`` (default), ``float64``,
        ``float16``, ``bfloat16``.
    :raises BlueprintError: if the kind is unknown, the shape is not a tuple of ints (``bool`` is
        not an int) of the kind's rank, each in ``[1, 2**20]``, or the dtype is not one of those.
    """

    kind: SlotKind
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        kind = self.kind
        if not isinstance(kind, str) or kind not in tuple(SlotKind):
            raise BlueprintError(
                f"a slot kind must be 'conv' or 'linear', got {clip_repr(kind)}"
            )
        kind = SlotKind(kind)
        rank = 3 if kind is SlotKind.CONV else 1
        shape = self.shape
        if (
            not isinstance(shape, tuple | list)
            or len(shape) != rank
            or not all(is_int(s) and 1 <= s <= MAX_SLOT_SIZE for s in shape)
        ):
            raise BlueprintError(
                f"a {kind.value} slot needs a per-sample shape of rank {rank}: a tuple of ints in "
                f"[1, {MAX_SLOT_SIZE}], got {clip_repr(shape)}"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise BlueprintError(
                f"a slot's dtype must be one of {', '.join(DTYPES)}, got {clip_repr(self.dtype)}"
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype", str(self.dtype))

    @property
    def channels(self) -> int:
        """Channels (conv) or features (linear): the first per-sample dimension."""
        return self.shape[0]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, the inverse of :meth:`from_json`."""
        return {"kind": self.kind.value, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotContract:
        """Read a contract written by :meth:`to_json`.

        :param data: a mapping with ``kind``, ``shape`` and optionally ``dtype``, nothing else.
        :raises BlueprintError: if it is not such a mapping, or not a valid contract.
        """
        if not isinstance(data, Mapping):
            raise BlueprintError(
                f"a slot contract's JSON must be an object, got {type(data).__name__}"
            )
        unknown = [k for k in data if k not in ("kind", "shape", "dtype")]
        if unknown or "kind" not in data or "shape" not in data:
            raise BlueprintError(
                "a slot contract's JSON needs 'kind' and 'shape' (and optionally 'dtype') and "
                f"nothing else, got keys {clip_repr(list(data))}"
            )
        return cls(data["kind"], data["shape"], data.get("dtype", "float32"))


@dataclass(frozen=True)
class Blueprint:
    """A declarative description of a seed sub-network: a family from the registry and its options.

    Blueprints are frozen and hashable; two blueprints with the same family and options have the
    same :attr:`id`, in every process and on every machine. Construction validates the family and
    every option against the family's schema (see :func:`esper_async.blueprints.families`).

    :param family: the family's registered name, e.g. ``"residual_conv"``.
    :param options: the family's options; omitted ones take the family's defaults.
    :raises BlueprintError: if the family is unknown, an option is unknown, of the wrong type
        (``bool`` is not an int) or out of range. Names are at most 64 characters; there are
        at most 32 options, each a JSON scalar (an int within 64 bits, a finite float, a string
        of at most 128 characters) or a flat list of at most 16 of them.

    Example::

        bp = Blueprint("low_rank", {"rank": 4})
        bp.id           # 'bp-3f2a...' (stable)
        bp.to_json()    # canonical JSON text
    """

    family: str
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __init__(self, family: str, options: Mapping[str, Any] | None = None) -> None:
        from ._families import resolve_options

        family = check_name(family, "a blueprint family")
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise BlueprintError(
                f"{family}: options must be a mapping of name to value, got "
                f"{type(options).__name__}",
                blueprint=family,
            )
        if len(options) > MAX_OPTIONS:
            raise BlueprintError(
                f"{family}: {len(options)} options given; at most {MAX_OPTIONS} are allowed",
                blueprint=family,
            )
        frozen = {}
        for key, value in options.items():
            key = check_name(key, f"{family}: an option name")
            frozen[key] = freeze_option(family, key, value)
        resolved = resolve_options(family, frozen)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "options", tuple(sorted(resolved.items())))

    @property
    def slot_kind(self) -> SlotKind:
        """The kind of slot this blueprint fits."""
        from ._families import get_family

        return get_family(self.family).slot_kind

    @property
    def name(self) -> str:
        """A short human-readable label, e.g. ``low_rank(rank=4)``."""
        inner = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.family}({inner})"

    def option(self, key: str) -> Any:
        """The value of one option."""
        return dict(self.options)[key]

    def canonical(self) -> dict[str, Any]:
        """The canonical JSON-ready mapping (sorted keys, resolved defaults, IR version)."""
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in self.options}
        return {"family": self.family, "ir_version": IR_VERSION, "options": opts}

    def to_json(self) -> str:
        """Canonical JSON text: sorted keys, no whitespace. Equal blueprints give equal text."""
        return json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> Blueprint:
        """Parse JSON written by :meth:`to_json` (or its mapping), validating it.

        :param text: JSON text (at most 128 KiB) or the mapping it parses to: ``family``, and
            optionally ``ir_version`` (an int) and ``options`` (an object), nothing else.
        :raises BlueprintError: if the text is not valid JSON or not a valid blueprint.
        """
        if isinstance(text, str | bytes | bytearray):
            if len(text) > MAX_JSON_CHARS:
                raise BlueprintError(
                    f"blueprint JSON is {len(text)} characters long; at most {MAX_JSON_CHARS} "
                    "are read"
                )
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                raise BlueprintError(
                    f"blueprint JSON does not parse: {clip_text(str(exc), 160)}"
                ) from exc
        elif isinstance(text, Mapping):
            data = dict(text)
        else:
            raise BlueprintError(
                f"blueprint JSON must be text or a mapping, got {type(text).__name__}"
            )
        if not isinstance(data, dict):
            raise BlueprintError(f"blueprint JSON must be an object, got {type(data).__name__}")
        unknown = [k for k in data if k not in ("family", "ir_version", "options")]
        if unknown or "family" not in data:
            raise BlueprintError(
                "blueprint JSON needs a 'family' key (and optionally 'ir_version' and "
                f"'options') and nothing else, got keys {clip_repr(list(data))}"
            )
        version = data.get("ir_version", IR_VERSION)
        if not is_int(version) or version != IR_VERSION:
            raise BlueprintError(
                f"blueprint IR version {clip_repr(version)} is not supported (this build reads "
                f"the int {IR_VERSION})"
            )
        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise BlueprintError(
                f"blueprint 'options' must be a JSON object, got {type(options).__name__}"
            )
        return cls(data["family"], options)

    @property
    def id(self) -> str:
        """A stable id: ``bp-`` and the first 16 hex digits of the canonical JSON's sha256."""
        return "bp-" + hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def check_fits(self, contract: SlotContract) -> None:
        """Check that this blueprint can be built for a slot with ``contract``.

        :raises BlueprintError: if the kinds differ or the family's constraints are not met.
        """
        from ._families import get_family

        get_family(self.family).check(dict(self.options), contract, self)

    def __repr__(self) -> str:
        return f"Blueprint({self.name})"
