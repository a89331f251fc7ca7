"""Rewiring traceable (sub)models through torch.fx: a zero-gated skip, or any graph transform.

The module at ``scope`` is traced, the graph is edited, and a new ``fx.GraphModule`` replaces the
module at ``scope``. The GraphModule shares the traced module's parameters and buffers by reference,
so the optimizer keeps its state; submodules the graph no longer uses (and their parameters) leave
the model. When ``scope`` is the root, the transaction's ``model`` becomes the GraphModule: read
``tx.model``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ._context import SurgeryContext, describe_callable
from ._modules import GatedShortcut, shortcut_for
from ._operations import place_like

__all__ = ("AddSkip", "FxRewire", "trace")


class _KeepTracer(fx.Tracer):
    """The default fx tracer, except that the named submodules stay leaves (``call_module``
    nodes)."""

    def __init__(self, keep: set[str]) -> None:
        super().__init__()
        self._keep = keep

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._keep or super().is_leaf_module(
            m, module_qualified_name
        )


def trace(module: nn.Module, *, keep: set[str] | None = None, operation: str) -> fx.GraphModule:
    """Symbolically trace ``module`` into a GraphModule.

    :param module: the module to trace.
    :param keep: qualified names (relative to ``module``) to keep as leaves.
    :param operation: the operation's description, for the error.
    :raises SurgeryError: the module is not traceable (data-dependent control flow, unsupported
        calls).
    """
    tracer = _KeepTracer(keep or set())
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        raise SurgeryError(
            f"{operation}: {type(module).__name__} is not traceable with torch.fx ({exc}); make "
            "its forward traceable (no data-dependent control flow) or choose a traceable scope",
            operation=operation,
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _relative(scope: str, path: str, operation: str) -> str:
    if not scope:
        return path
    if not path.startswith(scope + "."):
        raise SurgeryError(
            f"{operation}: {path!r} is not inside the scope {scope!r}", operation=operation
        )
    return path[len(scope) + 1 :]


@dataclass(frozen=True)
class AddSkip:
    """Add ``gate * shortcut(output of source)`` to the output of ``destination`` (gate starts at
    zero).

    ``source`` must run before ``destination`` in the forward pass of the module at ``scope``, which
    must be traceable. The shortcut is an identity, a Linear or a strided 1x1 Conv2d, as the shapes
    need. Function-preserving.

    :param source: dotted name (from the root) of the module whose output the skip carries.
    :param destination: dotted name of the module whose output receives the skip.
    :param scope: dotted name of the traced module containing both (``""``: the root).
    """

    source: str
    destination: str
    scope: str = ""

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"add skip {self.source!r} → {self.destination!r}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        scoped = ctx.resolve(self.scope, operation=operation)
        src = ctx.resolve(self.source, operation=operation)
        dst = ctx.resolve(self.destination, operation=operation)
        rel_src = _relative(self.scope, self.source, operation)
        rel_dst = _relative(self.scope, self.destination, operation)
        graph_module = trace(scoped, keep={rel_src, rel_dst}, operation=operation)
        nodes = {n.target: n for n in graph_module.graph.nodes if n.op == "call_module"}
        order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        for rel in (rel_src, rel_dst):
            calls = [
                n for n in graph_module.graph.nodes if n.op == "call_module" and n.target == rel
            ]
            if len(calls) != 1:
                raise SurgeryError(
                    f"{operation}: {rel!r} is called {len(calls)} times in the traced graph of "
                    f"{self.scope or 'the root'!r}; a skip needs exactly one call of each end",
                    operation=operation,
                )
        src_node, dst_node = nodes[rel_src], nodes[rel_dst]
        if order[src_node] >= order[dst_node]:
            raise SurgeryError(
                f"{operation}: {self.source!r} does not run before {self.destination!r}",
                operation=operation,
            )
        captured = ctx.capture([src, dst, scoped], operation=operation)
        src_out, dst_out = captured[id(src)].output, captured[id(dst)].output
        if not isinstance(src_out, torch.Tensor) or not isinstance(dst_out, torch.Tensor):
            raise SurgeryError(
                f"{operation}: both ends of a skip must return a single tensor", operation=operation
            )
        shortcut = place_like(
            shortcut_for(src_out.shape, dst_out.shape, operation=operation), dst, ctx.model
        )
        name, index = "esper_skip", 0
        while hasattr(graph_module, f"{name}{index}"):
            index += 1
        graph_module.add_submodule(f"{name}{index}", GatedShortcut(shortcut, like=dst_out))
        graph = graph_module.graph
        with graph.inserting_after(dst_node):
            skip = graph.call_module(f"{name}{index}", (src_node,))
        with graph.inserting_after(skip):
            total = graph.call_function(operator.add, (dst_node, skip))
        dst_node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
        _finish(graph_module, operation)
        ctx.prefer_group_of(dst)
        ctx.replace(self.scope, graph_module, operation=operation)


@dataclass(frozen=True)
class FxRewire:
    """Trace the module at ``scope`` and let ``transform`` edit its GraphModule in place.

    ``transform`` may edit the graph and add submodules (``gm.add_submodule``); it must not write
    into existing parameters or buffers (rollback relies on that). New parameters join the
    optimizer.

    :param transform: ``transform(gm)`` edits ``gm.graph``; the transaction lints and recompiles it.
    :param scope: dotted name of the module to trace (``""``: the root).
    :param preserves_function: whether ``transform`` promises an unchanged output.
    :param keep: qualified names (relative to ``scope``) to keep as leaves while tracing.
    """

    transform: Callable[[fx.GraphModule], None]
    scope: str = ""
    preserves_function: bool = False
    keep: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        return f"fx rewire {self.scope or 'root'!r} with {describe_callable(self.transform)}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        scoped = ctx.resolve(self.scope, operation=operation)
        graph_module = trace(scoped, keep=set(self.keep), operation=operation)
        try:
            self.transform(graph_module)
        except SurgeryError:
            raise
        except Exception as exc:
            raise SurgeryError(
                f"{operation}: the transform failed: {exc}", operation=operation
            ) from exc
        _finish(graph_module, operation)
        ctx.prefer_group_of(scoped)
        ctx.replace(self.scope, graph_module, operation=operation)


def _finish(graph_module: fx.GraphModule, operation: str) -> None:
    try:
        graph_module.graph.lint()
        graph_module.recompile()
    except Exception as exc:
        raise SurgeryError(
            f"{operation}: the rewired graph is invalid: {exc}", operation=operation
        ) from exc
    graph_module.delete_all_unused_submodules()
