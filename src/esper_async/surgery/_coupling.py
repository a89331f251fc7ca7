"""The torch.fx passes behind host growth: which layers write a block's residual branches.

A block is traced flat (PyTorch's own layers are leaves; the user's modules are traced through),
so the graph shows the residual stream as a chain of additions from the block's input. A residual
branch is the other operand of such an addition; walking it back through dropout, identities and
scalar multiplications reaches its output projection (a Linear or Conv). Anything else there (a
gate, a custom op) is refused with :class:`GrowthCouplingError`, never skipped.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ._host_common import GrowthCouplingError

__all__ = ("ADDS", "PASS_FUNCTIONS", "PASS_MODULES", "flat_graph", "residual_projections")

ADDS = {operator.add, operator.iadd, torch.add}
#: Modules and functions that hand a tensor on unchanged (at inference) along every dimension.
PASS_MODULES = (nn.Dropout, nn.Identity, nn.Dropout1d, nn.Dropout2d)
PASS_FUNCTIONS = {F.dropout, torch.nn.functional.dropout1d, F.dropout2d}
_PROJECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def flat_graph(module: nn.Module, path: str, *, operation: str) -> fx.Graph:
    """``module``'s forward as one torch.fx graph, PyTorch's layers as leaves.

    :raises GrowthCouplingError: the forward cannot be traced (data-dependent control flow).
    """
    try:
        return fx.Tracer().trace(module)
    except Exception as exc:
        raise GrowthCouplingError(
            path or "root",
            f"its forward cannot be traced with torch.fx ({type(exc).__name__}: {exc}), so its "
            "couplings cannot be found",
            operation=operation,
        ) from exc


def _passes(module: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(module.get_submodule(str(node.target)), PASS_MODULES)
    if node.op == "call_function":
        return node.target in PASS_FUNCTIONS
    return False


def _scalar_mul(node: fx.Node) -> fx.Node | None:
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        a, b = node.args[0], node.args[1]
        if isinstance(a, fx.Node) and isinstance(b, (int, float)):
            return a
        if isinstance(b, fx.Node) and isinstance(a, (int, float)):
            return b
    return None


def branch_projection(module: nn.Module, node: Any, path: str, operation: str) -> str:
    """The output projection a residual branch ends in (its dotted name relative to ``module``).

    :raises GrowthCouplingError: the branch ends in anything but a Linear or Conv.
    """
    while isinstance(node, fx.Node):
        if node.op == "call_module":
            layer = module.get_submodule(str(node.target))
            if isinstance(layer, _PROJECTIONS):
                return str(node.target)
        if _passes(module, node):
            node = node.args[0]
            continue
        inner = _scalar_mul(node)
        if inner is not None:
            node = inner
            continue
        where = f"{path}.{node.target}" if node.op == "call_module" and path else str(node)
        raise GrowthCouplingError(
            where,
            f"a residual branch of {path or 'the block'!r} ends in {node.format_node()}, not in "
            "a Linear or Conv output projection; pass zero= (the projections to zero) explicitly",
            operation=operation,
        )
    raise GrowthCouplingError(
        path or "block", f"a residual branch adds a constant ({node!r})", operation=operation
    )


def residual_projections(block: nn.Module, path: str, *, operation: str) -> list[str]:
    """The output projections of ``block``'s residual branches, found from its fx graph.

    :param block: one block (``x -> x + f(x) [+ g(...)]``).
    :param path: its dotted name, for errors.
    :raises GrowthCouplingError: the block cannot be traced, adds no residual branch, or a branch
        does not end in a Linear or Conv.
    """
    graph = flat_graph(block, path, operation=operation)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise GrowthCouplingError(path, "its forward takes no input", operation=operation)
    stream = {placeholders[0]}
    found: list[str] = []
    for node in graph.nodes:
        if _passes(block, node) and node.args and node.args[0] in stream:
            stream.add(node)
        elif node.op == "call_function" and node.target in ADDS and len(node.args) == 2:
            a, b = node.args
            if a in stream or b in stream:
                other = b if a in stream else a
                if other not in stream:
                    found.append(branch_projection(block, other, path, operation))
                stream.add(node)
    if not found:
        raise GrowthCouplingError(
            path,
            "no residual addition (input + branch) was found in its graph, so it cannot start as "
            "the identity; pass zero= or a factory that builds an identity block",
            operation=operation,
        )
    return list(dict.fromkeys(found))
