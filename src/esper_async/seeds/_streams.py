"""Side streams for seeds in TRAINING.

A seed in TRAINING does not change its slot's output (the output is exactly
``h``), so its forward and backward need not hold up the host. With a side stream set on the slot
(:func:`enable_side_streams`), :func:`train_beside` runs the seed on that stream: the side stream
waits for ``h`` (``wait_stream``), ``h`` is marked as used there (``record_stream``) so the
caching allocator cannot hand its memory to the main stream while the seed still reads it, and
the slot's output is a copy of ``h`` made on the main stream, tied to the seed's output by
:class:`_SideBranch`. In backward, autograd runs the seed's backward on the stream its forward ran
on, after an event that makes the side stream wait for ``dL/dh``; at the end of ``backward()``
autograd makes the caller's stream wait for every stream that accumulated a leaf gradient, so
``optimizer.step()`` on the main stream sees the seed's gradients. :meth:`SideStreams.join`
makes that join explicit for code that reads gradients another way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ("train_beside",)


class _SideBranch(torch.autograd.Function):
    """``out = h`` in value, with the gradient of ``out`` also sent to ``s`` (the seed's output),
    as in ``h + (s - s.detach())``, but without reading ``s``: the main stream never waits for
    the seed in forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, s: torch.Tensor, stream: Any) -> torch.Tensor:
        ctx.stream = stream
        # A copy, not h itself: the seed reads h on the side stream, so an in-place op
        # downstream (ReLU(inplace=True)) must not write into it.
        return h.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.stream is not None and grad.is_cuda:
            # grad is made on this (main) stream and read by the seed's backward on the side
            # stream: keep the allocator from reusing it before the side stream is done.
            grad.record_stream(ctx.stream)
        return grad, grad, None


def train_beside(
    seed: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, stream: torch.cuda.Stream | None
) -> torch.Tensor:
    """The output of a slot whose seed is in TRAINING, with the seed run on ``stream``.

    Equal in value to ``h``; the seed learns from the gradient of the output as if it were
    blended (as ``h + (s - s.detach())`` with ``s = seed(h.detach())``), and gradients of the
    host are those of the plain path. With ``stream=None`` (or a CPU tensor) nothing changes
    streams, which lets the autograd part be checked on a CPU.

    :param seed: the seed (a module or function), shape ``(N, *S) -> (N, *S)``.
    :param h: the host's output, ``(N, *S)``.
    :param stream: the side stream, on ``h``'s device.
    :returns: a new tensor equal to ``h``.
    """
    if stream is None or not h.is_cuda:
        return _SideBranch.apply(h, seed(h.detach()), None)
    stream.wait_stream(torch.cuda.current_stream(h.device))
    with torch.cuda.stream(stream):
        s = seed(h.detach())
    h.record_stream(stream)
    return _SideBranch.apply(h, s, stream)
