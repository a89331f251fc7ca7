"""Content-addressed artifact files, written atomically and verified on every read.

Layout under the store's root::

    blobs/ab/abcdef...      the artifact whose sha256 is abcdef... (64 hex digits)
    tmp/                    files being written (same filesystem, so rename is atomic)
    quarantine/             blobs that failed verification, kept for inspection

A blob is written to ``tmp/``, flushed, fsynced, renamed onto its final name and its directory
fsynced, so a reader sees either no file or the whole file. Since a name is the hash of its
content, two writers of one blob write the same bytes and the rename is idempotent.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiofiles
import aiofiles.os
import anyio
import structlog

from ..errors import StoreError, StoreIntegrityError

__all__ = ("BlobStore", "sha256_hex")

_log = structlog.get_logger("esper_async.store")

#: Above this size, hashing moves to a worker thread so the event loop is not held up
#: (hashlib releases the GIL on large buffers); below it the thread hop costs more than the hash.
_HASH_IN_THREAD_BYTES = 4 * 1024 * 1024

_HEX = frozenset("0123456789abcdef")


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
        tmp = self.tmp_dir / f"{actual}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        renamed = False
        try:
            await aiofiles.os.makedirs(final.parent, exist_ok=True)
            async with aiofiles.open(tmp, "xb") as handle:
                await handle.write(data)
                await handle.flush()
                await anyio.to_thread.run_sync(os.fsync, handle.fileno())
            await aiofiles.os.replace(tmp, final)
            renamed = True
            await anyio.to_thread.run_sync(_fsync_dir, final.parent)
        except OSError as exc:
            raise StoreError(f"cannot write blob {actual[:12]} under {self.root}: {exc}") from exc
        finally:
            if not renamed:
                with anyio.CancelScope(shield=True):
                    await self._unlink_quietly(tmp)
        return actual

    async def read(self, digest: str) -> bytes:
        """Read the blob ``digest`` and check its sha256.

        :raises StoreIntegrityError: if the file is missing or its bytes do not hash to
            ``digest``; the caller quarantines it and must not use the bytes.
        :raises StoreError: if the file exists but cannot be read.
        """
        path = self.path_of(digest)
        try:
            async with aiofiles.open(path, "rb") as handle:
                data = await handle.read()
        except FileNotFoundError as exc:
            raise StoreIntegrityError(
                f"blob {digest[:12]} is missing ({path})", key=digest
            ) from exc
        except OSError as exc:
            raise StoreError(f"cannot read blob {digest[:12]} ({path}): {exc}") from exc
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
        """Delete the blob ``digest``; ``False`` if it was not there.

        :raises StoreError: if it exists but cannot be deleted.
        """
        try:
            await aiofiles.os.remove(self.path_of(digest))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot delete blob {digest[:12]}: {exc}") from exc
        return True

    def iter_digests(self) -> Iterator[tuple[str, int, float]]:
        """Yield ``(digest, size, mtime)`` for every blob on disk (blocking: run in a thread)."""
        if not self.blobs_dir.is_dir():
            return
        for shard in self.blobs_dir.iterdir():
            if not shard.is_dir():
                continue
            for entry in shard.iterdir():
                name = entry.name
                if len(name) == 64 and set(name) <= _HEX:
                    try:
                        info = entry.stat()
                    except FileNotFoundError:
                        continue
                    yield name, info.st_size, info.st_mtime

    def remove_stale(self, directory: Path, older_than: float) -> int:
        """Delete files in ``directory`` last modified before ``older_than`` (blocking).

        Used on ``tmp/`` (left by killed writers) and ``quarantine/``.
        """
        removed = 0
        if not directory.is_dir():
            return 0
        for entry in directory.iterdir():
            try:
                if entry.is_file() and entry.stat().st_mtime < older_than:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            _log.info("store.stale_files_removed", directory=str(directory), count=removed)
        return removed

    async def _verifies(self, path: Path, digest: str, size: int) -> bool:
        try:
            info = await aiofiles.os.stat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot stat blob {digest[:12]}: {exc}") from exc
        if info.st_size != size:
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
