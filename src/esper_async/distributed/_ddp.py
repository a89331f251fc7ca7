"""DDP for a model whose structure changes: a wrapper built at the next step, not at the change.

The trainer re-applies its ``wrap_model`` after every graft and cull, because DDP captures the
parameter set (and its gradient buckets) when it is built. :func:`ddp_wrapper` returns a
``wrap_model`` whose wrapper defers building ``DistributedDataParallel`` to its first forward
call, i.e. to the first training step after the change. So DDP is rebuilt once per step boundary
however many grafts and culls happened there, and it is built when every rank has applied all of
them, whatever order its kernels arrived in. (Building DDP is a collective that checks every
rank holds parameters of the same shapes: built eagerly after the first of two grafts, it would
fail on a rank that received the other kernel first.)

Dormant slots hold no parameters, so they cost no gradient traffic; every grafted seed's
parameters receive a gradient at every step (a TRAINING seed through ``s - s.detach()``), so
``find_unused_parameters`` can stay off.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ("DeferredDDP", "ddp_wrapper")

log = structlog.get_logger(__name__)


class DeferredDDP(nn.Module):
    """Wraps ``module`` in ``DistributedDataParallel`` at its first forward call.

    :param module: the model (already on its device).
    :param on_build: called with this wrapper right after DDP was built (e.g. to time when a
        graft became live on this rank).
    :param ddp_options: ``DistributedDataParallel`` keyword arguments.
    :ivar built_at: ``time.time()`` when DDP was built, or ``None`` before the first step.
    """

    _ddp: DistributedDataParallel | None

    def __init__(
        self,
        module: nn.Module,
        *,
        on_build: Callable[[DeferredDDP], None] | None = None,
        **ddp_options: Any,
    ) -> None:
        super().__init__()
        self.module = module
        self._options = ddp_options
        self._on_build = on_build
        # Not a registered sub-module: `module` is registered once, above.
        object.__setattr__(self, "_ddp", None)
        self.built_at: float | None = None

    @property
    def ddp(self) -> DistributedDataParallel | None:
        """The DDP module, once built."""
        return self._ddp

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ddp = self._ddp
        if ddp is None:
            device_ids = self._options.get("device_ids")
            if device_ids:
                # Training steps run in worker threads, and the current CUDA device is per thread.
                torch.cuda.set_device(device_ids[0])
            ddp = DistributedDataParallel(self.module, **self._options)
            object.__setattr__(self, "_ddp", ddp)
            self.built_at = time.time()
            log.debug(
                "distributed.ddp_built",
                params=sum(p.numel() for p in self.module.parameters() if p.requires_grad),
            )
            if self._on_build is not None:
                self._on_build(self)
        return ddp(*args, **kwargs)


def ddp_wrapper(
    *,
    device_ids: list[int] | None = None,
    on_build: Callable[[DeferredDDP], None] | None = None,
    **ddp_options: Any,
) -> Callable[[nn.Module], nn.Module]:
    """A ``wrap_model`` for :class:`~esper_async.Trainer`: DDP, rebuilt at the step after every
    structure change.

    Example::

        trainer = Trainer(model, wrap_model=ddp_wrapper(device_ids=[ctx.local_rank]), ...)

    :param device_ids: ``[local_rank]`` on a GPU; ``None`` on the CPU.
    :param on_build: see :class:`DeferredDDP`.
    :param ddp_options: further ``DistributedDataParallel`` keyword arguments.
    """

    def wrap(module: nn.Module) -> nn.Module:
        return DeferredDDP(module, on_build=on_build, device_ids=device_ids, **ddp_options)

    return wrap
