"""Kernels: a blueprint exported with ``torch.export`` to bytes, plus metadata that describes it.

A :class:`Kernel` is immutable and identified by the sha256 of its artifact bytes
(:attr:`Kernel.kernel_id`). :func:`load_kernel` checks those bytes against the id, so what runs in
a slot is exactly what was exported and validated, and — since anyone can recompute a sha256 —
then reads them as data on an allow-list, never through ``torch.export.load``, so that no kernel
file can run code.
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..blueprints import Blueprint, SlotContract, build
from ..errors import CompileError, KernelIntegrityError, UnsafeKernelError
from ._archive import ArchiveRefused, read_archive
from ._forms import prepare_form, run_in_form
from ._graph import build_program

__all__ = ("Kernel", "KernelMetadata", "KernelModule", "export_kernel", "load_kernel")

#: Batch size of the example input used to trace a kernel. Not 0 or 1: torch.export specialises
#: those sizes, and the batch dimension must stay dynamic.
_TRACE_BATCH = 2
#: Sequence length of the example input of a token-slot kernel: not 0 or 1 (specialised), nor
#: the batch size (torch.export would take equal example sizes for the same symbol).
_TRACE_TOKENS = 5


@dataclass(frozen=True)
class KernelMetadata:
    """What is known about a kernel without loading it.

    :ivar sha256: hex sha256 of the artifact bytes; also the kernel's id.
    :ivar blueprint_json: the canonical JSON of the blueprint it was built from.
    :ivar contract: the slot contract it was built for, as JSON.
    :ivar input_shape: per-sample input shape (batch, and a token slot's sequence, excluded).
    :ivar output_shape: per-sample output shape, likewise.
    :ivar dtype: parameter and activation dtype.
    :ivar param_count: number of trainable parameters.
    :ivar torch_version: ``torch.__version__`` of the exporting process.
    :ivar device_kind: ``"cpu"`` or ``"cuda"``: the device the kernel was built for.
    :ivar execution_form: how the kernel runs: ``"export"`` is the exported graph as is.
    :ivar init_seed: the RNG seed of the initial weights.
    :ivar compile_s: seconds spent building and exporting.
    :ivar extra: further figures (optimizer timings, validation report), JSON-ready.
    """

    sha256: str
    blueprint_json: str
    contract: dict[str, Any]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    dtype: str
    param_count: int
    torch_version: str
    device_kind: str
    execution_form: str
    init_seed: int
    compile_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping (the inverse of :meth:`from_json`)."""
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["output_shape"] = list(self.output_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KernelMetadata:
        """Read metadata written by :meth:`to_json`."""
        fields = dict(data)
        fields["input_shape"] = tuple(fields["input_shape"])
        fields["output_shape"] = tuple(fields["output_shape"])
        return cls(**fields)


@dataclass(frozen=True)
class Kernel:
    """A compiled seed: the exported program's bytes and their metadata.

    :ivar artifact: bytes written by ``torch.export.save``.
    :ivar metadata: see :class:`KernelMetadata`.
    """

    artifact: bytes = field(repr=False)
    metadata: KernelMetadata

    @property
    def kernel_id(self) -> str:
        """The kernel's id: the hex sha256 of its artifact bytes."""
        return self.metadata.sha256

    @property
    def blueprint(self) -> Blueprint:
        """The blueprint the kernel was built from."""
        return Blueprint.from_json(self.metadata.blueprint_json)

    @property
    def contract(self) -> SlotContract:
        """The slot contract the kernel was built for."""
        return SlotContract.from_json(self.metadata.contract)

    @property
    def nbytes(self) -> int:
        """Size of the artifact in bytes."""
        return len(self.artifact)


class KernelModule(nn.Module):
    """The module that runs a loaded kernel in a slot.

    It holds the exported graph (an ``fx.GraphModule``) as its child ``program``, and runs it in
    its execution form (see :mod:`esper_async.kernels._forms`); the parameters' names are
    ``program.*`` in every form. Kernels are
    exported in training mode from mode-free blueprints (no dropout, no batch statistics), so
    ``train()``/``eval()`` only set the flag: exported graphs cannot switch mode, and their
    behaviour does not depend on it.

    :ivar kernel_id: the id of the kernel whose bytes were loaded.
    :ivar form: the execution form it runs in.
    """

    def __init__(self, program: nn.Module, kernel_id: str, form: str = "export") -> None:
        super().__init__()
        callee = prepare_form(program, form)
        self.program = program
        # What the form calls (the program, or its compiled twin) is not a registered child: the
        # parameters live in ``program`` alone, under the same names in every form.
        self.__dict__["_callee"] = callee
        self.kernel_id = kernel_id
        self.form = form

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map host outputs ``(N, *shape)`` to a seed contribution of the same shape."""
        return run_in_form(self.form, self.__dict__["_callee"], h)

    def train(self, mode: bool = True) -> KernelModule:
        self.training = mode
        return self


def export_kernel(
    blueprint: Blueprint,
    contract: SlotContract,
    *,
    seed: int = 0,
    device_kind: str = "cpu",
) -> Kernel:
    """Build ``blueprint`` for ``contract`` and export it to a kernel with a dynamic batch size
    (and, for a token slot, a dynamic sequence length: input ``(N, T, D)``).

    This runs in the calling thread and takes about a second; the compiler runs it off the
    event loop.

    :param blueprint: what to build.
    :param contract: the slot's shape contract.
    :param seed: RNG seed of the initial weights.
    :param device_kind: the device kind the kernel targets (recorded in the metadata).
    :raises BlueprintError: if the blueprint does not fit the contract.
    :raises CompileError: if building or exporting fails.
    """
    started = time.perf_counter()
    module = build(blueprint, contract, seed=seed)
    dtype = getattr(torch, contract.dtype)
    example = torch.randn(contract.batch_shape(_TRACE_BATCH, _TRACE_TOKENS), dtype=dtype)
    dynamic = dict.fromkeys(range(contract.leading_dims), torch.export.Dim.AUTO)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=(dynamic,))
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        with torch.no_grad():
            out_shape = tuple(module(example).shape[contract.leading_dims :])
    except Exception as exc:
        raise CompileError(
            f"torch.export of {blueprint.name} for shape {contract.shape} failed: {exc}",
            blueprint=blueprint.name,
        ) from exc
    artifact = buffer.getvalue()
    metadata = KernelMetadata(
        sha256=hashlib.sha256(artifact).hexdigest(),
        blueprint_json=blueprint.to_json(),
        contract=contract.to_json(),
        input_shape=contract.shape,
        output_shape=out_shape,
        dtype=contract.dtype,
        param_count=sum(p.numel() for p in module.parameters()),
        torch_version=torch.__version__,
        device_kind=device_kind,
        execution_form="export",
        init_seed=seed,
        compile_s=time.perf_counter() - started,
    )
    return Kernel(artifact=artifact, metadata=metadata)


#: Loads are serialised process-wide: rebuilding a program generates FX source, execs it and
#: registers it with linecache, state every thread of the process shares. Taking the lock here
#: keeps every caller (trainer, validator, optimizer, checkpoint restore) one at a time, so none
#: needs a limiter of its own.
_LOAD_LOCK = threading.Lock()


def load_kernel(
    kernel: Kernel, *, device: torch.device | str = "cpu", form: str | None = None
) -> KernelModule:
    """Check a kernel's bytes against its id and load it as a trainable module on ``device``.

    The bytes are never handed to ``torch.export.load`` (which can run code from an archive):
    the archive is checked member by member and the program rebuilt from its JSON graph and raw
    weights on an allow-list (see :mod:`esper_async.kernels._archive` and ``_graph``). Safe to
    call from several threads; loads run one at a time.

    :param kernel: the kernel to load.
    :param device: where its parameters go.
    :param form: the execution form to run in; default the one the optimizer chose.
    :raises KernelIntegrityError: if the bytes do not hash to the kernel's id.
    :raises UnsafeKernelError: if the archive holds anything a kernel may not carry (a pickle
        beyond tensor rebuilding, a weight marked as pickled, an operator outside the
        allow-list, a malformed zip); nothing in it was deserialised.
    :raises CompileError: if the checked program cannot be built or moved to ``device``.
    """
    digest = hashlib.sha256(kernel.artifact).hexdigest()
    if digest != kernel.kernel_id:
        raise KernelIntegrityError(
            f"kernel {kernel.kernel_id[:12]} artifact hashes to {digest[:12]}; refusing to load it",
            kernel_id=kernel.kernel_id,
        )
    with _LOAD_LOCK:
        try:
            program = build_program(read_archive(kernel.artifact))
        except ArchiveRefused as exc:
            raise UnsafeKernelError(
                f"kernel {kernel.kernel_id[:12]} refused before deserialising: {exc}; recompile "
                "it from its blueprint rather than loading these bytes",
                kernel_id=kernel.kernel_id,
                member=exc.member,
            ) from None
        except Exception as exc:
            raise CompileError(
                f"kernel {kernel.kernel_id[:12]} could not be rebuilt: {exc}",
                kernel_id=kernel.kernel_id,
            ) from exc
        program = program.to(device)
    return KernelModule(program, kernel.kernel_id, form or kernel.metadata.execution_form)
