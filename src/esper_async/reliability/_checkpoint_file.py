"""The checkpoint file: ``torch.save``'s bytes sealed with their sha256, verified before reading.

Layout of a file::

    payload        torch.save(...) of the checkpoint dict (a zip archive)
    [seal (32)     HMAC-SHA256(key, payload), only in a keyed file]
    trailer (48)   MAGIC (8 bytes) | len(payload) (8, big-endian) | sha256(payload) (32)

The magic says which: ``ESPCKPT2`` (digest only) or ``ESPCKPTK`` (sealed with a key).

The trailer is computed over the whole payload and written after it, in the same atomic write
(temporary file, ``fsync``, rename). Reading checks, before ``torch.load`` sees a byte, that the
file ends with the magic, that the recorded length is the payload's, and that the payload hashes
to the recorded digest. So a torn or truncated file (no trailer at its end), junk appended (the
trailer is no longer last) and a byte flipped anywhere (in a tensor, the pickled structure, a
kernel's bytes, or the trailer itself) are refused as :class:`CheckpointIntegrityError`.

torch's zip reader does not check the archive's CRCs, which is why this digest exists: without it
a flipped byte in a parameter loads silently as a wrong weight.

Files written before checkpoints carried a digest (a bare zip) are refused: their content cannot
be verified.

**The digest detects damage, not forgery.** With a key (:mod:`esper_async._seal`: an argument or
``$ESPER_SEAL_KEY``), files are written sealed, and reading refuses, as
:class:`CheckpointForgeryError`, a file whose digest verifies but whose seal is missing or does
not match (tampered and re-digested, or another key's genuine checkpoint); a file whose digest
does not verify is damaged, as without a key. Without a key, a sealed file's digest is checked
and its seal is not.

The file is opened as a regular file or refused (a link to ``/dev/zero``, a FIFO: refused before
a byte is read), and no more than its size, at most :data:`MAX_CHECKPOINT_BYTES`, is read.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from .._files import NotARegularFile, open_regular
from .._seal import SEAL_SIZE, seal_matches, seal_of
from ._errors import CheckpointError, CheckpointForgeryError, CheckpointIntegrityError

__all__ = (
    "MAGIC",
    "MAGIC_KEYED",
    "MAX_CHECKPOINT_BYTES",
    "decode",
    "encode",
    "read_verified",
    "seal",
    "unseal",
)

#: The trailer's first bytes: "esper_async checkpoint, sealed format 2" (format 1 had no trailer).
MAGIC = b"ESPCKPT2"
#: The same, for a file whose payload is also sealed with a key (32 bytes before the trailer).
MAGIC_KEYED = b"ESPCKPTK"
#: Largest checkpoint file read (bytes): far above any model this framework trains on one host.
MAX_CHECKPOINT_BYTES = 1 << 38
_TRAILER = struct.Struct(">8sQ32s")
#: The end of a bare zip archive (its end-of-central-directory record, no comment).
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SIZE = 22


def seal(payload: bytes, key: bytes | None = None) -> bytes:
    """``payload`` followed by its seal (with a ``key``) and its trailer (magic, length,
    sha256)."""
    digest = hashlib.sha256(payload).digest()
    if key is None:
        return payload + _TRAILER.pack(MAGIC, len(payload), digest)
    return payload + seal_of(key, payload) + _TRAILER.pack(MAGIC_KEYED, len(payload), digest)


def _extent(magic: bytes) -> int:
    """Bytes after the payload of a file with ``magic``."""
    return _TRAILER.size + (SEAL_SIZE if magic == MAGIC_KEYED else 0)


def _check_seal(payload: bytes, sealed: bytes, magic: bytes, key: bytes | None, path: str) -> None:
    """Refuse a file whose digest verified but whose seal is missing or wrong under ``key``."""
    if key is None:
        return
    if magic != MAGIC_KEYED:
        raise CheckpointForgeryError(
            f"checkpoint {path} carries no seal, and a seal key is configured: it was not "
            "written by a run holding the key (or its seal was stripped); refused", path=path,
        )
    if not seal_matches(key, payload, sealed):
        raise CheckpointForgeryError(
            f"checkpoint {path} is sealed with another key, or was altered and re-digested: "
            "its content verifies against its digest but not against the configured key; "
            "refused", path=path,
        )


def unseal(data: bytes, *, path: str, key: bytes | None = None) -> bytes:
    """The payload of a sealed file, after checking its trailer, digest and (with a ``key``)
    its seal.

    :param path: the file's name, for messages.
    :param key: the seal key, if one is configured.
    :raises CheckpointIntegrityError: if the trailer is missing or wrong, or the digest differs.
    :raises CheckpointForgeryError: if the digest verifies but, with a ``key``, the seal is
        missing or does not match.
    """
    size = _TRAILER.size
    magic = data[-size : -size + len(MAGIC)] if len(data) >= size else b""
    if magic not in (MAGIC, MAGIC_KEYED):
        if data[-_ZIP_END_SIZE : -_ZIP_END_SIZE + len(_ZIP_END)] == _ZIP_END:
            why = ("has no digest: it was written by an older esper_async, and unverified "
                   "checkpoints are refused; resume from a newer one or start the run anew")
        else:
            why = "does not end with its digest trailer: it is truncated or has bytes appended"
        raise CheckpointIntegrityError(f"checkpoint {path} {why}", path=path)
    _, length, digest = _TRAILER.unpack(data[-size:])
    if length != len(data) - _extent(magic):
        raise CheckpointIntegrityError(
            f"checkpoint {path} is damaged: its trailer records {length} bytes of payload, the "
            f"file holds {len(data) - _extent(magic)}", path=path,
        )
    payload = data[:length]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointIntegrityError(
            f"checkpoint {path} is damaged: its content does not hash to the sha256 written "
            "with it", path=path,
        )
    _check_seal(payload, data[length : length + SEAL_SIZE], magic, key, path)
    return payload


def encode(payload: Mapping[str, Any], key: bytes | None = None) -> bytes:
    """The sealed bytes of a checkpoint dict (serialised with ``torch.save``).

    :param key: the seal key, if one is configured (see :func:`seal`).
    """
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return seal(buffer.getvalue(), key)


def decode(data: bytes, *, path: str, key: bytes | None = None) -> dict[str, Any]:
    """The checkpoint dict in sealed ``data``: verified first, then ``torch.load``-ed with
    ``weights_only=True`` (tensors and plain data only) onto the CPU.

    :param key: the seal key, if one is configured.
    :raises CheckpointIntegrityError: if the digest does not verify, or the payload does not
        deserialise into a dict.
    :raises CheckpointForgeryError: if, with a ``key``, the seal is missing or wrong.
    """
    return _deserialise(unseal(data, path=path, key=key), path)


def _deserialise(payload: bytes, path: str) -> dict[str, Any]:
    try:
        loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointIntegrityError(
            f"checkpoint {path} verifies but does not deserialise: {_short(exc)}", path=path
        ) from exc
    if not isinstance(loaded, dict):
        raise CheckpointIntegrityError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a checkpoint dict", path=path
        )
    return loaded


def read_verified(path: str | os.PathLike[str], *, key: bytes | None = None) -> dict[str, Any]:
    """Read, verify and deserialise the checkpoint file ``path``.

    :param key: the seal key, if one is configured.
    :raises CheckpointError: if the file cannot be read.
    :raises CheckpointIntegrityError: if it is damaged (see :func:`decode`), larger than
        :data:`MAX_CHECKPOINT_BYTES`, or not a regular file (a FIFO, a device: nothing read).
    :raises CheckpointForgeryError: if, with a ``key``, its seal is missing or wrong.
    """
    name = str(path)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CHECKPOINT_BYTES:
                raise CheckpointIntegrityError(
                    f"checkpoint {name} holds {size} bytes, over the {MAX_CHECKPOINT_BYTES} "
                    "read; refused unread", path=name,
                )
            if size >= _TRAILER.size:
                f.seek(size - _TRAILER.size)
                magic, length, digest = _TRAILER.unpack(f.read(_TRAILER.size))
                if magic in (MAGIC, MAGIC_KEYED) and length == size - _extent(magic):
                    f.seek(0)
                    payload = f.read(length)  # one copy in memory: torch reads it in place
                    sealed = f.read(SEAL_SIZE) if magic == MAGIC_KEYED else b""
                    if len(payload) == length and hashlib.sha256(payload).digest() == digest:
                        _check_seal(payload, sealed, magic, key, name)
                        return _deserialise(payload, name)
            f.seek(0)
            data = f.read(size)  # damaged: read it whole to say how (never past its size)
    except NotARegularFile as exc:
        raise CheckpointIntegrityError(
            f"checkpoint {name} is {exc.strerror}", path=name
        ) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {name}: {exc}", path=name) from exc
    return decode(data, path=name, key=key)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
