"""A GrowthSchedule driven by the Grower (own loop) and the Trainer: the host grows at its
trigger, its growth is in the Grower's one state path, and a resume replays it exactly."""

from __future__ import annotations

import anyio
import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.errors import TrainingConfigError
from esper_async.reliability import CheckpointMismatchError
from esper_async.surgery import GrowthSchedule, GrowthStage, StackBlocks
from esper_async.training import Grower


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc(torch.relu(self.norm(h)))


class Host(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([Block(width)])
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _data(seed: int = 0, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


def _build(at_step: int = 3) -> tuple[Host, torch.optim.Optimizer, GrowthSchedule]:
    torch.manual_seed(0)
    model = Host()
    ea.wrap(model, ["inp"], example_input=torch.zeros(2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = GrowthSchedule(
        model, opt, probe=torch.zeros(2, 8),
        stages=[GrowthStage([StackBlocks("blocks", factor=2)], at_step=at_step, name="x2")],
    )
    return model, opt, schedule


async def _own_loop(model: Host, opt: torch.optim.Optimizer, grower: Grower, steps: int) -> None:
    for x, y in _data()[:steps]:
        model.train()
        opt.zero_grad()
        loss = nn.functional.cross_entropy(grower.model(x), y)
        loss.backward()
        opt.step()
        grower.after_step(loss)
        await grower.grow_host(loss=loss.item())


@pytest.mark.asyncio
async def test_own_loop_grows_at_the_trigger_and_resumes_the_grown_host_exactly() -> None:
    model, opt, schedule = _build(at_step=3)
    async with Grower(model, opt, grow=False, host_schedule=schedule) as grower:
        await _own_loop(model, opt, grower, 2)
        assert len(model.blocks) == 1  # not due yet
        await _own_loop(model, opt, grower, 3)
        assert len(model.blocks) == 2
        assert [e.name for e in schedule.events] == ["x2"] and schedule.events[0].step == 3
        # The copies train: the optimizer holds them and they move.
        copy = model.blocks[1].fc.weight
        assert any(copy is p for group in opt.param_groups for p in group["params"])
        before = copy.detach().clone()
        await _own_loop(model, opt, grower, 1)
        assert not torch.equal(before, copy.detach())
        state = grower.state_dict()
    fresh, fresh_opt, fresh_schedule = _build(at_step=3)
    again = Grower(fresh, fresh_opt, grow=False, host_schedule=fresh_schedule)
    again.load_state_dict(state)  # from inside a running loop: replayed on a thread of its own
    assert len(fresh.blocks) == 2 and fresh_schedule.done
    grown, resumed = model.state_dict(), fresh.state_dict()
    assert grown.keys() == resumed.keys()
    assert all(torch.equal(grown[k], resumed[k]) for k in grown)
    assert set(again.slots) == {"inp"}


def test_a_checkpoint_with_host_growth_needs_the_schedule_to_resume() -> None:
    async def grown_state() -> dict:
        model, opt, schedule = _build(at_step=1)
        async with Grower(model, opt, grow=False, host_schedule=schedule) as grower:
            await _own_loop(model, opt, grower, 2)
            return grower.state_dict()

    state = anyio.run(grown_state)
    fresh, fresh_opt, _ = _build()
    with pytest.raises(CheckpointMismatchError, match="host_schedule"):
        Grower(fresh, fresh_opt, grow=False).load_state_dict(state)


def test_a_schedule_on_another_optimizer_is_refused() -> None:
    model, _, schedule = _build()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingConfigError, match="same objects"):
        Grower(model, other, grow=False, host_schedule=schedule)


@pytest.mark.asyncio
async def test_the_trainer_grows_the_host_at_an_epoch_boundary() -> None:
    model, opt, schedule = _build(at_step=4)
    trainer = ea.Trainer(model, optimizer=opt, grow=False, host_schedule=schedule,
                         progress="off")
    data = _data(n=4)
    result = await trainer.fit(data, _data(seed=1, n=2), epochs=2)
    assert len(model.blocks) == 2  # grown after epoch 0 (4 steps), trained in epoch 1
    assert schedule.events[0].step == 4 and len(result.history) == 2
    assert trainer.param_count() == sum(p.numel() for p in model.parameters())


@pytest.mark.asyncio
async def test_seeds_in_stacked_blocks_come_along_in_the_same_slot_mapping() -> None:
    torch.manual_seed(0)
    model = Host()
    ea.wrap(model, ["blocks.0.fc"], example_input=torch.zeros(2, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = GrowthSchedule(
        model, opt, probe=torch.zeros(2, 8),
        stages=[GrowthStage([StackBlocks("blocks", factor=2)], at_step=1, name="x2")],
    )
    async with Grower(model, opt, grow=False, host_schedule=schedule) as grower:
        slots = grower.slots  # what the Trainer's step guard holds
        await _own_loop(model, opt, grower, 2)
        assert grower.slots is slots  # updated in place, never rebound
        assert sorted(slots) == ["blocks.0.fc", "blocks.1.fc"]
        assert all(s is m for s, m in zip(
            (slots["blocks.0.fc"], slots["blocks.1.fc"]),
            (model.blocks[0].fc, model.blocks[1].fc), strict=True))


@pytest.mark.asyncio
async def test_a_checkpoint_with_less_growth_than_the_model_is_refused() -> None:
    model, opt, schedule = _build(at_step=2)
    async with Grower(model, opt, grow=False, host_schedule=schedule) as grower:
        await _own_loop(model, opt, grower, 1)
        before = grower.state_dict()  # no growth yet
        await _own_loop(model, opt, grower, 2)
        assert len(model.blocks) == 2
    with pytest.raises(CheckpointMismatchError, match="afresh"):
        grower.load_state_dict(before)


def test_the_trainer_refuses_a_schedule_it_cannot_drive() -> None:
    from esper_async.surgery import GrowthLR

    model, opt, _ = _build()
    per_step_lr = GrowthSchedule(
        model, opt, probe=torch.zeros(2, 8), lr=GrowthLR(peak=1e-2, total_steps=10),
        stages=[GrowthStage([StackBlocks("blocks")], at_step=2)],
    )
    with pytest.raises(TrainingConfigError, match="lr=None"):
        ea.Trainer(model, optimizer=opt, grow=False, host_schedule=per_step_lr)
    tokens_only = GrowthSchedule(
        model, opt, probe=torch.zeros(2, 8),
        stages=[GrowthStage([StackBlocks("blocks")], at_tokens=1000, name="t")],
    )
    with pytest.raises(TrainingConfigError, match="tokens only"):
        ea.Trainer(model, optimizer=opt, grow=False, host_schedule=tokens_only)
