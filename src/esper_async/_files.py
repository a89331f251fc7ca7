"""Open files the way every reader and writer in esper_async must: regular files only, bounded,
and never written through a link.

Reading (:func:`read_regular`, :func:`open_regular`): the file is opened with ``O_NONBLOCK`` (so
opening a FIFO cannot block) and checked with ``fstat`` on the open descriptor: anything but a
regular file (a FIFO, a device such as ``/dev/zero``, a socket, a directory) is refused with
:class:`NotARegularFile` before a byte is read. A link to a regular file is read (a user may link
a data set in); a link to anything else is refused like its target. Then at most ``cap`` bytes
are read, whatever ``stat`` said: a file that grows past the cap while it is read is refused with
:class:`FileTooLarge`, without reading on.

Writing (:func:`atomic_writer`, :func:`write_atomic`): the content goes to a temporary file
beside the target created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a link, a FIFO or any file
already at that name is never opened, let alone followed: another fresh name is taken), is
flushed and ``fsync``-ed, then renamed over the target with ``os.replace`` (which replaces a link
at the target, never its target) and the directory is ``fsync``-ed. A crash leaves the old file
or the new one. :func:`open_append` opens a log file for appending without following a link.

Both errors subclass :class:`OSError`, so a reader that maps ``OSError`` to its own typed error
(``DataError``, ``CheckpointError``, ``StoreError``, ...) maps these too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = (
    "FileTooLarge",
    "NotARegularFile",
    "atomic_writer",
    "file_kind",
    "open_append",
    "open_regular",
    "read_regular",
    "write_atomic",
)

_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Fresh temporary names tried when the usual one (``<name>.tmp``) is taken.
_TEMP_TRIES = 8
#: Largest single read (bytes): a file is read in pieces of at most this.
_CHUNK = 8 * 2**20


class NotARegularFile(OSError):
    """A path names a FIFO, a device, a socket or a directory where a file was expected."""


class FileTooLarge(OSError):
    """A file holds more bytes than its reader's cap."""


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for messages (``"a FIFO"``, ``"a device"`` ...)."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_checked(path: str | os.PathLike[str]) -> tuple[int, int]:
    """A read-only descriptor of the regular file ``path`` and its size."""
    fd = os.open(path, _READ_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = file_kind(info.st_mode)
            raise NotARegularFile(
                errno.EINVAL, f"{kind}, not a regular file; refused unread", os.fspath(path)
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def open_regular(path: str | os.PathLike[str]) -> IO[bytes]:
    """``path`` opened for reading in binary mode, if it is a regular file.

    The caller bounds what it reads (a stream reader such as a tar importer counts its bytes).

    :param path: the file.
    :raises NotARegularFile: if it is a FIFO, a device, a socket or a directory.
    :raises OSError: if it cannot be opened (``FileNotFoundError`` if it does not exist).
    """
    fd, _ = _open_checked(path)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike[str], *, cap: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` of them.

    :param path: the file.
    :param cap: the most bytes the file may hold.
    :raises NotARegularFile: if it is a FIFO, a device, a socket or a directory (nothing read).
    :raises FileTooLarge: if it holds more than ``cap`` bytes (by ``stat``, or found while
        reading; at most ``cap + 1`` bytes are read).
    :raises OSError: if it cannot be opened or read.
    """
    fd, size = _open_checked(path)
    try:
        if size > cap:
            raise FileTooLarge(errno.EFBIG, f"{size} bytes, over the cap of {cap}", os.fspath(path))
        buffer = bytearray(size + 1)  # one byte more than stat says, to see growth
        view = memoryview(buffer)
        got = 0
        while True:
            if got == len(buffer):
                if got > cap:
                    raise FileTooLarge(
                        errno.EFBIG,
                        f"over the cap of {cap} bytes (it grew while read)",
                        os.fspath(path),
                    )
                view.release()
                buffer.extend(bytes(min(_CHUNK, cap + 1 - got)))
                view = memoryview(buffer)
            n = os.readv(fd, [view[got : got + _CHUNK]])
            if n == 0:
                break
            got += n
        view.release()
        del buffer[got:]
        return bytes(buffer)
    finally:
        os.close(fd)


def _create_temporary(target: Path) -> tuple[int, Path]:
    """A new file beside ``target``, created exclusively, never through a link."""
    names = [target.with_name(f"{target.name}.tmp")]
    names += [
        target.with_name(f"{target.name}.{secrets.token_hex(6)}.tmp") for _ in range(_TEMP_TRIES)
    ]
    for name in names:
        try:
            return os.open(name, _CREATE_FLAGS, 0o666), name
        except FileExistsError:
            continue  # a leftover, a concurrent writer or a planted link: never opened
    raise FileExistsError(errno.EEXIST, "no free temporary name beside it", str(target))


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # a platform or file system that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write ``path``'s new content to; it replaces ``path`` when the block
    ends without an error, and is removed otherwise (``path`` is then untouched).

    :param path: the file to write (its directory must exist).
    :param durable: ``fsync`` the file and the directory (a crash keeps one whole version).
    :raises OSError: if the temporary file cannot be created, written or renamed.
    """
    target = Path(path)
    fd, temporary = _create_temporary(target)
    done = False
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
        done = True
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    if durable:
        _fsync_directory(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Replace ``path``'s content with ``data`` atomically, never writing through a link.

    :param path: the file to write (its directory must exist).
    :param data: the new content.
    :param durable: ``fsync`` the file and the directory.
    :raises OSError: if the write fails (the previous file, if any, is untouched).
    """
    with atomic_writer(path, durable=durable) as handle:
        handle.write(data)


def open_append(path: str | os.PathLike[str]) -> IO[str]:
    """``path`` opened to append UTF-8 text, created if absent, never through a link.

    :param path: the log file.
    :raises NotARegularFile: if something other than a regular file is there.
    :raises OSError: if it cannot be opened (``ELOOP`` if it is a link).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(path, flags, 0o666)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(
                errno.EINVAL, f"{file_kind(info.st_mode)}, not a regular file", os.fspath(path)
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")
