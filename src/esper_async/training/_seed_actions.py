"""``SeedActions``: the lifecycle steps the grower takes on slots, between steps.

Decisions applied (germinate, blend, fossilize, cull, release, end a width trial), kernels grafted
when their compiles finish (at a step or an epoch boundary; with ``graft="eager"``, swapped in for
the eager module the seed trained as since its germination, see
:mod:`~esper_async.training._eager_graft`), the seeds still alive settled at the end of
training, and those still eager then recorded (:meth:`SeedActions.end_eager`). Every transition
is recorded through :meth:`~esper_async.training.RunState.transition`. It keeps no state of its
own: it acts on the :class:`~esper_async.training.Grower`'s parts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import structlog

from ..control import (
    Cull,
    Decision,
    EndWidthTrial,
    Fossilize,
    Germinate,
    GrowWidth,
    MarginController,
    Release,
    StartBlending,
)
from ..errors import CompileTimeoutError, SeedRuntimeError
from ..reliability import BreakerState, IncidentKind, is_out_of_memory
from ..seeds import EagerSeed, SeedSlot, SeedState
from ._compile_queue import Compiled
from ._eager_graft import awaits_kernel, eager_for, start_eager, swap_in_kernel
from ._optim import add_module_params, remove_module_params

if TYPE_CHECKING:
    from ._grower import Grower

__all__ = ("SeedActions",)

log = structlog.get_logger(__name__)


class SeedActions:
    """Decisions, grafts and the end-of-run settlement, applied to a grower's slots.

    :param grower: the grower it acts on.
    """

    def __init__(self, grower: Grower) -> None:
        self.grower = grower

    async def settle(self, how: Literal["judge", "cull", "keep"]) -> None:
        """Decide the seeds still alive at the end of training (without waiting for kernels:
        with ``graft="eager"`` a seed whose kernel has not arrived is judged as its eager
        module; see :meth:`await_eager_kernels`).

        :param how: ``"judge"``: a blended seed is kept if its counterfactual gain (last report)
            exceeds the controller's margin (:class:`~esper_async.control.MarginController`;
            otherwise any gain), culled otherwise, and an unblended one is culled; ``"cull"``:
            every live seed is culled; ``"keep"``: nothing changes.
        :raises ValueError: ``how`` is none of these.
        """
        g = self.grower
        if how not in ("judge", "cull", "keep"):
            raise ValueError(f"settle must be 'judge', 'cull' or 'keep', got {how!r}")
        if how == "keep":
            return
        last = g.result.history[-1] if g.result.history else None
        controller = g.controller
        margin = controller.fossilize_margin if isinstance(controller, MarginController) else 0.0
        for name, slot in g.slots.items():
            if not slot.lifecycle.live:
                continue
            cf = None if last is None else last.counterfactual.get(name)
            if (
                how == "judge"
                and slot.state is SeedState.PROBATION
                and cf is not None
                and (math.isfinite(cf.loss_with) and cf.loss_gain > margin)
            ):
                self.apply(Fossilize(name, f"settled at the end: gain {cf.loss_gain:.4f}"))
            else:
                self.apply(Cull(name, f"settled at the end ({how}) in state {slot.state.value}"))

    # --- kernels: graft when due ----------------------------------------------------------------

    def graft_ready(self) -> None:
        """Graft every kernel that finished compiling (between steps only)."""
        g = self.grower
        for done in g.compiles.ready():
            self._graft(done)

    async def graft_due(self) -> None:
        """Graft every kernel that finished, and wait for those whose seeds germinated
        ``graft_deadline_epochs`` or more epochs ago (at an epoch boundary)."""
        g = self.grower
        deadline = g.graft_deadline_epochs
        while g.compiles.open and any(
            s.state is SeedState.GERMINATED and s.lifecycle.epochs_in_state >= deadline
            for s in g.slots.values()
        ):
            # Every compile task sends exactly one message (kernel or error), so this ends.
            done = await g.compiles.receive()
            if done is not None:
                self._graft(done)

    async def await_eager_kernels(self) -> None:
        """Wait for the kernels of seeds still running as their eager module (``graft="eager"``)
        and swap them in (or cull the seeds whose compile fails): :meth:`Grower.await_kernels`,
        only when asked (the run's end does not wait), never at an epoch boundary, so decisions
        do not depend on the compile latency."""
        g = self.grower
        while g.compiles.open and any(
            awaits_kernel(s, g.compiles.pending) for s in g.slots.values()
        ):
            # Every compile task sends exactly one message (kernel or error), so this ends.
            done = await g.compiles.receive()
            if done is not None:
                self._graft(done)

    def end_eager(self) -> list[str]:
        """Record the seeds that end the run as their eager module (their kernel had not
        arrived; its compile is cancelled with the pool): an ``ended_eager`` incident each and
        their slots in :attr:`FitResult.ended_eager <esper_async.FitResult.ended_eager>`.

        :returns: the slots' names.
        """
        g = self.grower
        ended = [name for name, slot in g.slots.items() if isinstance(slot.seed, EagerSeed)]
        for name in ended:
            slot = g.slots[name]
            why = (
                "the run ended before its kernel compiled (the compile is cancelled)"
                if name in g.compiles.pending
                else "no kernel came for it (a failed compile has its compile_failed incident)"
            )
            g.incident(
                IncidentKind.ENDED_EAGER,
                slot,
                f"{why}: the seed ({slot.state.value}) ends as its blueprint's eager module, the "
                "validator's reference",
            )
        g.result.ended_eager = ended
        return ended

    def _graft(self, done: Compiled) -> None:
        g = self.grower
        slot = g.slots[done.slot]
        eager = eager_for(slot, done.blueprint)  # graft="eager": the slot runs its eager module
        if eager is None and (
            slot.state is not SeedState.GERMINATED or slot.blueprint != done.blueprint
        ):
            return  # the slot moved on (e.g. culled) while the kernel compiled
        breaker = g.breakers[done.blueprint.id]
        if done.module is None or done.kernel is None:
            breaker.record_failure(str(done.error))
            if eager is not None and not slot.lifecycle.live:  # a fossil cannot be culled
                detail = (
                    f"{done.error}; the fossil keeps its eager module (the validator's reference)"
                )
                g.incident(IncidentKind.COMPILE_FAILED, slot, detail, done.blueprint)
                return
            if isinstance(done.error, CompileTimeoutError):
                g.incident(IncidentKind.COMPILE_TIMEOUT, slot, str(done.error), done.blueprint)
                self.cull(slot, f"compile timed out: {done.error}", release=True)
            else:
                g.incident(IncidentKind.COMPILE_FAILED, slot, str(done.error), done.blueprint)
                self.cull(slot, f"compile failed: {done.error}")
            return
        try:
            if eager is not None:  # the kernel takes over the eager module's parameters
                swap_in_kernel(slot, eager, done.module, done.kernel.kernel_id)
            else:
                g.run.transition(slot, slot.graft, done.module, done.kernel.kernel_id)
                add_module_params(g.optimizer, done.module)
        except SeedRuntimeError as exc:  # a kernel that does not fit its eager module
            breaker.record_failure(str(exc))
            g.seed_failed(exc)  # culled, with its incident
            return
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            g.seed_failed(SeedRuntimeError(f"grafting: {exc}", slot=slot.slot_name), exc)
            return
        g.run.kernels[done.kernel.kernel_id] = done.kernel
        g.faults.grafted()
        if breaker.state is not BreakerState.CLOSED:
            breaker.record_success()  # the half-open trial went through
        g.restored()

    # --- decisions, applied between steps -------------------------------------------------------

    def apply(self, decision: Decision) -> None:
        """Apply one decision now (between steps).

        :raises ValueError: a :class:`GrowWidth` (it runs in :meth:`decide`).
        """
        g = self.grower
        slot = g.slots[decision.slot]
        match decision:
            case Germinate(blueprint=blueprint, reason=reason):
                refusal = g.faults.paused(g.epoch) or g.compiles.refusal(blueprint)
                if refusal is not None:
                    g.incident(IncidentKind.GERMINATION_REFUSED, slot, refusal, blueprint)
                    return
                g.run.transition(slot, slot.germinate, blueprint, reason)
                if g.graft == "eager":  # train at once as the blueprint's eager module
                    start_eager(
                        slot,
                        seed=g.seed,
                        device=g.device,
                        optimizer=g.optimizer,
                        tracked=g.run.transition,
                    )
                    g.rewrap()
                g.compiles.submit(slot)
            case StartBlending(epochs=epochs, reason=reason):
                g.run.transition(slot, slot.start_blending, epochs * g.run.steps_per_epoch, reason)
            case Fossilize(reason=reason):
                g.run.transition(slot, slot.fossilize, reason)
                if g.surgeon.policy is not None:
                    g.surgeon.policy.record_fossilized(g.surgeon.module_path(slot))
            case Cull(reason=reason):
                self.cull(slot, reason)
            case Release(reason=reason):
                g.run.transition(slot, slot.release, reason)
            case EndWidthTrial(reason=reason):
                if g.width_trials.pop(decision.slot, None) is not None:
                    log.info("width trial ended", slot=decision.slot, reason=reason, epoch=g.epoch)
            case GrowWidth():
                raise ValueError(
                    f"GrowWidth({decision.slot!r}) is surgery: it runs in end_epoch (it needs a "
                    "validation batch and a transaction), not through Grower.apply"
                )

    def cull(self, slot: SeedSlot, reason: str, *, release: bool = False) -> None:
        """Cull ``slot``'s seed and embargo the slot (``release``: free it again at once)."""
        g = self.grower
        seed = g.run.transition(slot, slot.cull, reason)
        if seed is not None:
            remove_module_params(g.optimizer, seed)
            g.rewrap()
        g.run.transition(slot, slot.embargo, "cooling down after cull")
        if release:
            g.run.transition(
                slot,
                slot.release,
                "nothing was grafted; the blueprint's breaker decides when it is tried again",
            )
        g.compiles.admission.set_loaded(g.loaded_bytes())
