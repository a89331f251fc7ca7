"""Width growth in training: a widening's trial counterfactual (its new units ablated), a width
growth run end to end, and static_final rebuilt with the widths growth ended with."""

from __future__ import annotations

import anyio
import pytest
import torch
from torch import nn

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.apps.static_final import graft_widenings
from esper_async.control import WIDEN_ARM
from esper_async.surgery import SurgeryContext
from esper_async.training import ClassificationTask
from esper_async.training._evaluate import evaluate
from esper_async.training._widths import WidthTrial, grow_width_operation, measure_widths

DATA = digits_loaders(seed=0, limit=300)


def _host() -> DigitsHost:
    torch.manual_seed(0)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    return model


def _widened(init: str, target: str) -> tuple[DigitsHost, torch.optim.Adam, WidthTrial]:
    model = _host()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = next(iter(DATA.val))
    width = 2 * model.get_submodule(target).host.weight.shape[0]
    operation, trial = grow_width_operation(
        model, ClassificationTask(), batch, target, width, init, seed=4
    )
    ctx = SurgeryContext(model, opt, probe=None)
    before = list(model.parameters())
    operation.apply(ctx)
    ctx.sync_optimizer(before)
    return model, opt, trial


@pytest.mark.parametrize("init", ["gradmax", "zero_fanout", "split_noise", "net2wider"])
@pytest.mark.parametrize("target", ["conv1", "conv2", "fc1"])
def test_at_birth_ablating_the_new_units_changes_nothing_and_weights_come_back(
    init: str, target: str
) -> None:
    model, opt, trial = _widened(init, target)
    task, device = ClassificationTask(), torch.device("cpu")
    measured = evaluate(model, {}, task, DATA.val, device)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cf = measure_widths(model, task, DATA.val, device, {target: trial}, measured)[target]
    assert cf.loss_with == measured.loss
    assert abs(cf.loss_without - cf.loss_with) < 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # after training, the new units carry something of their own
    model.train()
    for x, y in list(DATA.train) * 3:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    measured = evaluate(model, {}, task, DATA.val, device)
    cf = measure_widths(model, task, DATA.val, device, {target: trial}, measured)[target]
    assert abs(cf.loss_without - cf.loss_with) > 1e-6


def test_a_trial_record_round_trips_through_json() -> None:
    _, _, trial = _widened("split_noise", "conv2")
    assert WidthTrial.from_json(trial.to_json()) == trial
    assert all(sources is not None for _, _, sources in trial.columns)
    _, _, zero = _widened("gradmax", "conv2")
    assert [len(c) for _, c, _ in zero.columns] == [4 * 16]  # conv2 → fc1 through flatten(1)
    assert all(sources is None for _, _, sources in zero.columns)


async def _width_run() -> tuple[ea.Trainer, ea.FitResult]:
    model = _host()
    config = ea.ControllerConfig(
        plateau_patience=1, plateau_tolerance=1.0, max_live_seeds=3, width_growth=True,
        width_trial_epochs=1,
    )
    trainer = ea.Trainer(model, controller=ea.HeuristicController(config, blueprints=()))
    result = await trainer.fit(DATA.train, DATA.val, epochs=4)
    return trainer, result


@pytest.mark.slow
def test_a_width_growth_run_widens_measures_rewards_and_rebuilds_as_static_final() -> None:
    trainer, result = anyio.run(_width_run)
    records = trainer.surgeries
    assert records and all(r["op"] == "widen_slot" and r["init"] == "gradmax" for r in records)
    widened = {r["target"] for r in records}
    measured = [r for r in result.history if r.width_counterfactual]
    assert measured
    for report in measured:
        assert set(report.width_counterfactual) <= widened
        for cf in report.width_counterfactual.values():
            assert cf.loss_with == report.val_loss
    controller = trainer.controller
    assert isinstance(controller, ea.HeuristicController)
    rewarded = [s for s in widened if controller.selector.mean_reward((s, WIDEN_ARM)) != 0.0]
    assert rewarded  # the trials ended with a reward
    assert set(trainer.grower.width_trials) <= widened
    # static_final: the same shapes, the widened layers freshly initialised
    final = _host()
    changed = graft_widenings(final, records, seed=0)
    grown = trainer.model.state_dict()
    assert {k: v.shape for k, v in final.state_dict().items()} == {
        k: v.shape for k, v in grown.items()
    }
    assert changed and all(
        not torch.equal(final.get_submodule(n).weight, trainer.model.get_submodule(n).weight)
        for n in changed
    )
    fresh = final.get_submodule(changed[0]).weight
    assert bool((fresh != 0).all())  # a fresh init, no zero fan-out columns
