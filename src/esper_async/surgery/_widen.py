"""Net2Wider: widen a Linear or Conv2d (and the batch norms and consumers it feeds), preserving
function.

Widening ``producer`` from ``n`` to ``m`` units maps each new unit ``j`` to an old unit ``g(j)``
(``g(j) = j`` for ``j < n``, a random old unit otherwise). The producer's rows (and any batch norm's
per-channel parameters and statistics) are copied along ``g``; each consumer's input columns are
copied along ``g`` and multiplied by fractions ``f_j`` that sum to one over the replicas of a unit,
so ``Σ_j f_j · V[:, g(j)] · h_{g(j)} = V · h``: the output is unchanged. The fractions are drawn at
random rather than ``1/count`` so that the replicas receive different gradients and can diverge
(symmetry breaking without noise, hence exact preservation).

Optimizer state is carried along ``g`` too. A consumer column's gradient equals the original
column's, so its moments are copied; a producer replica's gradient is ``f_j`` times the original's,
so first moments are scaled by ``f_j`` and second moments by ``f_j²``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import SurgeryError
from ._context import SurgeryContext
from ._host_common import GrowthCouplingError
from ._width_init import (
    ZERO_FANOUT,
    WidthSignal,
    blocks,
    check_init,
    fresh_norm_entries,
    new_fan_in,
    split_noise,
    unit_shares,
    zero_new,
)

__all__ = ("Widen", "find_consumers", "refuse_gate", "traced_call", "widen_layers")


# Modules and functions acting on each unit independently: a widened unit's replicas stay replicas.
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.Hardswish,
    nn.Mish,
    nn.Softplus,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.gelu,
    F.silu,
    F.elu,
    F.dropout,
    F.hardswish,
    F.mish,
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    torch.sigmoid_,
    torch.relu_,
    F.relu_,
    F.softplus,
    F.dropout2d,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "tanh", "sigmoid", "clamp", "clamp_min"}
# Optimizer state entries that are running means of squared gradients (scaled by f² on producers).
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta"})
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_Layer = nn.Linear | nn.Conv2d


class _ChildLeafTracer(fx.Tracer):
    """Traces one module, treating each of its direct children as a leaf (cheap: one level deep)."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = {id(child) for child in root.children()}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._children or super().is_leaf_module(m, module_qualified_name)


def traced_call(
    model: nn.Module, target: str, *, operation: str, hint: str = ""
) -> tuple[nn.Module, str, fx.Node]:
    """Trace ``target``'s parent one level deep and find the one node that calls ``target``.

    :return: ``(parent, prefix, node)``: the parent module, its dotted path plus ``"."`` (empty
        for the root), and the ``call_module`` node.
    :raises SurgeryError: the parent cannot be traced, or calls ``target`` other than once.
    """
    parent_path, _, name = target.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    suffix = f"; {hint}" if hint else ""
    try:
        graph = _ChildLeafTracer(parent).trace(parent)
    except Exception as exc:
        raise SurgeryError(
            f"{operation}: cannot trace {parent_path or 'the root'!r} with torch.fx to find what "
            f"{target!r} feeds ({exc}){suffix}",
            operation=operation,
        ) from exc
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise SurgeryError(
            f"{operation}: {target!r} is called {len(calls)} times in its parent's forward{suffix}",
            operation=operation,
        )
    return parent, prefix, calls[0]


