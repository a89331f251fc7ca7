"""``enable_side_streams``: lend CUDA side streams to a model's seed slots (see ``_streams``)."""

from __future__ import annotations

from typing import Any

import structlog
import torch
from torch import nn

from ..errors import StreamError
from ._wrap import find_slots

__all__ = ("SideStreams", "enable_side_streams")

log = structlog.get_logger(__name__)


class SideStreams:
    """Side streams lent to the slots of one model; made by :func:`enable_side_streams`.

    A context manager: leaving it takes the streams back (the slots run their seeds inline again).

    :ivar streams: the streams, in the order they were lent.
    :ivar slots: names of the slots that got one.
    """

    def __init__(self, slots: dict[str, Any], streams: list[torch.cuda.Stream]) -> None:
        self._slots = slots
        self.streams = streams
        self.slots = tuple(slots)

    def join(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for all work queued on the side
        streams so far. Cheap (an event per stream); call it before reading seed gradients
        outside ``backward()`` or before bridging a step's completion."""
        target = stream if stream is not None else torch.cuda.current_stream()
        for side in self.streams:
            target.wait_stream(side)

    def close(self) -> None:
        """Take the streams back from the slots (after joining them)."""
        if self.streams:
            self.join()
        for slot in self._slots.values():
            slot.side_stream = None
        self._slots = {}

    def __enter__(self) -> SideStreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_side_streams(
    model: nn.Module, *, streams: int | None = None, device: torch.device | str | None = None
) -> SideStreams:
    """Give each seed slot of ``model`` a CUDA side stream on which a TRAINING seed runs.

    :param model: a model with :class:`~esper_async.SeedSlot` s (made by ``wrap``).
    :param streams: how many streams to share among the slots (round robin); default one per
        slot. Seeds sharing a stream run one after another on it.
    :param device: the CUDA device; default the device of the model's first parameter.
    :returns: the lent streams (see :class:`SideStreams`).
    :raises StreamError: if CUDA is not available or the model is not on a CUDA device.
    :raises ValueError: if ``streams`` is less than 1.
    """
    if streams is not None and streams < 1:
        raise ValueError(f"streams must be at least 1, got {streams}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise StreamError(f"side streams need a CUDA device, the model is on {device}; "
                          "on a CPU seeds run inline", device=device)
    slots = find_slots(model)
    count = len(slots) if streams is None else min(streams, max(1, len(slots)))
    pool = [torch.cuda.Stream(device=device) for _ in range(count)]
    for i, slot in enumerate(slots.values()):
        slot.side_stream = pool[i % count]
    log.debug("side streams enabled", slots=len(slots), streams=count, device=str(device))
    return SideStreams(dict(slots), pool)
