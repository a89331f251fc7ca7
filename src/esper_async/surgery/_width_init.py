"""How a widening initialises its new units: Net2Wider replicas, zero fan-out (random or GradMax
fan-in), or a half/half split with noise.

Every mode preserves the model's function at birth:

* ``"net2wider"`` — each new unit replicates a random old unit (rows copied), and each consumer
  column is split among a unit's replicas with random fractions that sum to one (see
  :mod:`._widen`).
* ``"zero_fanout"`` — each new unit's outgoing weights in every consumer are **zero**, so it adds
  nothing to the output whatever its fan-in; its fan-in rows are random, scaled to the mean norm
  of the layer's existing rows, its bias is zero, and a batch norm's new channel starts fresh
  (weight 1, bias 0, running mean 0, running variance 1).
* ``"gradmax"`` — zero fan-out as above, with the fan-in chosen to maximise the gradient the new
  fan-out weights receive (Evci et al. 2022, "GradMax"). With a new unit's activation linearised,
  ``a = w·x``, the gradient of the loss w.r.t. its fan-out weights in a consumer is ``M w``,
  where ``M`` is the gradient of the loss w.r.t. a map straight from the producer's input to the
  consumer's output (``Σ_n g_n x_nᵀ`` for Linear layers, the same through the patches of a
  conv): the new rows are the top right singular vectors of ``M`` (every consumer's ``M``
  stacked), scaled like ``"zero_fanout"``'s, each oriented so that its mean pre-activation on the
  batch is not negative. ``M`` needs a real batch: :func:`capture_width_signal` records the
  producer's input and the gradients at every consumer's output, without writing any ``.grad``.
  Batch norms between producer and consumer are left out of ``M`` (the linearisation).
* ``"split_noise"`` — each new unit splits a random old unit: its fan-in is copied exactly, and
  the consumer columns of the unit's ``c`` copies are ``V/c`` plus noise (10 % of ``|V/c|``,
  Gaussian) centred over the copies, so their sum is still ``V``: the function is exact and the
  copies get different gradients from the first step. (Noise on the fan-in, as Firefly adds,
  would change the function at the activation's kink; it is put in the fan-out split instead.)

Optimizer state: zero fan-out modes give new rows, new batch-norm entries and new consumer
columns empty moments (zeros); the split modes carry them as Net2Wider does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import SurgeryError

__all__ = ("WIDTH_INITS", "WidthInit", "WidthSignal", "check_init")

WidthInit = Literal["net2wider", "zero_fanout", "gradmax", "split_noise"]
#: Every width initialisation, in the order of the module docstring.
WIDTH_INITS: tuple[str, ...] = get_args(WidthInit)
#: Initialisations whose new units have zero fan-out (and fresh fan-in).
ZERO_FANOUT = frozenset({"zero_fanout", "gradmax"})
#: Relative size of ``"split_noise"``'s fan-out noise.
_SPLIT_NOISE = 0.1


@dataclass(frozen=True, eq=False)
class WidthSignal:
    """What GradMax reads from one real batch: the producer's input and the gradient of the loss
    at each consumer's output.

    :ivar target: the widening's target (a layer, or a seed slot).
    :ivar inputs: the producer's input, detached.
    :ivar grads: per consumer path, ``∂loss/∂(consumer output)``, detached.
    """

    target: str
    inputs: torch.Tensor
    grads: Mapping[str, torch.Tensor]


def check_init(init: str, operation: str) -> None:
    """:raises SurgeryError: ``init`` is not one of :data:`WIDTH_INITS`."""
    if init not in WIDTH_INITS:
        raise SurgeryError(
            f"{operation}: unknown init {init!r}; use one of {', '.join(WIDTH_INITS)}",
            operation=operation,
        )


# --- fan-in of new units ---------------------------------------------------------------------


def _basis(producer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The producer's input in "one channel per fan-in weight" form: ``(N, d)`` (Linear, leading
    dims flattened) or ``(N, d, H', W')`` (conv patches), so that a new unit with fan-in ``w``
    has pre-activation ``Σ_i w_i · basis[:, i]``."""
    if isinstance(producer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    assert isinstance(producer, nn.Conv2d)
    if producer.padding_mode != "zeros" or isinstance(producer.padding, str):
        raise SurgeryError(  # unfold pads with zeros, by explicit amounts only
            f"init='gradmax' on a Conv2d needs explicit zero padding, not "
            f"padding={producer.padding!r}, padding_mode={producer.padding_mode!r}; use "
            "init='zero_fanout'",
            operation="gradmax",
        )
    patches = F.unfold(x, producer.kernel_size, producer.dilation, producer.padding,
                       producer.stride)
    n, d, _ = patches.shape
    size = [
        (x.shape[2 + i] + 2 * producer.padding[i] - producer.dilation[i]
         * (producer.kernel_size[i] - 1) - 1) // producer.stride[i] + 1
        for i in range(2)
    ]
    return patches.reshape(n, d, *size)


def _gradient_map(
    basis: torch.Tensor, consumer: nn.Module, grad: torch.Tensor, block: int
) -> torch.Tensor:
    """``M`` (rows: the consumer's fan-out weights of one new unit, columns: fan-in weights):
    the gradient those fan-out weights get is ``M w`` for a new unit of fan-in ``w``."""
    d = basis.shape[1]
    if isinstance(consumer, nn.Conv2d):
        weight = conv2d_weight(
            basis, (consumer.out_channels, d, *consumer.kernel_size), grad,
            consumer.stride, consumer.padding, consumer.dilation,
        )
        return weight.permute(0, 2, 3, 1).reshape(-1, d)
    g = grad.reshape(-1, grad.shape[-1])
    if block == 1:  # Linear after Linear
        return g.t() @ basis
    flat = basis.reshape(basis.shape[0], d, -1)  # Linear after a conv's flatten(1)
    return torch.einsum("no,nil->oli", g, flat).reshape(-1, d)


def new_fan_in(
    producer: nn.Module,
    count: int,
    init: str,
    *,
    seed: int,
    signal: WidthSignal | None = None,
    consumers: Sequence[tuple[nn.Module, str, int]] = (),
) -> torch.Tensor:
    """Fan-in rows of ``count`` new units of ``producer`` (shape ``(count, *weight.shape[1:])``),
    scaled to the mean norm of its existing rows.

    :param init: ``"zero_fanout"`` (random) or ``"gradmax"`` (from ``signal``).
    :param consumers: ``(layer, path, block)`` of each consumer (``"gradmax"`` only).
    """
    weight = producer.weight
    assert isinstance(weight, torch.Tensor)
    flat = weight.detach().reshape(weight.shape[0], -1).double()
    norm = flat.norm(dim=1).mean().clamp_min(1e-6)
    d = flat.shape[1]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, d, generator=generator, dtype=torch.float64)
    if init == "gradmax":
        assert signal is not None
        basis = _basis(producer, signal.inputs.to(flat.device, torch.float64))
        maps = [
            _gradient_map(basis, layer, signal.grads[path].to(flat.device, torch.float64), block)
            for layer, path, block in consumers
        ]
        _, values, vh = torch.linalg.svd(torch.cat(maps), full_matrices=False)
        top = min(count, int((values > values.max() * 1e-6).sum()) if values.numel() else 0)
        rows[:top] = vh[:top].cpu()
        pre = basis.reshape(basis.shape[0], d, -1).mean(dim=(0, 2)).cpu()  # mean pre-activation
        sign = torch.where(rows @ pre < 0, -1.0, 1.0).to(torch.float64)
        rows = rows * sign.unsqueeze(1)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm.cpu()
    return rows.to(weight.dtype).reshape(count, *weight.shape[1:]).to(weight.device)


