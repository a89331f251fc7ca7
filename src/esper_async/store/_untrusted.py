"""Strict readers of data the store cannot take on trust: kernel metadata, request documents
and bundle manifests.

Everything here was written by someone else (a bundle from another machine) or could have been
edited on disk (a row's JSON). Each reader checks every field's type and size and raises
:class:`StoreError` naming the object it was reading (``where``) -- never a raw ``KeyError``,
``TypeError`` or ``AttributeError`` -- and quotes bad values only clipped, so a huge string
never ends up in a message.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from ..blueprints import Blueprint, SlotContract
from ..errors import BlueprintError, StoreError, StoreIntegrityError
from ..kernels import KernelMetadata
from ._keys import INIT_SEED_OPTION, KEY_VERSION, canonical_text, request_mismatch
from ._records import KernelStatus, known_status

__all__ = (
    "MAX_NAME_CHARS",
    "MAX_TEXT_CHARS",
    "check_row",
    "clip",
    "is_digest",
    "load_json",
    "parse_metadata",
    "parse_request",
    "sort_rows",
)

#: Longest string accepted in a short field (torch version, dtype, execution form, tag).
MAX_NAME_CHARS = 256
#: Longest string accepted in a long field (a blueprint's JSON).
MAX_TEXT_CHARS = 64 * 1024
#: Most dimensions accepted in a shape.
MAX_RANK = 8

_HEX = frozenset("0123456789abcdef")

_METADATA_FIELDS = (
    "sha256",
    "blueprint_json",
    "contract",
    "input_shape",
    "output_shape",
    "dtype",
    "param_count",
    "torch_version",
    "device_kind",
    "execution_form",
    "init_seed",
    "compile_s",
    "extra",
)
_REQUEST_FIELDS = frozenset(
    ("blueprint", "contract", "device_kind", "key_version", "optimizer", "torch_version")
)


def clip(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except RecursionError:
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_digest(value: object) -> bool:
    """Whether ``value`` is a lowercase hex sha256 digest."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_json(text: str | bytes, where: str) -> Any:
    """Parse JSON strictly (no NaN or Infinity).

    :raises StoreError: naming ``where`` if it does not parse or nests too deeply.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise StoreError(f"{where}: the JSON nests too deeply") from exc
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise StoreError(f"{where}: not valid JSON ({clip(str(exc), 80)})") from exc


def _string(data: dict[str, Any], name: str, where: str, limit: int = MAX_NAME_CHARS) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise StoreError(
            f"{where}: {name!r} must be a string of at most {limit} chars, got {clip(value)}"
        )
    return value


def _integer(data: dict[str, Any], name: str, where: str, *, minimum: int | None = None) -> int:
    value = data.get(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (minimum is not None and value < minimum)
    ):
        bound = "" if minimum is None else f" >= {minimum}"
        raise StoreError(f"{where}: {name!r} must be an int{bound}, got {clip(value)}")
    return value


def _shape(data: dict[str, Any], name: str, where: str) -> tuple[int, ...]:
    value = data.get(name)
    if (
        not isinstance(value, list | tuple)
        or len(value) > MAX_RANK
        or not all(type(s) is int and s >= 0 for s in value)
    ):
        raise StoreError(
            f"{where}: {name!r} must be a list of at most {MAX_RANK} non-negative ints, "
            f"got {clip(value)}"
        )
    return tuple(value)


def _mapping(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise StoreError(f"{where}: {name!r} must be a JSON object, got {clip(value)}")
    return value


def _blueprint(text_or_data: Any, where: str) -> Blueprint:
    try:
        return Blueprint.from_json(text_or_data)
    except (BlueprintError, TypeError, ValueError, KeyError, RecursionError) as exc:
        raise StoreError(f"{where}: not a valid blueprint ({clip(str(exc), 120)})") from exc


def _contract(data: dict[str, Any], where: str) -> SlotContract:
    try:
        contract = SlotContract.from_json(data)
    except (BlueprintError, TypeError, ValueError, KeyError, RecursionError) as exc:
        raise StoreError(f"{where}: not a valid slot contract ({clip(str(exc), 120)})") from exc
    if contract.to_json() != data:
        raise StoreError(f"{where}: slot contract {clip(data)} is not in canonical form")
    return contract


def parse_metadata(data: object, where: str, *, resolve: bool = False) -> KernelMetadata:
    """Read kernel metadata (``KernelMetadata.to_json()``), checking every field.

    The contract must be a valid slot contract. With ``resolve``, the blueprint JSON must also
    be canonical JSON of a blueprint this process knows (its family registered): imports need
    that to validate the kernel; rows are read without it, so a store stays readable by a
    process that has not imported every blueprint family.

    :param data: the decoded JSON.
    :param where: what is being read, for messages ("bundle b.tar entry 2").
    :param resolve: also build the blueprint and require canonical JSON.
    :raises StoreError: naming ``where`` and the field if anything is missing, extra, of the
        wrong type or too large.
    """
    if not isinstance(data, dict):
        raise StoreError(f"{where}: metadata must be a JSON object, got {clip(data)}")
    unknown = sorted(str(k) for k in data if k not in _METADATA_FIELDS)
    if unknown:
        raise StoreError(f"{where}: metadata has unknown field(s) {clip(unknown)}")
    sha256 = data.get("sha256")
    if not is_digest(sha256):
        raise StoreError(f"{where}: metadata 'sha256' must be a hex sha256, got {clip(sha256)}")
    blueprint_json = _string(data, "blueprint_json", where, MAX_TEXT_CHARS)
    if resolve and _blueprint(blueprint_json, where).to_json() != blueprint_json:
        raise StoreError(f"{where}: metadata 'blueprint_json' is not canonical blueprint JSON")
    contract = _mapping(data, "contract", where)
    slot = _contract(contract, where)
    input_shape = _shape(data, "input_shape", where)
    dtype = _string(data, "dtype", where)
    if input_shape != slot.shape or dtype != slot.dtype:
        raise StoreError(
            f"{where}: input shape {clip(input_shape)} / dtype {clip(dtype)} disagree with the "
            f"contract {clip(contract, 80)}"
        )
    compile_s = data.get("compile_s")
    if (
        isinstance(compile_s, bool)
        or not isinstance(compile_s, int | float)
        or not (math.isfinite(compile_s))
    ):
        raise StoreError(f"{where}: 'compile_s' must be a finite number, got {clip(compile_s)}")
    return KernelMetadata(
        sha256=str(sha256),
        blueprint_json=blueprint_json,
        contract=contract,
        input_shape=input_shape,
        output_shape=_shape(data, "output_shape", where),
        dtype=dtype,
        param_count=_integer(data, "param_count", where, minimum=0),
        torch_version=_string(data, "torch_version", where),
        device_kind=_string(data, "device_kind", where),
        execution_form=_string(data, "execution_form", where),
        init_seed=_integer(data, "init_seed", where),
        compile_s=float(compile_s),
        extra=_mapping(data, "extra", where) if "extra" in data else {},
    )


def parse_request(data: object, where: str) -> tuple[dict[str, Any], str]:
    """Read a request document (``KernelRequest.document``) and derive its key.

    :returns: the document and its key (the sha256 of its canonical text).
    :raises StoreError: naming ``where`` if a field is missing, extra or of the wrong type.
    """
    if not isinstance(data, dict):
        raise StoreError(f"{where}: the request must be a JSON object, got {clip(data)}")
    if set(data) != _REQUEST_FIELDS:
        raise StoreError(
            f"{where}: the request must have exactly the fields {sorted(_REQUEST_FIELDS)}, "
            f"got {clip(sorted(str(k) for k in data), 120)}"
        )
    if _integer(data, "key_version", where) != KEY_VERSION:
        raise StoreError(f"{where}: request key_version {data['key_version']} is not {KEY_VERSION}")
    blueprint = _blueprint(_mapping(data, "blueprint", where), where)
    if json.loads(blueprint.to_json()) != data["blueprint"]:
        raise StoreError(f"{where}: the request's blueprint is not in canonical form")
    _contract(_mapping(data, "contract", where), where)
    _string(data, "torch_version", where)
    _string(data, "device_kind", where)
    options = _mapping(data, "optimizer", where)
    seed = options.get(INIT_SEED_OPTION)
    if seed is not None and type(seed) is not int:
        raise StoreError(f"{where}: the request's init_seed must be an int, got {clip(seed)}")
    try:
        text = canonical_text(data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StoreError(f"{where}: the request is not canonical JSON ({clip(str(exc))})") from exc
    return data, hashlib.sha256(text.encode()).hexdigest()


def check_row(
    key: str,
    kernel_id: object,
    metadata_json: object,
    request_json: object,
    document: dict[str, Any] | None,
) -> KernelMetadata:
    """Check a ready row before its blob is read: the metadata parses and names the row's
    kernel id, the stored request hashes to the key, and the kernel answers both the stored
    request and the caller's (``document``, when given).

    :returns: the row's metadata.
    :raises StoreIntegrityError: naming the key and what disagrees.
    """
    where = f"the row of key {key[:12]}"
    try:
        if not is_digest(kernel_id):
            raise StoreError(f"{where}: kernel id {clip(kernel_id)} is not a hex sha256")
        if not isinstance(metadata_json, str):
            raise StoreError(f"{where}: metadata is {clip(metadata_json)}, not JSON text")
        metadata = parse_metadata(load_json(metadata_json, where), where)
        if metadata.sha256 != kernel_id:
            raise StoreError(
                f"{where}: metadata names kernel {metadata.sha256[:12]}, not {str(kernel_id)[:12]}"
            )
        documents = [] if document is None else [document]
        if request_json is not None:
            if not isinstance(request_json, str):
                raise StoreError(f"{where}: its request is {clip(request_json)}, not JSON text")
            if hashlib.sha256(request_json.encode()).hexdigest() != key:
                raise StoreError(f"{where}: its stored request does not hash to the key")
            stored = load_json(request_json, where)
            if not isinstance(stored, dict):
                raise StoreError(f"{where}: its stored request is not a JSON object")
            documents.append(stored)
        for wanted in documents:
            reason = request_mismatch(wanted, metadata)
            if reason is not None:
                raise StoreError(f"{where} holds a kernel that was not asked for: {reason}")
    except StoreIntegrityError:
        raise
    except StoreError as exc:
        raise StoreIntegrityError(str(exc), key=key) from exc
    return metadata


def sort_rows(rows: list[Any]) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Check rows ``(key, kernel_id, status, metadata_json, request_json)`` as ``verify`` does.

    :returns: the ready kernel ids that passed (each with one of its keys), and the rows that
        failed as ``(key, kernel_id, reason)``.
    """
    ready: dict[str, str] = {}
    refused: list[tuple[str, str, str]] = []
    for key, kernel_id, status, metadata_json, request_json in rows:
        reason = None
        if not known_status(status):
            reason = f"unknown status {str(status)[:20]!r}"
        elif status == KernelStatus.READY.value:
            try:
                check_row(str(key), kernel_id, metadata_json, request_json, None)
            except StoreIntegrityError as exc:
                reason = str(exc)
            else:
                ready.setdefault(str(kernel_id), str(key))
        if reason is not None:
            refused.append((str(key), str(kernel_id), reason))
    return ready, refused
