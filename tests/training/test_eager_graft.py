"""``graft="eager"``: training never waits on a compile, the run's end does not wait either, and
a run stays reproducible from its seed whatever the compile latency, across a checkpoint written
while a compile was pending too. Tests that start compile worker processes are marked slow; a
compile held back longer than the run never starts a worker."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import anyio
import pytest
import torch

import esper_async as ea
from esper_async.apps.data import digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.apps.static_final import fossils_of
from esper_async.compiler import OptimizerOptions
from esper_async.control import Germinate
from esper_async.reliability import CheckpointIntegrityError, IncidentKind
from esper_async.seeds import EagerSeed

#: A compile held back longer than any run here: it never lands, and no worker ever starts.
NEVER = 600.0


class SlowCompiler(ea.BlueprintCompiler):
    """The real compiler, each compile held back ``delay`` seconds first (a slow machine)."""

    def __init__(self, delay: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.delay = delay

    async def compile(self, *args: Any, **kwargs: Any) -> ea.Kernel:
        await anyio.sleep(self.delay)
        return await super().compile(*args, **kwargs)


def _trainer(delay: float) -> ea.Trainer:
    torch.manual_seed(123)
    model = DigitsHost()
    ea.wrap(model, ["conv1", "fc1"], example_input=torch.zeros(2, 1, 8, 8))
    # Only the export form is bit-for-bit the eager module (see seeds/_eager.py).
    compiler = SlowCompiler(delay, options=OptimizerOptions(forms=("export",)))
    return ea.Trainer(
        model,
        seed=7,
        compiler=compiler,
        progress="off",
        controller=ea.HeuristicController(ea.ControllerConfig.eager(), seed=7),
    )


async def _grown(
    delay: float, *, epochs: int = 5, wait: bool = False, **fit: Any
) -> tuple[ea.FitResult, list[torch.Tensor], ea.Trainer]:
    data = digits_loaders(seed=0, limit=300)
    trainer = _trainer(delay)  # graft="auto": eager on one process
    result = await trainer.fit(data.train, data.val, epochs=epochs, wait_for_kernels=wait, **fit)
    return result, [p.detach().clone() for p in trainer.model.parameters()], trainer


def _kinds(trainer: ea.Trainer) -> set[str]:
    return {type(s.seed).__name__ for s in trainer.slots.values() if s.seed is not None}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_same_seed_grows_the_same_weights_whatever_the_compile_latency() -> None:
    waited, weights_waited, trainer_waited = anyio.run(lambda: _grown(0.0, wait=True))
    ended, weights_ended, trainer_ended = anyio.run(lambda: _grown(NEVER))
    assert trainer_ended.grower.graft == "eager"  # the default on one process
    assert [e.target for e in waited.events].count("training") >= 1
    # Seeds start training at their germination, not when their kernel arrives.
    assert any(
        e.reason.startswith("started as its blueprint's eager module") for e in waited.events
    )
    assert waited.events == ended.events
    assert _same(weights_waited, weights_ended)
    # Asked to wait, the run ends on validated kernels; by default it ends without waiting, and
    # the seeds whose kernels had not arrived end as their eager module, on the record.
    assert _kinds(trainer_waited) == {"KernelModule"} and waited.ended_eager == []
    assert _kinds(trainer_ended) == {"EagerSeed"}
    live = [n for n, s in trainer_ended.slots.items() if s.seed is not None]
    assert ended.ended_eager == live
    eager_incidents = [i for i in ended.incidents if i.kind is IncidentKind.ENDED_EAGER]
    assert [i.slot for i in eager_incidents] == live
    assert not any(i.kind is IncidentKind.ENDED_EAGER for i in waited.incidents)
    # A model whose seeds ended eager leaves the framework as one whose seeds ended as kernels,
    # and names the same fossils for static_final.
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    exported = [ea.export_model(t.model, example_input=x) for t in (trainer_waited, trainer_ended)]
    assert torch.allclose(exported[0](x), exported[1](x), atol=1e-6)
    assert fossils_of(trainer_ended.slots) == fossils_of(trainer_waited.slots) != ()


@pytest.mark.slow
def test_resuming_a_checkpoint_taken_while_compiling_ends_as_an_uninterrupted_run() -> None:
    whole, weights_whole, _ = anyio.run(lambda: _grown(NEVER))
    with tempfile.TemporaryDirectory() as d:
        # Cut after 3 epochs: every checkpoint so far was written with its seeds' compiles
        # pending (they never land in this part).
        _, _, cut = anyio.run(lambda: _grown(NEVER, epochs=3, checkpoint_dir=d))
        assert {s.state.value for s in cut.slots.values() if s.seed is not None} >= {"blending"}
        assert _kinds(cut) == {"EagerSeed"}
        # The resumed run rebuilds the eager modules, compiles their kernels again (promptly
        # now) and swaps them in.
        resumed, weights_resumed, trainer = anyio.run(
            lambda: _grown(0.0, wait=True, checkpoint_dir=d, resume=True)
        )
    assert resumed.events == whole.events
    assert _same(weights_resumed, weights_whole)
    assert _kinds(trainer) == {"KernelModule"} and resumed.ended_eager == []


# --- a checkpoint of eager slots: rebuilt from the blueprint, never unpickled (no workers) -----


@pytest.fixture(scope="module")
def eager_payload() -> dict[str, Any]:
    """A checkpoint payload taken after 3 epochs whose seeds still run their eager modules."""
    _, _, trainer = anyio.run(lambda: _grown(NEVER, epochs=3))
    assert _kinds(trainer) == {"EagerSeed"}
    return trainer.state_dict()


def _slots(payload: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(payload["slots"]))


def _with_slots(payload: dict[str, Any], slots: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "slots": json.dumps(slots)}


def test_a_checkpoint_of_eager_slots_restores_them_with_their_trained_weights(
    eager_payload: dict[str, Any],
) -> None:
    eager = {n: s for n, s in _slots(eager_payload).items() if s["eager_seed"] is not None}
    assert eager and all(s["kernel_id"].startswith("eager:") for s in eager.values())
    assert eager_payload["kernels"] == {}  # no kernel was ever compiled
    fresh = _trainer(NEVER)
    fresh.load_state_dict(eager_payload)
    for name in eager:
        seed = fresh.slots[name].seed
        assert isinstance(seed, EagerSeed) and seed.init_seed == 7
    saved = eager_payload["model"]
    assert all(torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items())


def _no_seed(slot: dict[str, Any]) -> None:
    slot["eager_seed"] = None


def _bad_json(slot: dict[str, Any]) -> None:
    slot["blueprint_json"] = '{"family": "no-such-family"'


def _other_blueprint(slot: dict[str, Any]) -> None:
    blueprint = json.loads(slot["blueprint_json"])  # fc1's low_rank: a valid blueprint, another id
    blueprint["options"] = {"rank": blueprint["options"]["rank"] + 1}
    slot["blueprint_json"] = json.dumps(blueprint)


def _float_seed(slot: dict[str, Any]) -> None:
    slot["eager_seed"] = 7.5


def _dormant_with_seed(slot: dict[str, Any]) -> None:
    slot["state"] = "dormant"  # a dormant slot would take the rebuilt seed, and compile it


def _nan_alpha(slot: dict[str, Any]) -> None:
    slot["alpha"] = float("nan")


@pytest.mark.parametrize(
    ("craft", "why"),
    [
        pytest.param(_no_seed, "kernel id and init seed do not go together", id="no-seed"),
        pytest.param(_bad_json, "blueprint JSON does not parse", id="malformed-blueprint"),
        pytest.param(_other_blueprint, "is not its blueprint's", id="another-blueprint"),
        pytest.param(_float_seed, "init seed is a float", id="seed-not-an-int"),
        pytest.param(_dormant_with_seed, "cannot hold a seed", id="dormant-with-a-seed"),
        pytest.param(_nan_alpha, "not a number in", id="alpha-nan"),
    ],
)
def test_a_crafted_eager_slot_is_refused_before_anything_changes(
    eager_payload: dict[str, Any], craft: Any, why: str
) -> None:
    slots = _slots(eager_payload)
    assert slots["fc1"]["eager_seed"] is not None
    craft(slots["fc1"])
    fresh = _trainer(NEVER)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(CheckpointIntegrityError, match=why):
        fresh.load_state_dict(_with_slots(eager_payload, slots))
    assert all(s.seed is None for s in fresh.slots.values())
    assert all(torch.equal(v, before[k]) for k, v in fresh.model.state_dict().items())


@pytest.mark.slow
def test_a_rollback_to_before_the_swap_puts_the_eager_module_back_and_compiles_again() -> None:
    async def main() -> None:
        trainer = _trainer(0.0)
        grower = trainer.grower
        blueprint = ea.Blueprint("low_rank", {"rank": 4})
        async with grower:
            grower.apply(Germinate("fc1", blueprint, "test"))
            slot = grower.slots["fc1"]
            assert isinstance(slot.seed, EagerSeed)
            assert await grower.snapshot()
            before = grower.governor.snapshot
            assert before is not None
            await grower.await_kernels()
            assert type(slot.seed).__name__ == "KernelModule"
            grower.restore_snapshot(before)
            assert isinstance(slot.seed, EagerSeed)
            assert grower.compiles.pending.get("fc1") == blueprint  # compiling again
            await grower.await_kernels()
            assert type(slot.seed).__name__ == "KernelModule"
            assert slot.kernel_id in grower.kernels

    anyio.run(main)
