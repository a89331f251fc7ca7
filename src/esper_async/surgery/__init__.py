"""Runtime architecture modification with validation and exact rollback (the surgeon).

Operations (:class:`InsertAfter`, :class:`RemoveLayer`, :class:`Widen`, :class:`AddResidual`,
:class:`AddSkip`, :class:`FxRewire`, :class:`WidenSlot`) are staged in a
:class:`SurgeryTransaction` opened by :meth:`ModelSurgeon.transaction`, validated against a probe
batch and committed, or rolled back bitwise.
:class:`SurgeryPolicy` proposes widenings for the controller.

Host growth (grow the host itself toward the size a user would train; each is a
:class:`SurgeryOperation` staged in :meth:`ModelSurgeon.transaction`, carries Adam/AdamW state and
is recorded for replay on resume by :func:`operation_record` / :func:`replay_operations`):

* ``StackBlocks(blocks="blocks", factor=2, mode="whole" | "interleave", indices=None)`` — depth:
  copy the trained blocks of a ``ModuleList``/``Sequential`` ``factor`` times (G_stack); not
  function-preserving.
* ``InsertIdentityBlocks(blocks="blocks", after=(-1,), factory=None, zero=None)`` — depth: insert
  blocks whose residual output projections start at zero (function-preserving).
* ``WidenResidual(width, seed=0, embedding=None, head_dim=None, grow_heads=False)`` — a
  transformer's residual width ``d_model``: embeddings, position tables, LayerNorm/RMSNorm,
  attention (more heads of the same size), GELU or gated MLPs, tied or untied head
  (function-preserving).
* ``WidenChannels(target, width, seed=0)`` — a CNN's channels across a residual stage (every
  conv, batch norm and consumer coupled through residual additions; function-preserving).
* ``WidenGated(gate, up, width, seed=0)`` — a gated MLP's hidden width: gate and up projections
  together, one unit map (function-preserving).

What cannot be grown safely raises :class:`GrowthCouplingError` (a :class:`SurgeryError`) naming
the module and the reason. :func:`operation_from_record` rebuilds an operator from its record (rank
0 decides and broadcasts the record under DDP). See ``docs/surgery.md``, "Host growth".

A :class:`GrowthSchedule` applies host growth on a schedule (:class:`GrowthStage`: at a step,
a token count or a loss plateau) with :class:`GrowthLR`'s learning rate after growth.
"""

from __future__ import annotations

from ._context import SurgeryContext as SurgeryContext
from ._conv_width import WidenChannels as WidenChannels
from ._fx import AddSkip as AddSkip
from ._fx import FxRewire as FxRewire
from ._gated_width import WidenGated as WidenGated
from ._host_common import GrowthCouplingError as GrowthCouplingError
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
from ._replay import operation_from_record as operation_from_record
from ._replay import operation_record as operation_record
from ._replay import replay_operations as replay_operations
from ._residual_width import WidenResidual as WidenResidual
from ._schedule import GrowthLR as GrowthLR
from ._schedule import GrowthSchedule as GrowthSchedule
from ._schedule import GrowthStage as GrowthStage
from ._schedule import HostGrowthEvent as HostGrowthEvent
from ._schedule import Plateau as Plateau
from ._stack import InsertIdentityBlocks as InsertIdentityBlocks
from ._stack import StackBlocks as StackBlocks
from ._transaction import ModelSurgeon as ModelSurgeon
from ._transaction import SurgeryTransaction as SurgeryTransaction
from ._validation import RegionCheck as RegionCheck
from ._validation import SurgeryBudget as SurgeryBudget
from ._validation import SurgeryReport as SurgeryReport
from ._validation import SurgeryValidationConfig as SurgeryValidationConfig
from ._widen import Widen as Widen
from ._widen_slot import CoupledWidthError as CoupledWidthError
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
    "CoupledWidthError",
    "FxRewire",
    "GatedResidual",
    "GatedShortcut",
    "GrowthCouplingError",
    "GrowthLR",
    "GrowthSchedule",
    "GrowthStage",
    "HostGrowthEvent",
    "InsertAfter",
    "InsertIdentityBlocks",
    "ModelSurgeon",
    "Plateau",
    "RegionCheck",
    "RemoveLayer",
    "SkipAround",
    "StackBlocks",
    "SurgeryBudget",
    "SurgeryContext",
    "SurgeryOperation",
    "SurgeryPolicy",
    "SurgeryPolicyConfig",
    "SurgeryReport",
    "SurgeryTransaction",
    "SurgeryValidationConfig",
    "Widen",
    "WidenChannels",
    "WidenGated",
    "WidenResidual",
    "WidenSlot",
    "WidthSignal",
    "capture_width_signal",
    "find_slot_consumers",
    "identity_conv2d",
    "identity_linear",
    "operation_from_record",
    "operation_record",
    "replay_operations",
    "unit_shares",
)
