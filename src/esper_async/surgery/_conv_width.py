"""Width growth of a CNN's channels across a residual stage, function-preserving at birth.

:class:`WidenChannels` grows the output channels of a Conv2d and of everything coupled to them.
The coupling is found from the model's fx graph, traced on the probe batch: starting at the
target's output, the pass follows the channels forward through batch norms, elementwise
activations, dropout, identities and pooling, and at every residual addition walks each other
operand back to the convolutions that produce it (through the same ops, and through earlier
additions). So widening ``layer1.0.conv2`` of a ResNet widens the stem and every ``conv2`` and
downsample conv of ``layer1`` (their outputs are added together), their batch norms, and every
layer that reads those channels: each block's ``conv1``, the next stage's first ``conv1`` and
downsample, or the classifier after global pooling.

Initialisation (zero fan-out): every producer's new filters start random at the scale of its
existing filters (symmetry breaking), each batch norm's new channels start as a fresh norm's
(weight 1, bias 0, running mean 0, running variance 1), and every consumer's new input columns
start at zero, so the new channels add nothing at birth whatever they hold: the function is
preserved exactly. The consumers' new columns get gradients from the first step (the new
channels are not zero), the producers' new filters from the second.

Optimizer state: old entries keep their moments; new entries start with zero first moments and
the parameter's mean second moment; ``step`` is carried.

Refused with :class:`GrowthCouplingError`: a concatenation, a reshape other than a global-pool
flatten, a grouped or depthwise conv, a model input or output on the coupled channels, or any
other op there.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import SurgeryError
from ..seeds import SeedSlot
from ._context import SurgeryContext
from ._coupling import ADDS, PASS_FUNCTIONS, PASS_MODULES
from ._host_common import GrowthCouplingError
from ._host_slots import check_dormant, grown_slot_contracts, slot_of_host
from ._residual_width import expand, new_moment
from ._shadow import shadow_graph, value

__all__ = ("WidenChannels",)

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.leaky_relu,
    F.hardswish,
    F.adaptive_avg_pool2d,
    F.max_pool2d,
    F.avg_pool2d,
} | PASS_FUNCTIONS
_METHODS = {"relu", "contiguous", "clone"}


@dataclass(frozen=True)
class WidenChannels:
    """Widen the Conv2d at ``target`` to ``width`` output channels, with every conv, batch norm
    and consumer coupled to them through residual additions (see the module docstring).

    :param target: dotted name of a Conv2d (``groups == 1``).
    :param width: the new number of channels (larger than the current one).
    :param seed: seeds the new filters (reproducible surgery).
    :param plan: the coupled layers recorded by an earlier apply (replay without a probe).
    """

    target: str
    width: int
    seed: int = 0
    plan: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def preserves_function(self) -> bool:
        return True

    @property
    def found(self) -> dict[str, Any] | None:
        """The coupled layers the last :meth:`apply` used (JSON-ready), or ``None``."""
        return getattr(self, "_found", None)

    def describe(self) -> str:
        return f"widen the channels of {self.target!r} to {self.width}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        conv = ctx.resolve(self.target, operation=operation)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise SurgeryError(
                f"{operation}: {self.target!r} must be an nn.Conv2d with groups=1",
                operation=operation,
            )
        if self.width <= conv.out_channels:
            raise SurgeryError(
                f"{operation}: the new width must exceed the current {conv.out_channels}",
                operation=operation,
            )
        if self.plan is not None:
            plan = {
                key: [str(p) for p in self.plan[key]] for key in ("producers", "norms", "consumers")
            }
        else:
            plan = _Coupling(ctx, self.target, conv.out_channels, operation).find()
        object.__setattr__(self, "_found", plan)
        slots = {}
        for host in plan["producers"]:
            slot = slot_of_host(ctx, host, operation)
            if slot is not None:
                holder = ctx.resolve(slot, operation=operation)
                assert isinstance(holder, SeedSlot)
                check_dormant(holder, slot, "its host's channels widen", operation)
                slots[slot] = self.width
        # validated from the root: the coupled layers may all sit in a ModuleList, not callable
        ctx.keep("", operation=operation)
        _grow(ctx, plan, conv.out_channels, self.width, self.seed, operation)
        grown_slot_contracts(ctx, slots, slots, operation)


class _Coupling:
    def __init__(self, ctx: SurgeryContext, target: str, channels: int, operation: str) -> None:
        self.ctx, self.target, self.c, self.operation = ctx, target, channels, operation
        self.model = ctx.model
        self.members: set[fx.Node] = set()
        self.walked: set[fx.Node] = set()
        self.work: list[fx.Node] = []
        self.producers: list[str] = []
        self.norms: list[str] = []
        self.consumers: list[str] = []

    def refuse(self, node: fx.Node, reason: str) -> GrowthCouplingError:
        stack = node.meta.get("nn_module_stack") or {}
        where = (
            str(node.target)
            if node.op == "call_module"
            else (str(list(stack)[-1]) if stack else node.name)
        )
        return GrowthCouplingError(where, reason, operation=self.operation)

    def find(self) -> dict[str, list[str]]:
        graph = shadow_graph(self.model, self.ctx.probe, operation=self.operation)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target == self.target]
        if len(calls) != 1:
            raise GrowthCouplingError(
                self.target,
                f"it is called {len(calls)} times on the probe batch",
                operation=self.operation,
            )
        self.producers.append(self.target)
        self.work.append(calls[0])
        while self.work:
            node = self.work.pop()
            if node in self.members:
                continue
            self.members.add(node)
            for user in list(node.users):
                self.forward(user, node)
        return {"producers": self.producers, "norms": self.norms, "consumers": self.consumers}

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        return self.model.get_submodule(str(node.target))

    def passes(self, node: fx.Node) -> bool:
        module = self.module(node)
        if module is not None:
            return isinstance(module, _ACTIVATIONS + _POOLS + PASS_MODULES)
        if node.op == "call_function":
            return node.target in _FUNCTIONS
        return node.op == "call_method" and node.target in _METHODS

    def forward(self, user: fx.Node, source: fx.Node) -> None:
        module = self.module(user)
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.in_channels == self.c:
            _add(self.consumers, str(user.target))
        elif isinstance(module, nn.Linear) and module.in_features == self.c:
            if value(source).dim() != 2:
                raise self.refuse(user, "a Linear reads the channels before they are pooled")
            _add(self.consumers, str(user.target))
        elif isinstance(module, nn.BatchNorm2d) and module.num_features == self.c:
            _add(self.norms, str(user.target))
            self.work.append(user)
        elif self.passes(user):
            self.work.append(user)
        elif user.op == "call_function" and user.target in ADDS:
            self.work.append(user)
            for operand in user.args[:2]:
                if isinstance(operand, fx.Node) and operand is not source:
                    self.backward(operand)
        elif self.flattens_pooled(user, source):
            self.work.append(user)
        else:
            raise self.refuse(
                user,
                f"{user.format_node()} uses channels coupled to {self.target!r}; only convs, "
                "batch norms, activations, pooling, residual additions and a global-pool "
                "flatten can grow with them",
            )

    def flattens_pooled(self, user: fx.Node, source: fx.Node) -> bool:
        flat = (user.op == "call_function" and user.target is torch.flatten) or (
            user.op == "call_method" and user.target in ("flatten", "view", "reshape")
        )
        v, s = value(user), value(source)
        return bool(
            flat
            and isinstance(v, torch.Tensor)
            and v.dim() == 2
            and v.shape[1] == self.c
            and s.dim() == 4
            and s.shape[2] * s.shape[3] == 1
        )

    def backward(self, node: fx.Node) -> None:
        if node in self.members:
            return
        module = self.module(node)
        if isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels == self.c:
            _add(self.producers, str(node.target))
            self.work.append(node)
            return
        if isinstance(module, nn.BatchNorm2d) and module.num_features == self.c:
            _add(self.norms, str(node.target))
        elif not (self.passes(node) or (node.op == "call_function" and node.target in ADDS)):
            raise self.refuse(
                node,
                f"a residual addition coupled to {self.target!r} adds {node.format_node()}, "
                "which is not produced by a Conv2d through norms and activations",
            )
        self.work.append(node)
        for operand in node.all_input_nodes:
            if operand not in self.walked:
                self.walked.add(operand)
                self.backward(operand)


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _state(ctx: SurgeryContext, old: nn.Parameter, dim: int, extra: int) -> dict[str, Any] | None:
    optimizer = ctx.optimizer
    if optimizer is None or old not in optimizer.state:
        return None
    state: dict[str, Any] = {}
    for key, v in optimizer.state[old].items():
        if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
            second = key in ("exp_avg_sq", "max_exp_avg_sq")
            state[key] = expand(v, dim, 1, extra, new_moment(second))
        else:
            state[key] = v.clone() if isinstance(v, torch.Tensor) else v
    return state


def _swap(
    ctx: SurgeryContext,
    module: nn.Module,
    name: str,
    data: torch.Tensor,
    dim: int,
    extra: int,
    made: dict[int, nn.Parameter],
) -> None:
    old = module._parameters[name]
    assert old is not None
    if id(old) not in made:
        made[id(old)] = nn.Parameter(data, requires_grad=old.requires_grad)
        ctx.replace_parameter(old, made[id(old)], _state(ctx, old, dim, extra))
    module._parameters[name] = made[id(old)]


@torch.no_grad()
def _grow(
    ctx: SurgeryContext,
    plan: Mapping[str, list[str]],
    old: int,
    new: int,
    seed: int,
    operation: str,
) -> None:
    extra = new - old
    made: dict[int, nn.Parameter] = {}
    generators: dict[torch.device, torch.Generator] = {}
    for path in plan["producers"]:
        conv = ctx.resolve(path, operation=operation)
        assert isinstance(conv, nn.Conv2d)
        w = conv.weight
        if w.device not in generators:
            generators[w.device] = torch.Generator(device=w.device).manual_seed(seed)
        rows = torch.randn((extra, *w.shape[1:]), generator=generators[w.device], device=w.device)
        norm = w.detach().float().flatten(1).norm(dim=1).mean()
        rows = rows / rows.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * norm
        clone = _clone(conv)
        clone.out_channels = new
        _swap(ctx, clone, "weight", torch.cat([w.detach(), rows.to(w.dtype)]), 0, extra, made)
        if conv.bias is not None:
            _swap(
                ctx,
                clone,
                "bias",
                expand(conv.bias.detach(), 0, 1, extra, lambda p: 0.0),
                0,
                extra,
                made,
            )
        ctx.replace(path, clone, operation=operation)
    for path in plan["norms"]:
        bn = ctx.resolve(path, operation=operation)
        assert isinstance(bn, nn.BatchNorm2d)
        clone = _clone(bn)
        clone.num_features = new
        if bn.weight is not None and bn.bias is not None:
            _swap(
                ctx,
                clone,
                "weight",
                expand(bn.weight.detach(), 0, 1, extra, lambda p: 1.0),
                0,
                extra,
                made,
            )
            _swap(
                ctx,
                clone,
                "bias",
                expand(bn.bias.detach(), 0, 1, extra, lambda p: 0.0),
                0,
                extra,
                made,
            )
        if bn.running_mean is not None and bn.running_var is not None:
            clone._buffers["running_mean"] = expand(bn.running_mean, 0, 1, extra, lambda p: 0.0)
            clone._buffers["running_var"] = expand(bn.running_var, 0, 1, extra, lambda p: 1.0)
        ctx.replace(path, clone, operation=operation)
    for path in plan["consumers"]:
        layer = ctx.resolve(path, operation=operation)
        assert isinstance(layer, (nn.Conv2d, nn.Linear))
        clone = _clone(layer)
        if isinstance(layer, nn.Conv2d):
            clone.in_channels = new
        else:
            clone.in_features = new
        _swap(
            ctx,
            clone,
            "weight",
            expand(layer.weight.detach(), 1, 1, extra, lambda p: 0.0),
            1,
            extra,
            made,
        )
        ctx.replace(path, clone, operation=operation)


def _clone(module: nn.Module) -> Any:
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone
