"""Width growth of a transformer's residual stream (``d_model``), function-preserving at birth.

:class:`WidenResidual` grows the stream from ``d`` to ``d'`` (``k = d' - d`` new coordinates);
the coupled layers come from the model's fx graph (:mod:`._stream`). The new coordinates of the
stream are kept a fixed linear function of the old ones at birth, chosen so that every norm
sees the same statistics (LEMON's treatment of norms):

* **RMSNorm** (or no norm): the new coordinates are **zero**. ``rms`` over ``d'`` is
  ``sqrt(d/d')`` times ``rms`` over ``d``, so each norm's gain is multiplied by ``sqrt(d/d')``
  and its ``eps`` by ``d/d'``: its output on the old coordinates is unchanged, and zero on the
  new ones.
* **LayerNorm**: the new coordinates equal the **mean** of the old ones. The mean over ``d'`` is
  then unchanged and the variance is ``d/d'`` times the old one, so the same gain and ``eps``
  scaling keeps the output; the new outputs are the norm's new bias, zero.

Sources and writers keep that relation: an embedding's new columns (the tied head's too) and a
writer's new rows (and bias entries) are the mean of the old ones (LayerNorm) or zero
(RMSNorm). Readers see zeros on the new coordinates of every norm's output, so their new input
columns are free: they start random (the scale of the layer's weights, centred per row), which
breaks the symmetry between new coordinates and lets gradients reach every new weight.
Attention whose inner width follows the stream gains heads of the same size: the new heads'
query/key/value rows start random and the output projection's columns for them start at zero
(zero fan-out), so they add nothing at birth and learn from the first step. Models mixing
LayerNorm and RMSNorm on one stream are refused.

Optimizer state: old entries keep their moments; new entries start with zero first moments and
the parameter's mean second moment (so Adam's first step on them is not a full-size sign step);
``step`` is carried; a rescaled norm gain has its moments rescaled as its gradient is
(``1/c`` and ``1/c²``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..seeds import SeedSlot
from ._context import SurgeryContext
from ._host_common import GrowthCouplingError
from ._host_slots import check_dormant, grown_slot_contracts, slot_of_host
from ._stream import StreamPlan, find_stream, plan_from_record, plan_record

__all__ = ("WidenResidual", "expand", "new_moment")

_SECOND = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


@dataclass(frozen=True)
class WidenResidual:
    """Widen a transformer's residual stream (``d_model``) to ``width``, preserving its function.

    The coupled layers are found from the model's torch.fx graph: the stream starts at the
    embeddings (and learned position tables) whose output feeds it, runs through residual
    additions, LayerNorm/RMSNorm and dropout, and is read by Linear layers (attention's
    projections, the MLP's input projections, gated or not, the output head, tied or not) and
    written by the Linear layers whose outputs are added back to it. Attention whose inner width
    follows the stream (its code reads ``d`` from the input's shape) gains heads of the same head
    size. Anything else on the stream raises :class:`GrowthCouplingError`. See the module
    docstring for the initialisation.

    :param width: the new residual width ``d'`` (larger than the current one; for attention that
        follows the stream, a multiple of its head size).
    :param seed: seeds the new weights (reproducible surgery and replay).
    :param embedding: dotted name of the embedding that sets the current width (default: the
        first ``nn.Embedding`` in the model).
    :param head_dim: attention's head size (default: read from its
        ``scaled_dot_product_attention`` call).
    :param grow_heads: also grow attention whose head count is fixed in its code (a user's
        ``self.heads``, read by ``view(b, t, self.heads, self.head_dim)``): its query/key/value
        and output projections grow by whole heads and its head-count attribute follows; by
        default only attention that reads ``d`` from a shape grows its heads.
    :param plan: the coupled layers, as recorded by an earlier apply (replay on resume, which
        has no probe batch); default: found from the graph on the transaction's probe.
    """

    width: int
    seed: int = 0
    embedding: str | None = None
    head_dim: int | None = None
    grow_heads: bool = False
    plan: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def found(self) -> dict[str, Any] | None:
        """The coupled layers the last :meth:`apply` used (JSON-ready), or ``None``."""
        return getattr(self, "_found", None)

    @property
    def preserves_function(self) -> bool:
        return True

    def describe(self) -> str:
        return f"widen the residual stream to {self.width}"

    def apply(self, ctx: SurgeryContext) -> None:
        operation = self.describe()
        d = self._current(ctx, operation)
        if self.width <= d:
            raise SurgeryError(
                f"{operation}: the new width must exceed the current {d}", operation=operation
            )
        if self.plan is not None:
            plan = plan_from_record(self.plan)
        else:
            plan = find_stream(
                ctx.model, ctx.probe, width=d, operation=operation, grow_heads=self.grow_heads
            )
        object.__setattr__(self, "_found", plan_record(plan))  # recorded for replay
        slots = _grown_slots(ctx, plan, operation)
        _Grower(ctx, plan, self.width, self.seed, self.head_dim, operation).run()
        widths = {}
        for slot, host in slots.items():
            layer = ctx.resolve(host, operation=operation)
            widths[slot] = layer.out_features if isinstance(layer, nn.Linear) else self.width
        grown_slot_contracts(ctx, slots, widths, operation)

    def _current(self, ctx: SurgeryContext, operation: str) -> int:
        if self.embedding is not None:
            found = ctx.resolve(self.embedding, operation=operation)
            if not isinstance(found, nn.Embedding):
                raise SurgeryError(
                    f"{operation}: {self.embedding!r} is a {type(found).__name__}, not an "
                    "nn.Embedding",
                    operation=operation,
                )
            return found.embedding_dim
        for module in ctx.model.modules():
            if isinstance(module, nn.Embedding):
                return module.embedding_dim
        raise SurgeryError(
            f"{operation}: the model has no nn.Embedding to read the residual width from; pass "
            "embedding=",
            operation=operation,
        )


def _grown_slots(ctx: SurgeryContext, plan: StreamPlan, operation: str) -> dict[str, str]:
    """The seed slots whose host's output widens (writers, attention's inner readers, identities
    on the stream), by slot path -> host path; each must be dormant."""
    inner_readers = [r for i in plan.inner.values() for r in i.readers]
    found: dict[str, str] = {}
    for host in [*plan.writers, *inner_readers, *plan.passes]:
        slot = slot_of_host(ctx, host, operation)
        if slot is not None:
            holder = ctx.resolve(slot, operation=operation)
            assert isinstance(holder, SeedSlot)
            check_dormant(holder, slot, "its host's output widens with the stream", operation)
            found[slot] = host
    return found


def expand(
    t: torch.Tensor, dim: int, segments: int, extra: int, make: Callable[[torch.Tensor], Any]
) -> torch.Tensor:
    """``t`` with ``extra`` slices appended along ``dim`` to each of its ``segments`` equal
    parts; ``make(part)`` gives a part's new slices (a tensor, or a scalar to fill with)."""
    parts = t.chunk(segments, dim) if segments > 1 else (t,)
    grown = []
    for part in parts:
        shape = list(part.shape)
        shape[dim] = extra
        new = make(part)
        if not isinstance(new, torch.Tensor):
            new = part.new_full(shape, float(new))
        grown += [part, new.to(part.dtype).expand(shape)]
    return torch.cat(grown, dim)


