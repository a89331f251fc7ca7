"""The seed layer: slots in a host model, their lifecycle and blending, and side streams."""

from ._eager import EAGER_PREFIX as EAGER_PREFIX
from ._eager import EagerSeed as EagerSeed
from ._eager import adopt_parameters as adopt_parameters
from ._eager import eager_seed as eager_seed
from ._export import export_model as export_model
from ._export import export_program as export_program
from ._lifecycle import LIVE_STATES as LIVE_STATES
from ._lifecycle import TRANSITIONS as TRANSITIONS
from ._lifecycle import Lifecycle as Lifecycle
from ._lifecycle import SeedState as SeedState
from ._side_streams import SideStreams as SideStreams
from ._side_streams import enable_side_streams as enable_side_streams
from ._slot import HealthSignals as HealthSignals
from ._slot import SeedSlot as SeedSlot
from ._slot import UnitMap as UnitMap
from ._wrap import find_slots as find_slots
from ._wrap import wrap as wrap

__all__ = (
    "EAGER_PREFIX",
    "LIVE_STATES",
    "TRANSITIONS",
    "EagerSeed",
    "HealthSignals",
    "Lifecycle",
    "SeedSlot",
    "SeedState",
    "SideStreams",
    "UnitMap",
    "adopt_parameters",
    "eager_seed",
    "enable_side_streams",
    "export_model",
    "export_program",
    "find_slots",
    "wrap",
)
