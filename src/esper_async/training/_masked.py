"""``MaskedStep``: an optimizer step that takes effect only where a device-side verdict allows it,
with no host read.

A lagged verdict (see :mod:`esper_async.training._verdict`) is a 0-dim bool tensor on the device:
the host does not know it when it launches the step. The update must then be a no-op on a bad
step, parameters *and* optimizer state (moments, step counters), without the host looking:

* **fused Adam / AdamW** (``fused=True``): the optimizer's own ``found_inf`` input, the one
  ``GradScaler`` uses. The fused kernel skips the update and the step counters are put back, on
  the device;
* **any other optimizer**: its parameters and tensor state are copied before the step, and put
  back with ``torch.where(apply, new, old)`` after it. State kept on the host while the
  parameters are on a GPU (non-capturable Adam's ``step`` counters) cannot be chosen on the
  device: its pre-step values are returned to the caller, who restores them when it reads a bad
  verdict (:meth:`HostUndo.restore`).

A step that would *create* optimizer state (the first step of a parameter: after the start or a
graft) cannot be undone by copying; the generic path reads the verdict on the host for that one
step (fused Adam's lazily made state is zeros with its counter put back, so it needs no read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ("HostUndo", "MaskedStep")

_FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


@dataclass
class HostUndo:
    """Host-resident optimizer state as it was before one masked step (see the module doc)."""

    saved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def restore(self) -> None:
        """Put the saved values back (the step's verdict was bad)."""
        for tensor, old in self.saved:
            tensor.copy_(old)


class MaskedStep:
    """``optimizer.step()`` gated by a device-side verdict.

    :param optimizer: the optimizer to step (its groups may change between steps: grafts, culls).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        # The parameters themselves, not their ids: a culled seed's freed parameter could hand
        # its id to a new one, whose first step would then look like a step of an old one.
        self._layout: tuple[tuple[torch.Tensor, tuple[str, ...]], ...] | None = None
        #: Steps whose verdict had to be read on the host (state being created), for tests.
        self.host_reads = 0

    @property
    def uses_found_inf(self) -> bool:
        """Whether the optimizer masks its own update (fused Adam / AdamW)."""
        opt = self.optimizer
        return isinstance(opt, _FOUND_INF_OPTIMIZERS) and all(
            g.get("fused") for g in opt.param_groups
        )

    def step(self, apply: torch.Tensor) -> HostUndo:
        """Step the optimizer where ``apply`` (0-dim bool, on the parameters' device) is true.

        :param apply: the verdict; on false, parameters and optimizer state are left exactly as
            they were (host-resident state: see the returned undo).
        :returns: what to restore on the host if the verdict turns out bad.
        """
        if self.uses_found_inf:
            return self._found_inf_step(apply)
        return self._generic_step(apply)

    def _found_inf_step(self, apply: torch.Tensor) -> HostUndo:
        opt = self.optimizer
        opt.found_inf = (~apply).to(torch.float32)  # type: ignore[attr-defined]
        opt.grad_scale = None  # type: ignore[attr-defined]
        try:
            opt.step()
        finally:
            del opt.found_inf  # type: ignore[attr-defined]
            del opt.grad_scale  # type: ignore[attr-defined]
        return HostUndo()

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _layout_now(
        self, params: list[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, tuple[str, ...]], ...]:
        state = self.optimizer.state
        return tuple(
            (p, tuple(sorted(k for k, v in state.get(p, {}).items()
                             if isinstance(v, torch.Tensor))))
            for p in params if p.grad is not None
        )

    def _same_layout(self, layout: tuple[tuple[torch.Tensor, tuple[str, ...]], ...]) -> bool:
        old = self._layout
        if old is None or len(old) != len(layout):
            return False
        return all(p is q and keys == old_keys
                   for (p, keys), (q, old_keys) in zip(layout, old, strict=True))

    def _generic_step(self, apply: torch.Tensor) -> HostUndo:
        opt = self.optimizer
        params = self._params()
        layout = self._layout_now(params)
        if not self._same_layout(layout):
            # This step may create state that copying cannot undo: read the verdict (rare).
            self.host_reads += 1
            if bool(apply):
                opt.step()
            self._layout = self._layout_now(params)
            return HostUndo()
        device = apply.device
        on_device: list[torch.Tensor] = []
        undo = HostUndo()
        for p in params:
            on_device.append(p.data)
            for value in opt.state.get(p, {}).values():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.device == device or value.device.type == device.type == "cpu":
                    on_device.append(value)
                else:
                    undo.saved.append((value, value.clone()))
        before = [t.clone() for t in on_device]
        opt.step()
        for tensor, old in zip(on_device, before, strict=True):
            tensor.copy_(torch.where(apply, tensor, old))
        return undo
