"""Width growth in the controller: the selector's ``(slot, "widen")`` arm, the trial of a
widening, its reward in the seeds' currency (gain minus parameter and FLOP rent), and the
config's checks (hand-made reports, real slots)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from esper_async import ControllerConfig, EpochReport, HeuristicController
from esper_async.control import WIDEN_ARM, Counterfactual, EndWidthTrial, GrowWidth
from esper_async.errors import ControllerConfigError
from esper_async.seeds import SeedSlot, find_slots, wrap
from esper_async.surgery import WIDTH_INITS

WIDE = ControllerConfig(
    plateau_patience=1, plateau_tolerance=0.05, max_live_seeds=2, width_growth=True,
    width_trial_epochs=2, param_rent=1e-4, flop_rent=1e-5,
)


def _slots() -> dict[str, SeedSlot]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0"], example_input=torch.zeros(2, 4))
    return find_slots(model)


def _report(epoch: int, val_loss: float, **widths: Counterfactual) -> EpochReport:
    return EpochReport(epoch=epoch, train_loss=val_loss, val_loss=val_loss, val_acc=0.5,
                       width_counterfactual=widths)


PLATEAU = [_report(0, 1.0)]


def test_without_width_growth_no_widen_arm_is_offered() -> None:
    controller = HeuristicController(ControllerConfig(plateau_patience=1), blueprints=())
    assert controller.decide(_report(1, 1.0), PLATEAU, _slots()) == []


def test_a_plateau_widens_the_host_when_the_selector_picks_the_widen_arm() -> None:
    controller, slots = HeuristicController(WIDE, blueprints=()), _slots()
    decisions = controller.decide(_report(1, 1.0), PLATEAU, slots)
    assert decisions == [GrowWidth("0", 16, "gradmax", decisions[0].reason)]
    assert "widen 0 to 16" in decisions[0].reason
    # on trial: not offered again, and it counts against max_live_seeds
    controller.widened("0", committed=True, params_added=40, flops_added=80)
    assert controller.decide(_report(2, 1.0), [*PLATEAU, _report(1, 1.0)], slots) == []


def test_the_trial_ends_with_a_reward_of_gain_minus_parameter_and_flop_rent() -> None:
    controller, slots = HeuristicController(WIDE, blueprints=()), _slots()
    controller.decide(_report(1, 1.0), PLATEAU, slots)
    controller.widened("0", committed=True, params_added=40, flops_added=80)
    cf = Counterfactual(loss_with=0.5, loss_without=0.6, acc_with=0.9, acc_without=0.8)
    # epoch 2: one epoch into a two-epoch trial, nothing yet
    decisions = controller.decide(_report(2, 0.5, **{"0": cf}), PLATEAU, slots)
    assert not any(isinstance(d, EndWidthTrial) for d in decisions)
    decisions = controller.decide(_report(3, 0.5, **{"0": cf}), PLATEAU, slots)
    ended = [d for d in decisions if isinstance(d, EndWidthTrial)]
    assert len(ended) == 1 and ended[0].slot == "0"
    expected = 0.1 - 1e-4 * 40 - 1e-5 * 80
    assert math.isclose(controller.selector.mean_reward(("0", WIDEN_ARM)), expected, rel_tol=1e-9)


def test_a_refused_widening_is_not_rewarded_and_can_be_tried_again() -> None:
    controller, slots = HeuristicController(WIDE, blueprints=()), _slots()
    assert isinstance(controller.decide(_report(1, 1.0), PLATEAU, slots)[0], GrowWidth)
    controller.widened("0", committed=False)
    assert controller.selector.mean_reward(("0", WIDEN_ARM)) == 0.0
    again = controller.decide(_report(2, 1.0), PLATEAU, slots)
    assert len(again) == 1 and isinstance(again[0], GrowWidth)


def test_a_host_at_its_growth_cap_is_not_offered() -> None:
    config = ControllerConfig(plateau_patience=1, width_growth=True, width_max_growth=1.0)
    controller = HeuristicController(config, blueprints=())
    assert controller.decide(_report(1, 1.0), PLATEAU, _slots()) == []


def test_trials_survive_a_state_dict_round_trip() -> None:
    controller, slots = HeuristicController(WIDE, blueprints=()), _slots()
    controller.decide(_report(1, 1.0), PLATEAU, slots)
    controller.widened("0", committed=True, params_added=40, flops_added=80)
    restored = HeuristicController(WIDE, blueprints=())
    restored.load_state_dict(controller.state_dict())
    cf = Counterfactual(loss_with=0.5, loss_without=0.7, acc_with=0.9, acc_without=0.8)
    ended = [
        d for d in restored.decide(_report(3, 0.5, **{"0": cf}), PLATEAU, slots)
        if isinstance(d, EndWidthTrial)
    ]
    assert [d.slot for d in ended] == ["0"]


@pytest.mark.parametrize(
    "options",
    [{"width_factor": 1.0}, {"width_max_growth": 0.5}, {"width_trial_epochs": 0},
     {"flop_rent": -1.0}, {"flop_rent": math.inf}, {"width_init": "wide"},
     {"width_growth": "yes"}],
)
def test_bad_width_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ControllerConfigError):
        ControllerConfig(**options)  # type: ignore[arg-type]


def test_the_controller_knows_every_surgery_init() -> None:
    from esper_async.control._controller import WIDTH_INITS as CONTROL_INITS

    assert CONTROL_INITS == WIDTH_INITS


def test_width_slots_are_widened_only_and_no_other_slot_is() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    wrap(model, ["0", "2"], example_input=torch.zeros(2, 4))
    slots = find_slots(model)
    config = ControllerConfig(
        plateau_patience=1, plateau_tolerance=0.05, width_growth=True, width_slots=("0",)
    )
    controller = HeuristicController(config)
    controller.decide(_report(1, 1.0), PLATEAU, slots)
    assert controller.selector.last_actions == (("0", WIDEN_ARM),)
    assert controller.selector.last_arms and all(slot == "2" for slot, _ in
                                                 controller.selector.last_arms)


@pytest.mark.parametrize("named", [(), ["0"], ("0", "")], ids=["empty", "list", "blank"])
def test_bad_width_slots_are_refused(named: object) -> None:
    with pytest.raises(ControllerConfigError, match="width_slots"):
        ControllerConfig(width_slots=named)  # type: ignore[arg-type]
