"""Width growth's initialisations: every one keeps the function at birth (Linear and Conv2d, batch
norms in between, seed slots with a flattened conv output); zero fan-out units really have zero
fan-out; GradMax's new units get a gradient at once, and more of it than random fan-in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esper_async.apps.demo import DigitsHost
from esper_async.errors import SurgeryError
from esper_async.seeds import wrap
from esper_async.surgery import (
    WIDTH_INITS,
    ModelSurgeon,
    SurgeryContext,
    Widen,
    WidenSlot,
    capture_width_signal,
)
from esper_async.surgery._replay import operation_from_record, operation_record


class ConvBnNet(nn.Module):
    """conv → bn → relu → conv → bn → relu → pool → fc → relu → fc (traceable, one level)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(24, 7)
        self.bn3 = nn.BatchNorm1d(7)
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


X = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.arange(32) % 4


def _trained() -> tuple[ConvBnNet, torch.optim.Adam]:
    """A net after a few Adam steps in train mode (real batch-norm statistics and moments)."""
    torch.manual_seed(0)
    model = ConvBnNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return model, opt


def _loss(model: nn.Module) -> torch.Tensor:
    return nn.functional.cross_entropy(model(X), Y)


def _widen(model: nn.Module, opt: torch.optim.Optimizer | None, op: Widen | WidenSlot) -> None:
    ctx = SurgeryContext(model, opt, probe=None)
    before = list(model.parameters())
    op.apply(ctx)
    ctx.sync_optimizer(before)


def _op(target: str, width: int, init: str, model: nn.Module) -> Widen:
    signal = None
    if init == "gradmax":
        model.eval()
        signal = capture_width_signal(model, target, lambda: _loss(model))
    return Widen(target, width, seed=3, init=init, signal=signal)


@pytest.mark.parametrize("init", WIDTH_INITS)
@pytest.mark.parametrize(("target", "width"), [("conv1", 9), ("fc1", 12)])
def test_every_init_keeps_the_function_in_eval_and_train_mode(
    init: str, target: str, width: int
) -> None:
    model, opt = _trained()
    model.eval()
    with torch.no_grad():
        before_eval = model(X)
        model.train()
        before_train = model(X)  # batch statistics; running stats are updated: reset below
    model, opt = _trained()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(X), before_eval)
    _widen(model, opt, _op(target, width, init, model))
    layer = model.get_submodule(target)
    assert (layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features) == width
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), before_eval, rtol=1e-5, atol=1e-6)
        model.train()
        torch.testing.assert_close(model(X), before_train, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["zero_fanout", "gradmax"])
def test_zero_fanout_units_have_zero_fan_out_fresh_norms_and_empty_moments(init: str) -> None:
    model, opt = _trained()
    old_conv2 = model.conv2.weight.detach().clone()
    _widen(model, opt, _op("conv1", 8, init, model))
    assert torch.equal(model.conv2.weight[:, 5:], torch.zeros(6, 3, 3, 3))
    assert torch.equal(model.conv2.weight[:, :5], old_conv2)  # old columns untouched
    assert torch.equal(model.bn1.weight[5:].detach(), torch.ones(3))
    assert torch.equal(model.bn1.bias[5:].detach(), torch.zeros(3))
    assert torch.equal(model.bn1.running_mean[5:], torch.zeros(3))
    assert torch.equal(model.bn1.running_var[5:], torch.ones(3))
    assert torch.equal(model.conv1.bias[5:].detach(), torch.zeros(3))
    rows = model.conv1.weight[5:].detach().flatten(1)
    assert bool((rows.norm(dim=1) > 0).all())  # a real fan-in, not zeros
    for param, dim in ((model.conv1.weight, 0), (model.conv2.weight, 1), (model.bn1.weight, 0)):
        state = opt.state[param]
        for key in ("exp_avg", "exp_avg_sq"):
            new = state[key].narrow(dim, 5, 3)
            old = state[key].narrow(dim, 0, 5)
            assert torch.equal(new, torch.zeros_like(new)), key
            assert bool((old != 0).any()), key  # carried, not reset


def _fan_out_grad(model: ConvBnNet, target: str, consumer: str, old: int) -> torch.Tensor:
    model.zero_grad()
    model.eval()
    _loss(model).backward()
    grad = model.get_submodule(consumer).weight.grad
    assert grad is not None
    return grad[:, old:]


def test_gradmax_units_get_a_gradient_at_birth() -> None:
    model, opt = _trained()
    _widen(model, opt, _op("conv1", 9, "gradmax", model))
    assert float(_fan_out_grad(model, "conv1", "conv2", 5).norm()) > 1e-4
    model, opt = _trained()
    _widen(model, opt, _op("fc1", 12, "gradmax", model))
    assert float(_fan_out_grad(model, "fc1", "fc2", 7).norm()) > 1e-4


