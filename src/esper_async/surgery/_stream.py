"""Find a transformer's residual stream and every layer coupled to its width, from its fx graph.

The model is traced on the probe batch (:func:`._shadow.shadow_graph`); the pass walks the graph
in order, marking the nodes whose last dimension is the stream (width ``d``):

* **sources** start it: an ``nn.Embedding`` of dimension ``d``, or a parameter whose last
  dimension is ``d`` (a learned position table), sliced along leading dimensions only;
* it passes through residual additions, dropout, identities, ``contiguous``/``to``, and reshapes
  that keep the last dimension;
* **norms** (``nn.LayerNorm``, ``nn.RMSNorm`` over ``(d,)``, or the user's own leaf module holding
  only ``(d,)`` parameters whose forward takes a mean over the last dimension: an RMSNorm, or a
  LayerNorm when it subtracts, its ``eps`` attribute found by value) read it and write it;
* **readers** (``nn.Linear`` with ``in_features == d``) read it: attention's projections, the
  MLP's input projections (a gated MLP's two together: both read the stream), the output head;
* **writers** are found at each residual addition: the other operand, walked back through
  dropout and identities, must end in an ``nn.Linear`` with ``out_features == d``.

A module whose code reads the stream's width from a tensor's shape (``n, t, d = x.shape``, as
nanoGPT's attention does) has its inner width tied to the stream: its readers' outputs
(``m·d``, in ``m`` equal segments such as ``[q | k | v]``) and its writers' inputs grow too, as
more heads of the same head size (read from its ``scaled_dot_product_attention`` call, or given).

Anything else that touches the stream — another op, a custom module with its own parameters, an
activation, the model's output — is refused with :class:`GrowthCouplingError` naming the module.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..seeds import SeedSlot
from ._coupling import ADDS, PASS_FUNCTIONS, PASS_MODULES
from ._host_common import GrowthCouplingError
from ._host_slots import check_dormant
from ._shadow import shadow_graph, value

__all__ = ("Inner", "StreamPlan", "find_stream", "plan_from_record", "plan_record")

_NORMS = (nn.LayerNorm, nn.RMSNorm)
_SUBS = {operator.sub, torch.sub}
_PASS_METHODS = {"contiguous", "to", "float", "type_as", "clone", "detach"}
_RESHAPES = {"view", "reshape", "flatten"}
_SHAPE_READS_METHODS = {"size"}


@dataclass
class Inner:
    """A module whose inner width follows the stream: its readers' outputs and writers' inputs
    grow by whole heads.

    :ivar path: its dotted name.
    :ivar head_dim: the head size (``None``: no heads found; the inner width grows as is).
    :ivar heads: the number of heads now.
    :ivar readers: dotted names of its Linear layers that read the stream.
    :ivar writers: dotted names of its Linear layers that write the stream.
    """

    path: str
    head_dim: int | None = None
    heads: int | None = None
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)


@dataclass
class StreamPlan:
    """What a residual widening must change (dotted names from the root).

    :ivar width: the stream's width ``d`` now.
    :ivar embeddings: ``nn.Embedding`` sources.
    :ivar tables: parameters that feed the stream directly (dotted parameter names).
    :ivar norms: LayerNorm/RMSNorm layers on the stream.
    :ivar readers: Linear layers reading it.
    :ivar writers: Linear layers writing it.
    :ivar inner: modules whose inner width follows the stream, by path.
    :ivar passes: dropout and identity modules on the stream (a seed slot's host may be one).
    :ivar custom_norms: the user's own norm modules on the stream, by path: ``{"kind": "rms" |
        "layer", "eps": name of its eps attribute or None}``.
    """

    width: int
    embeddings: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    inner: dict[str, Inner] = field(default_factory=dict)
    passes: list[str] = field(default_factory=list)
    custom_norms: dict[str, dict[str, Any]] = field(default_factory=dict)


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack)[-1]) if stack else ""


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


class _Walker:
    def __init__(self, model: nn.Module, width: int, operation: str) -> None:
        self.model = model
        self.d = width
        self.operation = operation
        self.plan = StreamPlan(width)
        self.stream: set[fx.Node] = set()
        self.shapes: set[fx.Node] = set()  # nodes holding a stream tensor's shape
        self.width_reads: set[str] = set()  # modules whose code reads the stream's width
        # the user's own leaf modules holding only (d,) parameters: possible norms
        self.candidates = {
            name: m
            for name, m in model.named_modules()
            if name
            and not type(m).__module__.startswith("torch.")
            and not any(True for _ in m.children())
            and 0 < len([p for p in m._parameters.values() if p is not None]) <= 2
            and all(p is None or tuple(p.shape) == (width,) for p in m._parameters.values())
        }
        self.norm_info: dict[str, dict[str, Any]] = {}

    def refuse(self, where: str, reason: str) -> GrowthCouplingError:
        return GrowthCouplingError(where or "root", reason, operation=self.operation)

    def last_is_d(self, node: Any) -> bool:
        v = value(node)
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == self.d

    def walk(self, graph: fx.Graph) -> StreamPlan:
        for node in graph.nodes:
            self.visit(node)
        for path in sorted(self.width_reads):
            self.inner_of(path)
        self.custom_norms()
        return self.plan

    def norm_of(self, node: fx.Node) -> str | None:
        """The candidate norm module a node was traced inside, if any."""
        for path in node.meta.get("nn_module_stack") or {}:
            if str(path) in self.candidates:
                return str(path)
        return None

    def inside_norm(self, node: fx.Node, path: str) -> None:
        """A node of the user's own norm module: noted, not checked op by op; the module's output
        joins the stream once the stream entered it."""
        info = self.norm_info.setdefault(
            path, {"entered": False, "kind": "rms", "mean": False, "eps": None}
        )
        if any(n in self.stream and self.norm_of(n) != path for n in node.all_input_nodes):
            info["entered"] = True
        target = node.target
        if target in _SUBS or target in ("sub", "var") or target is torch.var:
            info["kind"] = "layer"
        if target == "mean" or target is torch.mean:
            v = value(node)
            info["mean"] = info["mean"] or (isinstance(v, torch.Tensor) and v.shape[-1] == 1)
        if node.op == "call_function" and target in ADDS:
            for arg in node.args:
                if isinstance(arg, float) and 0.0 < arg < 1e-2:
                    info["eps"] = arg
        if info["entered"] and any(self.norm_of(u) != path for u in node.users):
            self.stream.add(node)

    def custom_norms(self) -> None:
        for path, info in self.norm_info.items():
            if not info["entered"]:
                continue
            module = self.candidates[path]
            if not info["mean"]:
                raise self.refuse(
                    path,
                    f"a {type(module).__name__} with parameters of the stream's width acts on "
                    "the residual stream but does not normalise it over its last dimension "
                    "(no mean over it); a custom op there cannot grow",
                )
            eps = [
                n
                for n, v in vars(module).items()
                if type(v) is float and info["eps"] is not None and v == info["eps"]
            ]
            if info["eps"] is not None and len(eps) != 1:
                raise self.refuse(
                    path,
                    f"its eps ({info['eps']}) is a constant in its code, not one attribute, so a "
                    "widening cannot scale it by d/d' to keep the norm exact; store it as an "
                    "attribute (self.eps = ...)",
                )
            self.plan.custom_norms[path] = {"kind": info["kind"], "eps": eps[0] if eps else None}

    def visit(self, node: fx.Node) -> None:
        norm = self.norm_of(node)
        if norm is not None:
            self.inside_norm(node, norm)
            return
        if node.op == "call_module":
            self.module(node)
            return
        if node.op == "get_attr":
            v = value(node)
            if isinstance(v, nn.Parameter) and self.last_is_d(node):
                self.stream.add(node)
            return
        inputs = [n for n in node.all_input_nodes if n in self.stream]
        shape_inputs = [n for n in node.all_input_nodes if n in self.shapes]
        if shape_inputs:
            self.shape_use(node)
        if not inputs:
            return
        if node.op == "output":
            raise self.refuse("root", "the model returns the residual stream itself")
        self.function(node, inputs)

    def module(self, node: fx.Node) -> None:
        path = str(node.target)
        module = self.model.get_submodule(path)
        reads = any(n in self.stream for n in node.all_input_nodes)
        if isinstance(module, nn.Embedding) and module.embedding_dim == self.d:
            if reads:
                raise self.refuse(path, "an embedding is fed by the residual stream")
            _add(self.plan.embeddings, path)
            self.stream.add(node)
            return
        if not reads:
            return
        if isinstance(module, nn.Linear) and module.in_features == self.d:
            _add(self.plan.readers, path)
        elif isinstance(module, _NORMS) and tuple(module.normalized_shape) == (self.d,):
            _add(self.plan.norms, path)
            self.stream.add(node)
        elif isinstance(module, PASS_MODULES):
            _add(self.plan.passes, path)
            self.stream.add(node)
        else:
            raise self.refuse(
                path,
                f"a {type(module).__name__} reads the residual stream; only Linear, LayerNorm, "
                "RMSNorm, dropout and identities can grow with it",
            )

    def function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        target = node.target
        where = _owner(node)
        if node.op == "call_function" and target in ADDS | _SUBS and len(node.args) >= 2:
            for operand in node.args[:2]:
                if isinstance(operand, fx.Node) and operand not in self.stream:
                    self.operand(operand, node)
            self.stream.add(node)
            return
        if (node.op == "call_function" and target in PASS_FUNCTIONS) or (
            node.op == "call_method" and target in _PASS_METHODS
        ):
            self.stream.add(node)
            return
        if node.op == "call_function" and target is getattr and node.args[1] == "shape":
            self.shapes.add(node)
            return
        if node.op == "call_method" and target in _SHAPE_READS_METHODS:
            if isinstance(value(node), int):
                self.width_read(node)
            else:
                self.shapes.add(node)
            return
        if node.op == "call_method" and target == "dim":
            return
        if node.op == "call_function" and target is operator.getitem and self._keeps_last(node):
            self.stream.add(node)
            return
        if node.op == "call_method" and target in _RESHAPES and self._keeps_last(node):
            self.stream.add(node)
            return
        raise self.refuse(
            where,
            f"{node.format_node()} acts on the residual stream; only additions, dropout, "
            "reshapes that keep the last dimension, LayerNorm/RMSNorm and Linear layers can "
            "grow with it (a custom op or norm there is not understood)",
        )

    def _keeps_last(self, node: fx.Node) -> bool:
        source = node.args[0]
        if not (isinstance(source, fx.Node) and self.last_is_d(source) and self.last_is_d(node)):
            return False
        if node.target is operator.getitem:
            index = node.args[1]
            items = index if isinstance(index, tuple) else (index,)
            rank = value(source).dim()
            if Ellipsis in items:
                return items[-1] == slice(None)
            return len(items) < rank or items[-1] == slice(None)
        return True

    def operand(self, operand: fx.Node, add: fx.Node) -> None:
        """The non-stream operand of a residual addition: a writer's output, or a constant."""
        v = value(operand)
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] == 1:
            return
        if not self.last_is_d(operand):
            raise self.refuse(_owner(add), f"{add.format_node()} adds a tensor of another width")
        node = operand
        while True:
            if node.op == "call_module":
                module = self.model.get_submodule(str(node.target))
                if isinstance(module, nn.Linear) and module.out_features == self.d:
                    _add(self.plan.writers, str(node.target))
                    return
                if isinstance(module, PASS_MODULES):
                    node = node.args[0]  # type: ignore[assignment]
                    continue
            if node.op == "call_function" and node.target in PASS_FUNCTIONS:
                node = node.args[0]  # type: ignore[assignment]
                continue
            where = str(node.target) if node.op == "call_module" else _owner(node)
            for path in node.meta.get("nn_module_stack") or {}:
                holder = self.model.get_submodule(str(path))
                if isinstance(holder, SeedSlot):
                    check_dormant(
                        holder, str(path), "its host writes the residual stream", self.operation
                    )
            raise self.refuse(
                where,
                f"a residual branch added by {add.format_node()} ends in {node.format_node()}, "
                "not in a Linear writing the stream, so its width cannot grow",
            )

    def shape_use(self, node: fx.Node) -> None:
        if node.target is operator.getitem and node.args[0] in self.shapes:
            index = node.args[1]
            rank = len(value(node.args[0]))
            if isinstance(index, int) and index in (-1, rank - 1):
                self.width_read(node)

    def width_read(self, node: fx.Node) -> None:
        if node.users:
            self.width_reads.add(_owner(node))

    def inner_of(self, path: str) -> None:
        inner = Inner(path)
        prefix = f"{path}." if path else ""
        inner.readers = [r for r in self.plan.readers if r.startswith(prefix)]
        inner.writers = [w for w in self.plan.writers if w.startswith(prefix)]
        if not inner.readers and not inner.writers:
            raise self.refuse(
                path,
                "its code reads the residual stream's width from a tensor's shape but holds no "
                "layer reading or writing the stream, so what follows the width is unknown",
            )
        self.plan.inner[path] = inner


