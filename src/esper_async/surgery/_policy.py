"""A small policy that turns seed outcomes into surgery proposals for the controller.

Rule: a host layer whose seeds keep fossilizing is short of capacity, so widen it. "Keep
fossilizing" means at least ``fossil_threshold`` fossilizations at that layer within the last
``window_steps`` steps (since its last widening). Limits: a layer never grows past ``max_growth`` x
the width it had when the policy first saw it, no proposal comes within ``cooldown_steps`` of the
last surgery (committed or rejected), and at most ``max_operations`` proposals are committed in all.

A layer may be a plain Linear/Conv2d (proposed as :class:`Widen`) or a seed slot (proposed as
:class:`WidenSlot`, which widens the slot's host). A slot holds one seed and FOSSILIZED is terminal,
so a slot fossilizes at most once: for slots only ``fossil_threshold=1`` (the default) can fire,
and each fossil buys the slot one widening (its count is reset by the proposal's outcome).

The step counter is injected (``step=lambda: trainer.step``), so tests drive it by hand. The
policy's counts travel in checkpoints (:meth:`SurgeryPolicy.state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from torch import nn

from ..errors import SurgeryError
from ..seeds import SeedSlot
from ._widen import Widen
from ._widen_slot import WidenSlot

__all__ = ("SurgeryPolicy", "SurgeryPolicyConfig")

#: What the policy proposes: a plain layer's widening, or a seed slot host's.
_Proposal = Widen | WidenSlot

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SurgeryPolicyConfig:
    """Limits of :class:`SurgeryPolicy`.

    :param fossil_threshold: fossilizations at one layer that trigger a widening proposal (a seed
        slot fossilizes at most once, so only 1 can fire for slots).
    :param window_steps: only fossilizations this recent count (``None``: all since the last
        widening).
    :param growth_factor: each widening multiplies the width by this (at least +1 unit).
    :param max_growth: a layer's width never exceeds this multiple of its first-seen width.
    :param cooldown_steps: steps after any surgery (committed or rejected) before the next proposal.
    :param max_operations: most committed widenings in all (``None``: no limit).
    :raises SurgeryError: a limit is out of range.
    """

    fossil_threshold: int = 1
    window_steps: int | None = None
    growth_factor: float = 1.5
    max_growth: float = 2.0
    cooldown_steps: int = 100
    max_operations: int | None = None

    def __post_init__(self) -> None:
        if self.fossil_threshold < 1 or self.growth_factor <= 1.0 or self.max_growth < 1.0:
            raise SurgeryError(
                "SurgeryPolicyConfig needs fossil_threshold >= 1, growth_factor > 1 and "
                "max_growth >= 1",
                operation="policy",
            )
        if self.cooldown_steps < 0 or (self.window_steps is not None and self.window_steps < 1):
            raise SurgeryError(
                "SurgeryPolicyConfig needs cooldown_steps >= 0 and window_steps >= 1",
                operation="policy",
            )


class SurgeryPolicy:
    """Proposes :class:`Widen` (or, for seed slots, :class:`WidenSlot`) operations for layers
    whose seeds keep fossilizing.

    :param config: the limits.
    :param step: returns the current training step (injected; monotone).
    """

    def __init__(self, config: SurgeryPolicyConfig, *, step: Callable[[], int]) -> None:
        self.config = config
        self._step = step
        self._fossils: dict[str, list[int]] = {}
        self._base_width: dict[str, int] = {}
        self._last_surgery: int | None = None
        self._committed = 0

    def record_fossilized(self, layer: str) -> None:
        """Note that a seed attached to host layer ``layer`` (a dotted module name) fossilized."""
        self._fossils.setdefault(layer, []).append(self._step())

    def fossil_count(self, layer: str) -> int:
        """Fossilizations at ``layer`` that count towards a proposal now."""
        now, window = self._step(), self.config.window_steps
        return sum(1 for s in self._fossils.get(layer, []) if window is None or now - s < window)

    def propose(self, model: nn.Module) -> _Proposal | None:
        """The widening to attempt now, or ``None``.

        :param model: the live model (read only: current widths).
        """
        now = self._step()
        limit = self.config.max_operations
        if limit is not None and self._committed >= limit:
            return None
        if self._last_surgery is not None and now - self._last_surgery < self.config.cooldown_steps:
            return None
        ranked = sorted(self._fossils, key=lambda layer: (-self.fossil_count(layer), layer))
        for layer in ranked:
            if self.fossil_count(layer) < self.config.fossil_threshold:
                break
            width = _width(model, layer)
            if width is None:
                continue
            base = self._base_width.setdefault(layer, width)
            cap = math.floor(base * self.config.max_growth)
            target = min(cap, max(width + 1, math.ceil(width * self.config.growth_factor)))
            if target > width:
                if isinstance(model.get_submodule(layer), SeedSlot):
                    return WidenSlot(layer, target, seed=now)
                return Widen(layer, target, seed=now)
        return None

    def committed(self, operation: _Proposal) -> None:
        """The proposal was committed: reset the layer's count and start the cooldown."""
        self._committed += 1
        self._after(operation, "committed")

    def rejected(self, operation: _Proposal) -> None:
        """The proposal was rolled back: reset the layer's count and start the cooldown anyway."""
        self._after(operation, "rejected")

    def _after(self, operation: _Proposal, outcome: str) -> None:
        self._last_surgery = self._step()
        self._fossils.pop(operation.target, None)
        _log.info("surgery.policy", layer=operation.target, width=operation.width, outcome=outcome)

    def state_dict(self) -> dict[str, Any]:
        """The policy's counts (plain data), for checkpoints."""
        return {
            "fossils": {layer: list(steps) for layer, steps in self._fossils.items()},
            "base_width": dict(self._base_width),
            "last_surgery": self._last_surgery,
            "committed": self._committed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._fossils = {str(k): [int(s) for s in v] for k, v in state["fossils"].items()}
        self._base_width = {str(k): int(v) for k, v in state["base_width"].items()}
        last = state["last_surgery"]
        self._last_surgery = None if last is None else int(last)
        self._committed = int(state["committed"])


def _width(model: nn.Module, layer: str) -> int | None:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return None
    if isinstance(module, SeedSlot):
        module = module.host
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.out_channels
    return None
