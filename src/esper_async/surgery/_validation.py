"""Validation of a staged architecture change: shapes, a probe forward, preservation, gradients,
budget.

Each operation is checked where it acts: in the smallest module (the *region*) containing its
changes. The region's input on the probe batch is recorded with the old structure (the probe forward
stops as soon as the region has returned), then the new region runs on that input. Everything
outside the region is unchanged, so if the region keeps its output shape, its output values where
function preservation is promised, and a gradient path from its output to its parameters and its
input, the whole model does too. This keeps validation of a change in one block of a ResNet-18 far
cheaper than two full forward passes.

Validation runs in eval mode (batch-norm statistics untouched, dropout off) and never calls
``backward``: the parameters' ``.grad`` fields are not written. Gradient reachability is read from
the autograd graph: a parameter is reached when its ``AccumulateGrad`` node lies on a path from the
output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._context import Captured, eval_mode, module_list, parameter_list, tensor_leaves

__all__ = (
    "RegionCheck",
    "SurgeryBudget",
    "SurgeryReport",
    "SurgeryValidationConfig",
    "check_commit",
    "check_region",
    "footprint",
)


@dataclass(frozen=True)
class SurgeryBudget:
    """Limits a committed change must respect (``None``: no limit).

    :param max_parameters: most trainable parameters (elements) the model may hold afterwards.
    :param max_growth: most trainable parameters afterwards, as a multiple of the count before.
    :param max_bytes: most bytes of parameters, buffers and optimizer state afterwards.
    """

    max_parameters: int | None = None
    max_growth: float | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class SurgeryValidationConfig:
    """How a transaction validates before it commits.

    :param rtol: relative tolerance of the function-preservation check.
    :param atol: absolute tolerance of the function-preservation check.
    :param check_gradients: require a gradient path from the output to every trainable parameter.
    :param budget: parameter and memory limits.
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    check_gradients: bool = True
    budget: SurgeryBudget = field(default_factory=SurgeryBudget)


@dataclass(frozen=True)
class RegionCheck:
    """What validation found for one staged operation, in the smallest module containing its
    changes.

    :ivar operation: the operation's description.
    :ivar region: dotted name of that module (``""``: the root).
    :ivar problems: one sentence per failed check.
    :ivar max_abs_diff: largest output change where function preservation was checked, else
        ``None``.
    :ivar unreached: names (within the region) of trainable parameters no gradient reaches.
    """

    operation: str
    region: str
    problems: tuple[str, ...]
    max_abs_diff: float | None
    unreached: tuple[str, ...] = ()


@dataclass(frozen=True)
class SurgeryReport:
    """What validation found for a whole transaction. ``ok`` is true when ``problems`` is empty.

    :ivar checks: one :class:`RegionCheck` per staged operation.
    :ivar problems: one sentence per failed transaction-level check (optimizer coverage, budget).
    :ivar parameters_before: trainable parameter elements before the transaction.
    :ivar parameters_after: trainable parameter elements after it.
    :ivar bytes_after: bytes of parameters, buffers and optimizer state after it.
    """

    checks: tuple[RegionCheck, ...]
    problems: tuple[str, ...]
    parameters_before: int
    parameters_after: int
    bytes_after: int

    @property
    def ok(self) -> bool:
        return not self.problems and all(not check.problems for check in self.checks)

    @property
    def max_abs_diff(self) -> float | None:
        diffs = [c.max_abs_diff for c in self.checks if c.max_abs_diff is not None]
        return max(diffs) if diffs else None


def footprint(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
    """``(trainable parameter elements, bytes of parameters + buffers + optimizer state)``."""
    modules = module_list(model)
    params = parameter_list(model, modules)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in params)
    buffers = {id(b): b for m in modules for b in m._buffers.values() if b is not None}
    size += sum(b.numel() * b.element_size() for b in buffers.values())
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    size += value.numel() * value.element_size()
    return trainable, size


