"""``graft="eager"``: training never waits on a compile, and a run stays reproducible from its
seed whatever the compile latency. These start compile worker processes: marked slow."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.compiler import OptimizerOptions

pytestmark = pytest.mark.slow


class SlowCompiler(ea.BlueprintCompiler):
    """The real compiler, each compile held back ``delay`` seconds first (a slow machine)."""

    def __init__(self, delay: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    async def compile(self, *args: Any, **kwargs: Any) -> ea.Kernel:
        await anyio.sleep(self.delay)
        return await super().compile(*args, **kwargs)


async def _grown(delay: float) -> tuple[ea.FitResult, list[torch.Tensor], ea.Trainer]:
    torch.manual_seed(123)
    data = digits_loaders(seed=0, limit=300)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    # Only the export form is bit-for-bit the eager module (see seeds/_eager.py).
    compiler = SlowCompiler(delay, options=OptimizerOptions(forms=("export",)))
    trainer = ea.Trainer(
        model,
        seed=7,
        compiler=compiler,
        graft="eager",
        controller=ea.HeuristicController(ea.ControllerConfig.eager(), seed=7),
    )
    result = await trainer.fit(data.train, data.val, epochs=5)
    return result, [p.detach().clone() for p in model.parameters()], trainer


def test_same_seed_grows_the_same_weights_whatever_the_compile_latency() -> None:
    fast, weights_fast, trainer_fast = anyio.run(_grown, 0.0)
    slow, weights_slow, trainer_slow = anyio.run(_grown, 4.0)
    assert [e.target for e in fast.events].count("training") >= 1
    # Seeds start training at their germination, not when their kernel arrives.
    assert any(e.reason.startswith("started as its blueprint's eager module") for e in fast.events)
    assert fast.events == slow.events
    assert len(weights_fast) == len(weights_slow)
    assert all(torch.equal(a, b) for a, b in zip(weights_fast, weights_slow, strict=True))
    # Every run ends on validated kernels: the slow run waited for its own at the end only.
    for trainer in (trainer_fast, trainer_slow):
        seeds = [s.seed for s in trainer.slots.values() if s.seed is not None]
        assert seeds and all(type(seed).__name__ == "KernelModule" for seed in seeds)
