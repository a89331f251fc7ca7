"""Hidden-width growth of a gated MLP (SwiGLU, GeGLU): the gate and up projections widen together.

A gated MLP computes ``down(act(gate(x)) * up(x))``: hidden unit ``j`` is ``act(g_j) · u_j``, so
``gate`` and ``up`` cannot widen one without the other (``Widen`` on either alone is refused).
:class:`WidenGated` applies Net2Wider to both with **one** unit map ``g``: new unit ``k`` copies
row ``g(k)`` of ``gate`` and of ``up``, so it computes exactly hidden unit ``g(k)``, and ``down``'s
columns are split among a unit's replicas with random fractions summing to one — the function is
preserved exactly and the replicas diverge (different fractions, different gradients).

Optimizer state is carried as :class:`Widen` carries it: a replica row's gradient is its fraction
times the original's, so first moments scale by ``f`` and second moments by ``f²``; ``down``'s
columns copy their moments.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..errors import SurgeryError
from ._context import SurgeryContext
from ._host_common import GrowthCouplingError
from ._widen import _carry_state, _widened_producer, traced_call, widen_layers
from ._width_init import unit_shares

__all__ = ("WidenGated",)

_MULS = (operator.mul, torch.mul)


@dataclass(frozen=True)
class WidenGated:
    """Widen a gated MLP's hidden layer to ``width`` units: ``gate`` and ``up`` together,
    ``down``'s input with them (found with torch.fx in their parent), function-preserving.

    :param gate: dotted name of the gate projection (``nn.Linear``).
    :param up: dotted name of the up projection (``nn.Linear``), in the same parent module.
    :param width: the new hidden width (larger than the current one).
    :param seed: seeds the unit map and split fractions.
    """

    gate: str
    up: str
    width: int
    seed: int = 0

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"widen the gated MLP {self.gate!r} + {self.up!r} to {self.width}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        gate = ctx.resolve(self.gate, operation=operation)
        up = ctx.resolve(self.up, operation=operation)
        if not (isinstance(gate, nn.Linear) and isinstance(up, nn.Linear)):
            raise SurgeryError(f"{operation}: gate and up must be nn.Linear", operation=operation)
        if gate.out_features != up.out_features or gate.in_features != up.in_features:
            raise GrowthCouplingError(
                self.up, f"its shape differs from the gate {self.gate!r}'s", operation=operation
            )
        old = gate.out_features
        if self.width <= old:
            raise SurgeryError(
                f"{operation}: the new width must exceed the current {old}", operation=operation
            )
        down = self._down(ctx, operation)
        mapping = widen_layers(
            ctx,
            operation,
            producer_path=self.gate,
            norm_paths=[],
            consumers=[(down, 1)],
            width=self.width,
            seed=self.seed,
            init="net2wider",
            signal=None,
        )
        _, fractions = unit_shares(old, self.width, self.seed, "net2wider", mapping.device)
        new_up = _widened_producer(up, mapping)
        for key, param in up.named_parameters(recurse=False):
            state = _carry_state(ctx, param, mapping, fractions, is_consumer=False)
            ctx.replace_parameter(param, getattr(new_up, key), state)
        ctx.replace(self.up, new_up, operation=operation)

    def _down(self, ctx: SurgeryContext, operation: str) -> str:
        """The Linear reading ``act(gate) * up`` (the product found in the parent's graph)."""
        _, prefix, gate_call = traced_call(ctx.model, self.gate, operation=operation)
        local = self.up[len(prefix) :] if self.up.startswith(prefix) else None
        up_calls = [n for n in gate_call.graph.nodes if n.op == "call_module" and n.target == local]
        if len(up_calls) != 1:
            raise GrowthCouplingError(
                self.up,
                f"it is not called once beside {self.gate!r} in their parent's forward",
                operation=operation,
            )
        product = _meeting(gate_call, up_calls[0])
        if product is None:
            raise GrowthCouplingError(
                self.gate,
                f"its output is not multiplied by {self.up!r}'s in its parent's graph, so this is "
                "not a gated MLP",
                operation=operation,
            )
        users = list(product.users)
        if len(users) != 1 or users[0].op != "call_module":
            raise GrowthCouplingError(
                self.gate,
                f"the gated product {product.format_node()} must feed exactly one Linear",
                operation=operation,
            )
        path = prefix + str(users[0].target)
        layer = ctx.resolve(path, operation=operation)
        if (
            not isinstance(layer, nn.Linear)
            or layer.in_features != ctx.resolve(self.gate, operation=operation).out_features
        ):
            raise GrowthCouplingError(
                path, "the gated product does not feed a Linear of its width", operation=operation
            )
        return path


def _meeting(gate: fx.Node, up: fx.Node) -> fx.Node | None:
    """The ``mul`` joining ``gate``'s output (through one-input elementwise ops) with ``up``'s."""
    frontier, seen = [gate], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in _MULS:
                if up in user.args and node in user.args:
                    return user
                continue
            if len(user.all_input_nodes) == 1:
                frontier.append(user)
    return None
