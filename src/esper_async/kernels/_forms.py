"""Execution forms: the ways a loaded kernel can run in training.

Every form runs the same exported program with the same parameters; forms differ only in how the
program is executed. The optimizer measures the forms on the target device and records the fastest
in the kernel's metadata (``execution_form``); :func:`~esper_async.kernels.load_kernel` applies it.

==================  ==========================================================================
form                how it runs
==================  ==========================================================================
``export``          the exported graph as is (eager ATen ops): always available, the baseline
``channels_last``   parameters and inputs in channels-last memory format (conv kernels only)
``inductor``        the exported graph compiled by ``torch.compile`` (Inductor), forward and
                    backward; its compiled code is cached on disk, so a second load is fast
``bf16``            the graph under bfloat16 autocast, outputs cast back to the slot's dtype;
                    only where the caller allows reduced precision
==================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ("FORMS", "prepare_form", "run_in_form")


def _channels_last(program: nn.Module) -> nn.Module:
    # In place: the parameters stay the program's own (same objects, same names), only their
    # layout changes. torch's type stubs for Module.to omit memory_format, which it accepts.
    return program.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]


def _inductor(program: nn.Module) -> nn.Module:
    # Compiling the module itself (not a wrapper function) runs on its own parameters, so
    # optimizers, ``.to()`` and ``state_dict`` see the same tensors under the same names.
    compiled: nn.Module = torch.compile(program, dynamic=True, fullgraph=True)  # type: ignore[assignment]
    return compiled


FORMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "export": lambda program: program,
    "channels_last": _channels_last,
    "inductor": _inductor,
    "bf16": lambda program: program,
}
"""Each form's name and the function that prepares an exported program to run in that form: it
returns the module to call (the program itself, or its compiled twin over the same parameters)."""


def prepare_form(program: nn.Module, form: str) -> nn.Module:
    """Prepare an exported program to run in ``form``; return the module to call.

    The program keeps its parameters (the same tensors, under the same names) whatever the form,
    so a kernel's ``state_dict`` (and a checkpoint holding it) does not depend on which form the
    optimizer measured fastest on this machine.

    :raises KeyError: naming the known forms, if ``form`` is not one of them.
    """
    try:
        prepare = FORMS[form]
    except KeyError:
        raise KeyError(f"unknown execution form {form!r}; known: {sorted(FORMS)}") from None
    return prepare(program)


def run_in_form(form: str, module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Call ``module`` (from :func:`prepare_form`) on ``h`` the way ``form`` runs it."""
    if form == "channels_last":
        return module(h.contiguous(memory_format=torch.channels_last))  # type: ignore[no-any-return]
    if form == "bf16":
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            out = module(h)
        return out.to(h.dtype)  # type: ignore[no-any-return]
    return module(h)  # type: ignore[no-any-return]
