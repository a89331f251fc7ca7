"""The kernel store: SQLite (through aiosqlite) for rows, content-addressed files for artifacts.

Resource handling: a :class:`KernelStore` is opened with ``async with``. Opening creates the
directories, connects, switches the database to WAL mode, migrates the schema and starts one
background task (the usage flusher) in a task group the store owns. Closing cancels that task,
then flushes usage counts and closes the connection shielded from cancellation.

Write order (the crash-safety argument): a put writes its blob atomically first, then commits its
row in one ``BEGIN IMMEDIATE`` transaction. A crash before the commit leaves at most an
unreferenced blob (garbage collection removes it after a grace period) and never a row without
its blob; a committed row is durable (WAL with ``synchronous=FULL``).

Trust (see docs/store.md, "Trust model"): every read from disk checks the row before the blob --
its metadata parses and names the row's kernel id, the request document stored beside it hashes
to the key, and the kernel is of the blueprint, contract, device kind, torch version and seed
that request (and the caller's :class:`KernelRequest`, when given) asks for -- then the blob's
sha256. A store whose index is missing or empty while blobs exist refuses to open, so it is
never silently emptied over its blobs.

Error handling: sqlite and OS errors are mapped to :class:`StoreError` ``from`` the original;
a blob that is missing, not a regular file or does not hash to its kernel id is quarantined
and reported as :class:`StoreIntegrityError`, and its bytes are never returned; a row that
fails its checks is quarantined alone (its blob may serve other keys). Busy databases (other
processes writing) are waited on through SQLite's busy timeout and retried with backoff, all
within ``db_timeout_s``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import aiosqlite
import anyio
import structlog

from ..blueprints import Blueprint
from ..errors import KernelIntegrityError, StoreError, StoreIntegrityError
from ..kernels import Kernel
from ._blobs import BlobStore, sha256_hex
from ._keys import KernelRequest, default_store_path
from ._lru import ByteLRU
from ._queries import StoreQueries
from ._records import KernelStatus, known_status
from ._rows import NewRow, insert_row
from ._schema import SCHEMA_VERSION, migrate
from ._untrusted import check_row

__all__ = ("KernelStore",)

T = TypeVar("T")
_log = structlog.get_logger("esper_async.store")

#: Default bound on the bytes of kernels kept in memory.
DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024
#: How long one SQLite call waits on another process's lock before reporting busy.
DEFAULT_BUSY_TIMEOUT_S = 10.0
#: Deadline for one store operation against the database, retries included.
DEFAULT_DB_TIMEOUT_S = 60.0
#: Retries after a busy/locked error that outlived the busy timeout.
DEFAULT_RETRIES = 8
#: Usage counts are batched in memory and written this often (and at close), so a hit does
#: not cost a durable write.
DEFAULT_USAGE_FLUSH_S = 5.0

_DB_NAME = "store.sqlite3"
_SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

CompileFn = Callable[[], Awaitable[Kernel]]
_Mode = Literal["read", "snapshot", "write"]
KeyLike = str | KernelRequest


def _split(key: KeyLike) -> tuple[str, KernelRequest | None]:
    if isinstance(key, KernelRequest):
        return key.key, key
    if not isinstance(key, str) or not key:
        raise StoreError(f"a store key must be a non-empty string or a KernelRequest, got {key!r}")
    return key, None


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _SQLITE_BUSY_CODES
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _Flight:
    """One in-process compile that concurrent ``get_or_compile`` calls for a key share."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.kernel: Kernel | None = None
        self.error: BaseException | None = None


