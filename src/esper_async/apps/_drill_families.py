"""A blueprint family for fault drills, registered when this module is imported.

``drill_slow`` is a low-rank adapter for linear slots whose build first sleeps ``delay_ms``:
its compiles are slow on purpose, so a drill can kill a worker mid-compile or run a compile past
its timeout. ``variant`` only changes the blueprint's identity, so every drill compile can be a
store miss (a real compile). Compile workers import this module through
``BlueprintCompiler(imports=[...])``.
"""

from __future__ import annotations

import time

from torch import nn

from ..blueprints import Family, Option, SlotContract, SlotKind, register_family
from ..blueprints import LowRank as _LowRank
from ..errors import BlueprintError

__all__ = ("DRILL_FAMILY",)

DRILL_FAMILY = "drill_slow"
"""The family's registry name."""


def _build(contract: SlotContract, delay_ms: int, variant: int) -> nn.Module:
    time.sleep(delay_ms / 1000.0)
    return _LowRank(contract.channels, 2)


try:
    register_family(
        Family(
            DRILL_FAMILY, SlotKind.LINEAR,
            {"delay_ms": Option(int, 0, 0, 3_600_000), "variant": Option(int, 0, 0, 2**31 - 1)},
            _build, "fault drills: a low-rank adapter whose build sleeps first",
        )
    )
except BlueprintError:
    pass  # already registered in this process
