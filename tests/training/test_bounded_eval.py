"""Bounded evaluation: counterfactuals on a fraction of validation, and what they cost."""

from __future__ import annotations

import anyio
import pytest
import torch

import esper_async as ea
from esper_async.apps.demo import DigitsHost
from esper_async.blueprints import Blueprint
from esper_async.control import ControllerConfig
from esper_async.errors import ControllerConfigError
from esper_async.seeds import eager_seed, find_slots
from esper_async.training._bounded_eval import bounded_evaluate, selected, strided
from esper_async.training._evaluate import evaluate
from esper_async.training._task import ClassificationTask

CPU = torch.device("cpu")


def _blended_model() -> tuple[torch.nn.Module, dict[str, ea.SeedSlot]]:
    torch.manual_seed(0)
    model = DigitsHost()
    ea.wrap(model, ["fc1"], example_input=torch.zeros(2, 1, 8, 8))
    slots = find_slots(model)
    slot = slots["fc1"]
    blueprint = Blueprint("mlp", {"hidden_mult": 2})
    slot.germinate(blueprint)
    seed = eager_seed(blueprint, slot.contract, seed=1, device=CPU)  # type: ignore[arg-type]
    with torch.no_grad():  # a seed that changes the output, so its counterfactual is not zero
        for p in seed.parameters():
            p.normal_(0, 0.3)
    slot.graft(seed, seed.stand_in_id)
    slot.start_blending(1)
    slot.on_step()  # α = 1: PROBATION
    return model, slots


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.rand(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen))
        for _ in range(n)
    ]


def test_the_whole_of_validation_gives_exactly_evaluate() -> None:
    model, slots = _blended_model()
    val, task = _batches(5), ClassificationTask()
    reference = evaluate(model, slots, task, val, CPU)
    measured, cost = bounded_evaluate(model, slots, task, val, CPU, 1.0)
    assert measured == reference
    assert reference.counterfactual["fc1"].loss_with != reference.counterfactual["fc1"].loss_without
    assert (cost.batches, cost.counterfactual_batches) == (5, 5)
    assert cost.validation_s > 0 and cost.counterfactual_s > 0


def test_a_fraction_compares_on_the_same_spread_batches() -> None:
    model, slots = _blended_model()
    val, task = _batches(8), ClassificationTask()
    measured, cost = bounded_evaluate(model, slots, task, val, CPU, 0.25)
    assert [i for i in range(8) if selected(i, 0.25)] == [0, 4]
    subset = list(strided(val, 0.25))
    with_seed = evaluate(model, slots, task, subset, CPU)
    with slots["fc1"].ablated():
        without = evaluate(model, {}, task, subset, CPU)
    cf = measured.counterfactual["fc1"]
    assert (cf.loss_with, cf.loss_without) == (with_seed.loss, without.loss)
    assert measured.loss == evaluate(model, {}, task, val, CPU).loss  # validation stays whole
    assert cost.figures()["counterfactual_share"] == 2 / 8


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ControllerConfigError, match="counterfactual_fraction in"):
        ControllerConfig(counterfactual_fraction=fraction)


def test_the_epoch_report_carries_the_cost() -> None:
    model, _ = _blended_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    controller = ea.HeuristicController(ControllerConfig(counterfactual_fraction=0.5))

    async def one_epoch() -> ea.EpochReport:
        async with ea.Grower(model, optimizer, controller=controller, grow=False) as grower:
            grower.after_step(1.0)
            return await grower.end_epoch(_batches(4))

    report = anyio.run(one_epoch)
    assert report.eval_cost["batches"] == 4
    assert report.eval_cost["counterfactual_batches"] == 2
    assert report.eval_cost["counterfactual_s"] > 0
    assert "fc1" in report.counterfactual