class KernelStore(StoreQueries):
    """A persistent, content-addressed library of kernels, shared safely between processes.

    :param path: the store's root directory; default :func:`default_store_path` (``run_dir``).
    :param run_dir: the run's directory, used for the default path when ``path`` is not given.
    :param memory_bytes: bound on the bytes of kernels kept in memory (0: no memory cache).
    :param busy_timeout_s: SQLite busy timeout of each call.
    :param db_timeout_s: deadline of each database operation, retries included.
    :param retries: retries after a busy error that outlived the busy timeout.
    :param usage_flush_s: how often batched usage counts are written.
    :param clock: seconds since the epoch; injectable so tests of gc do not sleep.
    :raises ValueError: if a bound or timeout is not positive.

    Example::

        async with KernelStore(tmp_path / "kernels") as store:
            kernel = await store.get_or_compile(key, compile_fn)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        run_dir: str | os.PathLike[str] | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        db_timeout_s: float = DEFAULT_DB_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        usage_flush_s: float = DEFAULT_USAGE_FLUSH_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if busy_timeout_s <= 0 or db_timeout_s <= 0 or usage_flush_s <= 0 or retries < 0:
            raise ValueError(
                "busy_timeout_s, db_timeout_s and usage_flush_s must be positive and retries "
                f">= 0, got {busy_timeout_s}, {db_timeout_s}, {usage_flush_s}, {retries}"
            )
        self.path = Path(path) if path is not None else default_store_path(run_dir)
        self._blobs = BlobStore(self.path)
        self._db_path = self.path / _DB_NAME
        self._lru: ByteLRU[str, Kernel] = ByteLRU(memory_bytes, lambda k: k.nbytes)
        self._busy_timeout_s = busy_timeout_s
        self._db_timeout_s = db_timeout_s
        self._retries = retries
        self._usage_flush_s = usage_flush_s
        self._clock = clock
        self._conn: aiosqlite.Connection | None = None
        self._db_lock = anyio.Lock()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._flights: dict[str, _Flight] = {}
        self._pending_usage: dict[str, tuple[int, float]] = {}
        self._disk_hits = 0
        self._compiles = 0
        self._shared_waits = 0

    # -- lifetime ----------------------------------------------------------------------------

    async def __aenter__(self) -> KernelStore:
        if self._conn is not None:
            raise StoreError(f"the kernel store at {self.path} is already open")
        await self._blobs.ensure_dirs()
        try:
            with anyio.fail_after(self._db_timeout_s):
                self._conn = await aiosqlite.connect(
                    self._db_path, timeout=self._busy_timeout_s, isolation_level=None
                )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the store database {self._db_path}: {exc}") from exc
        except TimeoutError as exc:
            raise StoreError(f"opening {self._db_path} took over {self._db_timeout_s} s") from exc
        try:
            await self._setup_database()
            self._task_group = anyio.create_task_group()
            await self._task_group.__aenter__()
            await self._task_group.start(self._flush_usage_loop)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close_connection()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._task_group is not None:
                self._task_group.cancel_scope.cancel()
                await self._task_group.__aexit__(None, None, None)
        finally:
            self._task_group = None
            with anyio.CancelScope(shield=True):
                try:
                    await self._flush_usage()
                except StoreError as exc:
                    _log.warning("store.usage_flush_failed", path=str(self.path), error=str(exc))
                finally:
                    await self._close_connection()

    async def _setup_database(self) -> None:
        async def pragmas(conn: aiosqlite.Connection) -> str:
            async with conn.execute("PRAGMA journal_mode=WAL") as cursor:
                row = await cursor.fetchone()
            await conn.execute("PRAGMA synchronous=FULL")
            await conn.execute("PRAGMA foreign_keys=ON")
            return str(row[0]) if row else "?"

        journal = await self._db("configure the database", pragmas, mode="read")
        if journal.lower() != "wal":
            _log.warning("store.no_wal", path=str(self._db_path), journal_mode=journal)
        before, after = await self._db(
            "migrate the schema",
            lambda conn: migrate(conn, refuse_fresh=self._refuse_fresh_index),
            mode="write",
        )
        if before != after:
            _log.info("store.migrated", path=str(self.path), from_version=before, to_version=after)

    async def _refuse_fresh_index(self) -> None:
        """Refuse to create an empty index over existing blobs: it would forget them, and gc
        would then delete them as unreferenced."""
        if await anyio.to_thread.run_sync(self._blobs.has_blobs):
            raise StoreIntegrityError(
                f"the index {self._db_path} is missing or empty but {self._blobs.blobs_dir} "
                "holds blobs; opening would forget them. Restore store.sqlite3 from a backup, "
                "or move blobs/ aside to start an empty store"
            )

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except sqlite3.Error as exc:
                _log.warning("store.close_failed", path=str(self.path), error=str(exc))

    # -- database access ---------------------------------------------------------------------

    def _require_open(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreError(
                f"the kernel store at {self.path} is not open; use `async with KernelStore(...)`"
            )
        return self._conn

    async def _db(
        self,
        operation: str,
        fn: Callable[[aiosqlite.Connection], Awaitable[T]],
        *,
        mode: _Mode,
    ) -> T:
        """Run ``fn`` on the connection: alone (``read``), in a read transaction (``snapshot``)
        or in a ``BEGIN IMMEDIATE`` write transaction (``write``), retrying busy errors.

        :raises StoreError: on a database error or when ``db_timeout_s`` passes.
        """
        conn = self._require_open()
        delay = 0.01
        try:
            with anyio.fail_after(self._db_timeout_s):
                for attempt in range(self._retries + 1):
                    try:
                        async with self._db_lock:
                            return await self._run_once(conn, fn, mode)
                    except sqlite3.OperationalError as exc:
                        if not _is_busy(exc) or attempt == self._retries:
                            raise
                        _log.debug("store.busy_retry", operation=operation, attempt=attempt)
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 1.0)
        except sqlite3.Error as exc:
            raise StoreError(f"could not {operation} in {self._db_path}: {exc}") from exc
        except TimeoutError as exc:
            raise StoreError(
                f"could not {operation} in {self._db_path} within {self._db_timeout_s} s; "
                "another process may hold the database"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _run_once(
        conn: aiosqlite.Connection, fn: Callable[[aiosqlite.Connection], Awaitable[T]], mode: _Mode
    ) -> T:
        if mode == "read":
            return await fn(conn)
        try:
            await conn.execute("BEGIN IMMEDIATE" if mode == "write" else "BEGIN")
            result = await fn(conn)
            with anyio.CancelScope(shield=True):
                await conn.execute("COMMIT")
        except BaseException:
            # Also after a cancelled BEGIN: it still runs on the connection's thread, and the
            # rollback queued behind it ends the transaction it may have opened.
            with anyio.CancelScope(shield=True):
                try:
                    await conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # no transaction was open
            raise
        return result

    # -- reads -------------------------------------------------------------------------------

    async def get(self, key: KeyLike) -> Kernel | None:
        """The kernel stored under ``key``, from memory or from disk, or ``None`` on a miss.

        Before bytes from disk are used, the row is checked (its metadata, and the request it
        was stored for) and the bytes are checked against the kernel id. Given a
        :class:`KernelRequest`, the kernel is also checked against it, in memory too. Entries
        that are not ready (quarantined, rejected) are misses.

        :param key: a store key, or the request it is the key of.
        :raises StoreIntegrityError: if the blob is missing or corrupt, or the row is not what
            was asked for; it has been quarantined, and the caller recompiles (see
            :meth:`get_or_compile`). Also for a row whose status this code does not know.
        :raises StoreError: on database or file errors.
        """
        self._require_open()
        name, request = _split(key)
        kernel = await self._get_from_memory(name, request)
        if kernel is not None:
            return kernel
        return await self._get_from_disk(name, request)

    async def _get_from_memory(self, key: str, request: KernelRequest | None) -> Kernel | None:
        kernel = self._lru.get(key)
        if kernel is None:
            return None
        reason = None if request is None else request.mismatch(kernel.metadata)
        if reason is not None:
            await self._refuse_row(key, kernel.kernel_id, reason)
        self._note_use(key)
        return kernel

    async def _get_from_disk(self, key: str, request: KernelRequest | None) -> Kernel | None:
        async def fetch(conn: aiosqlite.Connection) -> Any:
            sql = "SELECT kernel_id, metadata_json, status, request_json FROM kernels WHERE key = ?"
            async with conn.execute(sql, (key,)) as cursor:
                return await cursor.fetchone()

        row = await self._db("read a kernel row", fetch, mode="read")
        if row is None:
            return None
        if not known_status(row[2]):
            raise StoreIntegrityError(
                f"the row of key {key[:12]} has unknown status {str(row[2])[:20]!r}; run "
                "`esper-async store verify` to quarantine it (a new put then replaces it)",
                key=key,
            )
        if row[2] != KernelStatus.READY.value:
            return None
        try:
            metadata = check_row(
                key, row[0], row[1], row[3], None if request is None else request.document
            )
        except StoreIntegrityError as exc:
            await self._refuse_row(key, str(row[0]), str(exc))
        kernel_id = metadata.sha256
        try:
            artifact = await self._blobs.read(kernel_id)
        except StoreIntegrityError as exc:
            await self._quarantine(kernel_id, key, str(exc))
            raise StoreIntegrityError(
                f"kernel {kernel_id[:12]} under key {key[:12]} failed verification and was "
                f"quarantined ({exc}); recompile it, e.g. with store.get_or_compile",
                key=key,
            ) from exc
        kernel = Kernel(artifact=artifact, metadata=metadata)
        self._lru.put(key, kernel)
        self._disk_hits += 1
        self._note_use(key)
        return kernel

    async def _refuse_row(self, key: str, kernel_id: str, reason: str) -> NoReturn:
        """Quarantine the row ``key`` alone, log it, and raise :class:`StoreIntegrityError`."""
        self._lru.pop(key)
        try:
            await self._quarantine_rows([(key, kernel_id, reason)], self._clock())
        except StoreError as exc:
            _log.error("store.quarantine_mark_failed", key=key, error=str(exc))
        raise StoreIntegrityError(
            f"{reason}; the row was quarantined (recompile, e.g. with store.get_or_compile)",
            key=key,
        )

    async def get_or_compile(
        self, key: KeyLike, compile_fn: CompileFn, *, tags: Iterable[str] = ()
    ) -> Kernel:
        """The kernel under ``key``; on a miss (or a quarantined entry) compile, store, return it.

        Single-flight: concurrent calls for one key in this process share one compile. If the
        leading call is cancelled, a waiting call takes over. When another process stored a
        different kernel under the key first, that stored kernel is returned, so every process
        runs the same bytes.

        :param key: the store key (see :func:`kernel_key`), or better the
            :class:`KernelRequest` it is the key of: then the kernel served, and the kernel
            ``compile_fn`` returns, are checked against it.
        :param compile_fn: an async callable returning a validated :class:`Kernel`.
        :param tags: tags for a newly stored kernel.
        :raises StoreError: on database or file errors, or if ``compile_fn`` does not return a
            kernel.
        :raises Exception: whatever ``compile_fn`` raises (e.g. ``CompileError``), to every
            caller that shared the compile.
        """
        self._require_open()
        key, request = _split(key)
        while True:
            try:
                kernel = await self._get_from_memory(key, request)
            except StoreIntegrityError:
                kernel = None  # that row is quarantined now: compile below replaces it
            if kernel is not None:
                return kernel
            flight = self._flights.get(key)
            if flight is None:
                break
            self._shared_waits += 1
            await flight.done.wait()
            if flight.kernel is not None:
                return flight.kernel
            if flight.error is not None:
                raise flight.error
            # The leader was cancelled: loop and lead.
        flight = _Flight()
        self._flights[key] = flight
        try:
            flight.kernel = await self._load_or_compile(key, request, compile_fn, tuple(tags))
            return flight.kernel
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    async def _load_or_compile(
        self,
        key: str,
        request: KernelRequest | None,
        compile_fn: CompileFn,
        tags: tuple[str, ...],
    ) -> Kernel:
        try:
            stored = await self._get_from_disk(key, request)
        except StoreIntegrityError as exc:
            _log.warning("store.recompiling", key=key, reason=str(exc))
            stored = None
        if stored is not None:
            return stored
        kernel = await compile_fn()
        if not isinstance(kernel, Kernel):
            raise StoreError(
                f"compile_fn for key {key[:12]} returned {type(kernel).__name__}, not a Kernel"
            )
        self._compiles += 1
        winner = await self.put(key if request is None else request, kernel, tags=tags)
        if winner != kernel.kernel_id:
            try:
                stored = await self._get_from_disk(key, request)
            except StoreIntegrityError:
                stored = None
            if stored is not None:
                return stored
        return kernel

    # -- writes ------------------------------------------------------------------------------

    async def put(
        self,
        key: KeyLike,
        kernel: Kernel,
        *,
        tags: Iterable[str] = (),
        validation_report: Mapping[str, Any] | None = None,
        status: KernelStatus | str = KernelStatus.READY,
    ) -> str:
        """Store ``kernel`` under ``key``; idempotent.

        The first ready kernel stored under a key stays (puts of another kernel under that key
        leave it, so every process serves the same bytes); a quarantined or rejected entry is
        replaced. Tags are added in every case; a validation report is recorded when the row
        was created or replaced.

        :param key: the store key (see :func:`kernel_key`), or the :class:`KernelRequest` it
            is the key of: the kernel is then checked against it, and the request is kept with
            the row (reads check against it; bundles carry it).
        :param kernel: the kernel; its artifact must hash to its id.
        :param tags: labels to list kernels by.
        :param validation_report: the validator's report (JSON-ready).
        :param status: ``READY``, or ``REJECTED`` to keep a kernel that failed validation.
        :returns: the kernel id stored under ``key`` after the put.
        :raises KernelIntegrityError: if the artifact does not hash to the kernel id.
        :raises StoreIntegrityError: if the kernel is not what the request asks for.
        :raises StoreError: on database or file errors.
        """
        self._require_open()
        name, request = _split(key)
        status = KernelStatus(status)
        digest = sha256_hex(kernel.artifact)
        if digest != kernel.kernel_id:
            raise KernelIntegrityError(
                f"kernel {kernel.kernel_id[:12]} artifact hashes to {digest[:12]}; not stored",
                kernel_id=kernel.kernel_id,
            )
        reason = None if request is None else request.mismatch(kernel.metadata)
        if reason is not None:
            raise StoreIntegrityError(
                f"kernel {kernel.kernel_id[:12]} is not what key {name[:12]} asks for "
                f"({reason}); not stored",
                key=name,
            )
        blueprint = Blueprint.from_json(kernel.metadata.blueprint_json)
        await self._blobs.put(kernel.artifact, digest)
        row = NewRow(
            key=name,
            metadata=kernel.metadata,
            nbytes=kernel.nbytes,
            blueprint=blueprint,
            status=status,
            tags=tuple(tags),
            report=validation_report,
            request_text=None if request is None else request.text,
        )
        now = self._clock()
        winner = await self._db(
            "store a kernel", lambda conn: insert_row(conn, row, now), mode="write"
        )
        if winner == kernel.kernel_id and status is KernelStatus.READY:
            self._lru.put(name, kernel)
        _log.info(
            "store.put",
            key=name,
            kernel_id=kernel.kernel_id,
            blueprint=blueprint.name,
            stored=winner == kernel.kernel_id,
            nbytes=kernel.nbytes,
        )
        return winner

    async def delete(self, key: str) -> bool:
        """Delete the entry ``key`` (and its blob, if no other entry uses it).

        :returns: whether there was such an entry.
        :raises StoreError: on database or file errors.
        """
        removed, orphaned = await self._delete_keys([key])
        for kernel_id in orphaned:
            await self._blobs.remove(kernel_id)
        return bool(removed)

    async def _delete_keys(self, keys: list[str]) -> tuple[list[str], list[str]]:
        """Delete rows in one transaction; the deleted keys and the kernel ids now unused."""

        async def delete(conn: aiosqlite.Connection) -> tuple[list[str], list[str]]:
            removed: list[str] = []
            ids: set[str] = set()
            for key in keys:
                sql = "DELETE FROM kernels WHERE key = ? RETURNING kernel_id"
                async with conn.execute(sql, (key,)) as cursor:
                    row = await cursor.fetchone()
                if row is not None:
                    removed.append(key)
                    ids.add(str(row[0]))
            orphaned: list[str] = []
            for kernel_id in sorted(ids):
                sql = "SELECT 1 FROM kernels WHERE kernel_id = ? LIMIT 1"
                async with conn.execute(sql, (kernel_id,)) as cursor:
                    if await cursor.fetchone() is None:
                        orphaned.append(kernel_id)
            return removed, orphaned

        removed, orphaned = await self._db("delete kernels", delete, mode="write")
        gone = set(removed)
        self._lru.discard_where(lambda k, _: k in gone)
        for key in removed:
            self._pending_usage.pop(key, None)
        return removed, orphaned

    async def _quarantine(self, kernel_id: str, key: str | None, reason: str) -> None:
        """Move a bad blob aside, mark every entry using it, log it; never raises StoreError."""
        self._lru.discard_where(lambda _, k: k.kernel_id == kernel_id)
        moved: Path | None = None
        try:
            moved = await self._blobs.quarantine(kernel_id)
        except StoreError as exc:
            _log.error("store.quarantine_move_failed", kernel_id=kernel_id, error=str(exc))
        now = self._clock()

        async def mark(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "UPDATE kernels SET status = ? WHERE kernel_id = ? AND status = ?",
                (KernelStatus.QUARANTINED.value, kernel_id, KernelStatus.READY.value),
            )
            await conn.execute(
                "INSERT INTO quarantine (kernel_id, key, reason, path, quarantined_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (kernel_id, key, reason, str(moved) if moved else None, now),
            )

        try:
            await self._db("quarantine a kernel", mark, mode="write")
        except StoreError as exc:
            _log.error("store.quarantine_mark_failed", kernel_id=kernel_id, error=str(exc))
        _log.warning(
            "store.kernel_quarantined",
            kernel_id=kernel_id,
            key=key,
            reason=reason,
            moved_to=str(moved) if moved else None,
        )

    # -- usage -------------------------------------------------------------------------------

    def _note_use(self, key: str) -> None:
        hits, _ = self._pending_usage.get(key, (0, 0.0))
        self._pending_usage[key] = (hits + 1, self._clock())

    async def _flush_usage(self) -> None:
        """Write the batched usage counts; on failure they are kept for the next flush."""
        if not self._pending_usage or self._conn is None:
            return
        pending, self._pending_usage = self._pending_usage, {}
        rows = [(key, hits, used, key) for key, (hits, used) in pending.items()]

        async def write(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "INSERT INTO usage (key, hits, last_used_at) "
                "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM kernels WHERE key = ?) "
                "ON CONFLICT (key) DO UPDATE SET hits = hits + excluded.hits, "
                "last_used_at = MAX(COALESCE(last_used_at, 0), excluded.last_used_at)",
                rows,
            )

        try:
            await self._db("record usage", write, mode="write")
        except BaseException:
            for key, (hits, used) in pending.items():
                more, last = self._pending_usage.get(key, (0, 0.0))
                self._pending_usage[key] = (hits + more, max(used, last))
            raise

    async def _flush_usage_loop(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await anyio.sleep(self._usage_flush_s)
            try:
                await self._flush_usage()
            except StoreError as exc:
                _log.warning("store.usage_flush_failed", path=str(self.path), error=str(exc))

    @property
    def schema_version(self) -> int:
        """The schema version this code writes."""
        return SCHEMA_VERSION