def _heads(graph: fx.Graph, inner: Inner) -> None:
    for node in graph.nodes:
        if (
            node.op == "call_function"
            and node.target is F.scaled_dot_product_attention
            and _owner(node) == inner.path
        ):
            q = value(node.args[0])
            inner.heads, inner.head_dim = int(q.shape[-3]), int(q.shape[-1])
            return


def find_stream(
    model: nn.Module, probe: Any, *, width: int, operation: str, grow_heads: bool = False
) -> StreamPlan:
    """Trace ``model`` on ``probe`` and find the residual stream of width ``width``.

    :param grow_heads: also treat every module that calls ``scaled_dot_product_attention`` as
        following the stream (its head count is fixed in its code, not read from a shape).
    :raises GrowthCouplingError: something on the stream cannot grow (see the module docstring).
    """
    graph = shadow_graph(model, probe, operation=operation)
    walker = _Walker(model, width, operation)
    if grow_heads:
        walker.width_reads |= {
            _owner(n)
            for n in graph.nodes
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention
        }
    plan = walker.walk(graph)
    for inner in plan.inner.values():
        _heads(graph, inner)
    params = dict(model.named_parameters(remove_duplicate=False))
    norms = tuple(f"{path}." for path in plan.custom_norms)
    for node in graph.nodes:
        if (
            node.op == "get_attr"
            and str(node.target) in params
            and not str(node.target).startswith(norms)
            and any(user.op != "output" for user in node.users)
        ):
            v = value(node)
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == width:
                _add(plan.tables, str(node.target))
    if not plan.embeddings and not plan.tables:
        raise GrowthCouplingError(
            "root",
            f"no embedding or table of width {width} starts a residual stream",
            operation=operation,
        )
    return plan


