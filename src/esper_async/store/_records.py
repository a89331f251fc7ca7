"""What the store reports: kernel status, records, statistics, and gc / verify reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._lru import LRUStats

__all__ = (
    "GcReport",
    "KernelRecord",
    "KernelStatus",
    "StoreStats",
    "VerifyReport",
    "known_status",
)


class KernelStatus(StrEnum):
    """The state of a store entry."""

    READY = "ready"
    """Its blob verified when it was written; ``get`` serves it."""
    QUARANTINED = "quarantined"
    """Its blob failed verification; ``get`` treats it as a miss until it is put again."""
    REJECTED = "rejected"
    """It failed validation; kept for its report, never served."""


_STATUSES = frozenset(s.value for s in KernelStatus)


def known_status(value: object) -> bool:
    """Whether ``value`` (a row's status column) is a :class:`KernelStatus` value."""
    return isinstance(value, str) and value in _STATUSES


@dataclass(frozen=True)
class KernelRecord:
    """One store entry, as listed (the artifact is not read).

    :ivar key: the store key (see :func:`kernel_key`).
    :ivar kernel_id: the sha256 of the artifact.
    :ivar blueprint_id: the id of the blueprint it was built from.
    :ivar family: that blueprint's family.
    :ivar status: see :class:`KernelStatus`.
    :ivar nbytes: artifact size.
    :ivar created_at: when it was put (seconds since the epoch).
    :ivar last_used_at: when it was last served, or ``None``.
    :ivar hits: how many times it was served (flushed counts).
    :ivar torch_version: the torch version it was built with.
    :ivar device_kind: the device kind it was built for.
    :ivar tags: its tags, sorted.
    """

    key: str
    kernel_id: str
    blueprint_id: str
    family: str
    status: KernelStatus
    nbytes: int
    created_at: float
    last_used_at: float | None
    hits: int
    torch_version: str
    device_kind: str
    tags: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        return {
            "key": self.key,
            "kernel_id": self.kernel_id,
            "blueprint_id": self.blueprint_id,
            "family": self.family,
            "status": self.status.value,
            "nbytes": self.nbytes,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "hits": self.hits,
            "torch_version": self.torch_version,
            "device_kind": self.device_kind,
            "tags": list(self.tags),
        }


@dataclass(frozen=True)
class StoreStats:
    """Figures about a store and this process's use of it.

    :ivar path: the store's root directory.
    :ivar schema_version: the schema version on disk.
    :ivar kernels: entries by status.
    :ivar blueprints: distinct blueprints with at least one entry.
    :ivar total_bytes: size of the distinct artifacts referenced by ready entries.
    :ivar quarantine_events: quarantines ever logged.
    :ivar lru: the in-memory cache's counters.
    :ivar disk_hits: kernels this process read from disk.
    :ivar compiles: compiles this process ran through ``get_or_compile``.
    :ivar shared_waits: ``get_or_compile`` calls that waited on another call's compile.
    """

    path: str
    schema_version: int
    kernels: dict[str, int]
    blueprints: int
    total_bytes: int
    quarantine_events: int
    lru: LRUStats
    disk_hits: int
    compiles: int
    shared_waits: int

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        lru = self.lru
        return {
            "path": self.path,
            "schema_version": self.schema_version,
            "kernels": dict(self.kernels),
            "blueprints": self.blueprints,
            "total_bytes": self.total_bytes,
            "quarantine_events": self.quarantine_events,
            "lru": {
                "hits": lru.hits,
                "misses": lru.misses,
                "evictions": lru.evictions,
                "entries": lru.entries,
                "nbytes": lru.nbytes,
                "capacity_bytes": lru.capacity_bytes,
                "hit_rate": lru.hit_rate,
            },
            "disk_hits": self.disk_hits,
            "compiles": self.compiles,
            "shared_waits": self.shared_waits,
        }


@dataclass(frozen=True)
class GcReport:
    """What a garbage collection removed (or would remove, on a dry run).

    :ivar removed_keys: entries deleted.
    :ivar removed_blobs: blob files deleted (no entry referenced them any more).
    :ivar orphan_blobs: blob files without any entry, older than the grace period, deleted.
    :ivar stale_files: leftover temporary and old quarantined files deleted.
    :ivar freed_bytes: bytes of blob files deleted.
    :ivar dry_run: whether nothing was actually deleted.
    """

    removed_keys: tuple[str, ...] = ()
    removed_blobs: int = 0
    orphan_blobs: int = 0
    stale_files: int = 0
    freed_bytes: int = 0
    dry_run: bool = False


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking every row and every ready entry's blob.

    :ivar checked: blobs checked.
    :ivar ok: blobs whose bytes hash to their name.
    :ivar quarantined: kernel ids found corrupt, missing or not regular files, now quarantined.
    :ivar orphans: blob files no entry references (harmless; ``gc`` removes them).
    :ivar bad_rows: keys whose row failed its checks (unreadable metadata, a kernel that is
        not what the key asks for, an unknown status), now quarantined.
    :ivar irregular: digests whose path held no regular file and no row used, moved to
        ``quarantine/``.
    """

    checked: int
    ok: int
    quarantined: tuple[str, ...] = field(default_factory=tuple)
    orphans: int = 0
    bad_rows: tuple[str, ...] = field(default_factory=tuple)
    irregular: tuple[str, ...] = field(default_factory=tuple)

    @property
    def problems(self) -> int:
        """How many things were wrong (orphans are not: a crashed put leaves them)."""
        return len(self.quarantined) + len(self.bad_rows) + len(self.irregular)
