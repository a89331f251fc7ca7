"""Queries and care of a kernel store: listing, tags, reports, statistics, gc, verify, bundles.

:class:`StoreQueries` is the half of :class:`KernelStore` that reads many rows or walks the blob
directory; the other half (``_store.py``) owns the connection, reads and writes single kernels.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiosqlite
import anyio
import structlog

from .._seal import resolve_key
from ..blueprints import Blueprint
from ..errors import StoreError, StoreIntegrityError
from ..kernels import Kernel
from ._bundle import BundleEntry, BundleLimits, stage_bundle, write_bundle
from ._import import checked_rows
from ._records import (
    GcReport,
    KernelRecord,
    KernelStatus,
    StoreStats,
    VerifyReport,
    known_status,
)
from ._rows import insert_row, quarantine_row
from ._schema import read_version
from ._untrusted import check_row, load_json, sort_rows

if TYPE_CHECKING:
    from ._blobs import BlobStore
    from ._lru import ByteLRU

__all__ = ("BlueprintRecord", "StoreQueries")

T = TypeVar("T")
_log = structlog.get_logger("esper_async.store")

#: Blob files without a row, and temporary files, younger than this are left alone by gc: a
#: put in another process writes its blob before it commits its row.
DEFAULT_ORPHAN_GRACE_S = 3600.0

_TAG_SEPARATOR = "\x1f"

_SELECT_RECORDS = f"""
SELECT k.key, k.kernel_id, k.blueprint_id, COALESCE(b.family, ''), k.status, k.nbytes,
       k.created_at, u.last_used_at, COALESCE(u.hits, 0), k.torch_version, k.device_kind,
       (SELECT group_concat(tag, '{_TAG_SEPARATOR}') FROM
           (SELECT tag FROM tags t WHERE t.key = k.key ORDER BY tag))
