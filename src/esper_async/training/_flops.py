"""Training FLOPs, counted with :class:`torch.utils.flop_counter.FlopCounterMode`.

What is counted: the FLOPs that ``FlopCounterMode`` attributes to matmul-like aten ops (``mm``,
``addmm``, ``bmm``, convolutions and their backward, attention), as they actually run on the
model in its current slot states. A multiply-add counts as 2 FLOPs. Not counted: elementwise
ops (activations, residual adds, α-blending, norms), the loss, the optimizer's update; on the
small conv/linear models of this project these are a small share of the total.

:class:`FlopCounter` measures a model once per (structure, batch shape) and caches the figure:
the structure is every parameter's name and shape and every slot's state, kernel and ablation.
:class:`FlopLedger` wraps a run's loaders to total a whole fit, step by step and validation
batch by validation batch. :func:`kernel_compile_flops` estimates what compiling one kernel
costs (the optimizer's timing runs and the validator's comparisons), from the eager module the
blueprint builds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..blueprints import Blueprint, SlotContract, build
from ..compiler import VALIDATOR_BATCHES, KernelOptimizer, OptimizerOptions
from ..seeds import SeedSlot, find_slots

if TYPE_CHECKING:
    from ..control import EpochReport

__all__ = ("FlopCounter", "FlopLedger", "count_flops", "kernel_compile_flops", "structure_key")

#: Warm-up runs of each form the kernel optimizer times (see ``KernelOptimizer._time``).
_OPTIMIZER_WARMUP = 3


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``FlopCounterMode`` counts while ``fn()`` runs.

    :param fn: the work to count (called once).
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _slots(model: nn.Module) -> list[tuple[str, SeedSlot]]:
    return list(find_slots(model).items())


def structure_key(model: nn.Module) -> tuple[object, ...]:
    """What decides a model's FLOPs for a given input shape: every parameter's name and shape,
    and every slot's state, kernel, ablation and unit map.

    :param model: any module (its slots, if it has any, are found by type).
    """
    params = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    slots = tuple(
        (n, s.state.value, s.kernel_id, s.seed is not None, s.is_ablated, s.unit_map is not None)
        for n, s in _slots(model)
    )
    return params, slots


class _Preserved:
    """Put back a model's gradients, buffers, train/eval mode and the RNG after measuring."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self._stack = ExitStack()
        self._stack.enter_context(torch.random.fork_rng(devices=[]))
        model = self.model
        self._grads = [(p, p.grad) for p in model.parameters()]
        for p, _ in self._grads:
            p.grad = None
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._modes = [(m, m.training) for m in model.modules()]
        # A slot observing records activation statistics for the controller: not from zeros.
        self._observing = [(s, s.observe) for _, s in _slots(model)]
        for s, _ in self._observing:
            s.observe = False

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for p, grad in self._grads:
                p.grad = grad
            for b, saved in self._buffers:
                b.copy_(saved)
        for m, mode in self._modes:
            m.training = mode
        for s, observing in self._observing:
            s.observe = observing
        self._stack.close()


