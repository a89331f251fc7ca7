"""Errors of the reliability layer and how faults are classified.

Each subclasses :class:`~esper_async.EsperError`, so ``except EsperError`` still catches
everything the framework raises on purpose::

    CheckpointError                a checkpoint cannot be written, found or restored
    ├── CheckpointIntegrityError   a checkpoint file is damaged (digest, truncation, content)
    ├── CheckpointForgeryError     with a seal key: a file's seal is missing or not the key's
    └── CheckpointMismatchError    a sound checkpoint does not fit the model it is restored into
    GovernorError                  rolling back did not make training sound
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import EsperError, LossAnomaly

__all__ = (
    "CheckpointError",
    "CheckpointForgeryError",
    "CheckpointIntegrityError",
    "CheckpointMismatchError",
    "GovernorError",
    "LossAnomaly",
    "is_out_of_memory",
)

#: What the CPU allocator says when an allocation fails (it raises a plain ``RuntimeError``;
#: CUDA raises ``torch.OutOfMemoryError``).
_CPU_OOM_TEXT = ("can't allocate memory", "out of memory")


class CheckpointError(EsperError):
    """A checkpoint could not be written, found or restored.

    :ivar path: the file or directory concerned.
    :ivar tried: when no checkpoint of a directory restored, each file tried and why it failed.
    """

    def __init__(
        self, message: str, *, path: str, tried: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.tried = dict(tried or {})


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file is damaged: its digest does not match, it is truncated or has junk
    appended, it has no digest (an old format), or its content does not decode. Nothing of it
    was deserialised into the run."""


class CheckpointForgeryError(CheckpointError):
    """With a seal key configured (``$ESPER_SEAL_KEY`` or an argument), a checkpoint file whose
    digest verifies carries no seal, or a seal of another key: it was altered and re-digested,
    or written by another run. It is refused, never skipped for an older one as damage is."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint is sound but does not fit what it is restored into (other slots, other
    parameter names or shapes, surgery the model does not match): the model was built or
    wrapped differently from the checkpointed run's."""


class GovernorError(EsperError):
    """Training went bad and rolling back did not help: the governor gave up.

    :ivar step: the global step at which it gave up.
    """

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


def is_out_of_memory(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an out-of-memory error."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and any(t in str(exc) for t in _CPU_OOM_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False
