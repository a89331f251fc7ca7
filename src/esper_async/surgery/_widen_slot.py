"""Net2Wider on a seed slot's host: widen the layer a seed sits on, whatever the seed's state.

A seed is an exported kernel with a fixed width ``C``, so the seed itself cannot grow. Widening
the slot's host ``h`` from ``n`` to ``m`` units with the unit map ``g`` (as :class:`Widen` does)
and giving the slot the composed map ``u' = u[g]`` (``u``: the slot's old map, the identity at
first) keeps the slot's function: the seed still reads the first ``C`` units (widening keeps the
first ``n`` units in place) and its output is spread along ``u'`` (see
:class:`~esper_async.seeds.SeedSlot`), so new unit ``k`` outputs ``h_{g(k)} + s_{u[g(k)]}``, which
is old unit ``g(k)`` of the slot's output. The consumers' columns are split with fractions that
sum to one over the replicas, exactly as for :class:`Widen`, so the model's output is unchanged.

The slot is the producer boundary: its consumers are found by tracing the slot's parent one level
deep with torch.fx, through batch norms, elementwise functions and ``flatten(1)`` (a Linear after
a flattened conv output reads ``n × H·W`` features; each unit's block of ``H·W`` columns is
split as one). A consumer that is itself a slot is widened at its host's input; its own seed and
contract are untouched, since its output keeps its width.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ..seeds import SeedSlot, UnitMap
from ._context import SurgeryContext
from ._widen import _classify, _width_of, traced_call, widen_layers
from ._width_init import WidthSignal, check_init

__all__ = ("CoupledWidthError", "SlotConsumer", "WidenSlot", "find_slot_consumers")

#: Products of the slot's output with another tensor of its width: a gated MLP's
#: ``act(gate(x)) * up(x)``. Both factors would have to grow. (A sum of two branches is refused
#: as any other unsupported node is: a residual add is common where width growth may still try
#: other slots.)
_GATING_FUNCTIONS = {operator.mul, operator.truediv, torch.mul}
_GATING_METHODS = {"mul", "mul_", "div"}


class CoupledWidthError(SurgeryError):
    """The slot's output is multiplied elementwise with another layer's output (the gate and up
    projections of a gated MLP): its width is coupled to that layer's, and widening one of them
    alone cannot preserve the function. Not a passing failure: the same slot always fails.

    :ivar slot: the slot's dotted name.
    :ivar coupled: the module whose output it is combined with (``None`` when not a module).
    """

    def __init__(
        self, message: str, *, operation: str, slot: str, coupled: str | None
    ) -> None:
        super().__init__(message, operation=operation)
        self.slot = slot
        self.coupled = coupled


@dataclass(frozen=True)
class SlotConsumer:
    """A layer that reads a widened slot's output.

    :ivar path: dotted name of the Linear or Conv2d (a slot's host for a consumer slot).
    :ivar block: input columns per unit: 1, or ``H·W`` for a Linear after ``flatten(1)``.
    """

    path: str
    block: int = 1


def _flattens(node: fx.Node) -> bool:
    """Whether ``node`` is ``x.flatten(1)`` or ``torch.flatten(x, 1)`` (to the last dim)."""
    is_method = node.op == "call_method" and node.target == "flatten"
    is_function = node.op == "call_function" and node.target is torch.flatten
    if not (is_method or is_function):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


def find_slot_consumers(
    model: nn.Module, slot_path: str, width: int, *, operation: str, unit_major: bool
) -> tuple[list[str], list[SlotConsumer]]:
    """Find the batch norms and the layers fed by the slot at ``slot_path``.

    :param model: the root module.
    :param slot_path: dotted name of the slot (not the root).
    :param width: the slot's current output width (its host's).
    :param operation: the operation's description, for errors.
    :param unit_major: whether ``flatten(1)`` of the slot's output keeps each unit's values
        together (a conv's ``NCHW``), so a Linear after it can be split block by block.
    :return: ``(norm_paths, consumers)``, dotted names from the root.
    :raises SurgeryError: the parent cannot be traced, the slot is called more than once, or its
        output reaches something whose input cannot simply grow (an addition, a reshape other
        than a conv's ``flatten(1)``, the parent's output).
    """
    parent, prefix, call = traced_call(model, slot_path, operation=operation)
    norms: list[str] = []
    consumers: dict[str, SlotConsumer] = {}
    # (node, whether the slot's output was flattened on the way to it)
    frontier: list[tuple[fx.Node, bool]] = [(user, False) for user in call.users]
    seen: set[tuple[fx.Node, bool]] = set()
    while frontier:
        node, flat = frontier.pop()
        if (node, flat) in seen:
            continue
        seen.add((node, flat))
        if unit_major and not flat and _flattens(node):
            frontier.extend((user, True) for user in node.users)
            continue
        layer, path = _layer_at(parent, node)
        if layer is not None:
            consumer = _consumer(layer, prefix + path, width, flat)
            if consumer is None:
                raise SurgeryError(
                    f"{operation}: the output of {slot_path!r} reaches {path!r} "
                    f"({type(layer).__name__}), which does not read {width} units",
                    operation=operation,
                )
            consumers[consumer.path] = consumer
            continue
        kind = _classify(parent, node, width)
        if kind is None and _gates(node):
            raise _coupled(operation, slot_path, prefix, call, node)
        if kind is None:
            raise SurgeryError(
                f"{operation}: the output of {slot_path!r} reaches {node.format_node()}, which "
                "cannot simply take a wider input",
                operation=operation,
            )
        if kind == "norm":
            norms.append(prefix + str(node.target))
        frontier.extend((user, flat) for user in node.users)
    if not consumers:
        raise SurgeryError(f"{operation}: {slot_path!r} feeds no consumer", operation=operation)
    return sorted(set(norms)), [consumers[path] for path in sorted(consumers)]


def _gates(node: fx.Node) -> bool:
    """Whether ``node`` multiplies two tensors elementwise (a gate)."""
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    if len(nodes) < 2:
        return False
    if node.op == "call_function":
        return node.target in _GATING_FUNCTIONS
    return node.op == "call_method" and node.target in _GATING_METHODS


def _origin(node: fx.Node, avoid: fx.Node) -> str | None:
    """The module whose output reaches ``node`` through elementwise steps (not through
    ``avoid``, the slot's call), or ``None``."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        if n in seen or n is avoid:
            continue
        seen.add(n)
        if n.op == "call_module":
            return str(n.target)
        frontier.extend(a for a in n.args if isinstance(a, fx.Node))
    return None


def _reaches(node: fx.Node, target: fx.Node) -> bool:
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            frontier.extend(a for a in n.args if isinstance(a, fx.Node))
    return False


def _coupled(
    operation: str, slot_path: str, prefix: str, call: fx.Node, node: fx.Node
) -> CoupledWidthError:
    """The error for a slot whose output is multiplied with another branch at ``node``."""
    others = [a for a in node.args if isinstance(a, fx.Node) and not _reaches(a, call)]
    origin = next((o for o in (_origin(a, call) for a in others) if o is not None), None)
    coupled = None if origin is None else prefix + origin
    what = "another tensor" if coupled is None else f"the output of {coupled!r}"
    return CoupledWidthError(
        f"{operation}: {slot_path!r} cannot be widened alone: its output is multiplied "
        f"({node.format_node()}) with {what}, as the gate and up projections of a gated "
        f"(SwiGLU, GLU) MLP are, so both widths are coupled and widening one breaks the "
        f"product. Width growth widens one layer whose output feeds only layers: leave "
        f"{slot_path!r} out of ControllerConfig.width_slots (a plain MLP's hidden Linear can "
        f"be widened), or grow both projections together with surgery.WidenGated.",
        operation=operation, slot=slot_path, coupled=coupled,
    )


def _layer_at(parent: nn.Module, node: fx.Node) -> tuple[nn.Module | None, str]:
    """The Linear or Conv2d an fx node calls (a slot's host for a slot), and its path in
    ``parent``; ``(None, "")`` for anything else."""
    if node.op != "call_module":
        return None, ""
    path = str(node.target)
    module = parent.get_submodule(path)
    if isinstance(module, SeedSlot):
        return module.host, f"{path}.host"
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return module, path
    return None, ""


def _consumer(layer: nn.Module, path: str, width: int, flat: bool) -> SlotConsumer | None:
    """``layer`` as a consumer of ``width`` units (flattened or not), or ``None`` if it is
    not one."""
    if isinstance(layer, nn.Linear) and flat and layer.in_features % width == 0:
        return SlotConsumer(path, layer.in_features // width)
    if isinstance(layer, nn.Linear) and not flat and layer.in_features == width:
        return SlotConsumer(path)
    fits = not flat and layer.groups == 1 and layer.in_channels == width  # type: ignore[operator]
    if isinstance(layer, nn.Conv2d) and fits:
        return SlotConsumer(path)
    return None


@dataclass(frozen=True)
class WidenSlot:
    """Widen the host of the seed slot at ``target`` to ``width`` outputs, whatever its seed's
    state, with the norms and consumers the slot feeds.

    :param target: dotted name of a :class:`~esper_async.seeds.SeedSlot` whose host is a Linear,
        or a Conv2d with ``groups == 1``.
    :param width: the new number of output features or channels (larger than the current one).
    :param seed: seeds the choice of replicated units and split fractions (reproducible surgery).
    :param init: how the new units start, as for :class:`~esper_async.surgery.Widen`
        (``"net2wider"``, ``"zero_fanout"``, ``"gradmax"``, ``"split_noise"``). With a zero
        fan-out init the slot's unit map still gives each new unit a seed unit (``u[g(k)]``):
        what the seed adds there reaches nothing, since the unit's fan-out is zero.
    :param signal: for ``init="gradmax"``: :func:`capture_width_signal` of the slot on a real
        batch.
    """

    target: str
    width: int
    seed: int = 0
    init: str = "net2wider"
    signal: WidthSignal | None = field(default=None, compare=False, repr=False)

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        how = "" if self.init == "net2wider" else f" ({self.init})"
        return f"widen slot {self.target!r} to {self.width}{how}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        check_init(self.init, operation)
        slot = ctx.resolve(self.target, operation=operation)
        ctx.parent_of(self.target, operation=operation)
        if not isinstance(slot, SeedSlot):
            raise SurgeryError(
                f"{operation}: {self.target!r} is a {type(slot).__name__}, not a SeedSlot; use "
                "Widen for a plain layer",
                operation=operation,
            )
        host = slot.host
        old_width = _width_of(host, operation)
        if self.width <= old_width:
            raise SurgeryError(
                f"{operation}: the new width must exceed the current {old_width}",
                operation=operation,
            )
        norm_paths, consumers = find_slot_consumers(
            ctx.model, self.target, old_width, operation=operation,
            unit_major=isinstance(host, nn.Conv2d),
        )
        assert isinstance(host, (nn.Linear, nn.Conv2d))
        mapping = widen_layers(
            ctx, operation, producer_path=f"{self.target}.host", norm_paths=norm_paths,
            consumers=[(c.path, c.block) for c in consumers], width=self.width, seed=self.seed,
            init=self.init, signal=self.signal,
        )

        # The slot's map composes: new unit k replicates old unit g(k), itself seed unit u[g(k)].
        previous = slot.unit_map
        if previous is None:
            dim = 1 if isinstance(host, nn.Conv2d) else -1
            unit_map = UnitMap(mapping.clone(), dim=dim, features=old_width)
        else:
            index = previous.index.index_select(0, mapping.to(previous.index.device))
            unit_map = UnitMap(index, dim=previous.dim, features=previous.features)
        unit_map.train(slot.training)
        ctx.keep(self.target, operation=operation)
        slot.unit_map = unit_map


