"""Runtime architecture modification with validation and exact rollback (the surgeon).

Operations (:class:`InsertAfter`, :class:`RemoveLayer`, :class:`Widen`, :class:`AddResidual`,
:class:`AddSkip`, :class:`FxRewire`, :class:`WidenSlot`) are staged in a
:class:`SurgeryTransaction` opened by :meth:`ModelSurgeon.transaction`, validated against a probe
batch and committed, or rolled back bitwise.
:class:`SurgeryPolicy` proposes widenings for the controller.
"""

from __future__ import annotations

from ._context import SurgeryContext as SurgeryContext
from ._fx import AddSkip as AddSkip
from ._fx import FxRewire as FxRewire
from ._modules import GatedResidual as GatedResidual
from ._modules import GatedShortcut as GatedShortcut
from ._modules import SkipAround as SkipAround
from ._modules import identity_conv2d as identity_conv2d
from ._modules import identity_linear as identity_linear
from ._operations import AddResidual as AddResidual
from ._operations import InsertAfter as InsertAfter
from ._operations import RemoveLayer as RemoveLayer
from ._operations import SurgeryOperation as SurgeryOperation
from ._policy import SurgeryPolicy as SurgeryPolicy
from ._policy import SurgeryPolicyConfig as SurgeryPolicyConfig
from ._replay import operation_record as operation_record
from ._replay import replay_operations as replay_operations
from ._transaction import ModelSurgeon as ModelSurgeon
from ._transaction import SurgeryTransaction as SurgeryTransaction
from ._validation import RegionCheck as RegionCheck
from ._validation import SurgeryBudget as SurgeryBudget
from ._validation import SurgeryReport as SurgeryReport
from ._validation import SurgeryValidationConfig as SurgeryValidationConfig
from ._widen import Widen as Widen
from ._widen_slot import WidenSlot as WidenSlot
from ._widen_slot import find_slot_consumers as find_slot_consumers
from ._width_init import WIDTH_INITS as WIDTH_INITS
from ._width_init import ZERO_FANOUT as ZERO_FANOUT
from ._width_init import WidthSignal as WidthSignal
from ._width_init import unit_shares as unit_shares
from ._width_signal import capture_width_signal as capture_width_signal

__all__ = (
    "WIDTH_INITS",
    "ZERO_FANOUT",
    "AddResidual",
    "AddSkip",
    "FxRewire",
    "GatedResidual",
    "GatedShortcut",
    "InsertAfter",
    "ModelSurgeon",
    "RegionCheck",
    "RemoveLayer",
    "SkipAround",
    "SurgeryBudget",
    "SurgeryContext",
    "SurgeryOperation",
    "SurgeryPolicy",
    "SurgeryPolicyConfig",
    "SurgeryReport",
    "SurgeryTransaction",
    "SurgeryValidationConfig",
    "Widen",
    "WidenSlot",
    "WidthSignal",
    "capture_width_signal",
    "find_slot_consumers",
    "identity_conv2d",
    "identity_linear",
    "operation_record",
    "replay_operations",
    "unit_shares",
)
