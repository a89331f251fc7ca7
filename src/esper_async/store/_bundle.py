"""Kernel bundles: a tar file holding a JSON manifest and the artifacts it names.

Layout of a bundle::

    manifest.json           {"format": "esper_async.kernel_bundle", "version": 1, "entries": [...]}
    blobs/<kernel_id>       one artifact per distinct kernel id

Each manifest entry holds a store key, the kernel's metadata, its tags and validation reports.
The functions here block (tar and file I/O); the store runs them in a worker thread.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError, StoreIntegrityError
from ._blobs import sha256_hex

__all__ = ("BUNDLE_FORMAT", "BUNDLE_VERSION", "BundleEntry", "read_bundle", "write_bundle")

BUNDLE_FORMAT = "esper_async.kernel_bundle"
BUNDLE_VERSION = 1
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BundleEntry:
    """One store entry in a bundle.

    :ivar key: the store key.
    :ivar metadata: the kernel's metadata (``KernelMetadata.to_json()``).
    :ivar artifact: the artifact bytes.
    :ivar tags: its tags.
    :ivar reports: its validation reports, as ``{"passed": bool, "report": {...}}`` mappings.
    """

    key: str
    metadata: dict[str, Any]
    artifact: bytes
    tags: tuple[str, ...] = ()
    reports: tuple[dict[str, Any], ...] = ()

    @property
    def kernel_id(self) -> str:
        """The kernel id the metadata announces."""
        return str(self.metadata["sha256"])


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_bundle(path: str | os.PathLike[str], entries: list[BundleEntry]) -> None:
    """Write ``entries`` to a bundle at ``path`` atomically (temporary file, fsync, rename).

    :raises StoreError: if the file cannot be written.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    now = time.time()
    manifest = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created_at": now,
        "entries": [
            {
                "key": e.key,
                "kernel_id": e.kernel_id,
                "metadata": e.metadata,
                "tags": list(e.tags),
                "validation_reports": list(e.reports),
                "blob": f"blobs/{e.kernel_id}",
            }
            for e in entries
        ],
    }
    try:
        with open(tmp, "xb") as handle:
            with tarfile.open(fileobj=handle, mode="w") as tar:
                _add_bytes(tar, _MANIFEST, json.dumps(manifest, indent=1).encode(), now)
                written: set[str] = set()
                for entry in entries:
                    if entry.kernel_id not in written:
                        _add_bytes(tar, f"blobs/{entry.kernel_id}", entry.artifact, now)
                        written.add(entry.kernel_id)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise StoreError(f"cannot write kernel bundle {target}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def read_bundle(path: str | os.PathLike[str]) -> list[BundleEntry]:
    """Read and verify every entry of the bundle at ``path``.

    Nothing is returned unless every artifact hashes to its kernel id, so an import is all or
    nothing. Members are read by name; nothing is extracted to disk.

    :raises StoreIntegrityError: if an artifact is missing or does not hash to its id.
    :raises StoreError: if the file is not a readable bundle.
    """
    source = Path(path)
    try:
        with tarfile.open(source, mode="r") as tar:
            manifest = json.loads(_member(tar, _MANIFEST, source))
            if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != BUNDLE_VERSION:
                raise StoreError(
                    f"{source} is not an esper_async kernel bundle of version {BUNDLE_VERSION} "
                    f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})"
                )
            entries: list[BundleEntry] = []
            for item in manifest["entries"]:
                kernel_id = str(item["kernel_id"])
                artifact = _member(tar, f"blobs/{kernel_id}", source)
                actual = sha256_hex(artifact)
                if actual != kernel_id or item["metadata"].get("sha256") != kernel_id:
                    raise StoreIntegrityError(
                        f"bundle {source}: artifact {kernel_id[:12]} hashes to {actual[:12]}; "
                        "nothing was imported",
                        key=str(item["key"]),
                    )
                entries.append(
                    BundleEntry(
                        key=str(item["key"]),
                        metadata=dict(item["metadata"]),
                        artifact=artifact,
                        tags=tuple(item.get("tags", ())),
                        reports=tuple(item.get("validation_reports", ())),
                    )
                )
    except (OSError, tarfile.TarError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StoreError(f"cannot read kernel bundle {source}: {exc}") from exc
    return entries


def _member(tar: tarfile.TarFile, name: str, source: Path) -> bytes:
    try:
        handle = tar.extractfile(name)
    except KeyError as exc:
        raise StoreIntegrityError(f"bundle {source} has no member {name!r}") from exc
    if handle is None:
        raise StoreIntegrityError(f"bundle {source}: member {name!r} is not a file")
    with handle:
        return handle.read()
