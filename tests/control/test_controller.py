"""HeuristicController decisions on hand-made epoch reports (real slots and kernels, no workers)."""

from __future__ import annotations

import math

import torch
from torch import nn

from esper_async import (
    Blueprint,
    ControllerConfig,
    EpochReport,
    HeuristicController,
    export_kernel,
    load_kernel,
)
from esper_async.control import Counterfactual, Cull, Fossilize, Germinate, StartBlending
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap

CONFIG = ControllerConfig(plateau_patience=2, plateau_tolerance=0.05, max_live_seeds=2)


def _slots() -> dict[str, SeedSlot]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0"], example_input=torch.zeros(2, 4))
    return find_slots(model)


def _report(epoch: int, val_loss: float, **cf: Counterfactual) -> EpochReport:
    return EpochReport(epoch=epoch, train_loss=val_loss, val_loss=val_loss, val_acc=0.5,
                       counterfactual=cf)


def _to_probation(slot: SeedSlot) -> None:
    assert slot.contract is not None
    kernel = export_kernel(Blueprint("low_rank", {"rank": 2}), slot.contract)
    slot.germinate(kernel.blueprint, "test")
    slot.graft(load_kernel(kernel), kernel.kernel_id)
    slot.start_blending(1, "test")
    slot.on_step()
    slot.lifecycle.epochs_in_state = CONFIG.probation_epochs
    assert slot.state is SeedState.PROBATION


def test_no_growth_while_the_loss_improves() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    history = [_report(0, 1.0), _report(1, 0.8)]
    assert controller.decide(_report(2, 0.6), history, slots) == []


def test_a_plateau_germinates_a_blueprint_in_a_free_slot() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    history = [_report(0, 1.0), _report(1, 0.99)]
    decisions = controller.decide(_report(2, 0.995), history, slots)
    assert len(decisions) == 1 and isinstance(decisions[0], Germinate)
    assert decisions[0].slot == "0" and "plateaued" in decisions[0].reason


def test_no_germination_when_the_only_slot_is_occupied() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    _to_probation(slots["0"])
    slots["0"].lifecycle.epochs_in_state = 0  # not yet due for judgement
    history = [_report(0, 1.0), _report(1, 0.99)]
    assert controller.decide(_report(2, 0.995), history, slots) == []


def test_a_trained_seed_starts_blending() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    slot = slots["0"]
    assert slot.contract is not None
    kernel = export_kernel(Blueprint("low_rank", {"rank": 2}), slot.contract)
    slot.germinate(kernel.blueprint, "test")
    slot.graft(load_kernel(kernel), kernel.kernel_id)
    slot.lifecycle.epochs_in_state = CONFIG.training_epochs
    assert slot.state is SeedState.TRAINING
    decisions = controller.decide(_report(0, 1.0), [], slots)
    assert decisions == [StartBlending("0", "trained 1 epochs", CONFIG.blend_epochs)]


def test_probation_fossilizes_a_seed_that_helps() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    _to_probation(slots["0"])
    helps = Counterfactual(loss_with=0.50, loss_without=0.70, acc_with=0.8, acc_without=0.7)
    decisions = controller.decide(_report(0, 0.5, **{"0": helps}), [], slots)
    assert len(decisions) == 1 and isinstance(decisions[0], Fossilize)
    assert "0.5000 with, 0.7000 without" in decisions[0].reason


def test_probation_culls_a_seed_that_does_not_help() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    _to_probation(slots["0"])
    hurts = Counterfactual(loss_with=0.70, loss_without=0.65, acc_with=0.7, acc_without=0.7)
    decisions = controller.decide(_report(0, 0.7, **{"0": hurts}), [], slots)
    assert len(decisions) == 1 and isinstance(decisions[0], Cull)
    assert "does not help" in decisions[0].reason


def test_probation_without_accuracy_is_judged_on_loss_alone() -> None:
    # A regression or language-model task measures no accuracy: NaN accuracies are not recorded.
    controller, slots = HeuristicController(CONFIG), _slots()
    _to_probation(slots["0"])
    helps = Counterfactual(loss_with=0.5, loss_without=0.9, acc_with=math.nan,
                           acc_without=math.nan)
    decisions = controller.decide(_report(0, 0.5, **{"0": helps}), [], slots)
    assert isinstance(decisions[0], Fossilize)


def test_probation_with_no_measurement_culls() -> None:
    controller, slots = HeuristicController(CONFIG), _slots()
    _to_probation(slots["0"])
    decisions = controller.decide(_report(0, 0.5), [], slots)
    assert decisions == [Cull("0", "no finite counterfactual measurement")]


def test_no_germination_too_late_to_judge_the_seed_before_the_run_ends() -> None:
    config = ControllerConfig(plateau_patience=1, plateau_tolerance=1.0, horizon_epochs=10)
    assert config.lifespan_epochs == 4  # kernel, training, blend, probation
    history = [_report(e, 1.0) for e in range(6)]
    late = HeuristicController(config).decide(_report(6, 1.0), history[:6], _slots())
    assert late == []
    early = HeuristicController(config).decide(_report(5, 1.0), history[:5], _slots())
    assert [type(d) for d in early] == [Germinate]
    unknown = ControllerConfig(plateau_patience=1, plateau_tolerance=1.0)
    anytime = HeuristicController(unknown).decide(_report(39, 1.0), history, _slots())
    assert [type(d) for d in anytime] == [Germinate]
