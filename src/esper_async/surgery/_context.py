"""The staging context an operation mutates the live model through, and the undo journal behind it.

Rollback has to be exact (bitwise) and cheap on a ResNet-18-sized model, so nothing is deep-copied.
The invariant that makes this possible: **an operation never writes into an existing tensor or
module**. It builds replacement modules (sharing the untouched parameters by reference) and swaps
them into their parents through :meth:`SurgeryContext.replace`, which records ``(parent, name,
old_child)``. Undo puts the old children back. The optimizer is restored from a shallow snapshot of
its parameter groups and its per-parameter state mapping: the state tensors themselves are never
written during surgery (no step runs inside a transaction), so holding references to them is enough.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError

__all__ = (
    "Captured",
    "OptimizerSnapshot",
    "SurgeryContext",
    "describe_callable",
    "eval_mode",
    "module_list",
    "parameter_list",
    "run_probe",
    "tensor_leaves",
)


def run_probe(model: nn.Module, probe: Any) -> Any:
    """Call ``model`` on a probe batch: a tensor, a tuple of positional arguments, or a mapping of
    keywords.

    :param model: the module to call.
    :param probe: the probe batch.
    :return: whatever the model returns.
    """
    if isinstance(probe, tuple):
        return model(*probe)
    if isinstance(probe, dict):
        return model(**probe)
    return model(probe)


def module_list(root: nn.Module) -> list[nn.Module]:
    """``list(root.modules())``: every module once, in the same (pre-order) order.

    Validation walks the whole model several times per transaction (eval mode, optimizer sync,
    the budget); torch's generator chain (``named_modules`` builds every dotted name) costs about
    half a millisecond per walk on a ResNet-18, this plain walk of the child tables a fraction.
    """
    seen: set[int] = set()
    found: list[nn.Module] = []
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        stack.extend(reversed([child for child in module._modules.values() if child is not None]))
    return found


def parameter_list(root: nn.Module, modules: list[nn.Module] | None = None) -> list[nn.Parameter]:
    """``list(root.parameters())``: every parameter once, in the same order.

    :param root: the module tree.
    :param modules: ``module_list(root)``, when the caller already has it.
    """
    seen: set[int] = set()
    found: list[nn.Parameter] = []
    for module in module_list(root) if modules is None else modules:
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                found.append(param)
    return found


class OptimizerSnapshot:
    """A shallow, exact snapshot of an optimizer's parameter groups and state mapping.

    :param optimizer: the optimizer to snapshot.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizer = optimizer
        self._groups = list(optimizer.param_groups)
        self._group_items = [dict(group) for group in self._groups]
        self._group_params = [list(group["params"]) for group in self._groups]
        self._state = dict(optimizer.state)

    def restore(self) -> None:
        """Put the optimizer's groups (the same dict objects) and state mapping back as they
        were."""
        for group, items, params in zip(
            self._groups, self._group_items, self._group_params, strict=True
        ):
            group.clear()
            group.update(items)
            group["params"][:] = params
        self._optimizer.param_groups[:] = self._groups
        self._optimizer.state.clear()
        self._optimizer.state.update(self._state)


@dataclass(frozen=True)
class _Entry:
    """One journal entry: a parent's child table as it was, or (``parent is None``) the old root."""

    parent: nn.Module | None
    children: OrderedDict[str, nn.Module | None] | None
    root: nn.Module | None
    changed: str
    parameters: dict[str, nn.Parameter | None] | None = None  # set: a parameter table as it was
    attribute: tuple[Any, str, Any] | None = None  # set: (object, name, old value)


