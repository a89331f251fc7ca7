"""A Hugging Face model that computes its own loss grows under the Grower and the Trainer
(issue 24). GPT-2 built from a tiny config: nothing is downloaded. These start compile worker
processes: marked slow."""

from __future__ import annotations

import math

import anyio
import pytest
import torch

import esper_async as ea
from esper_async.training import HFCausalLMTask, SelfLossTask, TaskError

transformers = pytest.importorskip("transformers")

SLOTS = ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def _gpt2(model: torch.nn.Module) -> torch.nn.Module:
    ea.wrap(model, SLOTS, example_input=torch.zeros(2, 12, dtype=torch.long))
    return model


def _batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Token sequences with a learnable pattern (running sums mod the vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 8, (4, 12), generator=gen).cumsum(dim=1) % 32
        out.append({"input_ids": ids, "labels": ids})
    return out


def _eager() -> ea.HeuristicController:
    return ea.HeuristicController(ea.ControllerConfig.eager())


@pytest.mark.slow
def test_gpt2_grows_under_the_grower_in_a_hand_written_loop(tiny_gpt2) -> None:
    model = _gpt2(tiny_gpt2())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train, val = _batches(8, 0), _batches(2, 1)

    async def loop() -> list[ea.EpochReport]:
        reports = []
        async with ea.Grower(
            model, optimizer, task=HFCausalLMTask(), controller=_eager(), seed=0
        ) as grower:
            for _ in range(3):
                model.train()
                for batch in train:
                    optimizer.zero_grad()
                    loss = model(**batch).loss  # the model's own loss
                    loss.backward()
                    optimizer.step()
                    grower.after_step(loss.detach())
                reports.append(await grower.end_epoch(val))
        return reports

    reports = anyio.run(loop)
    assert reports[-1].val_loss < reports[0].val_loss
    bits = reports[-1].metrics["bits_per_token"]
    assert bits == pytest.approx(reports[-1].val_loss / math.log(2), rel=1e-6)
    grafted = [s for s in SLOTS if model.get_submodule(s).seed is not None]
    assert grafted, "no seed was grafted into the GPT-2"
    # graft="auto" is eager: seeds train from their germination on, and are still live.
    assert all(model.get_submodule(s).lifecycle.live for s in grafted)


@pytest.mark.slow
def test_gpt2_grows_under_the_trainer(tiny_gpt2) -> None:
    model = _gpt2(tiny_gpt2())
    trainer = ea.Trainer(model, task=HFCausalLMTask(), controller=_eager(), seed=0)
    result = anyio.run(lambda: trainer.fit(_batches(8, 0), _batches(2, 1), epochs=3))
    assert result.history[-1].val_loss < result.history[0].val_loss
    moves = [(e.source, e.target) for e in result.events]
    assert ("dormant", "germinated") in moves
    assert ("germinated", "training") in moves  # a kernel was grafted


def test_self_loss_task_refuses_what_cannot_give_a_loss(tiny_gpt2) -> None:
    model = _gpt2(tiny_gpt2())
    ids = torch.randint(0, 32, (2, 12))
    task = SelfLossTask()
    with pytest.raises(TaskError, match="must be a mapping"):
        task.forward(model, (ids, ids))
    with pytest.raises(TaskError, match=r"no 'labels'.*labels are the input ids"):
        task.forward(model, {"input_ids": ids})
    with pytest.raises(TaskError, match="no scalar loss at 'nll'"):
        SelfLossTask(loss_key="nll").forward(model, {"input_ids": ids, "labels": ids})
    outputs, loss = task.forward(model, {"input_ids": ids, "labels": ids})
    assert loss.dim() == 0 and outputs.logits.shape == (2, 12, 32)
    ids[0, :6] = -100  # positions that count in no loss
    assert HFCausalLMTask().batch_size({"input_ids": ids, "labels": ids}) == 2 * 11 - 5
