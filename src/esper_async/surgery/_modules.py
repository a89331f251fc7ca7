"""Small modules surgery inserts: identity-initialised layers, zero-gated residuals and shortcuts.

Each is built so that, at the moment it is inserted, the host computes exactly what it computed
before (function preservation): identity weights, or a learnable gate that starts at zero.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = (
    "GatedResidual",
    "GatedShortcut",
    "SkipAround",
    "identity_conv2d",
    "identity_linear",
    "shortcut_for",
)


def identity_linear(features: int, *, bias: bool = True) -> nn.Linear:
    """A ``features → features`` Linear that starts as the identity map.

    :param features: input and output width.
    :param bias: whether it has a (zero) bias.
    """
    # Built on the meta device: the default random initialisation would be overwritten at once.
    layer = nn.Linear(features, features, bias=bias, device="meta")
    layer.weight = nn.Parameter(torch.eye(features))
    if bias:
        layer.bias = nn.Parameter(torch.zeros(features))
    return layer


def identity_conv2d(channels: int, kernel_size: int = 3, *, bias: bool = True) -> nn.Conv2d:
    """A ``channels → channels`` Conv2d (odd kernel, same padding) that starts as the identity
    (Dirac).

    :param channels: input and output channels.
    :param kernel_size: an odd kernel size.
    :raises SurgeryError: the kernel size is even (no centred Dirac kernel exists).
    """
    if kernel_size % 2 == 0:
        raise SurgeryError(
            f"identity_conv2d needs an odd kernel size, got {kernel_size}",
            operation="identity_conv2d",
        )
    # Built on the meta device: the default random initialisation (several milliseconds for a
    # 256-channel 3x3 conv) would be overwritten at once. The Dirac kernel is set by one indexed
    # write instead of ``nn.init.dirac_``'s per-channel loop.
    layer = nn.Conv2d(
        channels, channels, kernel_size, padding=kernel_size // 2, bias=bias, device="meta"
    )
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    units, centre = torch.arange(channels), kernel_size // 2
    weight[units, units, centre, centre] = 1.0
    layer.weight = nn.Parameter(weight)
    if bias:
        layer.bias = nn.Parameter(torch.zeros(channels))
    return layer


def _zero_gate(like: torch.Tensor | None) -> nn.Parameter:
    """A one-element zero parameter on ``like``'s device and dtype (default: CPU float32)."""
    if like is None:
        return nn.Parameter(torch.zeros(1))
    return nn.Parameter(torch.zeros(1, device=like.device, dtype=like.dtype))


class GatedResidual(nn.Module):
    """``x + gate * block(x)`` with ``gate`` starting at zero: a block inserted without changing the
    output.

    :param block: a module mapping ``x`` to a tensor of ``x``'s shape.
    :param like: a tensor whose device and dtype the gate takes.
    """

    def __init__(self, block: nn.Module, *, like: torch.Tensor | None = None) -> None:
        super().__init__()
        self.block = block
        self.gate = _zero_gate(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.block(x)


class SkipAround(nn.Module):
    """``body(x) + gate * shortcut(x)`` with ``gate`` starting at zero: a residual added around
    ``body``.

    :param body: the existing module.
    :param shortcut: maps ``x`` to ``body(x)``'s shape (an identity or a projection).
    :param like: a tensor whose device and dtype the gate takes.
    """

    def __init__(
        self, body: nn.Module, shortcut: nn.Module, *, like: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.gate = _zero_gate(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.gate * self.shortcut(x)


class GatedShortcut(nn.Module):
    """``gate * shortcut(x)`` with ``gate`` starting at zero; the fx skip adds this to a later
    output.

    :param shortcut: maps the source activation to the destination's shape.
    :param like: a tensor whose device and dtype the gate takes.
    """

    def __init__(self, shortcut: nn.Module, *, like: torch.Tensor | None = None) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.gate = _zero_gate(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate * self.shortcut(x)


def shortcut_for(
    source: torch.Size, target: torch.Size, *, operation: str, force_projection: bool = False
) -> nn.Module:
    """A module mapping activations of shape ``source`` to shape ``target``.

    Identity where the shapes agree; a Linear for ``(N, F)`` activations; a strided 1x1 Conv2d for
    ``(N, C, H, W)`` activations whose spatial size shrinks by a whole factor.

    :param source: the input activation's shape (batch first).
    :param target: the output activation's shape.
    :param operation: the operation's description, for the error.
    :param force_projection: build a projection even where an identity would do.
    :raises SurgeryError: no such simple map exists between the shapes.
    """
    if source == target and not force_projection:
        return nn.Identity()
    if len(source) == 2 and len(target) == 2 and source[0] == target[0]:
        return nn.Linear(source[1], target[1])
    if len(source) == 4 and len(target) == 4 and source[0] == target[0]:
        (_, c_in, h_in, w_in), (_, c_out, h_out, w_out) = source, target
        if h_out and w_out and h_in % h_out == 0 and w_in % w_out == 0:
            stride_h, stride_w = h_in // h_out, w_in // w_out
            if stride_h == stride_w:
                return nn.Conv2d(c_in, c_out, 1, stride=stride_h)
    raise SurgeryError(
        f"{operation}: incompatible shapes {tuple(source)} → {tuple(target)}: no identity, Linear "
        "or strided 1x1 Conv2d maps one to the other",
        operation=operation,
    )
