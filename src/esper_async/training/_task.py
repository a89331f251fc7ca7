"""Tasks: what a batch is, how the model's loss is computed on it, and what is measured.

The trainer and the grower never look inside a batch; a :class:`Task` does. Three come with the
library:

* :class:`ClassificationTask` (the default): ``(inputs, targets)`` with logits ``(N, C)``;
  cross-entropy; reports ``accuracy``.
* :class:`RegressionTask`: mean squared error; no accuracy.
* :class:`LanguageModelTask`: token tensors ``(N, T)`` in and out, logits ``(N, T, V)``;
  cross-entropy over every position; reports ``bits_per_token``; no accuracy.
* :class:`SelfLossTask`: a model that computes its own loss from a mapping batch
  (``model(**batch).loss``, Hugging Face's ``labels`` convention);
  :class:`HFCausalLMTask` is that for a causal language model, with ``bits_per_token``.

The first three take their batch as a tuple ``(inputs, targets)``, a mapping (Hugging Face style,
``{"input": ..., "labels": ...}``: the key names are the task's ``input_key`` and ``target_key``)
or an object with those attributes. Extra metrics are ``name -> fn(outputs, targets) -> float``.
Their outputs and targets must have the shapes above: a mismatch that the loss would broadcast
(outputs ``(N, 1)`` against targets ``(N,)`` in a regression) or reject is a :class:`TaskError`
naming both shapes.

A task of your own may also define ``inputs(batch)`` (the model's input): surgery takes its probe
batch from it, and under data parallelism the diagnosis of a non-finite loss runs the model on it
without the loss (a collective that a rank whose seed raised cannot join).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import EsperError

__all__ = (
    "ClassificationTask",
    "HFCausalLMTask",
    "LanguageModelTask",
    "RegressionTask",
    "SelfLossTask",
    "Task",
    "TaskError",
    "move_to_device",
    "task_inputs",
    "task_loss",
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[torch.Tensor, torch.Tensor], float]


class TaskError(EsperError, ValueError):
    """A batch or a model's outputs do not fit the task: shapes that do not match (which the loss
    would broadcast or reject), a batch without the fields the task reads, a model output
    without a loss.

    :ivar task: the task's class name.
    """

    def __init__(self, message: str, *, task: str) -> None:
        super().__init__(message)
        self.task = task


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ("," if t.dim() == 1 else "") + ")"


@runtime_checkable
class Task(Protocol):
    """What the trainer and the grower need to know about batches and outputs."""

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """``batch`` with its tensors on ``device``."""
        ...

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """Run ``model`` on ``batch``: its outputs and the (scalar, mean) loss."""
        ...

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """Figures measured on one batch (means over it, e.g. ``accuracy``); ``{}`` for none."""
        ...

    def batch_size(self, batch: Any) -> int:
        """The weight of ``batch``'s means in an epoch's mean (its examples, or its tokens)."""
        ...

    #: ``inputs(batch)``: the model's input alone (surgery and width growth probe the model
    #: with it; the diagnosis of a bad loss runs the model on it), or ``None`` for a task whose
    #: batches have no separable input (then surgery and width growth are skipped). A task that
    #: does not define it is read as ``None`` (see :func:`task_inputs`).
    inputs: Callable[[Any], Any] | None

    #: The loss, when it is a callable of its own (a collective over ranks is recognised by it:
    #: :class:`esper_async.training.StepConsensus`), or ``None``; undefined is read as ``None``.
    loss_fn: Callable[..., Any] | None


def task_inputs(task: Task) -> Callable[[Any], Any] | None:
    """``task.inputs`` as the :class:`Task` protocol declares it (``None`` when undefined)."""
    return getattr(task, "inputs", None)


def task_loss(task: Task) -> Callable[..., Any] | None:
    """``task.loss_fn`` as the :class:`Task` protocol declares it (``None`` when undefined)."""
    return getattr(task, "loss_fn", None)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device``: through mappings, lists, tuples
    (named ones too) and dataclasses; other objects with a ``.to`` method (a Hugging Face
    ``BatchEncoding``) are asked to move themselves; anything else is returned as it is. Copies
    from the host to a GPU do not block (``non_blocking``: asynchronous from pinned memory).

    :param batch: a tensor, or a structure holding tensors.
    :param device: where they go.
    :returns: the moved batch (tensors already there are not copied).
    """
    device = torch.device(device)
    non_blocking = device.type == "cuda"
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking)
                       if isinstance(t, torch.Tensor) else t.to(device))


