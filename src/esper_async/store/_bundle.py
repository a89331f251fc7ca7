"""Kernel bundles: a tar file holding a JSON manifest and the artifacts it names.

Layout of a bundle (members in this order)::

    manifest.json           {"format": "esper_async.kernel_bundle", "version": 2, "entries": [...]}
    blobs/<kernel_id>       one artifact per distinct kernel id

Each manifest entry holds a store key, the request document the key is the hash of, the kernel's
metadata and its tags. A bundle may be gzip, bzip2 or xz compressed.

Reading treats the file as hostile. It is read in one pass, in chunks, with every bound checked
*while* reading (:class:`BundleLimits`: bytes per member, bytes in all, members, manifest size),
so a small compressed file cannot exhaust memory or disk. Only regular members named exactly
``manifest.json`` (first) or ``blobs/<64 hex digits>`` are accepted: links, directories,
devices, sparse files, other names (path traversal included) are refused. Artifacts are streamed
into the store's ``tmp/`` and hashed on the way; each must hash to its name. Every manifest
field is checked (:mod:`._untrusted`), and every entry's key must be the hash of its request,
whose blueprint, contract, device kind, torch version and seed must be the kernel's. Validation
reports in a bundle are never read: the store validates each kernel again itself.

The functions here block (tar and file I/O); the store runs them in a worker thread.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import tarfile
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._files import atomic_writer, open_regular
from .._seal import seal_matches, seal_of
from ..errors import StoreError, StoreForgeryError, StoreIntegrityError
from ..kernels import KernelMetadata
from ._keys import request_mismatch
from ._untrusted import MAX_NAME_CHARS, clip, is_digest, load_json, parse_metadata, parse_request

__all__ = (
    "BUNDLE_FORMAT",
    "BUNDLE_VERSION",
    "BundleEntry",
    "BundleLimits",
    "ManifestEntry",
    "StagedBundle",
    "stage_bundle",
    "write_bundle",
)

BUNDLE_FORMAT = "esper_async.kernel_bundle"
#: 2 added the request document of each entry (version 1 bundles cannot have their keys
#: checked, so they are refused).
BUNDLE_VERSION = 2
_MANIFEST = "manifest.json"
#: The member after the manifest in a sealed bundle: hex HMAC-SHA256(key, manifest bytes). The
#: manifest names every artifact by its sha256, which import checks, so it covers them too.
_SEAL = "manifest.seal"

#: Default bound on one artifact's bytes.
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
#: Default bound on the bytes of all members together, uncompressed.
DEFAULT_MAX_TOTAL_BYTES = 4 * 1024 * 1024 * 1024
#: Default bound on the members of a bundle (the manifest included) and on its entries.
DEFAULT_MAX_MEMBERS = 4096
#: Default bound on the manifest's bytes (it is parsed in memory).
DEFAULT_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
#: Most tags accepted on one entry.
MAX_TAGS = 64

#: Chunk size of reads from the tar stream.
_CHUNK = 64 * 1024
#: Largest single read tarfile may ask of the stream: a header block, a chunk, or a long-name
#: / pax header. A header asking for more is refused before anything is read.
_MAX_READ = 1024 * 1024
#: Bytes allowed per member beyond its data: a header block, a pax header, padding.
_HEADER_SLACK = 4096

_ENTRY_FIELDS = frozenset(
    ("key", "kernel_id", "metadata", "request", "tags", "validation_reports", "blob")
)
_MANIFEST_FIELDS = frozenset(("format", "version", "created_at", "entries"))


@dataclass(frozen=True)
class BundleLimits:
    """Bounds on what reading a bundle may take; every one is enforced while reading.

    :param max_member_bytes: bytes of one artifact.
    :param max_total_bytes: bytes of all members together, uncompressed.
    :param max_members: members of the tar file (the manifest included), and entries.
    :param max_manifest_bytes: bytes of the manifest.
    :raises ValueError: if a bound is not a positive int.
    """

    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS
    max_manifest_bytes: int = DEFAULT_MAX_MANIFEST_BYTES

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_total_bytes", "max_members", "max_manifest_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BundleLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class BundleEntry:
    """One store entry, as written to a bundle.

    :ivar key: the store key.
    :ivar metadata: the kernel's metadata (``KernelMetadata.to_json()``).
    :ivar artifact: the artifact bytes.
    :ivar tags: its tags.
    :ivar reports: its validation reports (written for people; an import ignores them).
    :ivar request: the request document the key is the hash of (``KernelRequest.document``);
        an import refuses entries without one.
    """

    key: str
    metadata: dict[str, Any]
    artifact: bytes
    tags: tuple[str, ...] = ()
    reports: tuple[dict[str, Any], ...] = ()
    request: Mapping[str, Any] | None = None

    @property
    def kernel_id(self) -> str:
        """The kernel id the metadata announces."""
        return str(self.metadata["sha256"])


@dataclass(frozen=True)
class ManifestEntry:
    """One checked manifest entry.

    :ivar index: its position in the manifest.
    :ivar key: the store key (checked: the hash of ``request``).
    :ivar metadata: the kernel's metadata (checked field by field).
    :ivar request: the request document.
    :ivar tags: its tags.
    """

    index: int
    key: str
    metadata: KernelMetadata
    request: dict[str, Any]
    tags: tuple[str, ...]

    @property
    def kernel_id(self) -> str:
        """The kernel id, the sha256 of its artifact."""
        return self.metadata.sha256


@dataclass
class StagedBundle:
    """A read bundle: its checked entries and their artifacts, staged as files in ``tmp/``.

    :ivar source: the bundle file.
    :ivar entries: the manifest's entries.
    :ivar files: kernel id -> the staged file holding that artifact (hash checked).
    """

    source: Path
    entries: list[ManifestEntry] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def discard(self) -> None:
        """Delete the staged files that are still there (blocking)."""
        for path in self.files.values():
            path.unlink(missing_ok=True)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_bundle(
    path: str | os.PathLike[str], entries: list[BundleEntry], *, seal_key: bytes | None = None
) -> None:
    """Write ``entries`` to a bundle at ``path`` atomically (a temporary file created without
    following a link, fsync, rename).

    :param seal_key: when given, the manifest is sealed with it (member ``manifest.seal``).
    :raises StoreError: if the file cannot be written.
    """
    target = Path(path)
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
                "request": None if e.request is None else dict(e.request),
                "tags": list(e.tags),
                "validation_reports": list(e.reports),
                "blob": f"blobs/{e.kernel_id}",
            }
            for e in entries
        ],
    }
    try:
        with atomic_writer(target) as handle:
            with tarfile.open(fileobj=handle, mode="w") as tar:
                raw_manifest = json.dumps(manifest, indent=1).encode()
                _add_bytes(tar, _MANIFEST, raw_manifest, now)
                if seal_key is not None:
                    _add_bytes(tar, _SEAL, seal_of(seal_key, raw_manifest).hex().encode(), now)
                written: set[str] = set()
                for entry in entries:
                    if entry.kernel_id not in written:
                        _add_bytes(tar, f"blobs/{entry.kernel_id}", entry.artifact, now)
                        written.add(entry.kernel_id)
    except OSError as exc:
        raise StoreError(f"cannot write kernel bundle {target}: {exc}") from exc


# -- reading ---------------------------------------------------------------------------------


class _BoundedStream:
    """The decompressed bytes of a bundle, refusing to go past ``limit`` or to serve one read
    larger than :data:`_MAX_READ` (tarfile reads a pax or long-name header whole)."""

    def __init__(self, inner: IO[bytes] | gzip.GzipFile, limit: int, name: str) -> None:
        self._inner = inner
        self._limit = limit
        self._name = name

    def _too_large(self, what: str) -> StoreError:
        return StoreError(
            f"bundle {self._name}: {what}; refused (raise BundleLimits to import a larger one)"
        )

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > _MAX_READ:
            raise self._too_large(f"a tar header asks to read {size} bytes at once")
        if self._inner.tell() + size > self._limit:
            raise self._too_large(f"it holds over {self._limit} bytes uncompressed")
        return self._inner.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._inner.tell()
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("bundles are read from the start")
        if offset > self._limit:
            raise self._too_large(f"it holds over {self._limit} bytes uncompressed")
        return self._inner.seek(offset)

    def tell(self) -> int:
        return self._inner.tell()


def _decompressed(raw: IO[bytes]) -> IO[bytes] | gzip.GzipFile:
    head = raw.read(6)
    raw.seek(0)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(raw)
    if head == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


def stage_bundle(
    path: str | os.PathLike[str],
    staging_dir: Path,
    limits: BundleLimits | None = None,
    *,
    seal_key: bytes | None = None,
) -> StagedBundle:
    """Read and check the bundle at ``path``, staging its artifacts as files in
    ``staging_dir`` (blocking). Nothing is staged unless everything checks.

    :param path: the bundle file.
    :param staging_dir: where artifacts are written (the store's ``tmp/``).
    :param limits: bounds on what reading may take (default :class:`BundleLimits`).
    :param seal_key: when given, the bundle must carry this key's seal over its manifest.
    :raises StoreForgeryError: if, with a ``seal_key``, the seal is missing or not the key's.
    :raises StoreIntegrityError: if an artifact does not hash to its id, is missing, or an
        entry's key is not the key of its request and metadata.
    :raises StoreError: if the file is not a readable bundle, breaks a bound, holds a member
        that is not allowed, or its manifest is malformed (naming the entry).
    """
    limits = limits or BundleLimits()
    source = Path(path)
    staged = StagedBundle(source)
    slack = (limits.max_members + 1) * _HEADER_SLACK + 2 * tarfile.RECORDSIZE + _MAX_READ
    try:
        with open_regular(source) as raw:  # a FIFO or a device: refused before a read
            stream = _BoundedStream(_decompressed(raw), limits.max_total_bytes + slack, source.name)
            with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
                _read_members(tar, source, staged, staging_dir, limits, seal_key)
    except BaseException as exc:
        staged.discard()
        if isinstance(exc, (OSError, EOFError, tarfile.TarError, lzma.LZMAError, zlib.error)):
            raise StoreError(f"cannot read kernel bundle {source}: {clip(str(exc), 160)}") from exc
        raise
    return staged


def _read_members(
    tar: tarfile.TarFile,
    source: Path,
    staged: StagedBundle,
    staging_dir: Path,
    limits: BundleLimits,
    seal_key: bytes | None,
) -> None:
    name = source.name
    count = total = 0
    wanted: set[str] = set()
    manifest = b""
    for member in tar:
        count += 1
        if count > limits.max_members:
            raise StoreError(f"bundle {name} has over {limits.max_members} members; refused")
        if not member.isreg() or member.issparse():
            raise StoreError(
                f"bundle {name}: member {clip(member.name)} is not a regular file (a link, "
                "directory or device); refused"
            )
        if member.size > limits.max_member_bytes:
            raise StoreError(
                f"bundle {name}: member {clip(member.name)} has {member.size} bytes, over "
                f"the {limits.max_member_bytes} allowed; refused"
            )
        total += member.size
        if total > limits.max_total_bytes:
            raise StoreError(
                f"bundle {name} holds over {limits.max_total_bytes} bytes uncompressed; refused"
            )
        if count == 1:
            if member.name != _MANIFEST:
                raise StoreError(f"bundle {name}: the first member must be {_MANIFEST}")
            manifest = _read_capped(
                tar, member, min(limits.max_manifest_bytes, limits.max_member_bytes)
            )
            staged.entries = parse_manifest(manifest, source, limits)
            wanted = {e.kernel_id for e in staged.entries}
            continue
        if count == 2 and member.name == _SEAL:
            _check_seal(name, manifest, _read_capped(tar, member, _SEAL_HEX), seal_key)
            seal_key = None  # checked
            continue
        if count == 2 and seal_key is not None:
            _check_seal(name, manifest, None, seal_key)
        kernel_id = member.name.removeprefix("blobs/")
        if member.name != f"blobs/{kernel_id}" or not is_digest(kernel_id):
            raise StoreError(f"bundle {name}: unexpected member {clip(member.name)}; refused")
        if kernel_id not in wanted or kernel_id in staged.files:
            raise StoreError(
                f"bundle {name}: member blobs/{kernel_id[:12]} is not named by the manifest "
                "or appears twice; refused"
            )
        _stage_member(tar, member, kernel_id, staged, staging_dir, limits)
    if count == 0:
        raise StoreError(f"bundle {name} is empty; it has no {_MANIFEST}")
    if count == 1 and seal_key is not None:
        _check_seal(name, manifest, None, seal_key)
    missing = sorted(wanted - set(staged.files))
    if missing:
        entry = next(e for e in staged.entries if e.kernel_id == missing[0])
        raise StoreIntegrityError(
            f"bundle {name} entry {entry.index}: no artifact blobs/{missing[0][:12]}; "
            "nothing was imported",
            key=entry.key,
        )


#: Bytes of the seal member (an HMAC-SHA256 in hex).
_SEAL_HEX = 64


def _check_seal(name: str, manifest: bytes, seal: bytes | None, key: bytes | None) -> None:
    """Refuse, with a ``key``, a bundle whose manifest seal is missing or not the key's."""
    if key is None:
        return
    if seal is None:
        raise StoreForgeryError(
            f"bundle {name} carries no seal, and a seal key is configured: it was not exported "
            "by a holder of the key (or its seal was stripped); nothing was imported"
        )
    try:
        given = bytes.fromhex(seal.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        given = b""
    if not seal_matches(key, manifest, given):
        raise StoreForgeryError(
            f"bundle {name} is sealed with another key, or its manifest was altered: the seal "
            "does not match under the configured key; nothing was imported"
        )


def _read_capped(tar: tarfile.TarFile, member: tarfile.TarInfo, cap: int) -> bytes:
    if member.size > cap:
        raise StoreError(f"{member.name} has {member.size} bytes, over the {cap} allowed")
    handle = tar.extractfile(member)
    assert handle is not None  # a regular member always has a file object
    chunks: list[bytes] = []
    size = 0
    with handle:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise StoreError(f"{member.name} holds over {cap} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


def _stage_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    kernel_id: str,
    staged: StagedBundle,
    staging_dir: Path,
    limits: BundleLimits,
) -> None:
    target = staging_dir / f"{kernel_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}.import"
    staged.files[kernel_id] = target  # discarded on any failure from here on
    handle = tar.extractfile(member)
    assert handle is not None
    digest = hashlib.sha256()
    size = 0
    with handle, open(target, "xb") as out:
        while chunk := handle.read(_CHUNK):
            size += len(chunk)
            if size > limits.max_member_bytes:
                raise StoreError(f"bundle member {member.name[:20]} grew past its bound")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != kernel_id:
        entry = next(e for e in staged.entries if e.kernel_id == kernel_id)
        raise StoreIntegrityError(
            f"bundle {staged.source.name} entry {entry.index}: artifact {kernel_id[:12]} hashes "
            f"to {digest.hexdigest()[:12]}; nothing was imported",
            key=entry.key,
        )


def parse_manifest(raw: bytes, source: Path, limits: BundleLimits) -> list[ManifestEntry]:
    """Check a manifest field by field and derive each entry's key from its request.

    :raises StoreIntegrityError: if an entry's key is not the hash of its request, or its
        kernel is not what the request asks for.
    :raises StoreError: naming the entry if anything is missing, extra or of the wrong type.
    """
    where = f"bundle {source.name}"
    data = load_json(raw, f"{where} manifest")
    if not isinstance(data, dict):
        raise StoreError(f"{where}: the manifest must be a JSON object, got {clip(data)}")
    if data.get("format") != BUNDLE_FORMAT or data.get("version") != BUNDLE_VERSION:
        raise StoreError(
            f"{where} is not an esper_async kernel bundle of version {BUNDLE_VERSION} "
            f"(format {clip(data.get('format'))}, version {clip(data.get('version'))}); "
            "re-export it with this esper_async"
        )
    extra = sorted(str(k) for k in data if k not in _MANIFEST_FIELDS)
    items = data.get("entries")
    if extra or not isinstance(items, list):
        raise StoreError(f"{where}: the manifest needs an 'entries' list and no other fields")
    if len(items) > limits.max_members:
        raise StoreError(f"{where} has over {limits.max_members} entries; refused")
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        entry = _parse_entry(item, f"{where} entry {index}", index)
        if entry.key in seen:
            raise StoreError(f"{where} entry {index}: key {entry.key[:12]} appears twice")
        seen.add(entry.key)
        entries.append(entry)
    return entries


def _parse_entry(item: object, where: str, index: int) -> ManifestEntry:
    if not isinstance(item, dict):
        raise StoreError(f"{where}: must be a JSON object, got {clip(item)}")
    extra = sorted(str(k) for k in item if k not in _ENTRY_FIELDS)
    if extra:
        raise StoreError(f"{where}: unknown field(s) {clip(extra)}")
    key = item.get("key")
    if not isinstance(key, str) or not is_digest(key):
        raise StoreError(f"{where}: 'key' must be a hex sha256 store key, got {clip(key)}")
    where = f"{where} (key {key[:12]})"
    kernel_id = item.get("kernel_id")
    if not isinstance(kernel_id, str) or not is_digest(kernel_id):
        raise StoreError(f"{where}: 'kernel_id' must be a hex sha256, got {clip(kernel_id)}")
    if item.get("blob", f"blobs/{kernel_id}") != f"blobs/{kernel_id}":
        raise StoreError(f"{where}: 'blob' must be blobs/<kernel_id>, got {clip(item['blob'])}")
    if item.get("request") is None:
        raise StoreError(
            f"{where}: no request document, so its key cannot be checked; refused "
            "(export it from a store that recorded one)"
        )
    metadata = parse_metadata(item.get("metadata"), where, resolve=True)
    if metadata.sha256 != kernel_id:
        raise StoreIntegrityError(
            f"{where}: metadata names kernel {metadata.sha256[:12]}, not {kernel_id[:12]}", key=key
        )
    document, derived = parse_request(item.get("request"), where)
    if derived != key:
        raise StoreIntegrityError(
            f"{where}: the key is not the hash of the entry's request ({derived[:12]}); "
            "the entry is forged or damaged",
            key=key,
        )
    reason = request_mismatch(document, metadata)
    if reason is not None:
        raise StoreIntegrityError(
            f"{where}: the kernel is not what its key asks for: {reason}", key=key
        )
    tags = item.get("tags", [])
    if (
        not isinstance(tags, list)
        or len(tags) > MAX_TAGS
        or not all(isinstance(t, str) and 0 < len(t) <= MAX_NAME_CHARS for t in tags)
    ):
        raise StoreError(
            f"{where}: 'tags' must be a list of at most {MAX_TAGS} short strings, got {clip(tags)}"
        )
    return ManifestEntry(index, key, metadata, document, tuple(tags))