def find_consumers(
    model: nn.Module, target: str, width: int, *, operation: str
) -> tuple[list[str], list[str]]:
    """Find the batch norms and the Linear/Conv2d consumers fed by the module at ``target``.

    Traces ``target``'s parent one level deep with torch.fx and follows the target's output through
    batch norms and elementwise functions.

    :param model: the root module.
    :param target: dotted name of the producer (not the root).
    :param width: the producer's current output width.
    :param operation: the operation's description, for errors.
    :return: ``(norm_paths, consumer_paths)`` as dotted names from the root.
    :raises SurgeryError: the parent cannot be traced, or the output reaches something whose input
        width cannot simply grow (an addition, a concatenation, a reshape, the parent's output);
        pass ``consumers=`` (and ``norms=``) explicitly then.
    """
    hint = "pass consumers= (and norms=) to Widen explicitly"
    parent, prefix, call = traced_call(model, target, operation=operation, hint=hint)
    norms: list[str] = []
    consumers: list[str] = []
    frontier, seen = list(call.users), set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        kind = _classify(parent, node, width)
        if kind == "consumer":
            consumers.append(prefix + str(node.target))
            continue
        if kind == "norm":
            norms.append(prefix + str(node.target))
        if kind is None:
            refuse_gate(parent, prefix, target, node, operation)
            raise SurgeryError(
                f"{operation}: the output of {target!r} reaches {node.format_node()}, which cannot "
                f"simply take a wider input; {hint}",
                operation=operation,
            )
        frontier.extend(node.users)
    if not consumers:
        raise SurgeryError(
            f"{operation}: {target!r} feeds no consumer; {hint}", operation=operation
        )
    return sorted(set(norms)), sorted(set(consumers))


def refuse_gate(parent: nn.Module, prefix: str, target: str, node: fx.Node, operation: str) -> None:
    """:raises GrowthCouplingError: ``node`` multiplies ``target``'s output with another layer's
    (a gated MLP: the two projections widen together, never one alone)."""
    if not (node.op == "call_function" and node.target in (operator.mul, torch.mul)):
        return
    partners = []
    for arg in node.args[:2]:
        while isinstance(arg, fx.Node) and arg.op != "call_module" and arg.args:
            arg = arg.args[0]
        if isinstance(arg, fx.Node) and arg.op == "call_module":
            partners.append(prefix + str(arg.target))
    other = [p for p in partners if p != target]
    if other:
        raise GrowthCouplingError(
            target,
            f"its output is multiplied by {other[0]!r}'s ({node.format_node()}): one projection "
            "of a gated MLP cannot widen alone; the gate and up projections widen together: "
            "use WidenGated(gate, up, width)",
            operation=operation,
        )


def _classify(parent: nn.Module, node: fx.Node, width: int) -> str | None:
    """``"consumer"``, ``"norm"``, ``"pass"`` (elementwise) or ``None`` (unsupported) for one fx
    node."""
    if node.op == "call_module":
        module = parent.get_submodule(str(node.target))
        if isinstance(module, nn.Linear) and module.in_features == width:
            return "consumer"
        if isinstance(module, nn.Conv2d) and module.in_channels == width and module.groups == 1:
            return "consumer"
        if isinstance(module, _NORMS) and module.num_features == width:
            return "norm"
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "pass"
        return None
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return "pass" if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS:
        return "pass"
    if node.op == "call_function" and node.target is operator.getitem:
        return None
    return None


