"""The standard blueprint library: the designs the controller offers for each kind of slot."""

from __future__ import annotations

from ._contract import SlotKind
from ._ir import Blueprint

__all__ = ("library",)


def library(kind: SlotKind | str | None = None) -> tuple[Blueprint, ...]:
    """The standard blueprints, optionally only those for one kind of slot.

    Conv slots get 7 designs, linear slots 5, token slots 6; each is a :class:`Blueprint` with
    explicit options, so its id is stable across releases that keep the same defaults.
    """
    designs = (
        Blueprint("residual_conv", {"kernel_size": 3, "expansion": 1}),
        Blueprint("depthwise_separable", {"kernel_size": 3}),
        Blueprint("bottleneck", {"reduction": 2}),
        Blueprint("squeeze_excitation", {"reduction": 4}),
        Blueprint("conv_norm"),
        Blueprint("projection_1x1"),
        Blueprint("residual_conv", {"kernel_size": 3, "expansion": 2}),
        Blueprint("low_rank", {"rank": 4}),
        Blueprint("mlp", {"hidden_mult": 2}),
        Blueprint("gated_mlp", {"hidden_mult": 2}),
        Blueprint("linear_norm"),
        Blueprint("mlp", {"hidden_mult": 4}),
        Blueprint("lora", {"rank": 4}),
        Blueprint("mlp_expand", {"expansion": 2, "norm": True}),
        Blueprint("attn_heads", {"heads": 2, "head_dim": 16}),
        Blueprint("block", {"heads": 2, "head_dim": 16, "expansion": 2}),
        Blueprint("norm", {"eps": 1e-5}),
        Blueprint("lora", {"rank": 16}),
    )
    if kind is None:
        return designs
    wanted = SlotKind(kind)
    return tuple(bp for bp in designs if bp.slot_kind is wanted)
