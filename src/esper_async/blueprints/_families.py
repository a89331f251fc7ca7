"""The registry of blueprint families: their option schemas and the modules they build.

A family is a small, reviewed piece of code that turns options and a slot contract into an
``nn.Module`` mapping the host's output ``h`` to a tensor of the same shape. Its last layer starts
at zero where it has one, so a fresh seed contributes nothing until it has learned something.

The convolutional families act along the channel dim of ``(N, C, *spatial)`` for one, two or three
spatial dims: they build ``Conv1d``, ``Conv2d`` or ``Conv3d`` from the rank of the slot's
contract (a "3×3" conv is 3 wide along each spatial dim). The linear families map ``(N, F)``; a
slot runs them on any ``(..., F)`` flattened to ``(-1, F)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..errors import BlueprintError
from ._checks import check_name, clip_repr, clip_text
from ._contract import SlotContract, SlotKind

if TYPE_CHECKING:
    from ._ir import Blueprint

__all__ = ("Family", "Option", "families", "get_family", "register_family", "resolve_options")


@dataclass(frozen=True)
class Option:
    """One option of a family: its type, default and allowed range or choices."""

    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None

    def check(self, family: str, key: str, value: Any) -> Any:
        """``value`` if it fits this option (an int is taken for a float option).

        :param family: the family's name, for the message.
        :param key: the option's name, for the message.
        :param value: the value given (already frozen: a scalar or a tuple).
        :raises BlueprintError: if it has the wrong type (``bool`` is not an int), is not one of
            the choices, or lies out of range.
        """
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is int and isinstance(value, bool)):
            raise BlueprintError(
                f"{family}: option {key!r} must be {self.type.__name__}, got {clip_repr(value)}",
                blueprint=family,
            )
        if self.choices is not None and value not in self.choices:
            raise BlueprintError(
                f"{family}: option {key!r} must be one of "
                f"{clip_text(repr(list(self.choices)), 120)}, got {clip_repr(value)}",
                blueprint=family,
            )
        number = cast(float, value)  # an int or float: the type check above passed
        if (self.low is not None and number < self.low) or (
            self.high is not None and number > self.high
        ):
            raise BlueprintError(
                f"{family}: option {key!r} must lie in [{self.low}, {self.high}], "
                f"got {clip_repr(value)}",
                blueprint=family,
            )
        return value


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class Family:
    """A registered blueprint family.

    :param name: the registry name.
    :param slot_kind: the kind of slot it fits.
    :param options: its option schema.
    :param builder: ``builder(contract, **options) -> nn.Module``.
    :param doc: one line for listings.
    """

    name: str
    slot_kind: SlotKind
    options: Mapping[str, Option]
    builder: Builder
    doc: str = ""
    min_channels: int = field(default=1)

    def check(self, options: Mapping[str, Any], contract: SlotContract, bp: Blueprint) -> None:
        """Check that ``bp`` (of this family) can be built for a slot with ``contract``.

        :raises BlueprintError: if the slot's kind differs, a conv slot has not 1 to 3 spatial
            dims, or it has too few channels.
        """
        name = clip_text(bp.name)
        if contract.kind is not self.slot_kind:
            raise BlueprintError(
                f"{name} fits {self.slot_kind.value} slots, but the slot is "
                f"{contract.kind.value} with shape {contract.shape}",
                blueprint=bp.name,
            )
        if contract.kind is SlotKind.CONV and not 2 <= len(contract.shape) <= 4:
            raise BlueprintError(
                f"{name} needs a conv slot of shape (C, *spatial) with 1 to 3 spatial dims, the "
                f"slot has {contract.shape}",
                blueprint=bp.name,
            )
        if contract.channels < self.min_channels:
            raise BlueprintError(
                f"{name} needs at least {self.min_channels} channels, the slot has "
                f"{contract.channels}",
                blueprint=bp.name,
            )


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family to the registry (an extension point for user blueprints).

    :param family: the family; its name is a non-empty string of at most 64 characters.
    :raises BlueprintError: if the name is malformed or a family of that name is registered.
    """
    check_name(family.name, "a blueprint family's name")
    if family.name in _REGISTRY:
        raise BlueprintError(f"a blueprint family named {family.name!r} is already registered")
    _REGISTRY[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family, by name."""
    return dict(_REGISTRY)


def get_family(name: str) -> Family:
    """Look up a family by name.

    :raises BlueprintError: naming the registered families, if there is none called ``name``.
    """
    family = _REGISTRY.get(name) if isinstance(name, str) else None
    if family is None:
        registered = clip_text(", ".join(sorted(_REGISTRY)), 240)
        raise BlueprintError(
            f"unknown blueprint family {clip_repr(name)}; registered: {registered}",
            blueprint=clip_text(str(name)) if isinstance(name, str) else None,
        )
    return family


def resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``options`` against family ``name``'s schema and fill in defaults.

    :raises BlueprintError: if the family is unknown, or an option is unknown or does not fit.
    """
    family = get_family(name)
    unknown = sorted(set(options) - set(family.options))
    if unknown:
        raise BlueprintError(
            f"{name}: unknown option(s) {clip_repr(unknown, 120)}; valid options: "
            f"{clip_text(repr(sorted(family.options)), 160)}",
            blueprint=name,
        )
    resolved = {}
    for key, spec in family.options.items():
        resolved[key] = spec.check(name, key, options[key]) if key in options else spec.default
    return resolved


def _groups(channels: int, most: int = 4) -> int:
    """The largest group count up to ``most`` that divides ``channels`` (for GroupNorm)."""
    return max(g for g in range(1, most + 1) if channels % g == 0)


def _zero(layer: nn.Module) -> nn.Module:
    """Zero a layer's weight and bias so the seed starts as the zero function."""
    for p in layer.parameters():
        nn.init.zeros_(p)
    return layer


# --- convolutional families: (N, C, *spatial) -> (N, C, *spatial), 1 to 3 spatial dims ----------

_CONVS: dict[int, type[nn.Conv1d | nn.Conv2d | nn.Conv3d]] = {
    1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d,
}


def _conv_type(contract: SlotContract) -> type[nn.Conv1d | nn.Conv2d | nn.Conv3d]:
    """``Conv1d``, ``Conv2d`` or ``Conv3d``, for the spatial rank of a conv slot's contract.

    :raises BlueprintError: if the contract has no 1 to 3 spatial dimensions.
    """
    conv = _CONVS.get(len(contract.shape) - 1)
    if conv is None:
        raise BlueprintError(
            f"a conv family needs a slot shape (C, *spatial) with 1 to 3 spatial dims, got "
            f"{contract.shape}"
        )
    return conv


def _spatial_rank(contract: SlotContract) -> int:
    """The number of spatial dims of a conv slot, 1 to 3 (checked as by :func:`_conv_type`)."""
    _conv_type(contract)
    return len(contract.shape) - 1


class _ResidualConv(nn.Module):
    def __init__(self, conv: type[nn.Module], c: int, kernel_size: int, expansion: int) -> None:
        super().__init__()
        hidden = c * expansion
        pad = kernel_size // 2
        self.conv1 = conv(c, hidden, kernel_size, padding=pad, bias=False)
        self.norm = nn.GroupNorm(_groups(hidden), hidden)
        self.conv2 = _zero(conv(hidden, c, kernel_size, padding=pad))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(h))))


