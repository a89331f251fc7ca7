"""``SeedSlot``: a host module with a place for one seed beside it.

The slot's output is ``h + contribution``, where ``h = host(x)`` and the contribution depends on the
seed's state:

==============  ==========================================  ======================================
state           output                                      who learns
==============  ==========================================  ======================================
no seed         ``h``                                       the host
TRAINING        ``h + (s - s.detach())`` with ``s = seed(h.detach())``
                                                            host as before; the seed learns from
                                                            the host's loss as if it were blended,
                                                            while the output value stays ``h``
BLENDING        ``h + α·seed(h)``, α ramping 0 → 1           both
PROBATION,      ``h + seed(h)``                              both
FOSSILIZED
==============  ==========================================  ======================================

The slot passes every argument of its call to the host (``host(*args, **kwargs)``). A linear
slot's contract ``(F,)`` covers any output ``(..., F)``: ``(N, F)``, a sequence's ``(N, T, F)``
and so on. The seed, whose kernel is exported for ``(N, F)`` with a dynamic batch, then runs on
the leading dimensions flattened, ``(-1, F)``, and its output is reshaped back. A conv slot's
output is ``(N, C, *spatial)`` with one, two or three spatial dimensions.

In TRAINING, ``s - s.detach()`` is exactly zero in value, so the host's output, loss and gradients
are untouched, but the gradient of the loss reaches the seed's parameters. Detaching ``h`` at the
seed's input keeps the seed's backward pass from adding to the host's gradients.

On a GPU, a slot given a side stream (:attr:`SeedSlot.side_stream`, set by
:func:`esper_async.seeds.enable_side_streams`) runs a TRAINING seed's forward and backward on
that stream, beside the host's later layers (``seeds._streams.train_beside``); the output
is then a copy of ``h`` and the gradients are those above. Other states read the seed's output on
the main stream, so they gain nothing from a side stream and run inline. On a CPU, or with no side
stream, nothing changes. A widened slot (below) runs its seed inline too.

Widening the host (:class:`esper_async.surgery.WidenSlot`, Net2Wider) gives it more output units
than the seed, whose kernel is exported with a fixed width ``C``. The slot then holds a
:class:`UnitMap` ``m`` (unit ``k`` of the host is a replica of original unit ``m[k] < C``): the
seed reads the first ``C`` units of ``h`` (the original ones, which widening never moves) and its
output is spread along ``m`` before it is added, ``s[:, m]`` in place of ``s`` in the table above
(along the channel dimension of a conv's ``NCHW`` output, the last one of a Linear's). Unit ``k``
of the widened slot then outputs ``h_{m[k]} + s_{m[k]}``, a replica of what the slot output
before, so the consumers' split columns keep the model's function. A dormant slot never reads the
map.

A seed that raises in its forward pass surfaces as :class:`~esper_async.SeedRuntimeError` naming
the slot (the original error chained), so the trainer knows which seed to cull. With
:attr:`SeedSlot.check_finite` on (the trainer's diagnosis after a non-finite loss), a seed whose
output is not finite while its input is raises it too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..blueprints import Blueprint, SlotContract, SlotKind
from ..errors import LifecycleError, SeedRuntimeError
from ._lifecycle import Lifecycle, SeedState
from ._streams import train_beside

__all__ = ("HealthSignals", "SeedSlot", "UnitMap")


@dataclass(frozen=True)
class HealthSignals:
    """Per-slot health figures the controller reads at an epoch boundary.

    :ivar grad_norm: L2 norm of the host module's parameter gradients at the last step.
    :ivar act_mean: mean of the host's output over the last observed batch.
    :ivar act_std: standard deviation of the host's output.
    :ivar dead_fraction: fraction of output elements that were exactly zero (dead ReLUs).
    :ivar seed_grad_norm: L2 norm of the seed's parameter gradients (``nan`` with no seed).
    :ivar finite: whether every observed value was finite.
    """

    grad_norm: float
    act_mean: float
    act_std: float
    dead_fraction: float
    seed_grad_norm: float
    finite: bool

    def as_features(self) -> list[float]:
        """The signals as a feature vector for contextual selection (non-finite → 0)."""
        values = (self.grad_norm, self.act_mean, self.act_std, self.dead_fraction)
        return [v if math.isfinite(v) else 0.0 for v in values]


def _grad_norm(module: nn.Module | None) -> float:
    if module is None:
        return math.nan
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class UnitMap(nn.Module):
    """Where a widened slot's output units come from: unit ``k`` replicates seed unit
    ``index[k]``.

    A module (not a bare buffer on the slot) so that surgery swaps it like any child, and its
    undo journal, which records child tables, restores it exactly. ``index`` is a persistent
    buffer: it is in the model's ``state_dict``.

    :param index: long tensor, one entry per host unit, each in ``[0, features)``; it starts with
        ``arange(features)`` (widening keeps the original units first).
    :param dim: the unit dimension of the host's output (1 for a conv's ``NCHW``, -1 for a
        Linear).
    :param features: ``C``, the seed's width (the slot's contract width).
    """

    index: torch.Tensor

    def __init__(self, index: torch.Tensor, *, dim: int, features: int) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.dim = dim
        self.features = features

    def narrow(self, h: torch.Tensor) -> torch.Tensor:
        """The seed's input: the first ``features`` units of the host's output (a view)."""
        return h.narrow(self.dim, 0, self.features)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """The seed's output ``(N, C, ...)`` spread to the host's width, ``s[:, index]``."""
        return s.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"units={len(self.index)}, dim={self.dim}, features={self.features}"


class SeedSlot(nn.Module):
    """A host module wrapped with a place for a seed. Made by :func:`esper_async.wrap`.

    While dormant the slot costs one Python call: it returns the host's output untouched.

    :param host: the wrapped module; its output, shape ``(N, *contract.shape)`` (``(..., F)``
        for a linear slot), is what a seed reads and adds to.
    :param name: the slot's name (the host's path in the model).
    :param contract: the shape contract, found by probing the model (see :func:`wrap`).
    :ivar unit_map: set by widening the host (``None``: host and seed have the same width).
    """

    unit_map: UnitMap | None

    def __init__(self, host: nn.Module, *, name: str, contract: SlotContract | None = None) -> None:
        super().__init__()
        self.host = host
        self.seed: nn.Module | None = None
        self.slot_name = name
        self.contract = contract
        self.lifecycle = Lifecycle(name)
        self.blueprint: Blueprint | None = None
        self.kernel_id: str | None = None
        self.alpha = 0.0
        self.blend_steps = 1
        self.observe = False
        #: Raise ``SeedRuntimeError`` when the seed turns finite input into non-finite output
        #: (off in training steps: checking costs a device sync).
        self.check_finite = False
        #: CUDA stream on which a TRAINING seed runs (``None``: inline, as on a CPU).
        self.side_stream: torch.cuda.Stream | None = None
        # A child entry even while empty, so that surgery's journal of child tables covers it.
        self.register_module("unit_map", None)
        self._ablated = False
        self._act_stats: tuple[float, float, float, bool] = (math.nan, math.nan, math.nan, True)

    @property
    def state(self) -> SeedState:
        """The seed's lifecycle state."""
        return self.lifecycle.state

    @property
    def is_ablated(self) -> bool:
        """Whether the seed is switched off now (inside :meth:`ablated`)."""
        return self._ablated

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The host's output on the arguments (all passed through), plus the seed's contribution."""
        h = self.host(*args, **kwargs)
        if self.observe:
            self._record(h)
        seed = self.seed
        if seed is None or self._ablated:
            return h
        state = self.lifecycle.state
        units = self.unit_map
        if state is SeedState.TRAINING:
            beside = self.side_stream is not None and h.is_cuda and not self.check_finite
            if beside and units is None:
                try:
                    return train_beside(self._seed_fn(seed), h, self.side_stream)
                except Exception as exc:
                    raise self._failure(exc) from exc
            s = self._run_seed(seed, h.detach(), units)
            return h + (s - s.detach())
        s = self._run_seed(seed, h, units)
        if state is SeedState.BLENDING:
            return h + self.alpha * s
        return h + s

    def _run_seed(self, seed: nn.Module, h: torch.Tensor, units: UnitMap | None) -> torch.Tensor:
        """The seed's output on ``h``, spread along ``units`` when the host was widened."""
        if units is not None:
            return units(self._run_seed(seed, units.narrow(h), None))
        try:
            s = self._seed_fn(seed)(h)
        except Exception as exc:
            raise self._failure(exc) from exc
        if s.shape != h.shape:
            raise SeedRuntimeError(
                f"the seed in slot {self.slot_name!r} ({self.kernel_id}) returned shape "
                f"{tuple(s.shape)} for input {tuple(h.shape)}; a seed keeps its input's shape",
                slot=self.slot_name,
            )
        finite_in = self.check_finite and bool(torch.isfinite(h).all())
        if finite_in and not bool(torch.isfinite(s).all()):
            raise SeedRuntimeError(
                f"the seed in slot {self.slot_name!r} ({self.kernel_id}) produced non-finite "
                "values from finite input", slot=self.slot_name,
            )
        return s

    def _seed_fn(self, seed: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``seed``, or for a linear slot whose output has several leading dims, ``seed`` run on
        them flattened, ``(..., F) -> (-1, F) -> (..., F)`` (its kernel was exported for
        ``(N, F)`` with a dynamic batch)."""
        contract = self.contract
        if contract is None or contract.kind is not SlotKind.LINEAR:
            return seed

        def flat(h: torch.Tensor) -> torch.Tensor:
            if h.dim() == 2:
                return seed(h)
            return seed(h.reshape(-1, h.shape[-1])).reshape(h.shape)

        return flat

    def _failure(self, exc: Exception) -> SeedRuntimeError:
        return SeedRuntimeError(
            f"the seed in slot {self.slot_name!r} ({self.kernel_id}) raised "
            f"{type(exc).__name__}: {exc}", slot=self.slot_name,
        )

    @torch.no_grad()
    def _record(self, h: torch.Tensor) -> None:
        hf = h.float()
        self._act_stats = (
            float(hf.mean()),
            float(hf.std()) if hf.numel() > 1 else 0.0,
            float((hf == 0).float().mean()),
            bool(torch.isfinite(hf).all()),
        )

    def health(self) -> HealthSignals:
        """The slot's current health signals (gradients from the last backward pass, activation
        statistics from the last batch seen while :attr:`observe` was on)."""
        mean, std, dead, finite = self._act_stats
        return HealthSignals(
            grad_norm=_grad_norm(self.host),
            act_mean=mean,
            act_std=std,
            dead_fraction=dead,
            seed_grad_norm=_grad_norm(self.seed),
            finite=finite,
        )

    @contextmanager
    def ablated(self) -> Iterator[None]:
        """Within the block the seed contributes nothing (as at α = 0): for counterfactuals."""
        previous, self._ablated = self._ablated, True
        try:
            yield
        finally:
            self._ablated = previous

    # --- lifecycle actions: called by the trainer at step boundaries only ----------------------

    def germinate(self, blueprint: Blueprint, reason: str = "") -> None:
        """Reserve the slot for ``blueprint``; its kernel is being compiled.

        :raises BlueprintError: if the blueprint does not fit the slot's contract.
        :raises LifecycleError: unless the slot is dormant.
        """
        if self.contract is None:
            raise LifecycleError(
                f"slot {self.slot_name!r} has no shape contract; was it made by wrap()?",
                slot=self.slot_name, source=self.state, target=SeedState.GERMINATED,
            )
        blueprint.check_fits(self.contract)
        self.lifecycle.to(SeedState.GERMINATED, reason)
        self.blueprint = blueprint

    def graft(self, kernel: nn.Module, kernel_id: str, reason: str = "kernel ready") -> None:
        """Put a loaded kernel in the slot and start training it (GERMINATED → TRAINING).

        The host's output is unchanged by this (function preservation).
        """
        self.lifecycle.to(SeedState.TRAINING, reason)
        param = next(self.host.parameters(), None)
        self.seed = kernel.to(param.device) if param is not None else kernel
        self.kernel_id = kernel_id
        self.alpha = 0.0

    def replace_seed(self, kernel: nn.Module, kernel_id: str) -> None:
        """Put ``kernel`` in place of the seed now running, in the same state, α and counters
        (``graft="eager"``: the validated kernel replaces the blueprint's eager module, whose
        parameters it runs on; see :mod:`esper_async.seeds._eager`). Not a lifecycle transition.

        :raises LifecycleError: the slot holds no seed.
        """
        if self.seed is None:
            raise LifecycleError(
                f"slot {self.slot_name!r} holds no seed for kernel {kernel_id[:12]} to replace",
                slot=self.slot_name, source=self.state, target=self.state,
            )
        self.seed = kernel
        self.kernel_id = kernel_id

    def start_blending(self, steps: int, reason: str = "") -> None:
        """Begin ramping α from 0 to 1 over ``steps`` training steps (TRAINING → BLENDING)."""
        self.lifecycle.to(SeedState.BLENDING, reason)
        self.blend_steps = max(1, int(steps))
        self.alpha = 0.0

    def on_step(self) -> None:
        """Advance per-step counters and the blend ramp; enters PROBATION when α reaches 1."""
        life = self.lifecycle
        life.steps_in_state += 1
        if life.state is SeedState.BLENDING:
            self.alpha = min(1.0, life.steps_in_state / self.blend_steps)
            if self.alpha >= 1.0:
                life.to(SeedState.PROBATION, "blend complete")
                self.alpha = 1.0

    def fossilize(self, reason: str = "") -> None:
        """Keep the seed for good (PROBATION → FOSSILIZED): its output is part of the host's."""
        self.lifecycle.to(SeedState.FOSSILIZED, reason)
        self.alpha = 1.0

    def cull(self, reason: str = "") -> nn.Module | None:
        """Remove the seed (live state → CULLED) and return it so its parameters can be released.

        The slot's output is the host's alone from here on.
        """
        self.lifecycle.to(SeedState.CULLED, reason)
        seed, self.seed = self.seed, None
        self.alpha = 0.0
        self.kernel_id = None
        return seed

    def embargo(self, reason: str = "") -> None:
        """Start the cool-down after a cull (CULLED → EMBARGOED)."""
        self.lifecycle.to(SeedState.EMBARGOED, reason)
        self.blueprint = None

    def release(self, reason: str = "embargo over") -> None:
        """End the embargo (EMBARGOED → DORMANT): the slot may germinate again."""
        self.lifecycle.to(SeedState.DORMANT, reason)

    def extra_repr(self) -> str:
        bp = f", blueprint={self.blueprint.name}" if self.blueprint else ""
        return f"name={self.slot_name!r}, state={self.state.value}{bp}"
