"""``ReliabilityConfig``: how the trainer survives faults, in one place."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ._backoff import Backoff
from ._breaker import BreakerConfig
from ._governor import GovernorConfig
from ._limits import ResourceLimits

__all__ = ("ReliabilityConfig",)


@dataclass(frozen=True)
class ReliabilityConfig:
    """The trainer's fault handling.

    :ivar breaker: per-blueprint circuit breakers (failures: compile errors, runtime faults, OOM).
    :ivar compile_attempts: tries of one compile whose workers died (the compiler itself also
        retries once on a fresh worker within each try).
    :ivar backoff: jittered delays between those tries.
    :ivar limits: bounds on compiles in flight and loaded kernel bytes.
    :ivar governor: loss judgement, snapshots and the rollback budget.
    :ivar oom_backoff_epochs: after an out-of-memory, no germination for this many epochs
        (doubled on each further OOM, up to ``oom_backoff_max_epochs``).
    :ivar oom_backoff_max_epochs: the cap of that pause.
    :ivar checkpoint_keep: checkpoints kept on disk.
    :ivar max_epochs_without_steps: this many epochs in a row in which every step was dropped
        stop the run with :class:`~esper_async.reliability.GovernorError`.
    :ivar clock: monotonic seconds for the breakers (injectable in tests).
    :ivar verdict: how a step's loss is judged. ``"sync"``: read on the host before the backward
        pass (one device sync per step); ``"lagged"``: judged on the device, the update masked
        there, the verdict read ``verdict_lag`` steps later (no sync on the hot path; see
        ``docs/reliability.md``); ``"auto"`` (default): lagged on a GPU with a fused Adam or AdamW
        (the trainer's default optimizer there), sync otherwise: on a CPU (where a host read
        costs nothing), under data parallelism (the ranks agree on each step), and with other
        optimizers (whose masked step copies their state, and may keep some on the host).
    :ivar verdict_lag: with lagged verdicts, the steps launched before a step's verdict is read.
    :ivar launch: where a lagged GPU step is launched. ``"thread"`` (default): in a worker
        thread, so the event loop stays free during the launch (its loop lag stays within a few
        milliseconds); ``"loop"``: on the event loop's own thread, between its other tasks: no
        thread hop and no contention for the GIL, for steps whose host time to launch is what
        bounds them (small models, bf16), at the price of a loop busy for each launch (its
        loop-lag figure shows it). A lagged step never waits on the device, so the loop is held
        for the launch only. Steps judged on the host (``verdict="sync"``, a CPU) always run in
        a worker thread. Measured: ``docs/async.md``.
    """

    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    compile_attempts: int = 3
    backoff: Backoff = field(default_factory=lambda: Backoff(base_s=0.5, cap_s=10.0))
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    governor: GovernorConfig = field(default_factory=GovernorConfig)
    oom_backoff_epochs: int = 1
    oom_backoff_max_epochs: int = 16
    checkpoint_keep: int = 2
    max_epochs_without_steps: int = 2
    clock: Callable[[], float] = time.monotonic
    verdict: Literal["auto", "sync", "lagged"] = "auto"
    verdict_lag: int = 1
    launch: Literal["thread", "loop"] = "thread"

    def __post_init__(self) -> None:
        if (
            self.compile_attempts < 1 or self.oom_backoff_epochs < 0 or self.checkpoint_keep < 1
            or self.max_epochs_without_steps < 1
        ):
            raise ValueError(
                "compile_attempts, checkpoint_keep and max_epochs_without_steps must be >= 1 and "
                "oom_backoff_epochs >= 0"
            )
        if self.verdict not in ("auto", "sync", "lagged"):
            raise ValueError(f"verdict must be 'auto', 'sync' or 'lagged', got {self.verdict!r}")
        if self.launch not in ("thread", "loop"):
            raise ValueError(f"launch must be 'thread' or 'loop', got {self.launch!r}")
        if self.verdict_lag < 1:
            raise ValueError(f"verdict_lag must be at least 1 step, got {self.verdict_lag}")
