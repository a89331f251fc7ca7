"""The blueprint IR: a frozen, hashable, declarative description of a seed sub-network."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import BlueprintError
from ._checks import (
    MAX_JSON_CHARS,
    MAX_OPTIONS,
    check_name,
    clip_repr,
    clip_text,
    freeze_option,
    is_int,
)
from ._contract import SlotContract, SlotKind
from ._families import get_family, resolve_options

__all__ = ("Blueprint",)

#: Bumped when the meaning of a blueprint's JSON changes, so old ids never alias new modules.
IR_VERSION = 1


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

        get_family(self.family).check(dict(self.options), contract, self)

    def __repr__(self) -> str:
        return f"Blueprint({self.name})"
