"""The controller's optional extras, declared: what the grower uses when a controller has it.

:class:`~esper_async.control.Controller` (``decide``) is all a controller must have. A controller
may also be:

* :class:`StatefulController`: its statistics go into checkpoints (``state_dict`` /
  ``load_state_dict``), through :meth:`esper_async.training.Grower.state_dict`;
* :class:`WidthController`: told how each :class:`~esper_async.control.GrowWidth` it decided
  went (``widened``);
* :class:`MarginController`: its ``fossilize_margin`` is the gain
  :meth:`esper_async.training.Grower.settle` asks of a seed it keeps (otherwise any gain).

The grower checks these with ``isinstance`` (they are runtime-checkable), never with ``getattr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ("MarginController", "StatefulController", "WidthController")


@runtime_checkable
class StatefulController(Protocol):
    """A controller whose statistics are checkpointed."""

    def state_dict(self) -> dict[str, Any]:
        """Its state, JSON-ready or of tensors."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


@runtime_checkable
class WidthController(Protocol):
    """A controller told how each width growth it decided went."""

    def widened(
        self, slot: str, *, committed: bool, params_added: int = 0, flops_added: int = 0
    ) -> None:
        """The widening of ``slot``'s host was ``committed`` (with what it added) or refused."""
        ...


@runtime_checkable
class MarginController(Protocol):
    """A controller that names the gain a seed must show to be kept."""

    @property
    def fossilize_margin(self) -> float:
        """Validation-loss gain a seed must show to be kept."""
        ...