# --- the widening itself ---------------------------------------------------------------------


def blocks(
    mapping: torch.Tensor, fractions: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit map and fractions over a flattened consumer's columns: unit ``j``'s block of
    ``block`` columns comes from unit ``g(j)``'s, all scaled by ``f_j``. Starts with
    ``arange(n·block)``, as :func:`._widen._grow` requires."""
    if block == 1:
        return mapping, fractions
    offsets = torch.arange(block, device=mapping.device)
    columns = (mapping.unsqueeze(1) * block + offsets).flatten()
    return columns, fractions.repeat_interleave(block)


def replication(
    old: int, new: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Net2Wider's unit map ``g`` (long, length ``new``: ``arange(old)`` then random old units)
    and split fractions ``f`` (float64, random, summing to 1 over each unit's replicas)."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, old, (new - old,), generator=generator)
    mapping = torch.cat([torch.arange(old), extra])
    counts = torch.bincount(mapping, minlength=old)
    shares = torch.empty(new, dtype=torch.float64).uniform_(0.5, 1.5, generator=generator)
    shares = torch.where(counts[mapping] > 1, shares, torch.ones_like(shares))
    totals = torch.zeros(old, dtype=torch.float64).index_add_(0, mapping, shares)
    return mapping.to(device), (shares / totals[mapping]).to(device)


def unit_shares(
    old: int, new: int, seed: int, init: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit map ``g`` and the fractions ``f`` of each new unit's share of its source's
    fan-out: Net2Wider's random fractions, ``1/c`` for ``"split_noise"``, and 1 (old units) or 0
    (new ones) for the zero fan-out modes. ``g`` is the same for every mode."""
    mapping, fractions = replication(old, new, seed, device)
    if init in ZERO_FANOUT:
        fractions = (torch.arange(new, device=device) < old).to(torch.float64)
    elif init == "split_noise":
        counts = torch.bincount(mapping, minlength=old).to(torch.float64)
        fractions = 1.0 / counts[mapping]
    return mapping, fractions


def zero_new(state: dict[str, Any] | None, shape: torch.Size, dim: int, old: int) -> None:
    """Zero the new units' slices (along ``dim``, from ``old``) of carried optimizer state."""
    if state is None:
        return
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.shape == shape and value.dim() > dim:
            value.narrow(dim, old, shape[dim] - old).zero_()


@torch.no_grad()
def split_noise(weight: torch.Tensor, columns: torch.Tensor, seed: int) -> None:
    """Add fan-out noise centred over each source column's copies (so their sum is unchanged)."""
    generator = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    noise = noise.to(weight.device) * weight.detach().double().abs() * _SPLIT_NOISE
    source = columns.to(weight.device)
    width = int(source.max()) + 1
    sums = noise.new_zeros((weight.shape[0], width, *weight.shape[2:])).index_add_(1, source, noise)
    copies = torch.bincount(source, minlength=width).to(noise.dtype)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    noise -= (sums / copies.view(shape)).index_select(1, source)
    replicated = (copies[source] > 1).view(shape)
    weight.add_(torch.where(replicated, noise, torch.zeros_like(noise)).to(weight.dtype))


@torch.no_grad()
def fresh_norm_entries(norm: _BatchNorm, old: int) -> None:
    """A batch norm's new channels start as a fresh norm's do."""
    if norm.weight is not None and norm.bias is not None:
        norm.weight[old:] = 1.0
        norm.bias[old:] = 0.0
    if norm.running_mean is not None and norm.running_var is not None:
        norm.running_mean[old:] = 0.0
        norm.running_var[old:] = 1.0