@dataclass(frozen=True)
class Widen:
    """Widen the Linear or Conv2d at ``target`` to ``width`` outputs, with its norms and consumers.

    :param target: dotted name of a Linear, or a Conv2d with ``groups == 1``.
    :param width: the new number of output features or channels (larger than the current one).
    :param consumers: dotted names of the layers that read ``target``'s output; found with torch.fx
        when omitted.
    :param norms: dotted names of batch norms between ``target`` and its consumers (only read
        together with ``consumers``).
    :param seed: seeds the choice of replicated units and split fractions (reproducible surgery).
    :param init: how the new units start (see :mod:`._width_init`): ``"net2wider"`` (replicas),
        ``"zero_fanout"`` (zero fan-out, random fan-in), ``"gradmax"`` (zero fan-out, fan-in from
        ``signal``) or ``"split_noise"`` (half/half split with fan-out noise).
    :param signal: for ``init="gradmax"``: :func:`capture_width_signal` of ``target`` on a real
        batch.
    """

    target: str
    width: int
    consumers: tuple[str, ...] | None = None
    norms: tuple[str, ...] = ()
    seed: int = 0
    init: str = "net2wider"
    signal: WidthSignal | None = field(default=None, compare=False, repr=False)

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        how = "" if self.init == "net2wider" else f" ({self.init})"
        return f"widen {self.target!r} to {self.width}{how}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        check_init(self.init, operation)
        producer = ctx.resolve(self.target, operation=operation)
        ctx.parent_of(self.target, operation=operation)
        old_width = _width_of(producer, operation)
        if self.width <= old_width:
            raise SurgeryError(
                f"{operation}: the new width must exceed the current {old_width}",
                operation=operation,
            )
        if self.consumers is None:
            norm_paths, consumer_paths = find_consumers(
                ctx.model, self.target, old_width, operation=operation
            )
        else:
            norm_paths, consumer_paths = list(self.norms), list(self.consumers)
            if not consumer_paths:
                raise SurgeryError(f"{operation}: consumers= is empty", operation=operation)
        norms = [ctx.resolve(p, operation=operation) for p in norm_paths]
        consumers = [ctx.resolve(p, operation=operation) for p in consumer_paths]
        _check_fit(norm_paths, norms, consumer_paths, consumers, old_width, operation)
        assert isinstance(producer, (nn.Linear, nn.Conv2d))

        widen_layers(
            ctx, operation, producer_path=self.target, norm_paths=norm_paths,
            consumers=[(path, 1) for path in consumer_paths], width=self.width, seed=self.seed,
            init=self.init, signal=self.signal,
        )


