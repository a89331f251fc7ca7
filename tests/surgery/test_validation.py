from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.surgery import SurgeryBudget, SurgeryValidationConfig
from esper_async.surgery._context import Captured
from esper_async.surgery._validation import check_commit, check_region, footprint

from ._helpers import tiny_mlp, train, vectors


class _Partial(nn.Module):
    """Holds a parameter its forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 4)


def _call(module: nn.Module, x: torch.Tensor) -> Captured:
    with torch.no_grad():
        return Captured((x,), {}, module(x))


def test_unreached_parameters_are_reported() -> None:
    model = nn.Sequential(_Partial())
    check = check_region(
        model,
        "0",
        _call(model[0], torch.randn(2, 4)),
        operation="t",
        preserves_function=True,
        config=SurgeryValidationConfig(),
    )
    assert check.unreached == ("unused.weight", "unused.bias")


def test_an_output_cut_from_its_input_is_reported() -> None:
    model = nn.Sequential(_Constant())
    check = check_region(
        model,
        "0",
        _call(model[0], torch.randn(2, 4)),
        operation="t",
        preserves_function=False,
        config=SurgeryValidationConfig(),
    )
    assert any("no longer depends on its input" in p for p in check.problems)


@pytest.mark.parametrize(
    ("new", "message"),
    [
        pytest.param(nn.Linear(4, 3), "changed shape", id="shape"),
        pytest.param(nn.Linear(4, 4), "altered the output", id="values"),
    ],
)
def test_region_shape_and_preservation_are_checked(new: nn.Module, message: str) -> None:
    old = nn.Linear(4, 4)
    call = _call(old, torch.randn(3, 4))
    check = check_region(
        nn.Sequential(new),
        "0",
        call,
        operation="t",
        preserves_function=True,
        config=SurgeryValidationConfig(),
    )
    assert any(message in p for p in check.problems)


def test_non_finite_outputs_fail() -> None:
    old = nn.Linear(4, 4)
    call = _call(old, torch.randn(3, 4))
    broken = nn.Linear(4, 4)
    with torch.no_grad():
        broken.weight.fill_(float("nan"))
    check = check_region(
        nn.Sequential(broken),
        "0",
        call,
        operation="t",
        preserves_function=False,
        config=SurgeryValidationConfig(),
    )
    assert any("non-finite" in p for p in check.problems)


@pytest.mark.parametrize(
    ("budget", "fails"),
    [
        pytest.param(SurgeryBudget(), False, id="none"),
        pytest.param(SurgeryBudget(max_parameters=100), True, id="parameters"),
        pytest.param(SurgeryBudget(max_growth=1.0), False, id="growth-ok"),
        pytest.param(SurgeryBudget(max_bytes=1000), True, id="bytes"),
    ],
)
def test_budget(budget: SurgeryBudget, fails: bool) -> None:
    model = tiny_mlp()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt, vectors(), 1)
    trainable, size = footprint(model, opt)
    assert trainable == sum(p.numel() for p in model.parameters())
    assert size == 3 * 4 * trainable + 4 * len(opt.state)  # params, two moments, a step per param
    report = check_commit(
        model,
        opt,
        checks=(),
        parameters_before=trainable,
        config=SurgeryValidationConfig(budget=budget),
    )
    assert report.ok is not fails


def test_a_parameter_the_optimizer_misses_fails_the_commit() -> None:
    model = tiny_mlp()
    opt = torch.optim.Adam(list(model.parameters())[:-1])
    report = check_commit(
        model, opt, checks=(), parameters_before=0, config=SurgeryValidationConfig()
    )
    assert not report.ok and "does not step ['4.bias']" in report.problems[0]
