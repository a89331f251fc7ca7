"""The options a :class:`~esper_async.training.Grower` checks as it is built: the graft mode
(``"auto"`` resolved), the graft deadline, the surgery policy's threshold, the width slots."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..control import Controller, HeuristicController
from ..errors import ControllerConfigError
from ..seeds import SeedSlot

__all__ = (
    "DEFAULT_DEADLINE",
    "Graft",
    "check_options",
    "check_width_slots",
    "model_device",
    "resolve_graft",
)

#: ``graft_deadline_epochs`` with ``graft="step"`` when none is given.
DEFAULT_DEADLINE = 2
#: The graft modes a grower takes (``"auto"`` resolves to ``"eager"`` or ``"epoch"``).
_GRAFTS = ("auto", "epoch", "step", "eager")
Graft = Literal["auto", "epoch", "step", "eager"]
#: A graft mode in use (``"auto"`` resolved).
GraftMode = Literal["epoch", "step", "eager"]


def resolve_graft(graft: Graft, *, consensus: bool) -> GraftMode:
    """``graft`` with ``"auto"`` resolved: ``"eager"``, or ``"epoch"`` where kernels must land
    at the same step on every rank (a consensus loss, or one rank of several).

    :raises ValueError: ``"eager"`` under a consensus loss.
    """
    mode: GraftMode = (
        ("epoch" if consensus or _several_ranks() else "eager") if graft == "auto" else graft
    )
    if mode == "eager" and consensus:
        raise ValueError(
            "graft='eager' swaps each kernel in when it arrives, at a different step on each "
            "rank (DDP is rebuilt then); under data parallelism use graft='epoch'"
        )
    return mode


def _several_ranks() -> bool:
    """Whether this process is one rank of several (``torch.distributed`` initialised): ranks
    whose kernels land at different steps would rebuild DDP out of step."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def check_options(graft: str, deadline: int | None, surgery: Any) -> None:
    """:raises ValueError: an unknown graft mode, a deadline without ``graft="step"`` or below
    1, or a surgery policy whose fossil threshold can never be reached."""
    if graft not in _GRAFTS:
        raise ValueError(f"graft must be 'auto', 'epoch', 'step' or 'eager', got {graft!r}")
    if graft != "step" and deadline is not None:
        raise ValueError(
            f"graft_deadline_epochs applies to graft='step' only (graft={graft!r}: 'epoch' "
            "grafts at the first epoch boundary after germination, 'eager' and 'auto' never "
            "wait for a kernel); drop it or use graft='step'"
        )
    if deadline is not None and deadline < 1:
        raise ValueError(f"graft_deadline_epochs must be at least 1, got {deadline}")
    if surgery is not None and surgery.config.fossil_threshold > 1:
        raise ValueError(
            f"surgery fossil_threshold={surgery.config.fossil_threshold} can never be reached: "
            "fossils are reported per seed slot, and a slot fossilizes at most once; "
            "use fossil_threshold=1"
        )


def check_width_slots(controller: Controller, slots: dict[str, SeedSlot]) -> None:
    """:raises ControllerConfigError: the controller's ``width_slots`` name a slot the model
    lacks."""
    if not isinstance(controller, HeuristicController):
        return
    unknown = [n for n in controller.config.width_slots or () if n not in slots]
    if unknown:
        raise ControllerConfigError(
            f"ControllerConfig.width_slots names {unknown}, which the model has no slot for; "
            f"its slots are {sorted(slots)} (wrap the host with those targets or fix the names)"
        )
