"""Shapes that the loss would broadcast or reject are typed errors naming both (issue 24)."""

from __future__ import annotations

import anyio
import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.errors import EsperError
from esper_async.training import TaskError


def _fit(model: nn.Module, task: object, batches: list) -> None:
    trainer = ea.Trainer(model, grow=False, task=task)  # type: ignore[arg-type]
    anyio.run(lambda: trainer.fit(batches, batches, epochs=1))


def test_regression_outputs_n1_against_targets_n_is_refused_with_the_fix() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x.sum(dim=1)  # (16,), while nn.Linear(3, 1) gives (16, 1)
    with pytest.raises(TaskError) as caught:
        _fit(nn.Linear(3, 1), ea.RegressionTask(), [(x, y)])
    message = str(caught.value)
    assert "outputs have shape (16, 1) and the targets (16,)" in message
    assert "`.squeeze(-1)` the outputs" in message
    assert isinstance(caught.value, EsperError) and caught.value.task == "RegressionTask"


def test_regression_targets_n1_against_outputs_n_names_the_targets_fix() -> None:
    task = ea.RegressionTask()
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))  # (N,)
    with pytest.raises(TaskError, match=r"\(8,\) and the targets \(8, 1\).*squeeze\(-1\)` the tar"):
        task.forward(model, (torch.randn(8, 3), torch.randn(8, 1)))


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        pytest.param(
            torch.zeros(8, 1, dtype=torch.long),
            r"\(8, 3\) and the targets \(8, 1\).*"
            r"squeeze\(-1\)` the targets",
            id="indices-n1",
        ),
        pytest.param(
            torch.zeros(6, dtype=torch.long), r"\(8, 3\) and the targets \(6,\)", id="other-batch"
        ),
        pytest.param(torch.zeros(8, 4), r"probabilities .* logits' shape", id="probabilities"),
    ],
)
def test_classification_shape_mismatches_are_typed(targets: torch.Tensor, expected: str) -> None:
    with pytest.raises(TaskError, match=expected):
        ea.ClassificationTask().forward(nn.Linear(4, 3), (torch.randn(8, 4), targets))


def test_language_model_logits_must_match_the_tokens() -> None:
    model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
    tokens = torch.randint(0, 11, (2, 5))
    with pytest.raises(TaskError, match=r"\(2, 5, 11\) and the targets \(2, 6\)"):
        ea.LanguageModelTask().forward(model, (tokens, torch.randint(0, 11, (2, 6))))
    _, loss = ea.LanguageModelTask().forward(model, (tokens, tokens))
    assert loss.dim() == 0


def test_matching_shapes_still_train() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3)
    y = x.sum(dim=1, keepdim=True)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        before = float(nn.functional.mse_loss(model(x), y))
    _fit(model, ea.RegressionTask(), [(x, y)] * 8)
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(x), y)) < before
