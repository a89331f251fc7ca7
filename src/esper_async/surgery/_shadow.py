"""A torch.fx graph of a whole model, traced on a real probe batch, with every node's value.

Plain symbolic tracing fails on the checks a user's ``forward`` makes (``if idx.dim() != 2``,
``if t > block_size``). :class:`ShadowTracer` traces with torch.fx while running each operation on
the probe batch (eval mode, no grad): a condition, a ``len`` or a loop over a proxy reads the
concrete value, and every node keeps its value in ``node.meta["value"]``, so passes can read
shapes. PyTorch's own layers are leaves; the user's modules are traced through; the model is
never modified (constant tensors stay in the graph's metadata, not on the model).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import fx, nn

from ._context import eval_mode
from ._host_common import GrowthCouplingError

__all__ = ("ShadowTracer", "shadow_graph", "value")


def _constant() -> None:  # the target of nodes standing for constant tensors
    """A constant tensor met while tracing (its value is in the node's metadata)."""


class _ShadowProxy(fx.Proxy):
    def __len__(self) -> int:
        return len(self.node.meta["value"])

    def __iter__(self) -> Any:
        # The value's length is known: no need for fx's reading of the caller's bytecode.
        return iter([self[i] for i in range(len(self.node.meta["value"]))])


class ShadowTracer(fx.Tracer):
    """Traces ``root`` on ``probe`` (see the module docstring).

    :param probe: the probe batch: a tensor, a tuple of positional arguments or a mapping.
    """

    def __init__(self, probe: Any) -> None:
        super().__init__()
        self._probe = probe
        self._bound: dict[str, Any] = {}
        self._plain = False

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._plain:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShadowProxy(node, self)

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(obj.node.meta["value"])

    def iter(self, obj: fx.Proxy) -> Any:
        return iter(obj[i] for i in range(len(obj.node.meta["value"])))

    def create_arg(self, a: Any) -> Any:
        if (
            isinstance(a, torch.Tensor)
            and not isinstance(a, nn.Parameter)
            and not self.tensor_attrs.get(a)
        ):
            node = self.graph.create_node("call_function", _constant, (), {})
            node.meta["value"] = a
            return node
        return super().create_arg(a)

    def create_proxy(
        self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any
    ) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
        node = proxy.node
        if kind == "placeholder":
            node.meta["value"] = self._bound.get(str(target).lstrip("*"))
            return proxy
        if kind == "output":
            return proxy
        real_args = fx.node.map_arg(node.args, lambda n: n.meta["value"])
        real_kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta["value"])
        if kind == "call_function":
            node.meta["value"] = node.target(*real_args, **real_kwargs)
        elif kind == "call_method":
            node.meta["value"] = getattr(real_args[0], str(node.target))(
                *real_args[1:], **real_kwargs
            )
        elif kind == "call_module":
            self._plain = True  # the leaf reads its own parameters as tensors
            try:
                module = self.root.get_submodule(str(node.target))
                node.meta["value"] = module.forward(*real_args, **real_kwargs)
            finally:
                self._plain = False
        elif kind == "get_attr":
            self._plain = True
            try:
                found: Any = self.root
                for atom in str(node.target).split("."):
                    found = getattr(found, atom)
            finally:
                self._plain = False
            node.meta["value"] = found
        return proxy

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        assert isinstance(root, nn.Module)
        args, kwargs = _split(self._probe)
        bound = inspect.signature(root.forward).bind(*args, **kwargs)
        self._bound = dict(bound.arguments)
        with torch.no_grad(), eval_mode(root):
            return super().trace(root, concrete_args)


def _split(probe: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(probe, tuple):
        return probe, {}
    if isinstance(probe, dict):
        return (), dict(probe)
    return (probe,), {}


def shadow_graph(model: nn.Module, probe: Any, *, operation: str) -> fx.Graph:
    """``model``'s graph on ``probe`` with values (see :class:`ShadowTracer`).

    :raises GrowthCouplingError: the model cannot be traced.
    """
    if probe is None:
        raise GrowthCouplingError(
            "root", "finding the couplings needs a probe batch", operation=operation
        )
    try:
        return ShadowTracer(probe).trace(model)
    except GrowthCouplingError:
        raise
    except Exception as exc:
        raise GrowthCouplingError(
            "root",
            f"its forward cannot be traced with torch.fx on the probe batch "
            f"({type(exc).__name__}: {exc})",
            operation=operation,
        ) from exc


def value(node: Any) -> Any:
    """The value a node had on the probe batch (a constant stays itself)."""
    return node.meta.get("value") if isinstance(node, fx.Node) else node
