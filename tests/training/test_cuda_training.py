"""The trainer and the demo on a GPU: every step is launched from a worker thread and awaited
through the CUDA completion bridge. These tests skip without CUDA (CI has none); they were run on
the device machine (see the closing note of issue 5)."""

from __future__ import annotations

import tempfile

import anyio
import pytest
import torch

from esper_async.apps.demo import DemoConfig, DigitsHost, run_demo
from esper_async.control._controller import ControllerConfig
from esper_async.reliability import ReliabilityConfig
from esper_async.runtime import BridgeKind, CompletionBridge
from esper_async.runtime._execution import CudaStepRunner, LoopLagMonitor
from esper_async.seeds import SeedState
from esper_async.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

EAGER = ControllerConfig.eager()


def _batches(n: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch,),
                                                                        generator=gen))
            for _ in range(n)]


def test_trainer_awaits_every_cuda_step_through_the_bridge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    armed = 0
    real_arm = CompletionBridge.arm

    def counting_arm(self: CompletionBridge, stream: torch.cuda.Stream | None = None) -> object:
        nonlocal armed
        armed += 1
        return real_arm(self, stream)

    monkeypatch.setattr(CompletionBridge, "arm", counting_arm)
    torch.manual_seed(0)
    trainer = Trainer(DigitsHost(), grow=False, device="cuda", seed=0)
    runner = trainer._steps
    assert isinstance(runner, CudaStepRunner)
    assert runner.bridge.kind is BridgeKind.HOST_FUNC
    train, val = _batches(6, 32, 1), _batches(2, 32, 2)

    async def fit() -> tuple[object, float]:
        async with LoopLagMonitor(interval=0.002) as monitor:
            result = await trainer.fit(train, val, epochs=3)
        return result, monitor.stats().p99_ms

    result, lag_p99 = anyio.run(fit)
    assert armed == trainer.step == 18  # one bridged completion per step, none per layer
    assert all(p.is_cuda for p in trainer.model.parameters())
    losses = [r.train_loss for r in result.history]  # type: ignore[attr-defined]
    assert losses[-1] < losses[0]
    assert lag_p99 < 20.0, f"the loop lagged {lag_p99:.1f} ms (p99) while CUDA steps ran"


@pytest.mark.usefixtures("deterministic_cudnn")
@pytest.mark.parametrize("launch", ["thread", "loop"])
def test_bridged_trainer_matches_a_plain_synchronous_loop(launch: str) -> None:
    """Same model, same batches, same optimizer: the awaited CUDA steps give the same parameters
    as a plain ``for`` loop of synchronous steps (bitwise, cuDNN deterministic), whether the
    lagged steps are launched from a worker thread or from the loop's own thread."""
    train, val = _batches(5, 32, 3), _batches(1, 32, 4)
    torch.manual_seed(0)
    plain = DigitsHost().cuda()
    torch.manual_seed(0)
    reliability = ReliabilityConfig(launch=launch)  # type: ignore[arg-type]
    trainer = Trainer(DigitsHost(), grow=False, device="cuda", seed=0, reliability=reliability)
    assert trainer._steps.launch_on_loop == (launch == "loop")
    opt = type(trainer.optimizer)(plain.parameters(), **trainer.optimizer.defaults)
    for _ in range(2):
        for x, y in train:
            x, y = x.cuda(), y.cuda()
            opt.zero_grad(set_to_none=True)
            loss = trainer.loss_fn(plain(x), y)
            float(loss.detach())
            loss.backward()
            opt.step()
    anyio.run(lambda: trainer.fit(train, val, epochs=2))
    for (name, a), b in zip(trainer.model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_demo_grows_on_cuda() -> None:
    with tempfile.TemporaryDirectory() as store:
        config = DemoConfig(epochs=8, seed=0, limit=600, controller=EAGER, device="cuda",
                            store=store)
        result = anyio.run(run_demo, config)
    growth = result.growth.fit
    assert growth.count(SeedState.GERMINATED) >= 1
    assert any(e.target == SeedState.TRAINING.value for e in growth.events), "nothing grafted"
    assert result.kernels_compiled >= 1
    assert 0.3 < result.growth.test_acc <= 1.0
    assert all(torch.isfinite(torch.tensor(r.val_loss)) for r in growth.history)


def test_snapshot_of_a_cuda_model_copies_to_pinned_host_memory_and_judges_finiteness() -> None:
    from esper_async.reliability._snapshot import Snapshot

    torch.manual_seed(0)
    model = DigitsHost().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8, device="cuda")).sum().backward()
    opt.step()  # momentum buffers exist
    snap = Snapshot.take(1, model, opt, {})
    for name, t in model.state_dict().items():
        copy = snap.model_state[name]
        assert copy.device.type == "cpu" and copy.is_pinned()
        assert torch.equal(copy, t.cpu()), name
    assert snap.params_finite()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
    assert not Snapshot.take(2, model, opt, {}).params_finite()
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # the copies are not views of the live tensors
    snap.restore(model, opt, {})
    assert torch.equal(model.fc1.weight.cpu(), snap.model_state["fc1.weight"])