class Linear3(nn.Module):
    """fc1 → fc2 with nothing between: GradMax's linearisation is exact here."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(6, 10)
        self.fc1 = nn.Linear(10, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(torch.relu(self.fc0(x))))


def test_gradmax_fan_in_beats_random_fan_in_of_the_same_norm() -> None:
    """Where the activation is linear, GradMax's rows maximise the new fan-out's gradient among
    all rows of the same norm; every random draw gets less."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = torch.randn(64, 3)

    def loss(model: nn.Module) -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    def fan_out_grad_norm(model: Linear3) -> float:
        model.zero_grad()
        loss(model).backward()
        assert model.fc2.weight.grad is not None
        return float(model.fc2.weight.grad[:, 5:].norm())

    base = Linear3()
    signal = capture_width_signal(base, "fc1", lambda: loss(base))
    assert all(p.grad is None for p in base.parameters())  # the capture wrote no .grad
    gradmax = Linear3()
    gradmax.load_state_dict(base.state_dict())
    _widen(gradmax, None, Widen("fc1", 7, init="gradmax", signal=signal))
    best = fan_out_grad_norm(gradmax)
    for seed in range(5):
        other = Linear3()
        other.load_state_dict(base.state_dict())
        _widen(other, None, Widen("fc1", 7, init="zero_fanout", seed=seed))
        assert fan_out_grad_norm(other) < best


def test_split_noise_copies_fan_in_and_splits_fan_out_with_noise() -> None:
    model, opt = _trained()
    old_fc2 = model.fc2.weight.detach().clone()
    old_fc1 = model.fc1.weight.detach().clone()
    _widen(model, opt, Widen("fc1", 10, seed=5, init="split_noise"))
    sources = [
        next(j for j in range(7) if torch.equal(model.fc1.weight[k].detach(), old_fc1[j]))
        for k in range(7, 10)
    ]
    new = model.fc2.weight.detach()
    for j in set(sources):
        copies = [j] + [7 + i for i, s in enumerate(sources) if s == j]
        torch.testing.assert_close(new[:, copies].sum(1), old_fc2[:, j], rtol=1e-6, atol=1e-7)
        halves = new[:, copies] * len(copies)
        assert not torch.allclose(halves[:, 0], halves[:, 1])  # noise: the copies differ


def test_gradmax_without_a_signal_and_an_unknown_init_are_refused() -> None:
    model, opt = _trained()
    with pytest.raises(SurgeryError, match="capture_width_signal"):
        _widen(model, opt, Widen("conv1", 8, init="gradmax"))
    with pytest.raises(SurgeryError, match="unknown init 'wide'"):
        _widen(model, opt, Widen("conv1", 8, init="wide"))


@pytest.mark.parametrize("init", WIDTH_INITS)
@pytest.mark.parametrize("target", ["conv1", "conv2", "fc1"])
def test_widen_slot_inits_keep_the_digits_host_function(init: str, target: str) -> None:
    """Slots: conv2's output reaches fc1 through flatten(1) (16 columns per channel)."""
    torch.manual_seed(0)
    model = DigitsHost()
    wrap(model, ["conv1", "conv2", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    x = torch.rand(16, 1, 8, 8)
    y = torch.arange(16) % 10
    with torch.no_grad():
        before = model(x)
    signal = None
    if init == "gradmax":
        signal = capture_width_signal(
            model, target, lambda: nn.functional.cross_entropy(model(x), y)
        )
    _widen(model, None, WidenSlot(target, 2 * model.get_submodule(target).host.weight.shape[0],
                                  seed=1, init=init, signal=signal))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    if init == "gradmax":
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        consumer = {"conv1": model.conv2.host, "conv2": model.fc1.host, "fc1": model.head}[target]
        assert consumer.weight.grad is not None
        columns = consumer.weight.shape[1] // 2
        assert float(consumer.weight.grad[:, columns:].norm()) > 0


@pytest.mark.asyncio
@pytest.mark.parametrize("init", WIDTH_INITS)
async def test_every_init_passes_the_surgeons_validation(init: str) -> None:
    model, opt = _trained()
    await ModelSurgeon().apply(model, opt, _op("conv1", 10, init, model), probe=X[:8])
    assert model.conv1.out_channels == 10


def test_records_keep_the_init_and_gradmax_replays_as_zero_fanout() -> None:
    model, _ = _trained()
    op = _op("fc1", 9, "gradmax", model)
    record = operation_record(op)
    assert record["init"] == "gradmax"
    again = operation_from_record(record)
    assert isinstance(again, Widen) and again.init == "zero_fanout" and again.width == 9
    assert "init" not in operation_record(Widen("fc1", 9))
    assert operation_from_record(operation_record(WidenSlot("fc1", 9, init="split_noise"))) == (
        WidenSlot("fc1", 9, init="split_noise")
    )