def map_tensors(batch: Any, fn: Callable[[Any], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it (see :func:`move_to_device` for the
    structures walked; an object with a ``.to`` method is given to ``fn`` whole).

    :param batch: a tensor, or a structure holding tensors.
    :param fn: applied to each tensor.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_tensors(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {f.name: map_tensors(getattr(batch, f.name), fn)
                 for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **moved)
    if callable(getattr(batch, "to", None)):
        return fn(batch)
    return batch


class _SupervisedTask:
    """A task whose batches hold one input and one target (see the module doc).

    :param loss_fn: ``loss_fn(outputs, targets)``, a scalar mean.
    :param input_key: the input's key (mapping batches) or attribute (object batches).
    :param target_key: the target's key or attribute.
    :param metrics: extra figures, ``name -> fn(outputs, targets)``, measured on every
        validation batch and averaged.
    """

    def __init__(
        self, loss_fn: LossFn, *, input_key: str = "input", target_key: str = "labels",
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.input_key = input_key
        self.target_key = target_key
        self.extra_metrics = dict(metrics or {})

    def _field(self, batch: Any, key: str, index: int) -> Any:
        if isinstance(batch, (tuple, list)) and not hasattr(batch, key):
            if len(batch) < 2:
                raise TypeError(
                    f"{type(self).__name__}: a sequence batch must be (inputs, targets), got "
                    f"{len(batch)} item(s)"
                )
            return batch[index]
        if isinstance(batch, Mapping):
            if key not in batch:
                raise KeyError(
                    f"{type(self).__name__}: the batch has no key {key!r} (keys: "
                    f"{sorted(map(str, batch))[:8]}); pass input_key=/target_key="
                )
            return batch[key]
        if not hasattr(batch, key):
            raise TypeError(
                f"{type(self).__name__}: a {type(batch).__name__} batch has no attribute "
                f"{key!r}; pass input_key=/target_key= or a (inputs, targets) tuple"
            )
        return getattr(batch, key)

    def inputs(self, batch: Any) -> Any:
        """The model's input in ``batch``."""
        return self._field(batch, self.input_key, 0)

    def targets(self, batch: Any) -> Any:
        """The targets in ``batch``."""
        return self._field(batch, self.target_key, 1)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """See :meth:`Task.to_device` (every tensor in the batch, at any depth)."""
        return move_to_device(batch, device)

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """See :meth:`Task.forward`: ``model(inputs)`` and ``loss_fn(outputs, targets)``.

        :raises TaskError: the outputs' shape does not fit the targets' (see the task).
        """
        outputs = model(self.inputs(batch))
        targets = self.targets(batch)
        if isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            problem = self._shape_problem(outputs, targets)
            if problem is not None:
                raise TaskError(
                    f"{type(self).__name__}: the model's outputs have shape {_shape(outputs)} and "
                    f"the targets {_shape(targets)}; {problem}",
                    task=type(self).__name__,
                )
        return outputs, self.loss_fn(outputs, targets)

    def _shape_problem(self, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        """What is wrong with these shapes for this task and how to fix it; ``None``: fine."""
        if outputs.dim() == 0 or targets.dim() == 0 or outputs.shape[0] != targets.shape[0]:
            return "they must have the same first (batch) dimension."
        return None

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """See :meth:`Task.metrics`: the extra metrics given."""
        targets = self.targets(batch)
        return {name: float(fn(outputs, targets)) for name, fn in self.extra_metrics.items()}

    def batch_size(self, batch: Any) -> int:
        """See :meth:`Task.batch_size`: the targets' first dimension."""
        return int(self.targets(batch).shape[0])


class ClassificationTask(_SupervisedTask):
    """Logits ``(N, C)`` against class indices ``(N,)``; reports ``accuracy`` (see
    :class:`_SupervisedTask` for the parameters). ``loss_fn`` defaults to cross-entropy."""

    def __init__(
        self, loss_fn: LossFn = nn.functional.cross_entropy, *, input_key: str = "input",
        target_key: str = "labels", metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        super().__init__(loss_fn, input_key=input_key, target_key=target_key, metrics=metrics)

    def _shape_problem(self, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        if outputs.dim() < 2 or outputs.shape[0] != targets.shape[0]:
            return (
                "a classification needs logits (N, C) and class indices (N,) with the same N "
                "(or logits (N, C, d1, ...) and indices (N, d1, ...))."
            )
        if targets.is_floating_point():  # class probabilities: shaped like the logits
            if targets.shape != outputs.shape:
                return "class probabilities as targets must have the logits' shape."
        elif outputs.shape[2:] != targets.shape[1:]:
            hint = (
                " `.squeeze(-1)` the targets."
                if targets.shape[:-1] == outputs.shape[:1] and targets.shape[-1] == 1
                else ""
            )
            return (
                "class indices must have the logits' shape without the class dimension "
                f"(dimension 1).{hint}"
            )
        return None

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """``accuracy`` (argmax over dimension 1) and the extra metrics."""
        accuracy = float((outputs.argmax(dim=1) == self.targets(batch)).float().mean())
        return {"accuracy": accuracy, **super().metrics(outputs, batch)}


class RegressionTask(_SupervisedTask):
    """Outputs against real targets of the same shape; mean squared error by default; no
    accuracy (see :class:`_SupervisedTask` for the parameters). Outputs and targets of
    different shapes are a :class:`TaskError`: the loss would broadcast them (outputs ``(N, 1)``
    against targets ``(N,)`` give an ``(N, N)`` loss that does not train the model)."""

    def __init__(
        self, loss_fn: LossFn = nn.functional.mse_loss, *, input_key: str = "input",
        target_key: str = "labels", metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        super().__init__(loss_fn, input_key=input_key, target_key=target_key, metrics=metrics)

    def _shape_problem(self, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        if outputs.shape == targets.shape:
            return None
        if outputs.shape[:-1] == targets.shape and outputs.shape[-1] == 1:
            fix = "`.squeeze(-1)` the outputs (or `.unsqueeze(-1)` the targets)"
        elif targets.shape[:-1] == outputs.shape and targets.shape[-1] == 1:
            fix = "`.squeeze(-1)` the targets (or `.unsqueeze(-1)` the outputs)"
        else:
            fix = "make the model's output and the targets the same shape"
        return f"the loss would broadcast them and train on the wrong figure: {fix}."


def _token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class LanguageModelTask(_SupervisedTask):
    """Next-token prediction: inputs and targets are token tensors ``(N, T)``, the model returns
    logits ``(N, T, V)``; cross-entropy over every position. Reports ``bits_per_token`` (the
    loss in bits); no accuracy. Batches are weighted by their tokens (see
    :class:`_SupervisedTask` for the parameters)."""

    def __init__(
        self, *, input_key: str = "input", target_key: str = "labels",
        metrics: Mapping[str, MetricFn] | None = None,
    ) -> None:
        super().__init__(
            _token_cross_entropy, input_key=input_key, target_key=target_key, metrics=metrics
        )

    def _shape_problem(self, outputs: torch.Tensor, targets: torch.Tensor) -> str | None:
        if outputs.dim() >= 2 and outputs.shape[:-1] == targets.shape:
            return None
        return (
            "a language model needs logits (N, T, V) against tokens (N, T): the logits' shape "
            "without the vocabulary (last) dimension must be the targets'."
        )

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """``bits_per_token`` and the extra metrics."""
        bits = float(_token_cross_entropy(outputs, self.targets(batch))) / math.log(2)
        return {"bits_per_token": bits, **super().metrics(outputs, batch)}

    def batch_size(self, batch: Any) -> int:
        """The batch's target tokens."""
        return int(self.targets(batch).numel())


#: Hugging Face's label for positions that count in no loss.
IGNORE_INDEX = -100

SelfMetricFn = Callable[[Any, Any], float]


class SelfLossTask:
    """A model that computes its own loss: ``model(**batch)`` with the batch a mapping of its
    keyword arguments, the loss read from the outputs (Hugging Face's convention: a batch with
    ``labels`` gives outputs whose ``.loss`` is the mean loss).

    The loss is the model's, so what it means (and what ``labels`` mean) is the model's too; the
    task only checks that there is one scalar loss. Batches are weighted by their examples. It has
    no ``inputs(batch)``: surgery, which runs a probe batch through the model, is not available.

    :param loss_key: where the outputs carry the loss (an attribute, or a key of a mapping).
    :param labels_key: the batch key without which the model computes no loss.
    :param metrics: extra figures, ``name -> fn(outputs, batch)``, measured on every validation
        batch and averaged.
    """

    def __init__(
        self,
        *,
        loss_key: str = "loss",
        labels_key: str = "labels",
        metrics: Mapping[str, SelfMetricFn] | None = None,
    ) -> None:
        self.loss_key = loss_key
        self.labels_key = labels_key
        self.extra_metrics = dict(metrics or {})

    def _error(self, message: str) -> TaskError:
        return TaskError(f"{type(self).__name__}: {message}", task=type(self).__name__)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """See :meth:`Task.to_device` (every tensor in the batch, at any depth)."""
        return move_to_device(batch, device)

    def forward(self, model: nn.Module, batch: Any) -> tuple[Any, torch.Tensor]:
        """See :meth:`Task.forward`: ``outputs = model(**batch)``, the loss from the outputs.

        :raises TaskError: the batch is not a mapping or has no ``labels_key``; the outputs carry
            no loss, or one that is not a scalar.
        """
        if not isinstance(batch, Mapping):
            raise self._error(
                f"a batch must be a mapping of the model's keyword arguments (e.g. "
                f"{{'input_ids': ..., 'labels': ...}}), got a {type(batch).__name__}"
            )
        if self.labels_key not in batch:
            raise self._error(
                f"the batch has no {self.labels_key!r} (keys: {sorted(map(str, batch))[:8]}), so "
                f"the model computes no loss; add it (for a causal language model, labels are the "
                f"input ids: the model shifts them) or pass labels_key="
            )
        outputs = model(**batch)
        loss = self._loss_of(outputs)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            what = (
                "none"
                if loss is None
                else (
                    f"shape {_shape(loss)}"
                    if isinstance(loss, torch.Tensor)
                    else type(loss).__name__
                )
            )
            raise self._error(
                f"the model's outputs ({type(outputs).__name__}) carry no scalar loss at "
                f"{self.loss_key!r} (found {what}); the model must return its mean loss there "
                f"when given {self.labels_key!r}, or pass loss_key="
            )
        return outputs, loss

    def _loss_of(self, outputs: Any) -> Any:
        if isinstance(outputs, Mapping):
            return outputs.get(self.loss_key)
        return getattr(outputs, self.loss_key, None)

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """See :meth:`Task.metrics`: the extra metrics given."""
        return {name: float(fn(outputs, batch)) for name, fn in self.extra_metrics.items()}

    def batch_size(self, batch: Any) -> int:
        """See :meth:`Task.batch_size`: the labels' first dimension."""
        labels = batch[self.labels_key] if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor) or labels.dim() == 0:
            raise self._error(f"the batch's {self.labels_key!r} must be a tensor (N, ...)")
        return int(labels.shape[0])


class HFCausalLMTask(SelfLossTask):
    """A Hugging Face causal language model (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) on
    batches ``{"input_ids": (N, T), "labels": (N, T), "attention_mask": ...}``: the model shifts
    the labels and returns the mean cross-entropy of the positions whose label is not -100.
    Reports ``bits_per_token`` (that loss in bits); batches are weighted by the tokens that count
    (see :class:`SelfLossTask` for the parameters)."""

    def metrics(self, outputs: Any, batch: Any) -> dict[str, float]:
        """``bits_per_token`` and the extra metrics."""
        bits = float(self._loss_of(outputs)) / math.log(2)
        return {"bits_per_token": bits, **super().metrics(outputs, batch)}

    def batch_size(self, batch: Any) -> int:
        """The labelled tokens that count: the labels after the shift, -100 left out."""
        super().batch_size(batch)  # checks the labels
        labels = batch[self.labels_key]
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
