"""Content-addressed artifact files, written atomically and verified on every read.

Layout under the store's root::

    blobs/ab/abcdef...      the artifact whose sha256 is abcdef... (64 hex digits)
    tmp/                    files being written (same filesystem, so rename is atomic)
    quarantine/             blobs that failed verification, kept for inspection

A blob is written to ``tmp/``, flushed, fsynced, renamed onto its final name and its directory
fsynced, so a reader sees either no file or the whole file. Since a name is the hash of its
content, two writers of one blob write the same bytes and the rename is idempotent.

Only regular files are blobs. A blob path that is a directory, a symbolic link, a FIFO or a
device is reported as corrupt (and quarantined by the store) and never opened through: reads
check ``lstat`` first and open with ``O_NOFOLLOW | O_NONBLOCK``, so a link cannot point a read
elsewhere and a FIFO cannot block it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiofiles
import aiofiles.os
import anyio
import structlog

from .._files import file_kind
from ..errors import StoreError, StoreIntegrityError

__all__ = ("BlobStore", "sha256_hex")

_log = structlog.get_logger("esper_async.store")

#: Above this size, hashing moves to a worker thread so the event loop is not held up
#: (hashlib releases the GIL on large buffers); below it the thread hop costs more than the hash.
_HASH_IN_THREAD_BYTES = 4 * 1024 * 1024

_HEX = frozenset("0123456789abcdef")

#: Reads of a blob file go through the kernel in chunks of this size.
_READ_CHUNK = 1024 * 1024

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


async def _digest(data: bytes) -> str:
    if len(data) >= _HASH_IN_THREAD_BYTES:
        return await anyio.to_thread.run_sync(sha256_hex, data)
    return sha256_hex(data)


def _check_digest(digest: str) -> None:
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise StoreError(f"{digest!r} is not a hex sha256 digest")


def _read_regular(path: Path, digest: str) -> bytes:
    """Read the regular file ``path`` whole (blocking); anything else is an integrity error."""
    try:
        info = os.lstat(path)
    except FileNotFoundError as exc:
        raise StoreIntegrityError(f"blob {digest[:12]} is missing ({path})", key=digest) from exc
    except OSError as exc:
        raise StoreError(f"cannot stat blob {digest[:12]} ({path}): {exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise StoreIntegrityError(
            f"blob {digest[:12]} is {file_kind(info.st_mode)}, not a regular file ({path})",
            key=digest,
        )
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError as exc:
        raise StoreIntegrityError(f"blob {digest[:12]} is missing ({path})", key=digest) from exc
    except OSError as exc:  # ELOOP: replaced by a link since the lstat
        raise StoreIntegrityError(
            f"blob {digest[:12]} cannot be opened as a file: {exc}", key=digest
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreIntegrityError(
                f"blob {digest[:12]} is {file_kind(info.st_mode)}, not a regular file", key=digest
            )
        chunks: list[bytes] = []
        remaining = info.st_size
        while remaining > 0:
            chunk = os.read(fd, min(remaining, _READ_CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise StoreError(f"cannot read blob {digest[:12]} ({path}): {exc}") from exc
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Atomic, content-addressed files under one root directory.

    :param root: the store's root directory; ``blobs/``, ``tmp/`` and ``quarantine/`` are
        created under it by :meth:`ensure_dirs`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"

    async def ensure_dirs(self) -> None:
        """Create the directories (idempotent).

        :raises StoreError: if they cannot be created.
        """
        for path in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            try:
                await aiofiles.os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store directory {path}: {exc}") from exc

    def path_of(self, digest: str) -> Path:
        """The final path of the blob with hex sha256 ``digest``."""
        _check_digest(digest)
        return self.blobs_dir / digest[:2] / digest

    async def put(self, data: bytes, digest: str | None = None) -> str:
        """Store ``data`` (idempotent) and return its hex sha256.

        A blob already present is kept when it verifies, and rewritten when it does not, so a
        put also heals a damaged file.

        :param data: the bytes.
        :param digest: their sha256 if the caller knows it; checked against the bytes.
        :raises StoreIntegrityError: if ``digest`` does not match ``data``.
        :raises StoreError: if the file cannot be written.
        """
        actual = await _digest(data)
        if digest is not None and digest != actual:
            raise StoreIntegrityError(
                f"blob announced as {digest[:12]} hashes to {actual[:12]}; not stored", key=digest
            )
        final = self.path_of(actual)
        if await self._verifies(final, actual, len(data)):
            return actual
        tmp = self.staging_path(actual)
        try:
            async with aiofiles.open(tmp, "xb") as handle:
                await handle.write(data)
                await handle.flush()
                await anyio.to_thread.run_sync(os.fsync, handle.fileno())
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._unlink_quietly(tmp)
            if isinstance(exc, OSError):
                raise StoreError(
                    f"cannot write blob {actual[:12]} under {self.root}: {exc}"
                ) from exc
            raise
        await self.adopt(tmp, actual)
        return actual

    def staging_path(self, digest: str) -> Path:
        """A fresh path in ``tmp/`` to write the blob ``digest`` to before :meth:`adopt`."""
        _check_digest(digest)
        return self.tmp_dir / f"{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"

    async def adopt(self, tmp: Path, digest: str) -> None:
        """Rename the fsynced file ``tmp`` (in ``tmp/``, holding the blob ``digest``, checked by
        the caller) onto the blob's name and fsync its directory; ``tmp`` is gone afterwards.

        Whatever is in the way and is not a regular file (a directory, a link) is quarantined
        first.

        :raises StoreError: if the file cannot be moved.
        """
        final = self.path_of(digest)
        renamed = False
        try:
            await aiofiles.os.makedirs(final.parent, exist_ok=True)
            await self._clear_irregular(final, digest)
            await aiofiles.os.replace(tmp, final)
            renamed = True
            await anyio.to_thread.run_sync(_fsync_dir, final.parent)
        except OSError as exc:
            raise StoreError(f"cannot write blob {digest[:12]} under {self.root}: {exc}") from exc
        finally:
            if not renamed:
                with anyio.CancelScope(shield=True):
                    await self._unlink_quietly(tmp)

    async def _clear_irregular(self, final: Path, digest: str) -> None:
        try:
            info = await anyio.to_thread.run_sync(os.lstat, final)
        except FileNotFoundError:
            return
        if not stat.S_ISREG(info.st_mode):
            moved = await self.quarantine(digest)
            _log.warning(
                "store.irregular_blob_quarantined",
                kernel_id=digest,
                kind=file_kind(info.st_mode),
                moved_to=str(moved),
            )

    async def read(self, digest: str) -> bytes:
        """Read the blob ``digest`` and check its sha256.

        :raises StoreIntegrityError: if the file is missing, is not a regular file, or its bytes
            do not hash to ``digest``; the caller quarantines it and must not use the bytes.
        :raises StoreError: if the file exists but cannot be read.
        """
        path = self.path_of(digest)
        data = await anyio.to_thread.run_sync(_read_regular, path, digest)
        actual = await _digest(data)
        if actual != digest:
            raise StoreIntegrityError(
                f"blob {digest[:12]} is corrupt: its {len(data)} bytes hash to {actual[:12]}",
                key=digest,
            )
        return data

    async def quarantine(self, digest: str) -> Path | None:
        """Move the blob ``digest`` into ``quarantine/`` so it is never read again.

        :returns: where it went, or ``None`` if it was already gone.
        :raises StoreError: if it exists but cannot be moved.
        """
        source = self.path_of(digest)
        target = self.quarantine_dir / f"{digest}.{time.time_ns()}.{os.getpid()}"
        try:
            await aiofiles.os.replace(source, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot quarantine blob {digest[:12]}: {exc}") from exc
        return target

    async def remove(self, digest: str) -> bool:
        """Delete the blob file ``digest``; ``False`` if there was no such regular file.

        Anything else at its path (a directory, a link) is left for :meth:`quarantine`.

        :raises StoreError: if it exists but cannot be deleted.
        """
        path = self.path_of(digest)
        try:
            if not stat.S_ISREG((await anyio.to_thread.run_sync(os.lstat, path)).st_mode):
                return False
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete blob {digest[:12]}: {exc}") from exc
        return True

    def _entries(self) -> Iterator[tuple[str, os.stat_result]]:
        """``(digest, lstat)`` of every digest-named entry in a shard directory (blocking)."""
        try:
            shards = list(os.scandir(self.blobs_dir))
        except FileNotFoundError:
            return
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            try:
                entries = list(os.scandir(shard.path))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if len(name) == 64 and set(name) <= _HEX and name[:2] == shard.name:
                    try:
                        yield name, entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue

    def iter_digests(self) -> Iterator[tuple[str, int, float]]:
        """Yield ``(digest, size, mtime)`` for every blob file on disk (blocking: run in a
        thread). Only regular files are listed; see :meth:`iter_irregular`."""
        for name, info in self._entries():
            if stat.S_ISREG(info.st_mode):
                yield name, info.st_size, info.st_mtime

    def iter_irregular(self) -> Iterator[str]:
        """Yield the digests whose path holds something other than a regular file (blocking)."""
        for name, info in self._entries():
            if not stat.S_ISREG(info.st_mode):
                yield name

    def has_blobs(self) -> bool:
        """Whether anything at all is stored under ``blobs/`` (blocking)."""
        try:
            with os.scandir(self.blobs_dir) as shards:
                for shard in shards:
                    if not shard.is_dir(follow_symlinks=False):
                        return True
                    with os.scandir(shard.path) as entries:
                        if any(True for _ in entries):
                            return True
        except FileNotFoundError:
            return False
        return False

    def remove_stale(self, directory: Path, older_than: float) -> int:
        """Delete files in ``directory`` last modified before ``older_than`` (blocking).

        Used on ``tmp/`` (left by killed writers) and ``quarantine/``.
        """
        removed = 0
        if not directory.is_dir():
            return 0
        for entry in directory.iterdir():
            try:
                info = entry.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_mtime < older_than:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            _log.info("store.stale_files_removed", directory=str(directory), count=removed)
        return removed

    async def _verifies(self, path: Path, digest: str, size: int) -> bool:
        try:
            info = await anyio.to_thread.run_sync(os.lstat, path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot stat blob {digest[:12]}: {exc}") from exc
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return False
        try:
            await self.read(digest)
        except StoreIntegrityError:
            return False
        return True

    @staticmethod
    async def _unlink_quietly(path: Path) -> None:
        try:
            await aiofiles.os.remove(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("store.tmp_unlink_failed", path=str(path), error=str(exc))
