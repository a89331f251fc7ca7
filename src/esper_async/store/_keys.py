"""Store keys and the store's default location.

A kernel's *key* says what was asked for (blueprint, shape contract, torch version, device kind,
optimizer options); its *id* (``Kernel.kernel_id``) says what was built (the sha256 of the
artifact). Two processes that ask for the same thing compute the same key, so the key is what
the store is looked up by; the id is what its blobs are addressed by.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..blueprints import Blueprint, SlotContract
from ..errors import StoreError

__all__ = ("STORE_ENV_VAR", "default_store_path", "kernel_key")

#: Bumped when the meaning of a key's inputs changes, so old keys never alias new kernels.
KEY_VERSION = 1

#: Environment variable that overrides the store's default location.
STORE_ENV_VAR = "ESPER_ASYNC_STORE"


def _canonical(value: Any, where: str) -> Any:
    """Make ``value`` JSON-canonical (mappings with string keys, lists), or fail clearly."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise StoreError(f"optimizer option {where!r} must be finite, got {value}")
        return value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise StoreError(
        f"optimizer option {where!r} has type {type(value).__name__}; key inputs must be "
        "bool, int, float, str, None, lists or mappings of those"
    )


def kernel_key(
    blueprint: Blueprint,
    contract: SlotContract,
    *,
    torch_version: str,
    device_kind: str,
    optimizer_options: Mapping[str, Any],
) -> str:
    """The store key of the kernel built from ``blueprint`` for ``contract``.

    The key is the hex sha256 of a canonical JSON document holding the blueprint's canonical
    JSON, the contract, the torch version, the device kind and the optimizer's options (sorted
    keys, no whitespace), so it is the same in every process and on every machine.

    :param blueprint: the blueprint to build.
    :param contract: the slot contract it is built for (a kernel is built for one shape).
    :param torch_version: ``torch.__version__`` of the process that will run the kernel.
    :param device_kind: ``"cpu"`` or ``"cuda"``.
    :param optimizer_options: the options that steer the kernel optimizer (execution forms
        tried, timing budget ...); ``{}`` when there are none.
    :raises StoreError: if an optimizer option is not JSON-representable.
    """
    document = {
        "blueprint": json.loads(blueprint.to_json()),
        "contract": contract.to_json(),
        "device_kind": str(device_kind),
        "key_version": KEY_VERSION,
        "optimizer": _canonical(optimizer_options, "optimizer_options"),
        "torch_version": str(torch_version),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def default_store_path(run_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the store lives when no path is given.

    In order: ``$ESPER_ASYNC_STORE`` if set; ``<run_dir>/kernels`` if ``run_dir`` is given;
    ``$XDG_CACHE_HOME/esper_async/kernels``; ``~/.cache/esper_async/kernels``.

    :param run_dir: the run's directory, to keep the store beside the run.
    """
    override = os.environ.get(STORE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    if run_dir is not None:
        return Path(run_dir) / "kernels"
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "esper_async" / "kernels"
