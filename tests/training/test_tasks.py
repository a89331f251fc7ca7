"""Tasks: batches of any shape train through the Trainer (no growth, so no worker processes)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import esper_async as ea
from esper_async.errors import LoaderError
from esper_async.training import move_to_device


def _blobs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) * 0.3 + nn.functional.one_hot(y, 4).float()[:, :4] * 2
    return x, y


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_dict_batches_train_a_classifier_and_report_accuracy() -> None:
    x, y = _blobs()
    batches = [{"input": x[i : i + 16], "labels": y[i : i + 16]} for i in range(0, 64, 16)]
    trainer = ea.Trainer(_classifier(), grow=False, optimizer=None)
    result = anyio.run(lambda: trainer.fit(batches, batches, epochs=4))
    first, last = result.history[0], result.history[-1]
    assert last.val_loss < first.val_loss
    assert last.metrics["accuracy"] == last.val_acc
    assert last.val_acc > 0.8


@dataclass
class _Batch:
    features: torch.Tensor
    target: torch.Tensor


def test_object_batches_with_named_fields() -> None:
    x, y = _blobs()
    batches = [_Batch(x[i : i + 32], y[i : i + 32]) for i in (0, 32)]
    task = ea.ClassificationTask(input_key="features", target_key="target")
    model = _classifier()
    trainer = ea.Trainer(model, grow=False, task=task)
    result = anyio.run(lambda: trainer.fit(batches, batches, epochs=2))
    assert result.steps == 4
    # The accuracy reported is the model's on the named fields, measured here independently.
    with torch.no_grad():
        model.eval()
        correct = sum(int((model(b.features).argmax(1) == b.target).sum()) for b in batches)
    assert result.history[-1].val_acc == pytest.approx(correct / 64)


def test_a_missing_key_is_a_clear_error() -> None:
    x, y = _blobs()
    batches = [{"x": x, "y": y}]
    trainer = ea.Trainer(_classifier(), grow=False)
    with pytest.raises(KeyError, match="no key 'input'"):
        anyio.run(lambda: trainer.fit(batches, batches, epochs=1))


def test_regression_reports_its_own_metric_and_no_accuracy() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    mae = {"mae": lambda out, target: float((out - target).abs().mean())}
    torch.manual_seed(0)
    trainer = ea.Trainer(nn.Linear(3, 1), grow=False, task=ea.RegressionTask(metrics=mae))
    result = anyio.run(lambda: trainer.fit(data, data, epochs=5))
    report = result.history[-1]
    assert set(report.metrics) == {"mae"}
    assert math.isnan(report.val_acc)
    assert report.metrics["mae"] < result.history[0].metrics["mae"]
    with torch.no_grad():
        expected = float((trainer.model(x) - y).abs().mean())
    assert report.metrics["mae"] == pytest.approx(expected, rel=1e-5)


class _TinyLM(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))  # (N, T, V)


def test_a_tiny_language_model_trains_and_reports_bits_per_token() -> None:
    # The next token is the current one plus one (mod 11): learnable from one token.
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (32, 9), generator=gen)
    tokens = (tokens[:, :1] + torch.arange(9)) % 11
    data = [{"input": tokens[i : i + 8, :-1], "labels": tokens[i : i + 8, 1:]}
            for i in range(0, 32, 8)]
    torch.manual_seed(0)
    trainer = ea.Trainer(_TinyLM(), grow=False, task=ea.LanguageModelTask(),
                         optimizer=None)
    result = anyio.run(lambda: trainer.fit(data, data, epochs=6))
    first, last = result.history[0], result.history[-1]
    assert set(last.metrics) == {"bits_per_token"}
    assert last.metrics["bits_per_token"] == pytest.approx(last.val_loss / math.log(2), rel=1e-5)
    assert math.isnan(last.val_acc)
    assert last.val_loss < first.val_loss < math.log(11) * 1.2


class _Stream(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = _blobs(48)
        return iter(zip(x, y, strict=True))


def test_an_iterable_dataset_loader_without_len_trains() -> None:
    loader = DataLoader(_Stream(), batch_size=16)
    trainer = ea.Trainer(_classifier(), grow=False)
    result = anyio.run(lambda: trainer.fit(loader, loader, epochs=2))
    assert result.steps == 6 and len(result.history) == 2


def test_a_one_shot_iterator_is_refused_for_several_epochs() -> None:
    x, y = _blobs()
    trainer = ea.Trainer(_classifier(), grow=False)
    with pytest.raises(LoaderError, match="one-shot iterator"):
        anyio.run(lambda: trainer.fit(iter([(x, y)]), [(x, y)], epochs=2))


def test_on_step_sees_every_step_and_its_loss() -> None:
    x, y = _blobs()
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    seen: list[tuple[int, float | None]] = []
    trainer = ea.Trainer(_classifier(), grow=False)
    anyio.run(lambda: trainer.fit(data, data, epochs=2, on_step=lambda s, v: seen.append((s, v))))
    assert [s for s, _ in seen] == list(range(1, 9))
    assert all(loss is not None and math.isfinite(loss) for _, loss in seen)
    assert trainer.result.history[-1].train_loss == pytest.approx(
        sum(loss for _, loss in seen[4:] if loss is not None) / 4
    )


def test_graft_deadline_with_epoch_grafts_is_rejected() -> None:
    for graft in ("epoch", "eager", "auto"):
        with pytest.raises(ValueError, match="graft='step' only"):
            ea.Trainer(_classifier(), graft=graft, graft_deadline_epochs=3)  # type: ignore[arg-type]
    ea.Trainer(_classifier(), graft="step", graft_deadline_epochs=3)
    with pytest.raises(ValueError, match="not both"):
        ea.Trainer(_classifier(), loss_fn=nn.functional.cross_entropy, task=ea.RegressionTask())
    with pytest.raises(ValueError, match="settle"):
        anyio.run(lambda: ea.Trainer(_classifier(), grow=False).fit([], [], epochs=1,
                                                                   settle="maybe"))  # type: ignore[arg-type]


def test_move_to_device_reaches_every_tensor() -> None:
    @dataclass
    class Pair:
        a: torch.Tensor
        b: list[torch.Tensor]

    batch = {"x": (torch.ones(1), [torch.zeros(2)]), "p": Pair(torch.ones(1), [torch.ones(1)]),
             "n": 3}
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["n"] == 3 and isinstance(moved["p"], Pair)
    assert torch.equal(moved["x"][1][0], torch.zeros(2))