@dataclass(frozen=True)
class Captured:
    """One call of a module on the probe batch: its (cloned) arguments and its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


class _Stop(Exception):
    """Raised from a forward hook to end a probe forward pass once everything wanted was seen."""


class SurgeryContext:
    """What an operation sees: the live model, its optimizer, the probe batch, and journalled
    mutators.

    :param model: the root module (an fx operation on the root may replace it; read :attr:`model`).
    :param optimizer: the optimizer over the model's parameters, or ``None``.
    :param probe: a probe batch the model accepts (see :func:`run_probe`).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, probe: Any
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.probe = probe
        self._journal: list[_Entry] = []
        self._captured: dict[int, Captured] = {}
        self._captured_at = 0
        self._hint_group: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------- navigation
    def resolve(self, path: str, *, operation: str) -> nn.Module:
        """Return the submodule at a dotted path (``""`` is the root).

        :param path: e.g. ``"layer1.0.conv1"``.
        :param operation: the operation's description, for the error.
        :raises SurgeryError: no module has that name; the message lists close names.
        """
        if path == "":
            return self.model
        try:
            return self.model.get_submodule(path)
        except AttributeError as exc:
            names = [name for name, _ in self.model.named_modules() if name]
            stem = path.rsplit(".", 1)[0]
            close = [name for name in names if name.startswith(stem)][:8] or names[:8]
            raise SurgeryError(
                f"{operation}: the model has no module named {path!r}; "
                f"names near it: {', '.join(close) or '(none)'}",
                operation=operation,
            ) from exc

    def parent_of(self, path: str, *, operation: str) -> tuple[nn.Module, str]:
        """Return ``(parent_module, attribute_name)`` for a non-root path.

        :raises SurgeryError: the path is the root or does not exist.
        """
        if path == "":
            raise SurgeryError(f"{operation}: the root module has no parent", operation=operation)
        self.resolve(path, operation=operation)
        parent_path, _, name = path.rpartition(".")
        return self.resolve(parent_path, operation=operation), name

    # ----------------------------------------------------------------------------- mutation
    def replace(self, path: str, new: nn.Module, *, operation: str) -> None:
        """Swap the module at ``path`` for ``new`` (journalled). New submodules take the old one's
        mode.

        :param path: the module to replace; ``""`` replaces the root (see :attr:`model`).
        :param new: the replacement; it may contain the old module's children by reference.
        :param operation: the operation's description, for errors.
        :raises SurgeryError: the path does not exist.
        """
        old = self.resolve(path, operation=operation)
        kept = {id(module) for module in old.modules()}
        for module in new.modules():
            if id(module) not in kept:
                module.training = old.training
        if path == "":
            self._journal.append(_Entry(None, None, self.model, ""))
            self.model = new
            return
        parent, name = self.parent_of(path, operation=operation)
        self._journal.append(_Entry(parent, OrderedDict(parent._modules), None, path))
        setattr(parent, name, new)

    def keep(self, path: str, *, operation: str) -> nn.Module:
        """Journal the child table of the module at ``path`` before an operation edits it in place.

        :return: that module.
        """
        parent = self.resolve(path, operation=operation)
        self._journal.append(_Entry(parent, OrderedDict(parent._modules), None, path))
        return parent

    def set_parameter(self, path: str, name: str, new: nn.Parameter, *, operation: str) -> None:
        """Put ``new`` as the module at ``path``'s own parameter ``name`` (journalled: undo puts
        the old one back). For parameters held directly by a module that cannot be swapped
        whole, such as the root.
        """
        module = self.resolve(path, operation=operation)
        self._journal.append(_Entry(module, None, None, path, dict(module._parameters)))
        module._parameters[name] = new

    def set_attribute(self, obj: Any, name: str, value: Any, *, changed: str) -> None:
        """Set a plain (non-module, non-parameter) attribute of ``obj``, journalled: undo puts
        the old value back. For bookkeeping a change must keep true, such as a seed slot's
        contract or name.

        :param changed: the dotted path of the module concerned (for the validated region).
        """
        old = obj.__dict__[name]
        self._journal.append(_Entry(None, None, None, changed, attribute=(obj, name, old)))
        object.__setattr__(obj, name, value)

    def prefer_group_of(self, module: nn.Module) -> None:
        """New parameters join with the hyper-parameters of the group holding ``module``'s
        parameters."""
        self._hint_group = None
        if self.optimizer is None:
            return
        first = next(iter(module.parameters()), None)
        for group in self.optimizer.param_groups:
            if first is not None and any(p is first for p in group["params"]):
                self._hint_group = group
                return

    def replace_parameter(
        self, old: nn.Parameter, new: nn.Parameter, state: dict[str, Any] | None
    ) -> None:
        """Put ``new`` where ``old`` stood in its optimizer group, with the given optimizer state.

        :param old: a parameter the optimizer holds (nothing happens when it holds none).
        :param new: its replacement.
        :param state: the replacement's optimizer state (``None``: no state yet).
        """
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            for index, param in enumerate(group["params"]):
                if param is old:
                    group["params"][index] = new
                    self.optimizer.state.pop(old, None)
                    if state:
                        self.optimizer.state[new] = state
                    return

    def sync_optimizer(self, before: Sequence[nn.Parameter]) -> None:
        """After an operation: drop parameters that left the model, add trainable ones that joined.

        :param before: the model's parameters before the operation.
        """
        if self.optimizer is None:
            return
        now = parameter_list(self.model)
        now_ids = {id(p) for p in now}
        gone = {id(p) for p in before if id(p) not in now_ids}
        if gone:
            for group in self.optimizer.param_groups:
                group["params"][:] = [p for p in group["params"] if id(p) not in gone]
            for param in [p for p in self.optimizer.state if id(p) in gone]:
                del self.optimizer.state[param]
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        fresh = [p for p in now if p.requires_grad and id(p) not in held]
        fresh = list({id(p): p for p in fresh}.values())
        if fresh:
            like = self._hint_group or self.optimizer.param_groups[0]
            group = {key: value for key, value in like.items() if key != "params"}
            group["params"] = fresh
            self.optimizer.add_param_group(group)

    def mark(self) -> int:
        """A savepoint: the journal's length now."""
        return len(self._journal)

    def region_since(self, mark: int) -> str | None:
        """The dotted name of the smallest module containing every change after ``mark`` (``None``:
        none)."""
        paths = [entry.changed for entry in self._journal[mark:]]
        if not paths:
            return None
        common = paths[0].split(".") if paths[0] else []
        for path in paths[1:]:
            parts = path.split(".") if path else []
            size = 0
            while size < min(len(common), len(parts)) and common[size] == parts[size]:
                size += 1
            common = common[:size]
        return ".".join(common)

    @contextmanager
    def reverted(self, mark: int) -> Iterator[None]:
        """Within the block, the structure is as it was at ``mark``; afterwards, as it is now."""
        popped = self._journal[mark:]
        redo: list[tuple[_Entry, Any]] = []
        for entry in reversed(popped):
            if entry.attribute is not None:
                obj, name, old = entry.attribute
                redo.append((entry, obj.__dict__[name]))
                object.__setattr__(obj, name, old)
            elif entry.parent is None:
                redo.append((entry, self.model))
                self.model = entry.root  # type: ignore[assignment]
            elif entry.parameters is not None:
                redo.append((entry, dict(entry.parent._parameters)))
                entry.parent._parameters.clear()
                entry.parent._parameters.update(entry.parameters)
            else:
                redo.append((entry, OrderedDict(entry.parent._modules)))
                entry.parent._modules.clear()
                entry.parent._modules.update(entry.children or {})
        del self._journal[mark:]
        try:
            yield
        finally:
            for entry, after in reversed(redo):
                if entry.attribute is not None:
                    object.__setattr__(entry.attribute[0], entry.attribute[1], after)
                elif entry.parent is None:
                    self.model = after
                elif entry.parameters is not None:
                    entry.parent._parameters.clear()
                    entry.parent._parameters.update(after)
                else:
                    entry.parent._modules.clear()
                    entry.parent._modules.update(after)
            self._journal.extend(popped)

    def undo_to(self, mark: int) -> None:
        """Undo structural changes made after ``mark``, newest first."""
        self._captured, self._captured_at = {}, -1
        while len(self._journal) > mark:
            entry = self._journal.pop()
            if entry.attribute is not None:
                obj, name, old = entry.attribute
                object.__setattr__(obj, name, old)
            elif entry.parent is None:
                assert entry.root is not None
                self.model = entry.root
            elif entry.parameters is not None:
                entry.parent._parameters.clear()
                entry.parent._parameters.update(entry.parameters)
            else:
                assert entry.children is not None
                entry.parent._modules.clear()
                entry.parent._modules.update(entry.children)

    # ----------------------------------------------------------------------------- probing
    @torch.no_grad()
    def capture(self, modules: Iterable[nn.Module], *, operation: str) -> dict[int, Captured]:
        """Run the probe batch (eval mode, no grad) until each module has been called once.

        Results are cached until the structure next changes, and the forward pass stops as soon as
        every module asked for has returned, so a module early in the network is cheap to probe.

        :param modules: modules to watch.
        :param operation: the operation's description, for errors.
        :return: ``{id(module): Captured}``, the first call of each.
        :raises SurgeryError: the forward pass fails, or a module is never called.
        """
        if self._captured_at != len(self._journal):
            self._captured, self._captured_at = {}, len(self._journal)
        watched = list(modules)
        missing = {id(m) for m in watched if id(m) not in self._captured}
        if missing:
            self._run_capture([m for m in watched if id(m) in missing], operation)
        for module in watched:
            if id(module) not in self._captured:
                raise SurgeryError(
                    f"{operation}: {type(module).__name__} is not called when the model runs on "
                    "the probe batch, so its inputs and outputs are unknown",
                    operation=operation,
                )
        return {id(m): self._captured[id(m)] for m in watched}

    def _run_capture(self, watched: list[nn.Module], operation: str) -> None:
        pending = {id(m) for m in watched}
        inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}

        def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if id(module) in pending and id(module) not in inputs:
                # Cloned: an in-place op inside the module may overwrite its input.
                inputs[id(module)] = (_clone(args), _clone(kwargs))

        def after(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            key = id(module)
            if key in pending and key in inputs:
                self._captured[key] = Captured(*inputs[key], output)
                pending.discard(key)
                if not pending:
                    raise _Stop

        handles = []
        for module in watched:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        try:
            with eval_mode(self.model):
                run_probe(self.model, self.probe)
        except _Stop:
            pass
        except Exception as exc:
            raise SurgeryError(
                f"{operation}: the probe forward pass failed: {exc}", operation=operation
            ) from exc
        finally:
            for handle in handles:
                handle.remove()


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class eval_mode:
    """Put every submodule in eval mode for the block, then restore each module's own flag.

    Validation runs in eval mode so that batch-norm running statistics are not updated (rollback
    must be bitwise) and dropout does not make function-preservation checks noisy.

    :param model: the module tree.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = model
        self._flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        # The flag is written into each instance dict, as ``nn.Module.__setattr__`` would (it is
        # a plain attribute), without that method's slow path.
        self._flags = [(module, module.training) for module in module_list(self._model)]
        for module, _ in self._flags:
            module.__dict__["training"] = False

    def __exit__(self, *exc: object) -> None:
        for module, flag in self._flags:
            module.__dict__["training"] = flag


def tensor_leaves(value: Any) -> Iterator[torch.Tensor]:
    """Yield the tensors in a model output (a tensor, or nested tuples, lists and dicts of them)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensor_leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensor_leaves(item)


def describe_callable(fn: Callable[..., Any]) -> str:
    """A short name for a callable, for operation descriptions."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__