def new_moment(second: bool) -> Callable[[torch.Tensor], Any]:
    """How a moment's new entries start: the mean of the old ones (second moments) or zero."""
    return (lambda p: p.mean()) if second else (lambda p: 0.0)


class _Grower:
    """Builds every widened layer and swaps it in through the context."""

    def __init__(
        self,
        ctx: SurgeryContext,
        plan: StreamPlan,
        width: int,
        seed: int,
        head_dim: int | None,
        operation: str,
    ) -> None:
        self.ctx, self.plan, self.new, self.operation = ctx, plan, width, operation
        self.d = plan.width
        self.k = width - plan.width
        self.c = math.sqrt(self.d / width)
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}
        self.head_dim = head_dim
        self.fill = self._fill()
        self.params: dict[int, nn.Parameter] = {}  # old parameter id -> its replacement

    def refuse(self, where: str, reason: str) -> GrowthCouplingError:
        return GrowthCouplingError(where, reason, operation=self.operation)

    def _fill(self) -> str:
        kinds = {type(self.ctx.resolve(p, operation=self.operation)) for p in self.plan.norms}
        kinds |= {
            nn.LayerNorm if info["kind"] == "layer" else nn.RMSNorm
            for info in self.plan.custom_norms.values()
        }
        if len(kinds) > 1:
            raise self.refuse(
                ", ".join(self.plan.norms[:3]),
                "LayerNorm and RMSNorm on one stream need different fills of the new "
                "coordinates (mean and zero); no single widening preserves both",
            )
        return "mean" if kinds == {nn.LayerNorm} else "zero"

    # --------------------------------------------------------------- new values of a tensor
    def _fill_along(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """New slices along ``dim`` (the stream's) that keep the fill: mean or zero."""
        return expand(
            t,
            dim,
            1,
            self.k,
            (lambda p: p.mean(dim, keepdim=True)) if self.fill == "mean" else (lambda p: 0.0),
        )

    def _random(self, like: torch.Tensor, shape: list[int], centre_dim: int | None) -> torch.Tensor:
        """Gaussian values at the scale of ``like`` (its standard deviation, 0.02 when it has
        none), drawn on its device from a generator seeded with ``seed``; centred along
        ``centre_dim`` under the mean fill (a reader of the raw stream then adds nothing)."""
        device = like.device
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        ref = like.detach().float()
        std = ref.std() if ref.numel() > 1 else ref.new_tensor(0.02)
        std = torch.where(torch.isfinite(std) & (std > 0), std, std.new_tensor(0.02))
        noise = torch.randn(shape, generator=self.generators[device], device=device) * std
        if centre_dim is not None and self.fill == "mean" and shape[centre_dim] > 1:
            noise -= noise.mean(centre_dim, keepdim=True)
        elif centre_dim is not None and self.fill == "mean":
            noise.zero_()
        return noise.to(like.dtype)

    # --------------------------------------------------------------- parameters and state
    def _param(
        self,
        old: nn.Parameter,
        data: torch.Tensor,
        mapper: Callable[[torch.Tensor, bool], torch.Tensor],
    ) -> nn.Parameter:
        """The replacement of ``old`` (made once, shared by tied modules), with its state
        mapped by ``mapper(state_tensor, is_second_moment)``."""
        if id(old) in self.params:
            return self.params[id(old)]
        new = nn.Parameter(data.detach(), requires_grad=old.requires_grad)
        self.params[id(old)] = new
        state = None
        optimizer = self.ctx.optimizer
        if optimizer is not None and old in optimizer.state:
            state = {}
            for key, v in optimizer.state[old].items():
                if isinstance(v, torch.Tensor) and v.shape == old.shape and v.dim() > 0:
                    state[key] = mapper(v, key in _SECOND)
                else:
                    state[key] = v.clone() if isinstance(v, torch.Tensor) else v
        self.ctx.replace_parameter(old, new, state)
        return new

    # --------------------------------------------------------------- the run
    def run(self) -> None:
        plan = self.plan
        with torch.no_grad():
            for path, inner in plan.inner.items():
                self._inner(path, inner)
            for path in plan.embeddings:
                self._embedding(path)
            for name in plan.tables:
                self._table(name)
            for path in plan.norms:
                self._norm(path)
            for path, info in plan.custom_norms.items():
                self._custom_norm(path, info)
            inner_readers = {r for i in plan.inner.values() for r in i.readers}
            inner_writers = {w for i in plan.inner.values() for w in i.writers}
            for path in plan.readers:
                self._linear(
                    path,
                    read=True,
                    write=path in plan.writers,
                    heads=self._heads_of(path) if path in inner_readers else None,
                    zero_in=None,
                )
            for path in plan.writers:
                if path in plan.readers:
                    continue
                self._linear(
                    path,
                    read=False,
                    write=True,
                    heads=None,
                    zero_in=self._heads_of(path) if path in inner_writers else None,
                )

    def _heads_of(self, path: str) -> tuple[int, int]:
        """``(segments, extra per segment)`` of an inner layer's grown dimension."""
        layer = self.ctx.resolve(path, operation=self.operation)
        assert isinstance(layer, nn.Linear)
        size = layer.out_features if layer.in_features == self.d else layer.in_features
        if size % self.d:
            raise self.refuse(
                path, f"its inner width {size} is not a multiple of the stream's {self.d}"
            )
        return size // self.d, self.k

    def _inner(self, path: str, inner: Any) -> None:
        head_dim = self.head_dim or inner.head_dim
        if head_dim is None:
            raise self.refuse(
                path,
                "its inner width follows the stream's, but no scaled_dot_product_attention call "
                "in it shows a head size to grow by whole heads; pass head_dim=",
            )
        if self.new % head_dim:
            raise self.refuse(
                path,
                f"its heads are of size {head_dim}, which does not divide the new width "
                f"{self.new}; pick a multiple of {head_dim}",
            )
        module = self.ctx.resolve(path, operation=self.operation)
        heads = inner.heads if inner.heads is not None else self.d // head_dim
        names = [
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and type(v) is int and v == heads
        ]
        if len(names) > 1:
            names = [n for n in names if "head" in n and "dim" not in n and "size" not in n]
            if len(names) != 1:
                raise self.refuse(
                    path,
                    f"several int attributes equal its head count {heads}; cannot tell "
                    "which to grow",
                )
        if not names:
            return
        clone = copy.copy(module)
        clone._parameters = dict(module._parameters)
        clone._buffers = dict(module._buffers)
        clone._modules = dict(module._modules)
        setattr(clone, names[0], self.new // head_dim)
        self.ctx.replace(path, clone, operation=self.operation)

    def _embedding(self, path: str) -> None:
        layer = self.ctx.resolve(path, operation=self.operation)
        assert isinstance(layer, nn.Embedding)
        weight = self._param(
            layer.weight,
            self._fill_along(layer.weight, 1),
            lambda v, second: expand(v, 1, 1, self.k, new_moment(second)),
        )
        new = copy.copy(layer)
        new._parameters = dict(layer._parameters)
        new.embedding_dim = self.new
        new.weight = weight
        self.ctx.replace(path, new, operation=self.operation)

    def _table(self, name: str) -> None:
        owner, _, attr = name.rpartition(".")
        module = self.ctx.resolve(owner, operation=self.operation)
        old = module._parameters[attr]
        assert old is not None
        dim = old.dim() - 1
        new = self._param(
            old,
            self._fill_along(old, dim),
            lambda v, second: expand(v, dim, 1, self.k, new_moment(second)),
        )
        self.ctx.set_parameter(owner, attr, new, operation=self.operation)

    def _norm(self, path: str) -> None:
        norm = self.ctx.resolve(path, operation=self.operation)
        assert isinstance(norm, (nn.LayerNorm, nn.RMSNorm))
        if norm.weight is None:
            raise self.refuse(
                path, "a norm without a gain cannot keep its scale when the stream widens"
            )
        c = self.c
        new = copy.copy(norm)
        new._parameters = dict(norm._parameters)
        new.normalized_shape = (self.new,)
        eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype).eps
        new.eps = eps * self.d / self.new
        new.weight = self._param(
            norm.weight,
            expand(norm.weight * c, 0, 1, self.k, lambda p: p.mean()),
            lambda v, second: expand(
                v / (c * c if second else c), 0, 1, self.k, new_moment(second)
            ),
        )
        bias = getattr(norm, "bias", None)
        if bias is not None:
            new.bias = self._param(
                bias,
                expand(bias, 0, 1, self.k, lambda p: 0.0),
                lambda v, second: expand(v, 0, 1, self.k, new_moment(second)),
            )
        self.ctx.replace(path, new, operation=self.operation)

    def _custom_norm(self, path: str, info: Mapping[str, Any]) -> None:
        """The user's own norm: its gain scaled like a LayerNorm's or RMSNorm's, its bias (a
        parameter named ``bias``) extended with zeros, its eps attribute (if found) scaled."""
        module = self.ctx.resolve(path, operation=self.operation)
        params = {n: p for n, p in module._parameters.items() if p is not None}
        gains = [n for n in params if n != "bias"]
        if len(gains) != 1:
            raise self.refuse(path, "a custom norm needs one gain parameter (and maybe 'bias')")
        c = self.c
        clone = copy.copy(module)
        clone._parameters = dict(module._parameters)
        gain = params[gains[0]]
        clone._parameters[gains[0]] = self._param(
            gain,
            expand(gain.detach() * c, 0, 1, self.k, lambda p: p.mean()),
            lambda v, second: expand(
                v / (c * c if second else c), 0, 1, self.k, new_moment(second)
            ),
        )
        if "bias" in params:
            bias = params["bias"]
            clone._parameters["bias"] = self._param(
                bias,
                expand(bias.detach(), 0, 1, self.k, lambda p: 0.0),
                lambda v, second: expand(v, 0, 1, self.k, new_moment(second)),
            )
        if info.get("eps"):
            name = str(info["eps"])
            object.__setattr__(clone, name, getattr(module, name) * self.d / self.new)
        self.ctx.replace(path, clone, operation=self.operation)

    def _linear(
        self,
        path: str,
        *,
        read: bool,
        write: bool,
        heads: tuple[int, int] | None,
        zero_in: tuple[int, int] | None,
    ) -> None:
        layer = self.ctx.resolve(path, operation=self.operation)
        assert isinstance(layer, nn.Linear)
        w, b = layer.weight, layer.bias
        data = w.detach()
        moment_rows: list[tuple[int, int, int]] = []  # (dim, segments, extra) applied in order
        if heads is not None:  # new heads: random rows in each segment
            segments, extra = heads
            data = expand(
                data, 0, segments, extra, lambda p: self._random(w, [extra, p.shape[1]], None)
            )
            moment_rows.append((0, segments, extra))
        if zero_in is not None:  # the new heads' fan-out starts at zero
            segments, extra = zero_in
            data = expand(data, 1, segments, extra, lambda p: 0.0)
            moment_rows.append((1, segments, extra))
        if read and not self._tied_to_source(w):
            data = expand(data, 1, 1, self.k, lambda p: self._random(w, [p.shape[0], self.k], 1))
            moment_rows.append((1, 1, self.k))
        elif read:
            data = self._fill_along(data, 1)
            moment_rows.append((1, 1, self.k))
        if write:
            data = self._fill_along(data, 0)
            moment_rows.append((0, 1, self.k))

        def state(v: torch.Tensor, second: bool) -> torch.Tensor:
            for dim, segments, extra in moment_rows:
                v = expand(v, dim, segments, extra, new_moment(second))
            return v

        new = copy.copy(layer)
        new._parameters = dict(layer._parameters)
        new.weight = self._param(w, data, state)
        new.out_features, new.in_features = data.shape
        if b is not None:
            bias = b.detach()
            steps: list[tuple[int, int]] = []
            if heads is not None:
                bias = expand(bias, 0, heads[0], heads[1], lambda p: 0.0)
                steps.append(heads)
            if write:
                bias = self._fill_along(bias, 0)
                steps.append((1, self.k))

            def bias_state(v: torch.Tensor, second: bool) -> torch.Tensor:
                for segments, extra in steps:
                    v = expand(v, 0, segments, extra, new_moment(second))
                return v

            new.bias = self._param(b, bias, bias_state)
        self.ctx.replace(path, new, operation=self.operation)

    def _tied_to_source(self, weight: nn.Parameter) -> bool:
        """Whether a reader's weight is also an embedding's (a tied head): it then follows the
        embedding's fill."""
        for path in self.plan.embeddings:
            layer = self.ctx.resolve(path, operation=self.operation)
            if getattr(layer, "weight", None) is weight or id(weight) in self.params:
                return True
        return False