FROM kernels k
LEFT JOIN blueprints b ON b.blueprint_id = k.blueprint_id
LEFT JOIN usage u ON u.key = k.key
"""


@dataclass(frozen=True)
class BlueprintRecord:
    """A blueprint the store holds kernels of (its lineage).

    :ivar blueprint_id: the blueprint's id.
    :ivar family: its family.
    :ivar blueprint_json: its canonical JSON.
    :ivar first_seen_at: when its first kernel was stored.
    :ivar kernels: how many entries were built from it.
    """

    blueprint_id: str
    family: str
    blueprint_json: str
    first_seen_at: float
    kernels: int


def _record(row: Any) -> KernelRecord:
    key = str(row[0])
    if not known_status(row[4]):
        raise StoreIntegrityError(
            f"the row of key {key[:12]} has unknown status {str(row[4])[:20]!r}; run "
            "`esper-async store verify` to quarantine it",
            key=key,
        )
    tags = tuple(str(row[11]).split(_TAG_SEPARATOR)) if row[11] else ()
    try:
        return KernelRecord(
            key=key,
            kernel_id=str(row[1]),
            blueprint_id=str(row[2]),
            family=str(row[3]),
            status=KernelStatus(row[4]),
            nbytes=int(row[5]),
            created_at=float(row[6]),
            last_used_at=None if row[7] is None else float(row[7]),
            hits=int(row[8]),
            torch_version=str(row[9]),
            device_kind=str(row[10]),
            tags=tags,
        )
    except (TypeError, ValueError) as exc:
        raise StoreIntegrityError(
            f"the row of key {key[:12]} has a malformed column ({exc}); run "
            "`esper-async store verify` to quarantine it",
            key=key,
        ) from exc


class StoreQueries:
    """Listing, statistics and care operations of :class:`KernelStore` (a mixin)."""

    path: Path
    _blobs: BlobStore
    _lru: ByteLRU[str, Kernel]
    _clock: Callable[[], float]
    _disk_hits: int
    _compiles: int
    _shared_waits: int

    if TYPE_CHECKING:

        async def _db(
            self, operation: str, fn: Callable[[aiosqlite.Connection], Awaitable[T]], *, mode: Any
        ) -> T: ...

        async def _quarantine(self, kernel_id: str, key: str | None, reason: str) -> None: ...

        async def _flush_usage(self) -> None: ...

        async def _delete_keys(self, keys: list[str]) -> tuple[list[str], list[str]]: ...

    # -- listing -----------------------------------------------------------------------------

    async def list_kernels(
        self,
        *,
        blueprint: Blueprint | str | None = None,
        tag: str | None = None,
        status: KernelStatus | str | None = None,
        limit: int | None = None,
    ) -> list[KernelRecord]:
        """Entries, oldest first, filtered by blueprint, tag and status.

        :param blueprint: a :class:`Blueprint`, a blueprint id (``bp-...``) or a family name.
        :param tag: only entries with this tag.
        :param status: only entries in this status.
        :param limit: at most this many.
        :raises StoreError: on database errors.
        """
        if isinstance(blueprint, Blueprint):
            blueprint = blueprint.id
        wanted = None if status is None else KernelStatus(status).value
        sql = (
            _SELECT_RECORDS + "WHERE (?1 IS NULL OR k.blueprint_id = ?1 OR b.family = ?1) "
            "AND (?2 IS NULL OR k.status = ?2) "
            "AND (?3 IS NULL OR EXISTS (SELECT 1 FROM tags t WHERE t.key = k.key AND t.tag = ?3)) "
            "ORDER BY k.created_at, k.key LIMIT ?4"
        )
        params = (blueprint, wanted, tag, -1 if limit is None else int(limit))

        async def fetch(conn: aiosqlite.Connection) -> list[Any]:
            async with conn.execute(sql, params) as cursor:
                return list(await cursor.fetchall())

        rows = await self._db("list kernels", fetch, mode="read")
        return [_record(row) for row in rows]

    async def record(self, key: str) -> KernelRecord | None:
        """The entry ``key`` as listed, or ``None``.

        :raises StoreError: on database errors.
        """

        async def fetch(conn: aiosqlite.Connection) -> Any:
            async with conn.execute(_SELECT_RECORDS + "WHERE k.key = ?", (key,)) as cursor:
                return await cursor.fetchone()

        row = await self._db("read a kernel record", fetch, mode="read")
        return None if row is None else _record(row)

    async def blueprints(self) -> list[BlueprintRecord]:
        """The blueprints the store has seen, with how many entries each has (lineage).

        :raises StoreError: on database errors.
        """
        sql = (
            "SELECT b.blueprint_id, b.family, b.blueprint_json, b.first_seen_at, "
            "(SELECT COUNT(*) FROM kernels k WHERE k.blueprint_id = b.blueprint_id) "
            "FROM blueprints b ORDER BY b.first_seen_at, b.blueprint_id"
        )

        async def fetch(conn: aiosqlite.Connection) -> list[Any]:
            async with conn.execute(sql) as cursor:
                return list(await cursor.fetchall())

        rows = await self._db("list blueprints", fetch, mode="read")
        return [
            BlueprintRecord(str(r[0]), str(r[1]), str(r[2]), float(r[3]), int(r[4])) for r in rows
        ]

    async def validation_reports(self, key: str) -> list[dict[str, Any]]:
        """The validation reports of ``key``, oldest first, as ``{"passed", "report", "at"}``.

        :raises StoreIntegrityError: if a stored report is malformed.
        :raises StoreError: on database errors.
        """
        sql = (
            "SELECT passed, report_json, created_at FROM validation_reports WHERE key = ? "
            "ORDER BY created_at, id"
        )

        async def fetch(conn: aiosqlite.Connection) -> list[Any]:
            async with conn.execute(sql, (key,)) as cursor:
                return list(await cursor.fetchall())

        rows = await self._db("read validation reports", fetch, mode="read")
        where = f"a validation report of key {key[:12]}"
        try:
            return [
                {"passed": bool(r[0]), "report": load_json(r[1], where), "at": float(r[2])}
                for r in rows
            ]
        except (StoreError, TypeError, ValueError) as exc:
            raise StoreIntegrityError(f"{where} is malformed: {exc}", key=key) from exc

    async def stats(self) -> StoreStats:
        """Figures about the store (one consistent snapshot) and this process's use of it.

        :raises StoreError: on database errors.
        """
        await self._flush_usage()

        async def gather(conn: aiosqlite.Connection) -> tuple[Any, ...]:
            async def one(sql: str) -> Any:
                async with conn.execute(sql) as cursor:
                    return await cursor.fetchall()

            return (
                await read_version(conn),
                await one("SELECT status, COUNT(*) FROM kernels GROUP BY status"),
                await one("SELECT COUNT(DISTINCT blueprint_id) FROM kernels"),
                await one(
                    "SELECT COALESCE(SUM(nbytes), 0) FROM (SELECT kernel_id, MAX(nbytes) AS nbytes "
                    "FROM kernels WHERE status = 'ready' GROUP BY kernel_id)"
                ),
                await one("SELECT COUNT(*) FROM quarantine"),
            )

        version, by_status, blueprints, total, quarantined = await self._db(
            "gather statistics", gather, mode="snapshot"
        )
        return StoreStats(
            path=str(self.path),
            schema_version=version,
            kernels={str(s): int(n) for s, n in by_status},
            blueprints=int(blueprints[0][0]),
            total_bytes=int(total[0][0]),
            quarantine_events=int(quarantined[0][0]),
            lru=self._lru.stats(),
            disk_hits=self._disk_hits,
            compiles=self._compiles,
            shared_waits=self._shared_waits,
        )

    # -- labels and reports -------------------------------------------------------------------

    async def tag(self, key: str, *tags: str) -> None:
        """Add ``tags`` to the entry ``key``.

        :raises StoreError: if there is no such entry, or on database errors.
        """

        async def add(conn: aiosqlite.Connection) -> bool:
            async with conn.execute("SELECT 1 FROM kernels WHERE key = ?", (key,)) as cursor:
                if await cursor.fetchone() is None:
                    return False
            await conn.executemany(
                "INSERT OR IGNORE INTO tags (key, tag) VALUES (?, ?)", [(key, t) for t in tags]
            )
            return True

        if not await self._db("tag a kernel", add, mode="write"):
            raise StoreError(f"no kernel under key {key[:12]} in {self.path}; nothing was tagged")

    async def add_validation_report(
        self, key: str, report: Mapping[str, Any], *, passed: bool
    ) -> None:
        """Record a validation report for the entry ``key``; a failed one marks it rejected.

        :raises StoreError: if there is no such entry, or on database errors.
        """
        now = self._clock()

        async def add(conn: aiosqlite.Connection) -> bool:
            async with conn.execute("SELECT 1 FROM kernels WHERE key = ?", (key,)) as cursor:
                if await cursor.fetchone() is None:
                    return False
            await conn.execute(
                "INSERT INTO validation_reports (key, passed, report_json, created_at) "
                "VALUES (?, ?, ?, ?)",
                (key, int(passed), json.dumps(dict(report), sort_keys=True, default=str), now),
            )
            if not passed:
                await conn.execute(
                    "UPDATE kernels SET status = ? WHERE key = ?",
                    (KernelStatus.REJECTED.value, key),
                )
            return True

        if not await self._db("record a validation report", add, mode="write"):
            raise StoreError(f"no kernel under key {key[:12]} in {self.path}; report not recorded")
        if not passed:
            self._lru.pop(key)

    # -- care --------------------------------------------------------------------------------

    async def gc(
        self,
        *,
        max_age_s: float | None = None,
        max_total_bytes: int | None = None,
        orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove entries unused for ``max_age_s``, then the least recently used until the
        ready artifacts fit in ``max_total_bytes``; then blobs no entry uses, leftover
        temporary files, and quarantined files older than ``max_age_s``.

        A blob removed here while another process stores the same kernel id is detected on
        read (missing blob), quarantined and recompiled: gc never makes a bad kernel load.

        :param max_age_s: age limit, from last use (or creation if never used).
        :param max_total_bytes: size limit on the distinct artifacts of ready entries.
        :param orphan_grace_s: unreferenced or temporary files younger than this are kept.
        :param dry_run: report without deleting anything.
        :raises StoreError: on database or file errors.
        """
        await self._flush_usage()
        now = self._clock()
        rows = await self._db(
            "list kernels for gc",
            lambda conn: _fetch_all(
                conn,
                "SELECT k.key, k.kernel_id, k.nbytes, k.status, "
                "COALESCE(u.last_used_at, k.created_at) FROM kernels k "
                "LEFT JOIN usage u ON u.key = k.key ORDER BY 5, k.key",
            ),
            mode="read",
        )
        doomed = [str(r[0]) for r in rows if max_age_s is not None and r[4] < now - max_age_s]
        if max_total_bytes is not None:
            doomed += _over_budget(rows, set(doomed), max_total_bytes)
        removed: list[str] = list(doomed)
        orphaned: list[str] = []
        if not dry_run and doomed:
            removed, orphaned = await self._delete_keys(doomed)
        freed = 0
        sizes = {str(r[1]): int(r[2]) for r in rows}
        for kernel_id in orphaned:
            if await self._blobs.remove(kernel_id):
                freed += sizes.get(kernel_id, 0)
        orphans, orphan_bytes = await self._remove_orphans(now - orphan_grace_s, dry_run)
        stale = 0
        if not dry_run:
            stale = await anyio.to_thread.run_sync(
                self._blobs.remove_stale, self._blobs.tmp_dir, now - orphan_grace_s
            )
            if max_age_s is not None:
                stale += await anyio.to_thread.run_sync(
                    self._blobs.remove_stale, self._blobs.quarantine_dir, now - max_age_s
                )
        report = GcReport(
            removed_keys=tuple(removed),
            removed_blobs=len(orphaned),
            orphan_blobs=orphans,
            stale_files=stale,
            freed_bytes=freed + orphan_bytes,
            dry_run=dry_run,
        )
        _log.info("store.gc", path=str(self.path), removed=len(removed), dry_run=dry_run)
        return report

    async def _remove_orphans(self, older_than: float, dry_run: bool) -> tuple[int, int]:
        referenced = await self._referenced_ids()
        on_disk = await anyio.to_thread.run_sync(lambda: list(self._blobs.iter_digests()))
        count = freed = 0
        for digest, size, mtime in on_disk:
            if digest in referenced or mtime >= older_than:
                continue
            if dry_run or await self._blobs.remove(digest):
                count += 1
                freed += size
        return count, freed

    async def _referenced_ids(self) -> set[str]:
        rows = await self._db(
            "list kernel ids",
            lambda conn: _fetch_all(conn, "SELECT DISTINCT kernel_id FROM kernels"),
            mode="read",
        )
        return {str(r[0]) for r in rows}

    async def verify(self) -> VerifyReport:
        """Check every row and the blob of every ready entry; quarantine what is wrong.

        Rows: a known status; for ready rows, metadata that parses and names the row's kernel,
        and a stored request that hashes to the key and that the kernel answers. Blobs: a
        regular file whose bytes hash to its name. Something other than a regular file at a
        blob path no row uses is moved to ``quarantine/`` too.

        :raises StoreError: on database or file errors.
        """
        rows = await self._db(
            "list kernels to verify",
            lambda conn: _fetch_all(
                conn,
                "SELECT key, kernel_id, status, metadata_json, request_json FROM kernels "
                "ORDER BY key",
            ),
            mode="read",
        )
        ready, refused = sort_rows(rows)
        if refused:
            await self._quarantine_rows(refused, self._clock())
        bad: list[str] = []
        for kernel_id, key in sorted(ready.items()):
            try:
                await self._blobs.read(kernel_id)
            except StoreIntegrityError as exc:
                bad.append(kernel_id)
                await self._quarantine(kernel_id, key, str(exc))
        referenced = await self._referenced_ids()
        irregular = await anyio.to_thread.run_sync(lambda: list(self._blobs.iter_irregular()))
        moved = [d for d in irregular if d not in bad]
        for digest in moved:
            await self._quarantine(digest, None, "not a regular file")
        on_disk = await anyio.to_thread.run_sync(lambda: list(self._blobs.iter_digests()))
        orphans = sum(1 for digest, _, _ in on_disk if digest not in referenced)
        return VerifyReport(
            checked=len(ready),
            ok=len(ready) - len(bad),
            quarantined=tuple(bad),
            orphans=orphans,
            bad_rows=tuple(key for key, _, _ in refused),
            irregular=tuple(moved),
        )

    # -- bundles -----------------------------------------------------------------------------

    async def export_bundle(
        self,
        path: str | os.PathLike[str],
        *,
        keys: Iterable[str] | None = None,
        blueprint: Blueprint | str | None = None,
        tag: str | None = None,
        seal_key: bytes | str | None = None,
    ) -> int:
        """Write ready entries (all, the given ``keys``, or those matching the filters) to a
        tar bundle with a JSON manifest, atomically. Every artifact is verified as it is read.

        With a seal key (``seal_key``, else ``$ESPER_SEAL_KEY``) the manifest is sealed with
        HMAC-SHA256, so that an importer holding the key refuses a forged bundle.

        :returns: the number of entries written.
        :raises StoreIntegrityError: if an artifact fails verification (it is quarantined and
            no bundle is written).
        :raises StoreError: on database or file errors, or if a key has no ready entry.
        """
        records = await self.list_kernels(blueprint=blueprint, tag=tag, status=KernelStatus.READY)
        if keys is not None:
            by_key = {r.key: r for r in records}
            wanted = list(dict.fromkeys(keys))
            missing = [k for k in wanted if k not in by_key]
            if missing:
                raise StoreError(
                    f"no ready kernel under {len(missing)} key(s), e.g. {missing[0][:12]}; "
                    "nothing was exported"
                )
            records = [by_key[k] for k in wanted]
        entries: list[BundleEntry] = []
        for rec in records:
            metadata_json, request_json = await self._row_documents(rec.key)
            try:
                check_row(rec.key, rec.kernel_id, metadata_json, request_json, None)
            except StoreIntegrityError as exc:
                raise StoreIntegrityError(
                    f"{exc}; run `esper-async store verify`. Nothing was exported", key=rec.key
                ) from exc
            if request_json is None:
                raise StoreError(
                    f"the entry {rec.key[:12]} has no request document (stored by an older "
                    "esper_async or put with a bare key), so an importer could not check its "
                    "key; recompile it through BlueprintCompiler. Nothing was exported"
                )
            try:
                artifact = await self._blobs.read(rec.kernel_id)
            except StoreIntegrityError as exc:
                await self._quarantine(rec.kernel_id, rec.key, str(exc))
                raise
            reports = [
                {"passed": r["passed"], "report": r["report"]}
                for r in await self.validation_reports(rec.key)
            ]
            entries.append(
                BundleEntry(
                    rec.key,
                    load_json(metadata_json, rec.key),
                    artifact,
                    rec.tags,
                    tuple(reports),
                    load_json(request_json, rec.key),
                )
            )
        key = resolve_key(seal_key)
        await anyio.to_thread.run_sync(
            functools.partial(write_bundle, Path(path), entries, seal_key=key)
        )
        _log.info("store.exported", path=str(path), entries=len(entries))
        return len(entries)

    async def import_bundle(
        self,
        path: str | os.PathLike[str],
        *,
        limits: BundleLimits | None = None,
        seal_key: bytes | str | None = None,
    ) -> int:
        """Store every entry of a bundle, all or none (entries already present are kept).

        The bundle is read within ``limits``; every manifest field is checked; each key must
        be the hash of its entry's request, and each kernel what that request asks for; each
        artifact must hash to its id and pass this process's own validator (the bundle's
        reports are ignored). Only then are the artifacts moved into ``blobs/`` and every row
        committed in one transaction. On any failure nothing is stored (a crash between the
        two steps leaves unreferenced blobs, which ``gc`` removes).

        :param path: the bundle file.
        :param limits: bounds on what reading it may take (default :class:`BundleLimits`).
        :param seal_key: when set (else ``$ESPER_SEAL_KEY``), the bundle must carry this key's
            seal; without a key, seals are neither required nor checked.
        :returns: the number of entries whose kernel is now the one stored under their key.
        :raises StoreForgeryError: if, with a seal key, the seal is missing or foreign.
        :raises StoreIntegrityError: if an entry is forged or damaged, or fails validation.
        :raises StoreError: if the file is not a readable bundle, breaks a bound or is
            malformed (naming the entry), or on store errors.
        """
        staged = await anyio.to_thread.run_sync(
            functools.partial(
                stage_bundle, Path(path), self._blobs.tmp_dir, limits,
                seal_key=resolve_key(seal_key),
            )
        )
        try:
            rows = await checked_rows(staged)
            for kernel_id, tmp in staged.files.items():
                await self._blobs.adopt(tmp, kernel_id)
            now = self._clock()

            async def insert_all(conn: aiosqlite.Connection) -> list[str]:
                return [await insert_row(conn, row, now) for row in rows]

            winners = await self._db("import a bundle", insert_all, mode="write")
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(staged.discard)
        stored = sum(w == row.kernel_id for w, row in zip(winners, rows, strict=True))
        _log.info("store.imported", path=str(path), entries=len(rows), stored=stored)
        return stored

    async def _quarantine_rows(self, rows: list[tuple[str, str, str]], now: float) -> None:
        """Quarantine rows ``(key, kernel_id, reason)`` alone, leaving their blobs."""

        async def mark(conn: aiosqlite.Connection) -> None:
            for key, kernel_id, reason in rows:
                await quarantine_row(conn, key, kernel_id, reason, now)

        await self._db("quarantine rows", mark, mode="write")
        for key, kernel_id, reason in rows:
            _log.warning("store.row_quarantined", key=key, kernel_id=kernel_id, reason=reason)

    async def _row_documents(self, key: str) -> tuple[str, str | None]:
        rows = await self._db(
            "read kernel metadata",
            lambda conn: _fetch_all(
                conn, "SELECT metadata_json, request_json FROM kernels WHERE key = ?", (key,)
            ),
            mode="read",
        )
        if not rows:
            raise StoreError(f"no kernel under key {key[:12]}")
        return rows[0][0], rows[0][1]


async def _fetch_all(
    conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()
) -> list[Any]:
    async with conn.execute(sql, params) as cursor:
        return list(await cursor.fetchall())


def _over_budget(rows: list[Any], doomed: set[str], max_total_bytes: int) -> list[str]:
    """Keys to drop, least recently used first, until ready artifacts fit the budget.

    ``rows`` are ``(key, kernel_id, nbytes, status, last_used)`` ordered by last use; an
    artifact counts once however many keys share it, and is freed with its last key.
    """
    users: dict[str, int] = {}
    sizes: dict[str, int] = {}
    live = [r for r in rows if str(r[0]) not in doomed and r[3] == KernelStatus.READY.value]
    for _key, kernel_id, nbytes, _status, _used in live:
        users[kernel_id] = users.get(kernel_id, 0) + 1
        sizes[kernel_id] = int(nbytes)
    total = sum(sizes.values())
    extra: list[str] = []
    for key, kernel_id, _nbytes, _status, _used in live:
        if total <= max_total_bytes:
            break
        extra.append(str(key))
        users[kernel_id] -= 1
        if users[kernel_id] == 0:
            total -= sizes[kernel_id]
    return extra