def _input(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(shape, dtype=dtype, device=device)


class FlopCounter:
    """FLOPs of a model's training steps and forward passes, measured once per (structure,
    batch shape) and cached.

    Measuring runs the model itself (on zeros) and then puts back its gradients, buffers,
    train/eval mode and the RNG state, so it may be done between a run's steps.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], int] = {}
        #: How many figures were measured rather than read from the cache.
        self.measurements = 0

    def _cached(self, key: tuple[object, ...], measure: Callable[[], int]) -> int:
        if key not in self._cache:
            self._cache[key] = measure()
            self.measurements += 1
        return self._cache[key]

    def train_step(
        self,
        model: nn.Module,
        batch_shape: tuple[int, ...],
        *,
        dtype: torch.dtype = torch.float32,
        ablate: Iterable[str] = (),
    ) -> int:
        """FLOPs of one forward and backward pass of ``model`` in train mode on a batch of
        ``batch_shape`` (the input does not require a gradient, as in training; the loss is the
        output's sum, whose own FLOPs are not counted).

        :param model: the model, in its current slot states.
        :param batch_shape: the input batch's shape.
        :param dtype: the input's dtype.
        :param ablate: names of slots (their ``slot_name``) to run without their
            seed, e.g. every slot, for the host's share.
        :raises KeyError: if a name in ``ablate`` is not a slot of ``model``.
        """
        names = tuple(sorted(ablate))
        return self._with_ablated(model, names, lambda: self._cached(
            ("train", structure_key(model), tuple(batch_shape), str(dtype)),
            lambda: self._measure(model, batch_shape, dtype, backward=True),
        ))

    def forward(
        self,
        model: nn.Module,
        batch_shape: tuple[int, ...],
        *,
        dtype: torch.dtype = torch.float32,
        ablate: Iterable[str] = (),
    ) -> int:
        """FLOPs of one forward pass of ``model`` in eval mode without gradients, as in
        validation.

        :param model: the model, in its current slot states.
        :param batch_shape: the input batch's shape.
        :param dtype: the input's dtype.
        :param ablate: names of slots to run without their seed (a counterfactual pass).
        :raises KeyError: if a name in ``ablate`` is not a slot of ``model``.
        """
        names = tuple(sorted(ablate))
        return self._with_ablated(model, names, lambda: self._cached(
            ("forward", structure_key(model), tuple(batch_shape), str(dtype)),
            lambda: self._measure(model, batch_shape, dtype, backward=False),
        ))

    @staticmethod
    def _with_ablated(model: nn.Module, names: tuple[str, ...], fn: Callable[[], int]) -> int:
        slots = dict(_slots(model))
        missing = [n for n in names if n not in slots]
        if missing:
            raise KeyError(
                f"cannot ablate {missing[0]!r}: the model's slots are {sorted(slots)}"
            )
        with ExitStack() as stack:
            for n in names:
                stack.enter_context(slots[n].ablated())
            return fn()

    @staticmethod
    def _measure(
        model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, *, backward: bool
    ) -> int:
        with _Preserved(model):
            x = _input(model, shape, dtype)
            if backward:
                model.train()

                def step() -> None:
                    model(x).float().sum().backward()

                return count_flops(step)
            model.eval()
            with torch.no_grad():
                return count_flops(lambda: model(x))


def kernel_compile_flops(
    blueprint: Blueprint,
    contract: SlotContract,
    *,
    options: OptimizerOptions | None = None,
    counter: FlopCounter | None = None,
) -> dict[str, int]:
    """An estimate of the FLOPs of compiling one kernel, from the eager module the blueprint
    builds (a kernel computes the same ops).

    ``optimizer``: every form the kernel optimizer times, ``3 + repeats`` forward+backward runs
    at its batch, input requiring a gradient. ``validation``: at each of the validator's batch
    sizes, the kernel's two forwards and one backward and the reference's forward and backward.
    Export and loading are not counted (they trace, not compute).

    :param blueprint: the kernel's blueprint.
    :param contract: the slot's shape contract.
    :param options: the optimizer's options (default: its defaults).
    :param counter: a counter to cache the measurements in.
    :raises BlueprintError: if the blueprint does not fit the contract.
    """
    options = options or OptimizerOptions()
    module = build(blueprint, contract, seed=0)
    dtype = getattr(torch, contract.dtype)
    cache = counter or FlopCounter()

    def fwd_bwd(batch: int) -> int:
        def step() -> None:
            x = torch.zeros(contract.batch_shape(batch), dtype=dtype, requires_grad=True)
            module(x).sum().backward()

        return cache._cached(
            ("kernel_fwd_bwd", blueprint.id, contract.to_json().__repr__(), batch),
            lambda: count_flops(step),
        )

    def fwd(batch: int) -> int:
        return cache._cached(
            ("kernel_fwd", blueprint.id, contract.to_json().__repr__(), batch),
            lambda: count_flops(
                lambda: module(torch.zeros(contract.batch_shape(batch), dtype=dtype))
            ),
        )

    forms = KernelOptimizer(options).candidates(contract.kind)
    timed = len(forms) * (_OPTIMIZER_WARMUP + options.repeats) * fwd_bwd(options.batch)
    validated = sum(2 * fwd_bwd(b) + fwd(b) for b in VALIDATOR_BATCHES)
    return {"optimizer": timed, "validation": validated}


class _Counted:
    """A loader whose every pass reports each batch to ``on_batch`` before yielding it."""

    def __init__(
        self,
        loader: Iterable[Any],
        on_pass: Callable[[], None],
        on_batch: Callable[[torch.Tensor], None],
    ) -> None:
        self.loader = loader
        self._on_pass = on_pass
        self._on_batch = on_batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # e.g. a DataLoader's generator, for checkpoints
        return getattr(self.__dict__["loader"], name)

    def __iter__(self) -> Iterator[Any]:
        self._on_pass()
        for batch in self.loader:
            self._on_batch(batch[0])
            yield batch


class FlopLedger:
    """The FLOPs of one fit, totalled as it runs.

    Pass :meth:`train` and :meth:`val` of the fit's loaders to ``Trainer.fit``, and
    :meth:`end_epoch` as (or from) its ``on_epoch``. Every training batch adds one training
    step at the model's structure when the batch is drawn (split into the host's share, the
    step with every seed ablated, and the seeds' share, the rest); every validation batch adds
    one forward pass, and each counterfactual the epoch's report holds adds a forward pass with
    that slot ablated over the same batches.

    :param model: the model being trained.
    :param counter: where measurements are cached (default: a new one).
    """

    def __init__(self, model: nn.Module, counter: FlopCounter | None = None) -> None:
        self.model = model
        self.counter = counter or FlopCounter()
        self.totals: dict[str, int] = {
            "train_host": 0, "train_seeds": 0, "eval": 0, "counterfactual": 0, "kernels": 0,
        }
        self.steps = 0
        #: Per validation pass this epoch: each seeded slot's ablated-forward FLOPs over it.
        self._passes: list[dict[str, int]] = []

    def train(self, loader: Iterable[Any]) -> Iterable[Any]:
        """``loader``, counting a training step for each batch it yields."""
        return _Counted(loader, lambda: None, self._train_batch)

    def val(self, loader: Iterable[Any]) -> Iterable[Any]:
        """``loader``, counting a validation forward for each batch it yields."""
        return _Counted(loader, lambda: self._passes.append({}), self._val_batch)

    def _train_batch(self, x: torch.Tensor) -> None:
        shape, dtype = tuple(x.shape), x.dtype
        total = self.counter.train_step(self.model, shape, dtype=dtype)
        seeded = [n for n, s in _slots(self.model) if s.seed is not None]
        host = self.counter.train_step(self.model, shape, dtype=dtype, ablate=seeded)
        self.totals["train_host"] += host
        self.totals["train_seeds"] += total - host
        self.steps += 1

    def _val_batch(self, x: torch.Tensor) -> None:
        shape, dtype = tuple(x.shape), x.dtype
        self.totals["eval"] += self.counter.forward(self.model, shape, dtype=dtype)
        for name, slot in _slots(self.model):
            if slot.seed is not None:
                flops = self.counter.forward(self.model, shape, dtype=dtype, ablate=[name])
                ablation = self._passes[-1] if self._passes else {}
                ablation[name] = ablation.get(name, 0) + flops

    def end_epoch(self, report: EpochReport) -> None:
        """Add the counterfactual passes of ``report``'s epoch (one per slot it measured).

        A counterfactual runs over the epoch's validation batches, so each costs the slot's
        ablated forward over the epoch's *full* validation pass: the largest of the epoch's passes
        (others, such as a widening's one-batch draw or a width trial's pass, add their own
        forwards to ``eval`` as they run, and must not stand in for it)."""
        share = report.eval_cost.get("counterfactual_share", 1.0)  # bounded evaluation
        for name in report.counterfactual:
            self.totals["counterfactual"] += round(share * max(
                (ablation.get(name, 0) for ablation in self._passes), default=0
            ))
        self._passes.clear()

    def add_kernel(self, blueprint: Blueprint, contract: SlotContract) -> None:
        """Add the estimated FLOPs of compiling a kernel (see :func:`kernel_compile_flops`)."""
        figures = kernel_compile_flops(blueprint, contract, counter=self.counter)
        self.totals["kernels"] += sum(figures.values())

    @property
    def total(self) -> int:
        """Every FLOP counted so far."""
        return sum(self.totals.values())