def _width_of(module: nn.Module, operation: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.out_channels
    raise SurgeryError(
        f"{operation}: only nn.Linear and nn.Conv2d with groups=1 can be widened, not "
        f"{type(module).__name__}",
        operation=operation,
    )


def _check_fit(
    norm_paths: list[str],
    norms: list[nn.Module],
    consumer_paths: list[str],
    consumers: list[nn.Module],
    width: int,
    operation: str,
) -> None:
    for path, norm in zip(norm_paths, norms, strict=True):
        if not isinstance(norm, _NORMS) or norm.num_features != width:
            raise SurgeryError(
                f"{operation}: norm {path!r} must be a BatchNorm1d/2d over {width} features",
                operation=operation,
            )
    for path, consumer in zip(consumer_paths, consumers, strict=True):
        fits = (isinstance(consumer, nn.Linear) and consumer.in_features == width) or (
            isinstance(consumer, nn.Conv2d)
            and consumer.groups == 1
            and consumer.in_channels == width
        )
        if not fits:
            raise SurgeryError(
                f"{operation}: consumer {path!r} ({type(consumer).__name__}) does not read {width} "
                "input features or channels",
                operation=operation,
            )


def _grow(tensor: torch.Tensor, dim: int, mapping: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(dim, mapping)`` for a ``mapping`` that starts with ``arange(n)``.

    The first ``n`` slices are an unchanged copy, so they are copied rather than gathered (on
    CPU a gather along dim 0 of a conv weight is several times slower than a copy).
    """
    return _grow_scaled(tensor, dim, mapping, None)


def _grow_scaled(
    tensor: torch.Tensor, dim: int, mapping: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """``tensor.index_select(dim, mapping) * factor`` (``factor`` broadcast along ``dim``; ``None``:
    no scaling), written in one pass into one new tensor.

    Widening a layer4 conv of a ResNet-18 moves tens of megabytes (weights and optimizer moments),
    so the copy and the scaling are fused and no intermediate of the full size is made: the result
    is bitwise the same as gathering and then multiplying.
    """
    old = tensor.shape[dim]
    if (torch.is_grad_enabled() and tensor.requires_grad) or not tensor.is_contiguous():
        grown = torch.cat([tensor, tensor.index_select(dim, mapping[old:])], dim)
        return grown if factor is None else grown.mul_(factor)
    shape = list(tensor.shape)
    shape[dim] = len(mapping)
    out = tensor.new_empty(shape)
    head, tail = out.narrow(dim, 0, old), out.narrow(dim, old, len(mapping) - old)
    if factor is None:
        head.copy_(tensor)
        torch.index_select(tensor, dim, mapping[old:], out=tail)  # gathered in place
        return out
    torch.mul(tensor, factor.narrow(dim, 0, old), out=head)
    extra = tensor.index_select(dim, mapping[old:])
    torch.mul(extra, factor.narrow(dim, old, len(mapping) - old), out=tail)
    return out


def _param(data: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``data`` (no copy), trainable exactly when ``like`` is."""
    return nn.Parameter(data, requires_grad=like.requires_grad)


def _empty_like_layer(layer: _Layer, n_in: int, n_out: int) -> _Layer:
    """A layer configured like ``layer`` with new widths, on the meta device (no storage, no init):
    the caller replaces every tensor, so allocating and initialising them would be wasted work."""
    options: dict[str, Any] = {"bias": layer.bias is not None, "device": "meta"}
    options["dtype"] = layer.weight.dtype
    if isinstance(layer, nn.Linear):
        return nn.Linear(n_in, n_out, **options)
    options.update(
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        padding_mode=layer.padding_mode,
    )
    return nn.Conv2d(n_in, n_out, **options)


@torch.no_grad()
def _widened_producer(producer: _Layer, mapping: torch.Tensor) -> _Layer:
    weight, bias = producer.weight, producer.bias
    n_in = producer.in_features if isinstance(producer, nn.Linear) else producer.in_channels
    new = _empty_like_layer(producer, n_in, len(mapping))
    new.weight = _param(_grow(weight, 0, mapping), weight)
    if bias is not None:
        new.bias = _param(_grow(bias, 0, mapping), bias)
    return new


@torch.no_grad()
def _widened_norm(norm: _BatchNorm, mapping: torch.Tensor) -> _BatchNorm:
    anchor = norm.weight if norm.weight is not None else norm.running_mean
    new = type(norm)(
        len(mapping),
        eps=norm.eps,
        momentum=norm.momentum,
        affine=norm.affine,
        track_running_stats=norm.track_running_stats,
        device="meta",  # every tensor is replaced below
        dtype=None if anchor is None else anchor.dtype,
    )
    if norm.weight is not None and norm.bias is not None:
        new.weight = _param(_grow(norm.weight, 0, mapping), norm.weight)
        new.bias = _param(_grow(norm.bias, 0, mapping), norm.bias)
    if norm.running_mean is not None and norm.running_var is not None:
        new.running_mean = _grow(norm.running_mean, 0, mapping)
        new.running_var = _grow(norm.running_var, 0, mapping)
    if norm.num_batches_tracked is not None:
        new.num_batches_tracked = norm.num_batches_tracked.clone()
    return new


@torch.no_grad()
def _widened_consumer(consumer: _Layer, mapping: torch.Tensor, fractions: torch.Tensor) -> _Layer:
    weight = consumer.weight
    n_out = consumer.out_features if isinstance(consumer, nn.Linear) else consumer.out_channels
    new = _empty_like_layer(consumer, len(mapping), n_out)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    scale = fractions.to(weight.dtype).view(shape)
    new.weight = _param(_grow_scaled(weight, 1, mapping, scale), weight)
    if consumer.bias is not None:
        new.bias = consumer.bias  # unchanged in shape and value: the same Parameter carries over
    return new


def _carry_state(
    ctx: SurgeryContext,
    old: nn.Parameter,
    mapping: torch.Tensor,
    fractions: torch.Tensor,
    is_consumer: bool,
) -> dict[str, Any] | None:
    """The optimizer state of ``old`` remapped to the widened shape (``None`` when it has none)."""
    if ctx.optimizer is None or old not in ctx.optimizer.state:
        return None
    dim = 1 if is_consumer else 0
    carried: dict[str, Any] = {}
    for key, value in ctx.optimizer.state[old].items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape and value.dim() > dim:
            factor = None
            if not is_consumer:
                power = 2 if key in _SECOND_MOMENTS else 1
                shape = [-1] + [1] * (value.dim() - 1)
                factor = fractions.to(value.dtype).pow(power).view(shape)
            carried[key] = _grow_scaled(value, dim, mapping, factor)
        elif isinstance(value, torch.Tensor):
            carried[key] = value.clone()
        else:
            carried[key] = value
    return carried


def widen_layers(
    ctx: SurgeryContext,
    operation: str,
    *,
    producer_path: str,
    norm_paths: Sequence[str],
    consumers: Sequence[tuple[str, int]],
    width: int,
    seed: int,
    init: str,
    signal: WidthSignal | None,
) -> torch.Tensor:
    """Widen the producer at ``producer_path`` to ``width`` units, its batch norms and its
    consumers (``(path, block)``: ``block`` input columns per unit), initialising the new units
    as ``init`` says; swap everything in through ``ctx`` with optimizer state carried.

    :returns: the unit map ``g`` (new unit ``k`` stands in for old unit ``g(k)``).
    :raises SurgeryError: ``init="gradmax"`` without a signal for this target, or a signal that
        lacks a consumer.
    """
    producer = ctx.resolve(producer_path, operation=operation)
    assert isinstance(producer, (nn.Linear, nn.Conv2d))
    old = _width_of(producer, operation)
    layers = []
    for path, block in consumers:
        layer = ctx.resolve(path, operation=operation)
        assert isinstance(layer, (nn.Linear, nn.Conv2d))
        layers.append((layer, path, block))
    if init == "gradmax":
        missing = [p for _, p, _ in layers if signal is None or p not in signal.grads]
        if missing:
            raise SurgeryError(
                f"{operation}: init='gradmax' needs signal= from capture_width_signal(model, "
                f"target, loss_fn) on a real batch (missing the gradient at {', '.join(missing)})",
                operation=operation,
            )
    mapping, fractions = unit_shares(old, width, seed, init, producer.weight.device)
    fresh = init in ZERO_FANOUT

    swaps: list[tuple[str, nn.Module, nn.Module, torch.Tensor, torch.Tensor, bool, int]] = []
    new_producer = _widened_producer(producer, mapping)
    if fresh:
        rows = new_fan_in(
            producer, width - old, init, seed=seed, signal=signal, consumers=layers
        )
        with torch.no_grad():
            new_producer.weight[old:] = rows
            if new_producer.bias is not None:
                new_producer.bias[old:] = 0.0
    swaps.append((producer_path, producer, new_producer, mapping, fractions, False, old))
    for path in norm_paths:
        norm = ctx.resolve(path, operation=operation)
        assert isinstance(norm, _BatchNorm)
        new_norm = _widened_norm(norm, mapping)
        if fresh:
            fresh_norm_entries(new_norm, old)
        swaps.append((path, norm, new_norm, mapping, fractions, False, old))
    for layer, path, block in layers:
        columns, shares = blocks(mapping, fractions, block)
        widened = _widened_consumer(layer, columns, shares)
        if init == "split_noise":
            split_noise(widened.weight, columns, seed)
        swaps.append((path, layer, widened, columns, shares, True, old * block))

    for path, before, after, units, split, is_consumer, kept in swaps:
        for key, old_param in before.named_parameters(recurse=False):
            new_param = getattr(after, key)
            if new_param is old_param:
                continue
            state = _carry_state(ctx, old_param, units, split, is_consumer)
            if fresh:
                zero_new(state, new_param.shape, 1 if is_consumer else 0, kept)
            ctx.replace_parameter(old_param, new_param, state)
        ctx.replace(path, after, operation=operation)
    return mapping
