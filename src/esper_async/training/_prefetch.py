"""Input overlap: the next batch is copied to the device while the current step runs.

On a GPU, :func:`prefetched` pins each batch's host tensors (unless the loader already did:
``DataLoader(pin_memory=True)``) and queues its copy on a copy stream, one batch ahead, so the
copy runs beside the step that is on the device; the step's stream waits for the copy's event
before it reads the batch (:func:`wait_ready`). On a CPU batches are moved as they come (a no-op
for CPU tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ._task import Task, map_tensors

__all__ = ("Ready", "prefetched", "wait_ready")

#: What a prefetched batch waits for: the event closing its copy, and the copy's stream.
Ready = tuple[torch.cuda.Event, torch.cuda.Stream] | None


def _pin(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_pinned():
        return t.pin_memory()
    return t


def prefetched(
    loader: Iterable[Any], task: Task, device: torch.device
) -> Iterator[tuple[Any, Ready]]:
    """``loader``'s batches on ``device``, each copied while the step before it runs.

    :param loader: host batches.
    :param task: moves a batch (:meth:`Task.to_device`).
    :param device: the training device.
    :returns: ``(batch, ready)`` pairs; pass ``ready`` to :func:`wait_ready` in the step.
    """
    if device.type != "cuda":
        for batch in loader:
            yield task.to_device(batch, device), None
        return
    stream = torch.cuda.Stream(device=device)
    ahead: tuple[Any, Ready] | None = None
    for batch in loader:
        with torch.cuda.stream(stream):
            moved = task.to_device(map_tensors(batch, _pin), device)
            event = torch.cuda.Event()
            event.record(stream)
        if ahead is not None:
            yield ahead
        ahead = (moved, (event, stream))
    if ahead is not None:
        yield ahead


def wait_ready(batch: Any, ready: Ready) -> None:
    """Make the current stream wait for ``batch``'s copy, and keep the allocator from reusing its
    memory before the current stream is done with it. Call in the step, before using ``batch``.

    :param batch: a batch from :func:`prefetched`.
    :param ready: its ``ready``.
    """
    if ready is None:
        return
    event, _ = ready
    current = torch.cuda.current_stream()
    current.wait_event(event)

    def keep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            t.record_stream(current)
        return t

    map_tensors(batch, keep)
