"""GrowthSchedule: stages fire on their triggers, the learning rate follows GrowthLR, failures roll
back, and a resumed schedule rebuilds the grown structure."""

from __future__ import annotations

import copy
import itertools
import math
import sys
from pathlib import Path

import anyio
import pytest
import torch
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    GrowthLR,
    GrowthSchedule,
    GrowthStage,
    Plateau,
    StackBlocks,
)


class Block(nn.Module):
    """A pre-norm residual MLP block, as a user would write one."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, depth: int = 2, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make(seed: int = 0, **schedule: object) -> tuple[Net, torch.optim.Optimizer, GrowthSchedule]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stages = schedule.pop("stages", [GrowthStage([StackBlocks("blocks", factor=2)], at_step=3)])
    grow = GrowthSchedule(model, optimizer, stages=stages, probe=torch.randn(2, 4), **schedule)
    return model, optimizer, grow


def train(grow: GrowthSchedule, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    gen = torch.Generator().manual_seed(7)
    losses: list[float] = []
    for step in steps:
        grow.maybe_grow(step=step, tokens=step * 16, loss=losses[-1] if losses else None)
        x = torch.randn(16, 4, generator=gen)
        loss = grow.model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_stage_fires_at_its_step_and_new_blocks_train() -> None:
    model, optimizer, grow = make()
    train(grow, optimizer, range(3))
    assert len(model.blocks) == 2 and not grow.events
    train(grow, optimizer, range(3, 5))
    assert len(model.blocks) == 4
    (event,) = grow.events
    assert (event.stage, event.step, event.tokens) == (0, 3, 48)
    assert event.parameters_after > event.parameters_before
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for p in model.blocks[3].parameters())
    # the copies were trained after the growth: they differ from their sources now
    assert not torch.equal(model.blocks[3].up.weight, model.blocks[1].up.weight)
    assert grow.done


def test_token_trigger_and_stages_in_order() -> None:
    stages = [
        GrowthStage([StackBlocks("blocks", factor=2)], at_tokens=32, name="deeper"),
        GrowthStage([StackBlocks("blocks", factor=2)], at_step=10, name="deeper again"),
    ]
    model, optimizer, grow = make(stages=stages)
    train(grow, optimizer, range(4))
    assert [e.name for e in grow.events] == ["deeper"]
    assert grow.events[0].tokens == 32
    train(grow, optimizer, range(4, 11))
    assert [e.name for e in grow.events] == ["deeper", "deeper again"]
    assert len(model.blocks) == 8


def test_plateau_fires_on_a_flat_loss_and_not_on_a_falling_one() -> None:
    stage = GrowthStage([StackBlocks("blocks", factor=2)], plateau=Plateau(patience=5))
    _, _, grow = make(stages=[stage])
    for step in range(30):
        grow.maybe_grow(step=step, loss=10.0 * 0.9**step)
    assert not grow.events
    for step in range(30, 130):
        grow.maybe_grow(step=step, loss=1.0)
    assert len(grow.events) == 1 and 30 < grow.events[0].step < 130


@pytest.mark.parametrize(
    "after",
    [
        pytest.param("keep", id="keep"),
        pytest.param("rewarm", id="rewarm"),
        pytest.param("restart", id="restart"),
    ],
)
def test_learning_rate_after_growth(after: str) -> None:
    lr = GrowthLR(
        peak=1.0, total_steps=100, warmup_steps=10, min_lr=0.1, after_growth=after, rewarm_steps=10
    )  # type: ignore[arg-type]
    assert lr.at(4, None) == pytest.approx(0.5)
    assert lr.at(10, None) == pytest.approx(1.0)
    assert lr.at(100, None) == pytest.approx(0.1)
    at_growth = lr.base(50)
    rates = [lr.at(s, 50) for s in range(50, 101)]
    assert rates[-1] == pytest.approx(0.1)
    if after == "keep":
        assert rates == [lr.base(s) for s in range(50, 101)]
    elif after == "restart":
        assert rates[0] == pytest.approx(1.0)
    else:
        assert at_growth < rates[0] < rates[9] == pytest.approx(1.0)
        assert all(a >= b for a, b in itertools.pairwise(rates[9:]))


def test_schedule_sets_every_group_rate() -> None:
    lr = GrowthLR(peak=0.5, total_steps=10, after_growth="restart")
    _, optimizer, grow = make(lr=lr)
    train(grow, optimizer, range(6))
    rate = lr.at(5, 3)
    assert {g["lr"] for g in optimizer.param_groups} == {rate}
    assert rate == pytest.approx(0.5 * (0.5 + 0.5 * math.cos(math.pi * 2 / 7)))


def test_a_failing_stage_rolls_back_and_raises() -> None:
    model, _, grow = make(stages=[GrowthStage([StackBlocks("nope")], at_step=0)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError):
        grow.maybe_grow(step=0)
    assert not grow.events
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_replays_the_growth() -> None:
    model, optimizer, grow = make()
    train(grow, optimizer, range(6))
    # a deep copy, as torch.save would make: load_state_dict may alias the optimizer's tensors
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": grow.state_dict(),
        }
    )

    fresh, fresh_opt, again = make(seed=1)
    again.load_state_dict(saved["schedule"])
    again.replay()
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])
    assert len(fresh.blocks) == 4
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert again.done and again.grown_at == 3
    # continuing does not fire the stage again, and both runs take the same next step
    train(grow, optimizer, range(6, 8))
    train(again, fresh_opt, range(6, 8))
    torch.testing.assert_close(fresh(x), model(x))


def test_resume_rejects_a_state_of_another_schedule() -> None:
    _, optimizer, grow = make()
    train(grow, optimizer, range(4))
    state = grow.state_dict()
    state["events"].append(dict(state["events"][0], stage=1))
    _, _, other = make()
    with pytest.raises(SurgeryError, match="do not fit"):
        other.load_state_dict(state)
    with pytest.raises(SurgeryError, match="version"):
        other.load_state_dict({"version": 99, "events": []})


def test_async_loops_use_the_async_entry_point() -> None:
    model, _, grow = make(stages=[GrowthStage([StackBlocks("blocks", factor=2)], at_step=0)])

    async def main() -> None:
        with pytest.raises(SurgeryError, match="maybe_grow_async"):
            grow.maybe_grow(step=0)
        assert len(await grow.maybe_grow_async(step=0)) == 1

    anyio.run(main)
    assert len(model.blocks) == 4


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: GrowthStage([StackBlocks()]), id="no-trigger"),
        pytest.param(lambda: GrowthStage([StackBlocks()], at_step=-1), id="negative-step"),
        pytest.param(lambda: Plateau(patience=0), id="plateau-patience"),
        pytest.param(lambda: GrowthLR(peak=1.0, total_steps=0), id="lr-total"),
        pytest.param(lambda: GrowthLR(peak=1.0, total_steps=9, min_lr=2.0), id="lr-min"),
        pytest.param(lambda: GrowthLR(peak=1.0, total_steps=9, after_growth="x"), id="lr-mode"),
    ],
)
def test_bad_configuration_is_refused(build: object) -> None:
    with pytest.raises(SurgeryError):
        build()  # type: ignore[operator]


def test_a_stage_without_operations_is_refused() -> None:
    _, _, grow = make(stages=[GrowthStage(lambda m: [], at_step=0)])
    with pytest.raises(SurgeryError, match="at least one SurgeryOperation"):
        grow.maybe_grow(step=0)


def test_the_own_loop_example_grows_and_resumes(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import grow_host_own_loop as example

    ckpt = tmp_path / "ckpt.pt"
    first = example.train(20, checkpoint=ckpt)
    assert (first.depth, first.grown_at) == (4, 4)
    assert sum(first.losses[-5:]) < sum(first.losses[:5])
    # a fresh 2-block model, the recorded stacking replayed, then the checkpoint's tensors
    again = example.train(20, checkpoint=ckpt, resume=True)
    assert again.depth == 4 and not again.losses
    assert again.val_loss == first.val_loss
