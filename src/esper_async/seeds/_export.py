"""Leaving the framework: a trained model with its seed slots turned into plain torch.

:func:`export_model` traces the whole model with ``torch.fx`` and inlines every
:class:`~esper_async.seeds.SeedSlot`:

===============================  ===================================================
slot                             becomes
===============================  ===================================================
no seed (DORMANT, CULLED,        the host module's call, ``h = host(*args)``
EMBARGOED)
FOSSILIZED                       ``h + seed(h)``: the kernel's ATen graph inlined
                                 (a widened host's seed reads the first ``C`` units
                                 and is spread along the unit map, as in the slot)
live (GERMINATED … PROBATION)    refused (``live="refuse"``, the default) or the
                                 host alone (``live="drop"``)
===============================  ===================================================

The result is an ``fx.GraphModule``: its submodules are ``torch.nn`` leaves (``Conv2d``,
``Linear``...) and plain ``torch.nn.Module`` containers, the seed's weights are parameters on
it, and nothing in it refers to esper_async, so ``torch.save`` of it loads with torch alone
(``torch.load(..., weights_only=False)``). Its ``state_dict`` keys are the trained model's keys
for what it kept (``conv1.host.weight``, ``conv1.seed.program.<name>``...).

**Loading the pickled module runs code**: a ``GraphModule``'s pickle carries its generated Python
source, which ``torch.load(..., weights_only=False)`` executes, so an edited file runs whatever
was put in it. Load it only as you would run its author's code; to share a model, save
:func:`export_program`'s result with ``torch.export.save`` (a ``.pt2`` whose graph is data).

A model ``torch.fx`` cannot trace (a Hugging Face model: its forward inspects its arguments) is
exported through ``torch.export`` instead, when an example input is given: the result is then
``ExportedProgram.module()``, the model's ATen graph with the slots' seeds inlined as they compute
in eval mode. It runs and has the model's ``state_dict`` keys, but it cannot be pickled with
``torch.save``: share it as a program (:func:`export_program`, ``torch.export.save``), and call
neither ``.train()`` nor ``.eval()`` on it (it is fixed at eval).

The model is traced in eval mode: Python branches on ``self.training`` in the model's own
modules are fixed at eval; torch's leaves (``Dropout``, ``BatchNorm``) still switch. A kernel
loaded in the ``bf16`` form runs in full precision in the export. :func:`export_program` turns the
result into a ``torch.export`` program with a dynamic batch size.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import structlog
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..blueprints import SlotKind
from ..errors import ExportError
from ._lifecycle import LIVE_STATES, SeedState
from ._slot import SeedSlot

__all__ = ("export_model", "export_program")

log = structlog.get_logger(__name__)

_LIVE = ("refuse", "drop")


def _program(slot: SeedSlot) -> tuple[nn.Module, str]:
    """The slot's seed program (the kernel's ``fx.GraphModule``) and its execution form's name."""
    seed = slot.seed
    assert seed is not None
    program = getattr(seed, "program", None)
    form = str(getattr(seed, "form", "export"))
    if program is None:  # a seed that is not a KernelModule: a plain module, traced as it is
        return seed, "export"
    return program, form


