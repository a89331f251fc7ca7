"""A directory of numbered checkpoint files: sealed, written atomically, restored newest-good-first.

Writing: the payload is serialised with ``torch.save``, sealed with its sha256 (see
:mod:`~esper_async.reliability._checkpoint_file`), written to a temporary file in the same
directory, flushed, ``fsync``-ed, renamed over its final name and the directory ``fsync``-ed. A
crash at any point leaves either the previous checkpoint or the new one. The newest ``keep`` are
kept.

Reading: :meth:`CheckpointStore.restore` tries the checkpoints newest first. Each is verified
against its digest before ``torch.load`` reads it, then handed to the caller's restore; a file
that is damaged, or whose restore raises, is skipped with a warning naming it, and the one before
it is tried. When none restores, one :class:`CheckpointError` lists every file tried and why (a
:class:`CheckpointMismatchError` when every one was sound but did not fit the model: that is the
caller's model, not the files).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from .._files import write_atomic as _write_atomic
from .._seal import resolve_key
from ._checkpoint_file import encode, read_verified
from ._errors import (
    CheckpointError,
    CheckpointForgeryError,
    CheckpointMismatchError,
    is_out_of_memory,
)

__all__ = ("CHECKPOINT_PATTERN", "CheckpointStore", "reason", "unrestorable", "write_atomic")

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
#: What a checkpoint file is called (for messages).
CHECKPOINT_PATTERN = "ckpt-<8-digit epoch>.pt"
#: Longest reason per file kept in an error listing several (messages stay short).
_REASON_CHARS = 160

T = TypeVar("T")


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file created beside it without
    following a link (``O_EXCL | O_NOFOLLOW``), flushed, fsynced, renamed over ``path``; then
    the directory is fsynced.

    :param path: the file to write.
    :param data: its content.
    :raises OSError: if the write fails (the previous file, if any, is untouched).
    """
    _write_atomic(path, data)


def reason(exc: BaseException, path: str | os.PathLike[str]) -> str:
    """Why restoring ``path`` failed, short, without repeating the file's name."""
    text = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    text = text.removeprefix(f"checkpoint {path} ").removeprefix(f"checkpoint {path}: ")
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def unrestorable(
    directory: str | os.PathLike[str], tried: Mapping[str, str], *, mismatch: bool
) -> CheckpointError:
    """The error for a directory none of whose checkpoints restored.

    :param directory: the checkpoint directory.
    :param tried: each file tried and why it failed, newest first.
    :param mismatch: whether every file was sound but did not fit the model.
    """
    listing = "; ".join(f"{Path(p).name}: {why}" for p, why in tried.items())
    if mismatch:
        return CheckpointMismatchError(
            f"the model does not fit any checkpoint in {directory} (build and wrap it as the "
            f"checkpointed run did); tried {listing}", path=str(directory), tried=tried,
        )
    return CheckpointError(
        f"no checkpoint in {directory} restores; tried {listing}", path=str(directory),
        tried=tried,
    )


class CheckpointStore:
    """A directory of numbered checkpoints.

    :param directory: where they live (created on first save).
    :param keep: how many of the newest to keep.
    :param seal_key: the key checkpoints are sealed with and checked against (HMAC-SHA256);
        default ``$ESPER_SEAL_KEY``, and without either none are sealed or checked (see
        :mod:`esper_async.reliability._checkpoint_file`).
    :raises ValueError: if ``keep < 1``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 2,
        seal_key: bytes | str | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self._seal_key = resolve_key(seal_key)

    def paths(self) -> list[Path]:
        """The checkpoints present, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name)

    def save(self, payload: Mapping[str, Any]) -> Path:
        """Write ``payload`` as the checkpoint of its epoch, sealed and atomically; prune old ones.

        Blocking (serialising, hashing and fsync): run it in a worker thread.

        :param payload: what :func:`~esper_async.reliability.capture_state` returned.
        :raises CheckpointError: if the file cannot be written.
        """
        path = self.directory / f"ckpt-{int(payload['epoch']):08d}.pt"
        data = encode(payload, self._seal_key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {path}: {exc}", path=str(path)) from exc
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        log.info("checkpoint written", path=str(path), bytes=len(data))
        return path

    def read(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The payload of the checkpoint file ``path``, verified against its digest first.

        :param path: a checkpoint file.
        :raises CheckpointIntegrityError: if it is damaged, truncated, has bytes appended, or
            carries no digest (written by an older esper_async).
        :raises CheckpointForgeryError: if a seal key is configured and the file's seal is
            missing or not the key's.
        :raises CheckpointError: if it cannot be read.
        """
        return read_verified(path, key=self._seal_key)

    def missing(self) -> CheckpointError:
        """The error for a directory with no checkpoint file at all."""
        state = "holds none" if self.directory.is_dir() else "does not exist"
        return CheckpointError(
            f"no checkpoint to resume from: looked for {CHECKPOINT_PATTERN} files in "
            f"{self.directory}, which {state}", path=str(self.directory),
        )

    def restore(
        self,
        apply: Callable[[Path, dict[str, Any]], T],
        path: str | os.PathLike[str] | None = None,
    ) -> tuple[Path, T]:
        """Verify and read the newest checkpoint, call ``apply(path, payload)`` on it, and fall
        back to the one before whenever either fails.

        Every file skipped is logged as a warning naming it and the reason. An out-of-memory
        error is not a fault of the file and is raised at once; so is a forgery (with a seal
        key: a file whose seal is missing or another key's), which is never skipped.

        :param apply: puts a payload into the run; whatever it raises counts as that file's
            failure.
        :param path: use only this file (no fallback).
        :returns: the file used and what ``apply`` returned.
        :raises CheckpointForgeryError: if a file's seal is missing or foreign (with a key).
        :raises CheckpointError: if there is no checkpoint (saying what was looked for), if
            ``path`` does not restore, or if none does (listing each file tried and why; a
            :class:`CheckpointMismatchError` when every file was sound but did not fit).
        """
        candidates = [Path(path)] if path is not None else list(reversed(self.paths()))
        if not candidates:
            raise self.missing()
        tried: dict[str, str] = {}
        mismatch = True
        error: Exception | None = None
        for candidate in candidates:
            try:
                return candidate, apply(candidate, self.read(candidate))
            except Exception as exc:
                if is_out_of_memory(exc) or isinstance(exc, CheckpointForgeryError):
                    raise  # not the file's damage: a forgery is refused, never skipped
                if path is not None:
                    if isinstance(exc, CheckpointError):
                        raise
                    raise CheckpointError(
                        f"checkpoint {candidate} does not restore: {reason(exc, candidate)}",
                        path=str(candidate),
                    ) from exc
                why = reason(exc, candidate)
                log.warning("checkpoint unusable; trying an older one", path=str(candidate),
                            error=why)
                tried[str(candidate)] = why
                mismatch = mismatch and isinstance(exc, CheckpointMismatchError)
                error = exc
        raise unrestorable(self.directory, tried, mismatch=mismatch) from error

    def load(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The payload of ``path``, or of the newest checkpoint that verifies (older ones are
        tried as :meth:`restore` does).

        :param path: a checkpoint file (no fallback).
        :raises CheckpointError: if there is none, or ``path`` is damaged, or none verifies.
        """
        return self.restore(lambda _path, payload: payload, path)[1]
