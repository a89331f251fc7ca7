"""``KernelValidator``: a kernel must compute what its blueprint describes before it is grafted.

The kernel, loaded from its bytes in the form it will run in, is compared with an eager module
built from the same blueprint. Both get the same random weights first: a fresh seed's last layer is
zero, and comparing two zero functions would prove nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..blueprints import build
from ..kernels import Kernel, load_kernel

__all__ = ("Check", "KernelValidator", "ValidationReport")

#: Batch sizes the kernel is run at: the batch dimension must be truly dynamic.
_BATCHES = (1, 3)


@dataclass(frozen=True)
class Check:
    """One validation check: its name, whether it passed, and the figure or reason behind it."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class ValidationReport:
    """The validator's verdict on one kernel, stored in the kernel's metadata.

    :ivar kernel_id: the kernel checked.
    :ivar form: the execution form it was checked in.
    :ivar checks: every check made, in order.
    :ivar max_abs_error: the largest difference from the eager reference, outputs and gradients.
    """

    kernel_id: str
    form: str
    checks: tuple[Check, ...] = field(default_factory=tuple)
    max_abs_error: float = 0.0

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping."""
        data = asdict(self)
        data["passed"] = self.passed
        return data


def _randomise(*modules: nn.Module, seed: int) -> None:
    """Give each module the same random weights, parameter by parameter (in order)."""
    params = [list(m.parameters()) for m in modules]
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for group in zip(*params, strict=True):
            values = torch.randn(group[0].shape, generator=gen, dtype=group[0].dtype) * 0.5
            for p in group:
                p.copy_(values.to(p.device))


def _tolerances(form: str) -> tuple[float, float]:
    # bf16 keeps 8 bits of mantissa; compiled code may reorder float32 reductions.
    return {"bf16": (5e-2, 5e-2), "inductor": (1e-4, 1e-4)}.get(form, (1e-5, 1e-5))


class KernelValidator:
    """Compare a kernel with its eager reference.

    Checks: the kernel's parameters match the reference's layout; forward outputs allclose;
    gradients allclose for the input and every parameter; the slot's shape contract at several
    batch sizes (and, for a token slot, sequence lengths); finite outputs; the input is not
    mutated; two runs on the same input agree (determinism); and building the reference twice
    from the blueprint's seed gives the same initial weights as the kernel's.

    :param seed: seeds the random weights and inputs of the comparison.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def validate(self, kernel: Kernel, *, form: str | None = None) -> ValidationReport:
        """Validate ``kernel`` as it will run (in ``form``, default its recorded form).

        Never raises for a bad kernel: every problem becomes a failed check in the report.
        """
        form = form or kernel.metadata.execution_form
        checks: list[Check] = []
        worst = 0.0

        def check(name: str, passed: bool, detail: str = "") -> bool:
            checks.append(Check(name, bool(passed), detail))
            return bool(passed)

        def report() -> ValidationReport:
            return ValidationReport(kernel.kernel_id, form, tuple(checks), worst)

        contract, blueprint = kernel.contract, kernel.blueprint
        try:
            module = load_kernel(kernel, form=form)
            reference = build(blueprint, contract, seed=kernel.metadata.init_seed)
        except Exception as exc:  # a kernel that does not even load fails validation
            check("loads", False, f"{type(exc).__name__}: {exc}")
            return report()
        check("loads", True)

        init_equal = all(
            torch.equal(a.detach().cpu(), b.detach().cpu())
            for a, b in zip(module.parameters(), reference.parameters(), strict=False)
        )
        same_layout = [p.shape for p in module.parameters()] == [
            p.shape for p in reference.parameters()
        ]
        if not check("parameter_layout", same_layout, "kernel and reference parameter shapes"):
            return report()
        check("initial_weights", init_equal, f"weights from seed {kernel.metadata.init_seed}")

        _randomise(module, reference, seed=self.seed)
        rtol, atol = _tolerances(form)
        gen = torch.Generator().manual_seed(self.seed + 1)
        dtype = getattr(torch, contract.dtype)
        for batch in _BATCHES:
            shape = contract.batch_shape(batch, tokens=batch + 2)  # T varies with N (token slots)
            x = torch.randn(shape, generator=gen, dtype=dtype)
            x_kernel = x.clone().requires_grad_(True)
            x_ref = x.clone().requires_grad_(True)
            try:
                out = module(x_kernel)
                again = module(x_kernel)
            except Exception as exc:
                check(f"runs[b={batch}]", False, f"{type(exc).__name__}: {exc}")
                return report()
            expected = reference(x_ref)
            if not check(
                f"shape[b={batch}]",
                tuple(out.shape) == shape,
                f"got {tuple(out.shape)}, contract {shape}",
            ):
                return report()
            check(f"finite[b={batch}]", bool(torch.isfinite(out).all()))
            check(f"deterministic[b={batch}]", torch.equal(out, again))
            err = float((out.detach().float() - expected.detach().float()).abs().max())
            worst = max(worst, err)
            check(f"forward[b={batch}]", torch.allclose(out, expected, rtol, atol), f"{err:.2e}")

            weight = torch.randn(out.shape, generator=gen, dtype=dtype)
            module.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            (out * weight).sum().backward()
            (expected * weight).sum().backward()
            check(f"input_unchanged[b={batch}]", torch.equal(x_kernel.detach(), x))
            pairs = [(x_kernel.grad, x_ref.grad)] + [
                (a.grad, b.grad)
                for a, b in zip(module.parameters(), reference.parameters(), strict=True)
            ]
            grad_err = 0.0
            grads_ok = True
            for got, want in pairs:
                if got is None or want is None:
                    grads_ok = grads_ok and got is None and want is None
                    continue
                grad_err = max(grad_err, float((got.float() - want.float()).abs().max()))
                # Gradients sum over the batch and spatial positions, so their rounding error
                # grows with that count; a tenfold absolute tolerance covers the batches used here.
                grads_ok = grads_ok and torch.allclose(got.float(), want.float(), rtol, atol * 10)
            worst = max(worst, grad_err)
            check(f"gradients[b={batch}]", grads_ok and math.isfinite(grad_err), f"{grad_err:.2e}")
        return report()
