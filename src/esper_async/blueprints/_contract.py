"""Slot contracts: the shape and dtype of the tensor a seed slot carries, and its kind."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import BlueprintError
from ._checks import DTYPES, MAX_SLOT_SIZE, clip_repr, is_int

__all__ = ("SlotContract", "SlotKind")


class SlotKind(StrEnum):
    """The kind of host module a slot wraps, and so the layout of the tensors a seed sees."""

    CONV = "conv"
    """Per-sample shape ``(C, *spatial)`` with 1 to 3 spatial dims: the output of a Conv1d,
    Conv2d or Conv3d, or of a convolutional block."""
    LINEAR = "linear"
    """Per-sample shape ``(F,)``: the output of a Linear layer or an MLP block."""
    TOKEN = "token"
    """Per-token shape ``(D,)``: a sequence model's sublayer output ``(N, T, D)``. The seed sees
    the whole sequence: its input and output are ``(N, T, D)`` with ``N`` and ``T`` dynamic."""


@dataclass(frozen=True)
class SlotContract:
    """What a seed in a slot receives and must return.

    A seed reads the host module's output ``h`` and returns a tensor of the same shape, which the
    slot adds to ``h`` scaled by the blending factor α. Shapes exclude the batch dimension, and
    for a token slot the sequence dimension too (see :meth:`batch_shape`).

    :param kind: the slot's kind.
    :param shape: the per-sample (per-token for a token slot) shape of the host's output, e.g.
        ``(16, 8, 8)`` or ``(64,)``.
    :param dtype: the dtype of that output, by name: one of ``float32`` (default), ``float64``,
        ``float16``, ``bfloat16``.
    :raises BlueprintError: if the kind is unknown, the shape is not a tuple of ints (``bool`` is
        not an int) of the kind's rank, each in ``[1, 2**20]``, or the dtype is not one of those.
    """

    kind: SlotKind
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        kind = self.kind
        if not isinstance(kind, str) or kind not in tuple(SlotKind):
            raise BlueprintError(
                f"a slot kind must be one of {', '.join(k.value for k in SlotKind)}, got "
                f"{clip_repr(kind)}"
            )
        kind = SlotKind(kind)
        ranks = (2, 3, 4) if kind is SlotKind.CONV else (1,)
        shape = self.shape
        if (
            not isinstance(shape, tuple | list)
            or len(shape) not in ranks
            or not all(is_int(s) and 1 <= s <= MAX_SLOT_SIZE for s in shape)
        ):
            raise BlueprintError(
                f"a {kind.value} slot needs a per-sample shape of rank "
                f"{' to '.join(map(str, sorted({ranks[0], ranks[-1]})))}: a tuple of ints in "
                f"[1, {MAX_SLOT_SIZE}], got {clip_repr(shape)}"
            )
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise BlueprintError(
                f"a slot's dtype must be one of {', '.join(DTYPES)}, got {clip_repr(self.dtype)}"
            )
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "dtype", str(self.dtype))

    @property
    def channels(self) -> int:
        """Channels (conv) or features (linear, token): the first per-sample dimension."""
        return self.shape[0]

    @property
    def leading_dims(self) -> int:
        """How many dynamic dimensions come before :attr:`shape`: 2 (``N, T``) for a token slot,
        else 1 (``N``)."""
        return 2 if self.kind is SlotKind.TOKEN else 1

    def batch_shape(self, batch: int, tokens: int = 3) -> tuple[int, ...]:
        """The full shape of a batch a seed in this slot receives and returns.

        :param batch: ``N``.
        :param tokens: ``T``, the sequence length; used by token slots only.
        :returns: ``(batch, tokens, *shape)`` for a token slot, else ``(batch, *shape)``.
        """
        if self.kind is SlotKind.TOKEN:
            return (batch, tokens, *self.shape)
        return (batch, *self.shape)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready form, the inverse of :meth:`from_json`."""
        return {"kind": self.kind.value, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SlotContract:
        """Read a contract written by :meth:`to_json`.

        :param data: a mapping with ``kind``, ``shape`` and optionally ``dtype``, nothing else.
        :raises BlueprintError: if it is not such a mapping, or not a valid contract.
        """
        if not isinstance(data, Mapping):
            raise BlueprintError(
                f"a slot contract's JSON must be an object, got {type(data).__name__}"
            )
        unknown = [k for k in data if k not in ("kind", "shape", "dtype")]
        if unknown or "kind" not in data or "shape" not in data:
            raise BlueprintError(
                "a slot contract's JSON needs 'kind' and 'shape' (and optionally 'dtype') and "
                f"nothing else, got keys {clip_repr(list(data))}"
            )
        return cls(data["kind"], data["shape"], data.get("dtype", "float32"))