def plan_record(plan: StreamPlan) -> dict[str, Any]:
    """``plan`` as JSON-ready data, so that a replay needs no probe batch."""
    return {
        "width": plan.width,
        "embeddings": list(plan.embeddings),
        "tables": list(plan.tables),
        "norms": list(plan.norms),
        "readers": list(plan.readers),
        "writers": list(plan.writers),
        "inner": {
            path: {
                "head_dim": i.head_dim,
                "heads": i.heads,
                "readers": list(i.readers),
                "writers": list(i.writers),
            }
            for path, i in plan.inner.items()
        },
        "passes": list(plan.passes),
        "custom_norms": {path: dict(info) for path, info in plan.custom_norms.items()},
    }


def plan_from_record(record: Mapping[str, Any]) -> StreamPlan:
    """The inverse of :func:`plan_record`."""
    plan = StreamPlan(
        int(record["width"]),
        [str(p) for p in record["embeddings"]],
        [str(p) for p in record["tables"]],
        [str(p) for p in record["norms"]],
        [str(p) for p in record["readers"]],
        [str(p) for p in record["writers"]],
    )
    for path, i in record["inner"].items():
        plan.inner[str(path)] = Inner(
            str(path),
            i["head_dim"],
            i["heads"],
            [str(r) for r in i["readers"]],
            [str(w) for w in i["writers"]],
        )
    plan.passes = [str(p) for p in record.get("passes", [])]
    plan.custom_norms = {str(p): dict(i) for p, i in record.get("custom_norms", {}).items()}
    return plan
