"""The default fossilize_margin keeps no seed on a gain that noise reaches (issue 24)."""

from __future__ import annotations

import pytest

from esper_async import ControllerConfig, HeuristicController
from esper_async.control import Counterfactual, Cull, Fossilize

from .test_controller import _report, _slots, _to_probation

DEFAULT = ControllerConfig(plateau_patience=2, plateau_tolerance=0.05, max_live_seeds=2)


def _judge(loss_with: float, loss_without: float) -> object:
    controller, slots = HeuristicController(DEFAULT), _slots()
    _to_probation(slots["0"])
    cf = Counterfactual(
        loss_with=loss_with, loss_without=loss_without, acc_with=0.9, acc_without=0.9
    )
    [decision] = controller.decide(_report(0, loss_with, **{"0": cf}), [], slots)
    return decision


def test_the_default_margin_is_positive() -> None:
    assert DEFAULT.fossilize_margin > 0.0


def test_a_gain_noise_reaches_is_culled_and_the_reason_names_the_margin() -> None:
    decision = _judge(0.3730, 0.3731)  # issue 24's "helps" on noise
    assert isinstance(decision, Cull)
    assert "does not help: val loss 0.3730 with, 0.3731 without" in decision.reason
    assert f"margin {DEFAULT.fossilize_margin}" in decision.reason


@pytest.mark.parametrize("factor", [pytest.param(1.5, id="above"), pytest.param(4.0, id="well")])
def test_a_gain_above_the_margin_is_kept(factor: float) -> None:
    decision = _judge(0.30, 0.30 + factor * DEFAULT.fossilize_margin)
    assert isinstance(decision, Fossilize)