class _Tracer(fx.Tracer):
    """``symbolic_trace`` with each :class:`SeedSlot` replaced by what it computes."""

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if isinstance(m, SeedSlot):
            return self._slot(m, args, kwargs)
        return super().call_module(m, forward, args, kwargs)

    def _slot(self, slot: SeedSlot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h = slot.host(*args, **kwargs)
        if slot.seed is None or slot.state is not SeedState.FOSSILIZED:
            return h  # no seed, or a live one dropped (refused before tracing otherwise)
        program, form = _program(slot)
        units = slot.unit_map
        x = units.narrow(h) if units is not None else h
        if form == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        contract = slot.contract
        if contract is not None and contract.kind is SlotKind.LINEAR:
            # The kernel was exported for (N, F): run it on the leading dims flattened (a view
            # for an (N, F) output, so the result is the slot's, bitwise).
            s = program(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        else:
            s = program(x)
        if units is not None:
            s = units(s)
        return h + s


def _check_slots(model: nn.Module, live: str) -> None:
    for name, module in model.named_modules():
        if not isinstance(module, SeedSlot) or module.state not in LIVE_STATES:
            continue
        if live == "refuse":
            raise ExportError(
                f"slot {name!r} holds a live seed ({module.state.value}); settle it first "
                "(fit(settle=...), or fossilize/cull it) or pass live='drop' to export the "
                "host alone",
                slot=name,
            )
        log.warning("export.live_seed_dropped", slot=name, state=module.state.value)
    for name, module in model.named_modules():
        if isinstance(module, SeedSlot) and module.seed is not None:
            if getattr(module.seed, "form", None) == "bf16":
                log.warning("export.bf16_seed_in_full_precision", slot=name)


@torch.no_grad()
def _own_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """Give each parameter and buffer storage of its own (a loaded kernel's weights are views of
    one archive buffer), keeping tied ones tied and each tensor's layout."""
    done: dict[int, torch.Tensor] = {}
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                if id(t) not in done:
                    fresh = t.detach().clone()
                    done[id(t)] = (
                        nn.Parameter(fresh, t.requires_grad)
                        if isinstance(t, nn.Parameter)
                        else fresh
                    )
                table[name] = done[id(t)]  # type: ignore[assignment]
    return gm


def _foreign(gm: fx.GraphModule) -> list[str]:
    """What in ``gm`` still refers to esper_async: module classes and call targets."""
    found = [
        f"{name or '<root>'}: {type(m).__module__}.{type(m).__qualname__}"
        for name, m in gm.named_modules()
        if type(m).__module__.startswith("esper_async")
    ]
    found += [
        f"node {node.name}: {node.target!r}"
        for node in gm.graph.nodes
        if node.op in ("call_function", "call_method")
        and str(getattr(node.target, "__module__", "") or "").startswith("esper_async")
    ]
    return found


@contextmanager
def _live_seeds_dropped(model: nn.Module) -> Iterator[None]:
    """Within the block every live seed contributes nothing: its slot computes its host alone."""
    with ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, SeedSlot) and module.state in LIVE_STATES:
                stack.enter_context(module.ablated())
        yield


def _batch_dims(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """``dynamic_shapes`` with dimension 0 of each positional tensor dynamic; keyword arguments
    stay as given."""
    return tuple(
        {0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
        for a in args
    ) + tuple(None for _ in kwargs)


def _through_torch_export(
    model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any], fx_error: Exception
) -> fx.GraphModule:
    """``model`` exported with ``torch.export`` (non-strict) as its unlifted graph module."""
    name = type(model).__name__
    try:
        with _live_seeds_dropped(model):
            program = torch.export.export(
                model, args, dict(kwargs), dynamic_shapes=_batch_dims(args, kwargs), strict=False
            )
    except Exception as exc:
        raise ExportError(
            f"torch.fx could not trace {name} ({type(fx_error).__name__}: {fx_error}), and "
            f"torch.export failed on the example input too: {type(exc).__name__}: {exc}. The "
            "model needs no data-dependent Python control flow; an output torch.export cannot "
            "carry (a Hugging Face cache) is turned off with example_kwargs (e.g. "
            "{'use_cache': False})",
        ) from exc
    log.info("export.through_torch_export", model=name, fx_error=str(fx_error)[:200])
    return _own_tensors(program.module())


def export_model(
    model: nn.Module,
    *,
    example_input: Any = None,
    example_kwargs: Mapping[str, Any] | None = None,
    live: Literal["refuse", "drop"] = "refuse",
    atol: float = 1e-6,
) -> fx.GraphModule:
    """A plain-torch copy of ``model`` with every seed slot inlined (see the module docstring).

    ``model`` is not changed (it is traced in eval mode and its mode restored). The result is in
    eval mode and holds copies of the parameters it uses, shared with nothing.

    :param model: the trained model, with slots made by :func:`esper_async.wrap` anywhere in it.
    :param example_input: a batch (a tensor, or a tuple of positional arguments); when given, the
        export's outputs on it are checked against the model's (eval mode, within ``atol``), and
        a model ``torch.fx`` cannot trace is exported through ``torch.export`` on it instead.
    :param example_kwargs: keyword arguments of the model's forward that go with
        ``example_input`` (e.g. ``{"use_cache": False}`` for a Hugging Face language model).
    :param live: what to do with a slot whose seed is still live (GERMINATED to PROBATION):
        ``"refuse"`` raises, ``"drop"`` exports that slot's host alone.
    :param atol: absolute tolerance of the check on ``example_input``.
    :raises ValueError: if ``live`` is not ``"refuse"`` or ``"drop"``.
    :raises ExportError: if a slot holds a live seed (with ``live="refuse"``), the model cannot
        be traced with ``torch.fx`` and either no example input was given or ``torch.export``
        failed on it too (data-dependent control flow), something of esper_async would remain in
        the export, or the outputs on ``example_input`` differ.
    """
    if live not in _LIVE:
        raise ValueError(f"export_model: live must be one of {_LIVE}, not {live!r}")
    _check_slots(model, live)
    kwargs = dict(example_kwargs or {})
    was_training = model.training
    model.eval()
    try:
        tracer = _Tracer()
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            if example_input is None:
                raise ExportError(
                    f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: "
                    f"{exc}; pass example_input= (and example_kwargs=) and export_model exports "
                    "it through torch.export instead",
                ) from exc
            gm = _through_torch_export(model, _args(example_input), kwargs, exc)
        else:
            gm = _from_fx(model, tracer, graph)
        left = _foreign(gm)
        if left:
            raise ExportError(
                f"the export of {type(model).__name__} still refers to esper_async: "
                f"{', '.join(left[:3])}",
            )
        if example_input is not None:
            _check_outputs(model, gm, example_input, kwargs, atol)
    finally:
        model.train(was_training)
    log.info(
        "export.model", model=type(model).__name__, params=sum(p.numel() for p in gm.parameters())
    )
    return gm


def _from_fx(model: nn.Module, tracer: fx.Tracer, graph: fx.Graph) -> fx.GraphModule:
    """The traced graph as a module of its own, free of esper_async."""
    # The graph remembers its tracer's class, and GraphModule pickles it: leave it out, so
    # that loading the export never imports esper_async.
    graph._tracer_cls = None
    for node in graph.nodes:
        # Annotations read from the model's signature (strings under postponed evaluation)
        # would become imports in the pickled code.
        node.type = None
    gm = _own_tensors(copy.deepcopy(fx.GraphModule(tracer.root, graph, type(model).__name__)))
    gm._tracer_cls = None
    gm.eval()
    return gm


def _args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


@torch.no_grad()
def _check_outputs(
    model: nn.Module, gm: nn.Module, example_input: Any, kwargs: Mapping[str, Any], atol: float
) -> None:
    args = _args(example_input)
    # Structured outputs (a tuple, a Hugging Face ModelOutput) are compared tensor by tensor.
    want = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    got = [t for t in pytree.tree_leaves(gm(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(want) != len(got):
        raise ExportError(
            f"the export of {type(model).__name__} returns {len(got)} tensors on the example "
            f"input where the model returns {len(want)}",
        )
    for w, g in zip(want, got, strict=True):
        if w.shape != g.shape or not torch.allclose(w, g, rtol=0.0, atol=atol):
            diff = (w - g).abs().max().item() if w.shape == g.shape else float("nan")
            raise ExportError(
                f"the export of {type(model).__name__} differs from the model on the example "
                f"input (shape {tuple(g.shape)} vs {tuple(w.shape)}, max |diff| {diff:.3g} > "
                f"{atol})",
            )


def export_program(
    model: nn.Module,
    example_input: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """A ``torch.export`` program of ``model``'s export (``torch.export.save``/``load`` it).

    :param model: a model with seed slots (exported first with :func:`export_model`, live seeds
        refused) or the result of :func:`export_model`.
    :param example_input: a batch (a tensor, or a tuple of positional arguments).
    :param example_kwargs: keyword arguments of the model's forward (fixed in the program).
    :param dynamic_batch: whether dimension 0 of each tensor argument stays dynamic.
    :raises ExportError: as :func:`export_model`, or if ``torch.export.export`` fails.
    """
    kwargs = dict(example_kwargs or {})
    if isinstance(model, fx.GraphModule) and not _foreign(model):
        gm = model
    else:
        gm = export_model(model, example_input=example_input, example_kwargs=kwargs)
    args = _args(example_input)
    dynamic = _batch_dims(args, kwargs) if dynamic_batch else None
    try:
        gm.eval()
    except NotImplementedError:
        pass  # an export made through torch.export: fixed at eval already
    try:
        return torch.export.export(gm, args, kwargs or None, dynamic_shapes=dynamic)
    except Exception as exc:
        raise ExportError(
            f"torch.export of the exported {type(model).__name__} failed: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