class _DepthwiseSeparable(nn.Module):
    def __init__(self, conv: type[nn.Module], c: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise = conv(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = nn.GroupNorm(_groups(c), c)
        self.pointwise = _zero(conv(c, c, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.pointwise(torch.relu(self.norm(self.depthwise(h))))


class _Bottleneck(nn.Module):
    def __init__(self, conv: type[nn.Module], c: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, c // reduction)
        self.down = conv(c, hidden, 1)
        self.mid = conv(hidden, hidden, 3, padding=1)
        self.up = _zero(conv(hidden, c, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.mid(torch.relu(self.down(h)))))


class _SqueezeExcitation(nn.Module):
    def __init__(self, c: int, reduction: int, spatial: int) -> None:
        super().__init__()
        hidden = max(1, c // reduction)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = _zero(nn.Linear(hidden, c))
        self.spatial_dims = tuple(range(2, 2 + spatial))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # tanh of a zero-initialised gate: the seed starts as the zero function and learns to
        # rescale channels up or down, which sigmoid gating (always positive) could not express.
        gate = torch.tanh(self.fc2(torch.relu(self.fc1(h.mean(dim=self.spatial_dims)))))
        return h * gate.reshape(*gate.shape, *(1 for _ in self.spatial_dims))


class _ConvNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(c), c)
        nn.init.zeros_(self.norm.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


def _projection(conv: type[nn.Module], c: int) -> nn.Module:
    return _zero(conv(c, c, 1))


# --- linear families: (N, F) -> (N, F) (a slot runs them on (..., F) flattened) ---------------


class _LowRank(nn.Module):
    def __init__(self, f: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(f, min(rank, f), bias=False)
        self.up = _zero(nn.Linear(min(rank, f), f, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class _MLP(nn.Module):
    def __init__(self, f: int, hidden_mult: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(f, f * hidden_mult)
        self.fc2 = _zero(nn.Linear(f * hidden_mult, f))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(h)))


class _GatedMLP(nn.Module):
    def __init__(self, f: int, hidden_mult: int) -> None:
        super().__init__()
        hidden = f * hidden_mult
        self.gate = nn.Linear(f, hidden, bias=False)
        self.value = nn.Linear(f, hidden, bias=False)
        self.out = _zero(nn.Linear(hidden, f, bias=False))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(nn.functional.silu(self.gate(h)) * self.value(h))


class _LinearNorm(nn.Module):
    def __init__(self, f: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(f)
        nn.init.zeros_(self.norm.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


_ODD_KERNELS = (1, 3, 5, 7)
_C = SlotKind.CONV
_L = SlotKind.LINEAR

for _family in (
    Family(
        "residual_conv",
        _C,
        {"kernel_size": Option(int, 3, choices=_ODD_KERNELS), "expansion": Option(int, 1, 1, 4)},
        lambda c, kernel_size, expansion: _ResidualConv(
            _conv_type(c), c.channels, kernel_size, expansion
        ),
        "conv-norm-relu-conv residual branch",
    ),
    Family(
        "depthwise_separable",
        _C,
        {"kernel_size": Option(int, 3, choices=_ODD_KERNELS)},
        lambda c, kernel_size: _DepthwiseSeparable(_conv_type(c), c.channels, kernel_size),
        "depthwise k×k conv, norm, pointwise 1×1",
    ),
    Family(
        "bottleneck",
        _C,
        {"reduction": Option(int, 2, 1, 16)},
        lambda c, reduction: _Bottleneck(_conv_type(c), c.channels, reduction),
        "1×1 down, 3×3, 1×1 up",
    ),
    Family(
        "squeeze_excitation",
        _C,
        {"reduction": Option(int, 4, 1, 64)},
        lambda c, reduction: _SqueezeExcitation(c.channels, reduction, _spatial_rank(c)),
        "channel gating from pooled statistics",
    ),
    Family("conv_norm", _C, {}, lambda c: _ConvNorm(c.channels), "group normalisation branch"),
    Family(
        "projection_1x1", _C, {}, lambda c: _projection(_conv_type(c), c.channels),
        "1×1 channel mixing",
    ),
    Family(
        "low_rank",
        _L,
        {"rank": Option(int, 4, 1, 4096)},
        lambda c, rank: _LowRank(c.channels, rank),
        "low-rank adapter (down, up)",
    ),
    Family(
        "mlp",
        _L,
        {"hidden_mult": Option(int, 2, 1, 8)},
        lambda c, hidden_mult: _MLP(c.channels, hidden_mult),
        "two-layer GELU MLP",
    ),
    Family(
        "gated_mlp",
        _L,
        {"hidden_mult": Option(int, 2, 1, 8)},
        lambda c, hidden_mult: _GatedMLP(c.channels, hidden_mult),
        "SwiGLU-style gated MLP",
    ),
    Family("linear_norm", _L, {}, lambda c: _LinearNorm(c.channels), "layer normalisation branch"),
):
    register_family(_family)

del _family
