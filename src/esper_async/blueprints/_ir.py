"""The blueprint IR: a frozen, hashable, declarative description of a seed sub-network."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .._exceptions import BlueprintError

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
    :param dtype: the dtype of that output, by name (``"float32"``).
    :raises BlueprintError: if the shape does not match the kind or has a non-positive size.
    """

    kind: SlotKind
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SlotKind(self.kind))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        rank = 3 if self.kind is SlotKind.CONV else 1
        if len(self.shape) != rank or any(s <= 0 for s in self.shape):
            raise BlueprintError(
                f"a {self.kind.value} slot needs a per-sample shape of rank {rank} with positive "
                f"sizes, got {self.shape}"
            )

    @property
    def channels(self) -> int:
        """Channels (conv) or features (linear): the first per-sample dimension."""
        return self.shape[0]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, the inverse of :meth:`from_json`."""
        return {"kind": self.kind.value, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotContract:
        """Read a contract written by :meth:`to_json`."""
        return cls(SlotKind(data["kind"]), tuple(data["shape"]), data.get("dtype", "float32"))


def _freeze(value: Any, where: str) -> Any:
    """Make ``value`` hashable and JSON-canonical, or fail with a clear message."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise BlueprintError(f"parameter {where!r} must be finite, got {value}")
        return value
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise BlueprintError(
        f"parameter {where!r} has type {type(value).__name__}; blueprint parameters must be "
        "bool, int, float, str, None or tuples of those"
    )


@dataclass(frozen=True)
class Blueprint:
    """A declarative description of a seed sub-network: a family from the registry and its options.

    Blueprints are frozen and hashable; two blueprints with the same family and options have the
    same :attr:`id`, in every process and on every machine. Construction validates the family and
    every option against the family's schema (see :func:`esper_async.blueprints.families`).

    :param family: the family's registered name, e.g. ``"residual_conv"``.
    :param options: the family's options; omitted ones take the family's defaults.
    :raises BlueprintError: if the family is unknown, an option is unknown or out of range.

    Example::

        bp = Blueprint("low_rank", {"rank": 4})
        bp.id           # 'bp-3f2a...' (stable)
        bp.to_json()    # canonical JSON text
    """

    family: str
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __init__(self, family: str, options: Mapping[str, Any] | None = None) -> None:
        from ._families import resolve_options

        if not isinstance(family, str) or not family:
            raise BlueprintError(f"a blueprint family must be a non-empty string, got {family!r}")
        raw = dict(options or {})
        frozen = {k: _freeze(v, k) for k, v in raw.items()}
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
    def from_json(cls, text: str | Mapping[str, Any]) -> Blueprint:
        """Parse JSON written by :meth:`to_json` (or its mapping), validating it.

        :raises BlueprintError: if the text is not valid JSON or not a valid blueprint.
        """
        try:
            data = json.loads(text) if isinstance(text, str) else dict(text)
        except json.JSONDecodeError as exc:
            raise BlueprintError(f"blueprint JSON does not parse: {exc}") from exc
        if not isinstance(data, dict) or "family" not in data:
            raise BlueprintError(f"blueprint JSON needs a 'family' key, got {data!r}")
        version = data.get("ir_version", IR_VERSION)
        if version != IR_VERSION:
            raise BlueprintError(
                f"blueprint IR version {version} is not supported (this build reads {IR_VERSION})",
                blueprint=str(data.get("family")),
            )
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise BlueprintError("blueprint 'options' must be a JSON object")
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
