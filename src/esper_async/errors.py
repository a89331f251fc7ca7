"""The exceptions esper_async raises.

Every error derives from :class:`EsperError`, so ``except EsperError`` catches anything the
framework raises on purpose. Errors of dependencies (torch, sqlite, the OS) are mapped at the
boundary where they occur and chained with ``raise ... from exc``.

::

    EsperError
    ├── BlueprintError            a blueprint is malformed or does not fit a slot
    ├── LifecycleError            an illegal seed-lifecycle transition
    ├── KernelError
    │   ├── CompileError          a blueprint could not be turned into a kernel
    │   │   └── CompileTimeoutError
    │   ├── KernelValidationError a kernel failed validation (carries the report)
    │   └── KernelIntegrityError  artifact bytes do not match the kernel's id
    │       └── UnsafeKernelError artifact holds what a kernel may not carry (a pickle, code)
    ├── StoreError
    │   └── StoreIntegrityError   a stored blob or row is corrupt or missing
    │       └── StoreForgeryError     with a seal key: a bundle's seal is missing or foreign
    ├── SelectionError
    │   └── NoLegalArmError       every (slot, blueprint) pair is ruled out
    ├── SurgeryError              an architecture change was rejected; nothing was changed
    ├── SeedRuntimeError          a grafted kernel failed or produced non-finite values
    ├── LossAnomaly               a training step's loss was non-finite or spiked (recoverable)
    ├── ExportError               a model cannot be exported to plain torch (a live seed, ...)
    ├── StreamError               a CUDA stream operation failed, or CUDA is needed and absent
    ├── TelemetryConfigError      telemetry was configured in a way that cannot work
    ├── ControllerConfigError     a ControllerConfig option is out of range
    ├── TrainingConfigError       a Trainer, Grower or fit option is invalid
    ├── LoaderError               a data loader yields no batches, or cannot be iterated again
    ├── DemoConfigError           the demo's options (or a run's demo.json) are invalid
    ├── DataError                 a data set's files are corrupt, truncated, crafted or malformed
    │   └── DataMissingError          a data set's directory or one of its files is not there
    ├── CheckpointError           (esper_async.reliability) a checkpoint cannot be written or read
    │   ├── CheckpointIntegrityError  a checkpoint file is damaged (digest, truncation, content)
    │   ├── CheckpointForgeryError    with a seal key: a checkpoint's seal is missing or foreign
    │   └── CheckpointMismatchError   a sound checkpoint does not fit the model restored into
    ├── GovernorError             (esper_async.reliability) rolling back did not make training sound
    ├── WorkerStartError          (esper_async.compiler) a compile worker died starting (no
    │                             `if __name__ == "__main__":` guard in the script)
    └── DistributedError          (esper_async.distributed) ranks disagree or cannot coordinate
        ├── RankDivergenceError       ranks hold different structure or parameters
        └── ControllerBroadcastError  rank 0's decision could not reach the other ranks
"""

from __future__ import annotations

from typing import Any

__all__ = (
    "BlueprintError",
    "CompileError",
    "CompileTimeoutError",
    "ControllerConfigError",
    "DataError",
    "DataMissingError",
    "DemoConfigError",
    "EsperError",
    "ExportError",
    "KernelError",
    "KernelIntegrityError",
    "KernelValidationError",
    "LifecycleError",
    "LoaderError",
    "LossAnomaly",
    "NoLegalArmError",
    "SeedRuntimeError",
    "SelectionError",
    "StoreError",
    "StoreForgeryError",
    "StoreIntegrityError",
    "StreamError",
    "SurgeryError",
    "TelemetryConfigError",
    "TrainingConfigError",
    "UnsafeKernelError",
)


def _rebuild(cls: type[EsperError], args: tuple[Any, ...], state: dict[str, Any]) -> EsperError:
    """Unpickle an :class:`EsperError` without calling its keyword-only ``__init__``."""
    # An OSError subclass (DataMissingError) has OSError's layout: only OSError.__new__ builds it.
    error = OSError.__new__(cls) if issubclass(cls, OSError) else cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class EsperError(Exception):
    """Base class of every error raised by esper_async.

    Every one pickles with its attributes (``slot``, ``key``, ...), so that it crosses a process
    pool (compile workers, a benchmark's seeds) as itself: ``Exception``'s own pickling would call
    ``__init__`` with the message alone, which fails for errors whose keyword arguments are
    required.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.args, dict(self.__dict__))


class BlueprintError(EsperError, ValueError):
    """A blueprint is malformed, or its shape contract does not fit the slot it was offered to.

    :ivar blueprint: the offending blueprint's name (or ``None`` when it could not be read).
    """

    def __init__(self, message: str, *, blueprint: str | None = None) -> None:
        super().__init__(message)
        self.blueprint = blueprint


class LifecycleError(EsperError):
    """A seed was asked to make a transition its lifecycle does not allow.

    :ivar slot: the slot's name.
    :ivar source: the state the seed was in.
    :ivar target: the state it was asked to enter.
    """

    def __init__(self, message: str, *, slot: str, source: Any, target: Any) -> None:
        super().__init__(message)
        self.slot = slot
        self.source = source
        self.target = target


class KernelError(EsperError):
    """Base class of errors about kernels.

    :ivar blueprint: the blueprint's name, where known.
    :ivar kernel_id: the kernel's id (sha256 of its artifact), where known.
    """

    def __init__(
        self, message: str, *, blueprint: str | None = None, kernel_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.blueprint = blueprint
        self.kernel_id = kernel_id


class CompileError(KernelError):
    """A blueprint could not be compiled into a kernel. Nothing was persisted."""


class CompileTimeoutError(CompileError, TimeoutError):
    """A compile ran past its timeout and was cancelled."""


class KernelValidationError(KernelError):
    """A kernel failed validation and must not be grafted.

    :ivar report: the validator's structured report (a mapping), where available.
    """

    def __init__(
        self,
        message: str,
        *,
        blueprint: str | None = None,
        kernel_id: str | None = None,
        report: Any = None,
    ) -> None:
        super().__init__(message, blueprint=blueprint, kernel_id=kernel_id)
        self.report = report


class KernelIntegrityError(KernelError):
    """A kernel's artifact bytes do not hash to the kernel's id; they are never loaded."""


class UnsafeKernelError(KernelIntegrityError):
    """A kernel's artifact holds something a kernel may not carry — a pickle that imports more
    than tensor rebuilders, a weight marked as pickled, an operator outside the allow-list, a
    malformed zip — so it is refused before anything in it is deserialised.

    :ivar member: the archive member concerned (``""`` for the zip itself).
    """

    def __init__(self, message: str, *, kernel_id: str | None = None, member: str = "") -> None:
        super().__init__(message, kernel_id=kernel_id)
        self.member = member


class StoreError(EsperError):
    """Base class of kernel-store errors."""


class StoreIntegrityError(StoreError):
    """A stored artifact or row is corrupt or missing.

    :ivar key: the store key concerned, where known.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreForgeryError(StoreIntegrityError):
    """With a seal key configured (``$ESPER_SEAL_KEY`` or an argument), a kernel bundle carries
    no seal, or a seal of another key, over its manifest: it was not exported by a holder of the
    key, or was altered since. Nothing of it is imported."""


