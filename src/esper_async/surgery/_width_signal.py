"""What ``init="gradmax"`` reads from a real batch: the producer's input and the gradients at
its consumers' outputs (see :mod:`._width_init`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import SurgeryError
from ..seeds import SeedSlot
from ._widen import _width_of, find_consumers
from ._widen_slot import find_slot_consumers
from ._width_init import WidthSignal

__all__ = ("capture_width_signal",)


def capture_width_signal(
    model: nn.Module, target: str, loss_fn: Callable[[], torch.Tensor]
) -> WidthSignal:
    """Run ``loss_fn`` once (it calls ``model`` on a real batch and returns the loss) and record
    what ``init="gradmax"`` needs to widen ``target``. No ``.grad`` field is written (the
    gradients are taken with :func:`torch.autograd.grad`) and no parameter changes.

    :param model: the root module.
    :param target: the layer (``Widen``) or seed slot (``WidenSlot``) to widen.
    :param loss_fn: computes the loss on a real batch with ``model``, with autograd on.
    :raises SurgeryError: ``target`` is not a layer or slot that can be widened, its consumers
        cannot be found, or the batch did not reach them.
    """
    operation = f"gradmax signal for {target!r}"
    module = model.get_submodule(target)
    if isinstance(module, SeedSlot):
        producer_path, producer = f"{target}.host", module.host
        width = _width_of(producer, operation)
        _, found = find_slot_consumers(
            model, target, width, operation=operation,
            unit_major=isinstance(producer, nn.Conv2d),
        )
        paths = [c.path for c in found]
    else:
        producer_path, producer = target, module
        width = _width_of(producer, operation)
        _, paths = find_consumers(model, target, width, operation=operation)
    inputs: list[torch.Tensor] = []
    outputs: dict[str, torch.Tensor] = {}

    def keep_input(_m: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.append(args[0].detach())

    def keeper(path: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def keep_output(_m: nn.Module, _args: Any, out: torch.Tensor) -> None:
            outputs[path] = out

        return keep_output

    handles = [producer.register_forward_pre_hook(keep_input)]
    handles += [model.get_submodule(p).register_forward_hook(keeper(p)) for p in paths]
    try:
        with torch.enable_grad():
            loss = loss_fn()
            reached = [p for p in paths if p in outputs and outputs[p].requires_grad]
            if not inputs or len(reached) != len(paths):
                raise SurgeryError(
                    f"{operation}: the batch did not run through {producer_path!r} and all its "
                    f"consumers ({', '.join(paths)}) with autograd on",
                    operation=operation,
                )
            grads = torch.autograd.grad(loss, [outputs[p] for p in paths], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return WidthSignal(
        target, inputs[0],
        {p: torch.zeros_like(outputs[p]) if g is None else g.detach()
         for p, g in zip(paths, grads, strict=True)},
    )
