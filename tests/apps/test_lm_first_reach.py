"""first_reach: where a validation-loss curve first reaches a target loss."""

from __future__ import annotations

import math

import pytest

from esper_async.apps.lm_demo import first_reach
from esper_async.errors import DemoConfigError


def test_crossing_between_two_points_is_interpolated_linearly() -> None:
    # 3.0 at 100 tokens, 2.0 at 200: 2.5 is reached half way, at 150.
    assert first_reach([100, 200, 300], [3.0, 2.0, 1.5], 2.5) == pytest.approx(150.0)
    # A quarter of the way from 2.0 (at 200) to 1.6 (at 300) is 1.9.
    assert first_reach([100, 200, 300], [3.0, 2.0, 1.6], 1.9) == pytest.approx(225.0)


def test_target_met_exactly_at_a_point_is_that_point() -> None:
    assert first_reach([10, 20, 30], [3.0, 2.0, 1.0], 2.0) == pytest.approx(20.0)


def test_first_crossing_counts_not_a_later_one() -> None:
    # Down to 1.9 at 20, back up, down again at 40: the first crossing of 2.0 is the one.
    xs, losses = [10, 20, 30, 40], [3.0, 1.9, 2.5, 1.0]
    assert first_reach(xs, losses, 2.0) == pytest.approx(10 + (3.0 - 2.0) / (3.0 - 1.9) * 10)


def test_curve_at_target_from_its_first_point_reaches_it_there() -> None:
    assert first_reach([50, 100], [1.0, 0.9], 2.0) == 50.0


def test_never_reached_is_none() -> None:
    assert first_reach([1, 2, 3], [3.0, 2.5, 2.1], 2.0) is None
    assert first_reach([], [], 2.0) is None


def test_non_finite_losses_never_reach_and_break_the_interpolation() -> None:
    assert first_reach([1, 2], [math.nan, math.inf], 2.0) is None
    # After a NaN, the next finite point below the target is taken as is (no segment to it).
    assert first_reach([1, 2, 3], [3.0, math.nan, 1.0], 2.0) == 3.0


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(DemoConfigError, match="2 budget points but 3 losses"):
        first_reach([1, 2], [3.0, 2.0, 1.0], 2.0)