class SelectionError(EsperError):
    """Base class of seed-selection errors."""


class NoLegalArmError(SelectionError):
    """No (slot, blueprint) pair satisfies the selector's constraints.

    :ivar reasons: for each ruled-out arm, why it was ruled out.
    """

    def __init__(self, message: str, *, reasons: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = dict(reasons or {})


class SurgeryError(EsperError):
    """An architecture change was rejected; the model and optimizer are as they were.

    :ivar operation: a short description of the operation concerned.
    """

    def __init__(self, message: str, *, operation: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation


class SeedRuntimeError(EsperError):
    """A grafted kernel raised or produced non-finite values while running.

    :ivar slot: the slot whose seed failed.
    """

    def __init__(self, message: str, *, slot: str) -> None:
        super().__init__(message)
        self.slot = slot


class LossAnomaly(EsperError):
    """A training step's loss was non-finite or spiked, or its backward pass failed: nothing was
    updated. The trainer recovers from it (:meth:`esper_async.training.Grower.roll_back` takes
    it); a hand-written loop may raise it to ask for the same recovery.

    :ivar kind: ``"non_finite"``, ``"spike"`` or ``"backward"``.
    :ivar loss: the loss value (``None``: not known).
    :ivar culprit: the slot whose seed caused it, where a diagnosis found one.
    """

    def __init__(self, kind: str, loss: float | None = None, culprit: str | None = None) -> None:
        super().__init__(f"{kind} loss {loss}" + (f" caused by slot {culprit}" if culprit else ""))
        self.kind = kind
        self.loss = loss
        self.culprit = culprit


class ExportError(EsperError):
    """A trained model could not be exported to plain torch (:func:`esper_async.export_model`):
    a slot holds a live seed, the model cannot be traced, or the export differs from it.

    :ivar slot: the slot concerned, where one is.
    """

    def __init__(self, message: str, *, slot: str | None = None) -> None:
        super().__init__(message)
        self.slot = slot


class StreamError(EsperError, RuntimeError):
    """A CUDA stream operation failed, or CUDA is needed and absent.

    :ivar device: the device concerned (``None`` when no device was named).
    """

    def __init__(self, message: str, *, device: Any = None) -> None:
        super().__init__(message)
        self.device = device


class TelemetryConfigError(EsperError, ValueError):
    """Telemetry was configured in a way that cannot work (an exporter that is not installed,
    a malformed endpoint, an unreadable trace file)."""


class ControllerConfigError(EsperError, ValueError):
    """A :class:`~esper_async.control.ControllerConfig` option is out of range (width growth's
    factors, trial length, the FLOP rent)."""


class TrainingConfigError(EsperError, ValueError):
    """A :class:`~esper_async.Trainer`, :class:`~esper_async.training.Grower` or ``fit`` option
    is invalid (the message names it, what was given and what is accepted)."""


class LoaderError(EsperError, ValueError):
    """A training or validation loader cannot be used: it yielded no batches, or it is a one-shot
    iterator (a generator) that a run of several epochs would find empty after the first.

    :ivar loader: ``"training"`` or ``"validation"``.
    """

    def __init__(self, message: str, *, loader: str) -> None:
        super().__init__(message)
        self.loader = loader


class DemoConfigError(EsperError, ValueError):
    """The demo's options are invalid: given directly, or read back from a run's ``demo.json``.

    :ivar key: the option concerned (``"controller.blend_epochs"`` for a nested one), or ``None``
        when the file as a whole cannot be read.
    :ivar path: the file read, where there was one.
    """

    def __init__(self, message: str, *, key: str | None, path: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path


class DataError(EsperError, ValueError):
    """A data set's files cannot be used: one is corrupt, truncated, of the wrong shape or type,
    or holds what a data file may not (a pickle that imports anything but array rebuilders).
    Nothing in such a file is run.

    :ivar path: the file or directory concerned.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class DataMissingError(DataError, FileNotFoundError):
    """A data set's directory, or a file it must hold, is not there."""
