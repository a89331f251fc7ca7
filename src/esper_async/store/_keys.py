"""Store keys, the requests they are derived from, and the store's default location.

A kernel's *key* says what was asked for (blueprint, shape contract, torch version, device kind,
optimizer options); its *id* (``Kernel.kernel_id``) says what was built (the sha256 of the
artifact). Two processes that ask for the same thing compute the same key, so the key is what
the store is looked up by; the id is what its blobs are addressed by.

A :class:`KernelRequest` is the document a key is the hash of. The store keeps it beside each
row and checks a kernel's metadata against it on every read (:func:`request_mismatch`), so a
row can never serve a kernel of another blueprint, contract, device kind or torch version.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..blueprints import Blueprint, SlotContract
from ..errors import StoreError
from ..kernels import KernelMetadata

__all__ = (
    "KEY_VERSION",
    "STORE_ENV_VAR",
    "KernelRequest",
    "canonical_text",
    "default_store_path",
    "kernel_key",
    "request_mismatch",
)

#: Bumped when the meaning of a key's inputs changes, so old keys never alias new kernels.
KEY_VERSION = 1

#: Environment variable that overrides the store's default location.
STORE_ENV_VAR = "ESPER_ASYNC_STORE"

#: The optimizer option that carries the kernel's init seed (the compiler has always keyed
#: kernels this way), checked against ``KernelMetadata.init_seed``.
INIT_SEED_OPTION = "init_seed"


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


def canonical_text(document: Any) -> str:
    """The canonical JSON text of ``document`` (sorted keys, no whitespace); keys hash it."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True, eq=False)
class KernelRequest:
    """What a caller asks the store for; its :attr:`key` is the store key.

    Pass a request (instead of a bare key) to ``KernelStore.get``, ``put`` and
    ``get_or_compile``: the store then checks the kernel it returns or stores against it.

    :param blueprint: the blueprint to build.
    :param contract: the slot contract it is built for.
    :param torch_version: ``torch.__version__`` of the process that will run the kernel.
    :param device_kind: ``"cpu"`` or ``"cuda"``.
    :param optimizer_options: the options that steer the kernel optimizer; ``{}`` if none.
    :param init_seed: the seed of the kernel's initial weights, or ``None`` when any will do;
        it enters the key as the optimizer option ``"init_seed"``.
    :raises StoreError: if an option is not JSON-representable, or ``init_seed`` is given
        twice with different values or is not an int.
    """

    blueprint: Blueprint
    contract: SlotContract
    torch_version: str
    device_kind: str
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    init_seed: int | None = None
    document: dict[str, Any] = field(init=False, repr=False)
    key: str = field(init=False)

    def __post_init__(self) -> None:
        options = _canonical(dict(self.optimizer_options), "optimizer_options")
        if self.init_seed is not None:
            if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
                raise StoreError(f"init_seed must be an int, got {self.init_seed!r}")
            if options.get(INIT_SEED_OPTION, self.init_seed) != self.init_seed:
                raise StoreError(
                    f"init_seed {self.init_seed} disagrees with optimizer option "
                    f"init_seed={options[INIT_SEED_OPTION]!r}"
                )
            options[INIT_SEED_OPTION] = self.init_seed
        document = {
            "blueprint": json.loads(self.blueprint.to_json()),
            "contract": self.contract.to_json(),
            "device_kind": str(self.device_kind),
            "key_version": KEY_VERSION,
            "optimizer": options,
            "torch_version": str(self.torch_version),
        }
        object.__setattr__(self, "document", document)
        text = canonical_text(document)
        object.__setattr__(self, "key", hashlib.sha256(text.encode()).hexdigest())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KernelRequest) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def text(self) -> str:
        """The canonical JSON text of :attr:`document`; :attr:`key` is its sha256."""
        return canonical_text(self.document)

    def mismatch(self, metadata: KernelMetadata) -> str | None:
        """Why a kernel with ``metadata`` is not what this request asks for, or ``None``."""
        return request_mismatch(self.document, metadata)


def request_mismatch(document: Mapping[str, Any], metadata: KernelMetadata) -> str | None:
    """Why a kernel with ``metadata`` does not answer the request ``document``, or ``None``.

    Compared exactly (canonical JSON): blueprint, contract, torch version, device kind, and the
    init seed when the request names one.
    """
    try:
        wanted = canonical_text(document.get("blueprint"))
        if metadata.blueprint_json != wanted:
            return (
                f"blueprint {_clip(metadata.blueprint_json)} is not the requested {_clip(wanted)}"
            )
        wanted, got = canonical_text(document.get("contract")), canonical_text(metadata.contract)
        if got != wanted:
            return f"contract {_clip(got)} is not the requested {_clip(wanted)}"
    except (TypeError, ValueError) as exc:
        return f"the request or metadata is not JSON ({exc})"
    for name in ("torch_version", "device_kind"):
        if getattr(metadata, name) != document.get(name):
            return f"{name} {_clip(getattr(metadata, name))} is not {_clip(document.get(name))}"
    options = document.get("optimizer")
    seed = options.get(INIT_SEED_OPTION) if isinstance(options, Mapping) else None
    if seed is not None and (type(seed) is not int or metadata.init_seed != seed):
        return f"init seed {metadata.init_seed!r} is not the requested {_clip(seed)}"
    return None


def _clip(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    keys, no whitespace), so it is the same in every process and on every machine. It is
    :attr:`KernelRequest.key` of the same inputs.

    :param blueprint: the blueprint to build.
    :param contract: the slot contract it is built for (a kernel is built for one shape).
    :param torch_version: ``torch.__version__`` of the process that will run the kernel.
    :param device_kind: ``"cpu"`` or ``"cuda"``.
    :param optimizer_options: the options that steer the kernel optimizer (execution forms
        tried, timing budget ...); ``{}`` when there are none.
    :raises StoreError: if an optimizer option is not JSON-representable.
    """
    return KernelRequest(
        blueprint,
        contract,
        torch_version=torch_version,
        device_kind=device_kind,
        optimizer_options=optimizer_options,
    ).key


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
