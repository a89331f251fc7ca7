from __future__ import annotations

import torch
from _helpers import cull, grow, host, optimizer_tensors, same_tensors, structure, train

from esper_async.reliability import Snapshot
from esper_async.seeds import find_slots


def same_list(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_rollback_restores_structure_parameters_and_optimizer_across_growth_and_culls() -> None:
    model = host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    slots = find_slots(model)
    grow(model, opt, "0", rank=2)
    slots["0"].start_blending(4, "test")
    train(model, opt, 3)
    snap = Snapshot.take(3, model, opt, slots)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_structure = structure(model)
    before_moments = [t.clone() for t in optimizer_tensors(opt)]

    # After the snapshot: the seed in "0" is culled, a new one grows in "2", training moves on.
    cull(model, opt, "0")
    grow(model, opt, "2", rank=3)
    train(model, opt, 4, seed=1)
    assert structure(model) != before_structure

    snap.restore(model, opt, slots)
    assert structure(model) == before_structure
    assert slots["2"].seed is None and slots["0"].seed is not None
    assert same_tensors(model.state_dict(), before_state)
    assert same_list(optimizer_tensors(opt), before_moments)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters()
    }

    # Training from the restored state does not write into the snapshot: it can be restored again.
    train(model, opt, 2, seed=2)
    snap.restore(model, opt, slots)
    assert same_tensors(model.state_dict(), before_state)
    assert same_list(optimizer_tensors(opt), before_moments)
