"""The checkpoint file: ``torch.save``'s bytes sealed with their sha256, verified before reading.

Layout of a file::

    payload        torch.save(...) of the checkpoint dict (a zip archive)
    trailer (48)   MAGIC (8 bytes) | len(payload) (8, big-endian) | sha256(payload) (32)

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
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Mapping
from typing import Any

import torch

from ._errors import CheckpointError, CheckpointIntegrityError

__all__ = ("MAGIC", "decode", "encode", "read_verified", "seal", "unseal")

#: The trailer's first bytes: "esper_async checkpoint, sealed format 2" (format 1 had no trailer).
MAGIC = b"ESPCKPT2"
_TRAILER = struct.Struct(">8sQ32s")
#: The end of a bare zip archive (its end-of-central-directory record, no comment).
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SIZE = 22


def seal(payload: bytes) -> bytes:
    """``payload`` followed by its trailer (magic, length, sha256)."""
    digest = hashlib.sha256(payload).digest()
    return payload + _TRAILER.pack(MAGIC, len(payload), digest)


def unseal(data: bytes, *, path: str) -> bytes:
    """The payload of a sealed file, after checking its trailer and digest.

    :param path: the file's name, for messages.
    :raises CheckpointIntegrityError: if the trailer is missing or wrong, or the digest differs.
    """
    size = _TRAILER.size
    if len(data) < size or data[-size : -size + len(MAGIC)] != MAGIC:
        if data[-_ZIP_END_SIZE : -_ZIP_END_SIZE + len(_ZIP_END)] == _ZIP_END:
            why = ("has no digest: it was written by an older esper_async, and unverified "
                   "checkpoints are refused; resume from a newer one or start the run anew")
        else:
            why = "does not end with its digest trailer: it is truncated or has bytes appended"
        raise CheckpointIntegrityError(f"checkpoint {path} {why}", path=path)
    _, length, digest = _TRAILER.unpack(data[-size:])
    if length != len(data) - size:
        raise CheckpointIntegrityError(
            f"checkpoint {path} is damaged: its trailer records {length} bytes of payload, the "
            f"file holds {len(data) - size}", path=path,
        )
    payload = data[:-size]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointIntegrityError(
            f"checkpoint {path} is damaged: its content does not hash to the sha256 written "
            "with it", path=path,
        )
    return payload


def encode(payload: Mapping[str, Any]) -> bytes:
    """The sealed bytes of a checkpoint dict (serialised with ``torch.save``)."""
    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    return seal(buffer.getvalue())


def decode(data: bytes, *, path: str) -> dict[str, Any]:
    """The checkpoint dict in sealed ``data``: verified first, then ``torch.load``-ed with
    ``weights_only=True`` (tensors and plain data only) onto the CPU.

    :raises CheckpointIntegrityError: if the seal does not verify, or the payload does not
        deserialise into a dict.
    """
    return _deserialise(unseal(data, path=path), path)


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


def read_verified(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read, verify and deserialise the checkpoint file ``path``.

    :raises CheckpointError: if the file cannot be read.
    :raises CheckpointIntegrityError: if it is damaged (see :func:`decode`).
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size >= _TRAILER.size:
                f.seek(size - _TRAILER.size)
                magic, length, digest = _TRAILER.unpack(f.read(_TRAILER.size))
                if magic == MAGIC and length == size - _TRAILER.size:
                    f.seek(0)
                    payload = f.read(length)  # one copy in memory: torch reads it in place
                    if len(payload) == length and hashlib.sha256(payload).digest() == digest:
                        return _deserialise(payload, name)
            f.seek(0)
            data = f.read()  # damaged: read it whole to say how
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {name}: {exc}", path=name) from exc
    return decode(data, path=name)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