def _reached(outputs: Iterable[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors whose ``AccumulateGrad`` nodes the outputs' autograd graph
    reaches."""
    outputs = list(outputs)
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    seen: set[Any] = set()
    leaves = {id(t) for t in outputs if t.grad_fn is None and t.requires_grad}
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return leaves


def _leaf_inputs(value: Any) -> Any:
    """A copy of the captured arguments whose floating tensors are fresh leaves requiring grad."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_(True) if leaf.is_floating_point() else leaf
    if isinstance(value, tuple):
        return tuple(_leaf_inputs(v) for v in value)
    if isinstance(value, list):
        return [_leaf_inputs(v) for v in value]
    if isinstance(value, dict):
        return {k: _leaf_inputs(v) for k, v in value.items()}
    return value


def check_region(
    model: nn.Module,
    region: str,
    call: Captured,
    *,
    operation: str,
    preserves_function: bool,
    config: SurgeryValidationConfig,
) -> RegionCheck:
    """Run the changed region on the input it had before the change, and check the result.

    The rest of the model is untouched, so a region that keeps its output shape (and, where
    promised, its output values) and passes gradients from its output to its parameters and its
    input keeps the whole model's forward pass, output and gradient flow intact.

    :param model: the root module, after the change.
    :param region: dotted name of the smallest module containing the change.
    :param call: the region's first call on the probe batch before the change (arguments, output).
    :param operation: the operation's description.
    :param preserves_function: whether to require the same output within tolerance.
    :param config: tolerances and the gradient switch.
    """
    module = model.get_submodule(region) if region else model
    problems: list[str] = []
    max_diff: float | None = None
    unreached: tuple[str, ...] = ()
    args, kwargs = _leaf_inputs(call.args), _leaf_inputs(call.kwargs)
    try:
        with eval_mode(model), torch.enable_grad():
            outputs = tuple(tensor_leaves(module(*args, **kwargs)))
    except Exception as exc:
        problems.append(f"the changed region {region or 'root'!r} fails on its probe input: {exc}")
        return RegionCheck(operation, region, tuple(problems), None)
    before = tuple(t for t in tensor_leaves(call.output))
    shapes, old_shapes = [tuple(t.shape) for t in outputs], [tuple(t.shape) for t in before]
    if shapes != old_shapes:
        problems.append(
            f"the output of {region or 'root'!r} changed shape from {old_shapes} to {shapes}"
        )
    elif not all(bool(torch.isfinite(t).all()) for t in outputs):
        problems.append(f"the output of {region or 'root'!r} has non-finite values")
    elif preserves_function:
        max_diff = (
            max(
                (float((o.detach() - r).abs().max()) if o.numel() else 0.0)
                for o, r in zip(outputs, before, strict=True)
            )
            if outputs
            else 0.0
        )
        if not all(
            torch.allclose(o.detach(), r, rtol=config.rtol, atol=config.atol)
            for o, r in zip(outputs, before, strict=True)
        ):
            problems.append(
                f"a function-preserving change altered the output of {region or 'root'!r} "
                f"(max |Δ| = {max_diff:.3g}, rtol={config.rtol}, atol={config.atol})"
            )
    if config.check_gradients and not problems:
        reached = _reached(outputs)
        unreached = tuple(
            name
            for name, p in module.named_parameters()
            if p.requires_grad and id(p) not in reached
        )
        if unreached:
            problems.append(f"no gradient reaches {len(unreached)} parameter(s): {unreached[:5]}")
        cut = [t for t in tensor_leaves((args, kwargs)) if t.requires_grad and id(t) not in reached]
        if cut:
            problems.append(
                f"the output of {region or 'root'!r} no longer depends on its input: gradients "
                "would not reach the layers before it"
            )
    return RegionCheck(operation, region, tuple(problems), max_diff, unreached)


def check_commit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    checks: tuple[RegionCheck, ...],
    parameters_before: int,
    config: SurgeryValidationConfig,
) -> SurgeryReport:
    """The transaction-level checks: the optimizer steps every trainable parameter; the budget
    holds.

    :param model: the model after every staged operation.
    :param optimizer: its optimizer, or ``None``.
    :param checks: the per-operation region checks made while staging.
    :param parameters_before: trainable parameter elements before the transaction.
    :param config: the budget.
    """
    problems: list[str] = []
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing: list[str] = []
        if any(p.requires_grad and id(p) not in held for p in parameter_list(model)):
            missing = [
                n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held
            ]
        if missing:
            problems.append(f"the optimizer does not step {missing[:5]}")
    trainable, size = footprint(model, optimizer)
    problems.extend(_budget_problems(config.budget, parameters_before, trainable, size))
    return SurgeryReport(checks, tuple(problems), parameters_before, trainable, size)


def _budget_problems(budget: SurgeryBudget, before: int, after: int, size: int) -> list[str]:
    problems = []
    if budget.max_parameters is not None and after > budget.max_parameters:
        problems.append(
            f"{after} trainable parameters exceed the budget of {budget.max_parameters}"
        )
    if budget.max_growth is not None and after > budget.max_growth * before:
        problems.append(
            f"{after} trainable parameters exceed {budget.max_growth}x the {before} before"
        )
    if budget.max_bytes is not None and size > budget.max_bytes:
        problems.append(f"{size} bytes of model and optimizer state exceed {budget.max_bytes}")
    return problems
