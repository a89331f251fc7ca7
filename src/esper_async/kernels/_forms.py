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

__all__ = ("FORMS", "apply_form")


class _ChannelsLast(nn.Module):
    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        # torch's type stubs for Module.to omit memory_format, which it accepts.
        self.program = program.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.program(h.contiguous(memory_format=torch.channels_last))


class _Compiled(nn.Module):
    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program
        # Compiling the module itself (not a wrapper function) keeps its parameters visible to
        # optimizers and state_dict under the same names as the other forms.
        self._compiled = torch.compile(program, dynamic=True, fullgraph=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._compiled(h)


class _Bf16(nn.Module):
    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, dtype=torch.bfloat16):
            out = self.program(h)
        return out.to(h.dtype)


FORMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "export": lambda program: program,
    "channels_last": _ChannelsLast,
    "inductor": _Compiled,
    "bf16": _Bf16,
}
"""Each form's name and the function that wraps an exported program to run in that form."""


def apply_form(program: nn.Module, form: str) -> nn.Module:
    """Wrap an exported program to run in ``form``.

    :raises KeyError: naming the known forms, if ``form`` is not one of them.
    """
    try:
        wrap = FORMS[form]
    except KeyError:
        raise KeyError(f"unknown execution form {form!r}; known: {sorted(FORMS)}") from None
    return wrap(program)
