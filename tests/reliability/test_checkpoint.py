from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _helpers import grow, host, optimizer_tensors, same_tensors, structure, train

from esper_async.reliability import (
    CheckpointError,
    CheckpointStore,
    capture_state,
    restore_state,
    write_atomic,
)
from esper_async.seeds import find_slots


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


Run = tuple[
    torch.nn.Module, torch.optim.Optimizer, dict, "Counter", torch.optim.lr_scheduler.StepLR
]


def _run() -> Run:
    model = host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    kernels = {}
    k = grow(model, opt, "0", rank=2)
    kernels[k.kernel_id] = k
    slots = find_slots(model)
    slots["0"].start_blending(2, "test")
    train(model, opt, 3)
    slots["0"].fossilize("test")
    k = grow(model, opt, "2", rank=3)
    kernels[k.kernel_id] = k
    train(model, opt, 2, seed=1)
    sched.step()
    counter = Counter()
    counter.n = 42
    return model, opt, kernels, counter, sched


def test_checkpoint_round_trip_restores_everything_without_compiling(tmp_path: Path) -> None:
    model, opt, kernels, counter, sched = _run()
    gen = torch.Generator().manual_seed(5)
    gen.seed()
    payload = capture_state(
        epoch=3, step=5, model=model, optimizer=opt, slots=find_slots(model), kernels=kernels,
        stateful={"counter": counter, "scheduler": sched}, record={"history": [1, 2]},
        generator=gen,
    )
    expected_rand = torch.rand(3)
    expected_gen = torch.rand(3, generator=gen)
    store = CheckpointStore(tmp_path / "ckpt")
    path = store.save(payload)
    assert path.name == "ckpt-00000003.pt"

    fresh = host()  # same wrapping, no seeds, fresh optimizer and statistics
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
    fresh_counter = Counter()
    fresh_gen = torch.Generator()
    restored = restore_state(
        store.load(), model=fresh, optimizer=fresh_opt, slots=find_slots(fresh),
        stateful={"counter": fresh_counter, "scheduler": fresh_sched}, generator=fresh_gen,
    )
    assert (restored.epoch, restored.step, restored.record) == (3, 5, {"history": [1, 2]})
    assert structure(fresh) == structure(model)
    assert [s.state.value for s in find_slots(fresh).values()] == ["fossilized", "training"]
    assert same_tensors(fresh.state_dict(), model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(fresh_opt),
                                                  optimizer_tensors(opt), strict=True))
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert fresh_counter.n == 42 and fresh_sched.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(3), expected_rand)
    assert torch.equal(torch.rand(3, generator=fresh_gen), expected_gen)
    # Training continues identically from the original and the restored state.
    train(model, opt, 2, seed=9)
    train(fresh, fresh_opt, 2, seed=9)
    assert same_tensors(fresh.state_dict(), model.state_dict())


def test_keeps_the_newest_and_skips_an_unreadable_one(tmp_path: Path) -> None:
    model, opt, kernels, counter, _ = _run()
    store = CheckpointStore(tmp_path, keep=2)
    for epoch in range(4):
        counter.n = epoch
        store.save(capture_state(
            epoch=epoch, step=epoch, model=model, optimizer=opt, slots=find_slots(model),
            kernels=kernels, stateful={"counter": counter}, record={},
        ))
    assert [p.name for p in store.paths()] == ["ckpt-00000002.pt", "ckpt-00000003.pt"]
    store.paths()[-1].write_bytes(b"rotten")
    assert store.load()["epoch"] == 2
    with pytest.raises(CheckpointError, match="does not end with its digest trailer"):
        store.load(store.paths()[-1])


def test_a_torn_write_leaves_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    write_atomic(target, b"committed")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]  # fails mid-write
    assert target.read_bytes() == b"committed"
    assert os.listdir(tmp_path) == ["file"]


def test_refuses_a_model_with_other_slots(tmp_path: Path) -> None:
    model, opt, kernels, _, _ = _run()
    payload = capture_state(
        epoch=0, step=0, model=model, optimizer=opt, slots=find_slots(model), kernels=kernels,
        stateful={}, record={},
    )
    other = host()
    with pytest.raises(CheckpointError, match="wrap the model with the same targets"):
        restore_state(payload, model=other, optimizer=torch.optim.Adam(other.parameters()),
                      slots={"0": find_slots(other)["0"]}, stateful={})
