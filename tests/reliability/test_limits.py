from __future__ import annotations

import pytest

from esper_async.reliability import Admission, ResourceLimits


def test_compiles_in_flight_are_bounded() -> None:
    admission = Admission(ResourceLimits(max_compiles_in_flight=2))
    assert admission.try_start() is None
    assert admission.try_start() is None
    reason = admission.try_start()
    assert reason is not None and "2 compiles in flight (limit 2)" in reason
    assert admission.refused == 1
    admission.finished()
    assert admission.try_start() is None


def test_loaded_kernel_bytes_are_bounded() -> None:
    admission = Admission(ResourceLimits(max_kernel_bytes=1000))
    admission.set_loaded(999)
    assert admission.refusal() is None
    admission.set_loaded(1000)
    assert admission.refusal() == "1000 kernel bytes loaded (limit 1000)"


def test_reserved_compiles_count_but_are_never_refused() -> None:
    admission = Admission(ResourceLimits(max_compiles_in_flight=1))
    admission.reserve()
    admission.reserve()  # re-issued after a rollback: admitted before
    assert admission.in_flight == 2 and admission.refusal() is not None


@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({"max_compiles_in_flight": 0}, id="no-compiles"),
        pytest.param({"max_kernel_bytes": 0}, id="no-bytes"),
    ],
)
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ResourceLimits(**limits)
