"""Surgery during training: the trainer widens slots whose seeds fossilized, between steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from torch import nn

from esper_async.apps.data import DigitsLoaders, digits_loaders
from esper_async.apps.demo import DigitsHost
from esper_async.blueprints import Blueprint
from esper_async.control._controller import Decision, EpochReport, Fossilize
from esper_async.kernels import Kernel, export_kernel, load_kernel
from esper_async.seeds import SeedSlot, SeedState, find_slots, wrap
from esper_async.surgery import SurgeryPolicyConfig
from esper_async.telemetry import SPAN_ROLLBACK, SPAN_SURGERY, Telemetry
from esper_async.training.trainer import Trainer

_KERNELS: dict[str, Kernel] = {}
_EXAMPLE = torch.zeros(2, 1, 8, 8)


def _data() -> DigitsLoaders:
    return digits_loaders(batch_size=32, seed=0, limit=300)


def _kernel(slot: SeedSlot) -> Kernel:
    """A real exported kernel for ``slot`` (cached: exporting takes about a second)."""
    if slot.slot_name not in _KERNELS:
        assert slot.contract is not None
        blueprint = Blueprint("bottleneck") if slot.contract.shape[1:] else Blueprint("mlp")
        _KERNELS[slot.slot_name] = export_kernel(blueprint, slot.contract, seed=0)
    return _KERNELS[slot.slot_name]


def _host(
    targets: Sequence[str], seeded: Mapping[str, SeedState]
) -> tuple[nn.Module, list[Kernel]]:
    """The demo host, wrapped, with a real seed walked to a state in each ``seeded`` slot."""
    torch.manual_seed(0)
    model = DigitsHost()
    slots = wrap(model, list(targets), example_input=_EXAMPLE)
    kernels = []
    for name, state in seeded.items():
        slot, kernel = slots[name], _kernel(slots[name])
        slot.germinate(kernel.blueprint)
        slot.graft(load_kernel(kernel), kernel.kernel_id)
        slot.start_blending(1)
        slot.on_step()  # α = 1: PROBATION
        if state is SeedState.FOSSILIZED:
            slot.fossilize("kept before the run")
        kernels.append(kernel)
    return model, kernels


def _trainer(
    model: nn.Module,
    kernels: list[Kernel],
    *,
    surgery: SurgeryPolicyConfig | None,
    telemetry: Telemetry | None = None,
    **options: object,
) -> Trainer:
    trainer = Trainer(model, seed=0, surgery=surgery, telemetry=telemetry, **options)  # type: ignore[arg-type]
    for kernel in kernels:  # seeds grafted before the run are registered as the trainer's own
        trainer.kernels[kernel.kernel_id] = kernel
    return trainer


def _memory_telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Telemetry(tracer_provider=provider), exporter


class _KeepOnProbation:
    """A controller that keeps (fossilizes) every seed on probation and decides nothing else."""

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        return [
            Fossilize(name, "helps") for name, s in slots.items() if s.state is SeedState.PROBATION
        ]


@pytest.mark.timeout(120)
def test_a_fossilized_slot_is_widened_during_fit_and_every_parameter_trains() -> None:
    data = _data()
    model, kernels = _host(["conv1", "conv2", "fc1"], {"conv1": SeedState.PROBATION})
    telemetry, spans = _memory_telemetry()
    trainer = _trainer(
        model, kernels, surgery=SurgeryPolicyConfig(cooldown_steps=0), telemetry=telemetry,
        controller=_KeepOnProbation(),
    )
    params_before = trainer.param_count()
    after_surgery: dict[str, torch.Tensor] = {}

    def on_epoch(report: EpochReport, _: object) -> None:
        if report.epoch == 0:
            after_surgery.update({n: p.detach().clone() for n, p in model.named_parameters()})

    result = anyio.run(lambda: trainer.fit(data.train, data.val, epochs=6, on_epoch=on_epoch))

    # The controller fossilized conv1's seed at the first boundary; the policy widened its host.
    assert [(e.slot, e.target) for e in result.events] == [("conv1", "fossilized")]
    assert trainer.surgeries == [{"op": "widen_slot", "target": "conv1", "width": 6, "seed": 6}]
    slots = find_slots(model)
    assert slots["conv1"].host.out_channels == 6  # type: ignore[union-attr]
    assert slots["conv2"].host.in_channels == 6  # type: ignore[union-attr]
    assert slots["conv1"].state is SeedState.FOSSILIZED and slots["conv1"].unit_map is not None
    assert trainer.param_count() > params_before
    # The optimizer steps every parameter, the new ones included, and training goes on.
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters())
    assert set(after_surgery) == {n for n, _ in model.named_parameters()}
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, after_surgery[n])]
    assert unchanged == []
    losses = [r.train_loss for r in result.history]
    assert losses[-1] < losses[1] < losses[0]
    # A rollback would land on the widened structure: the governor's snapshot has its shapes.
    snapshot = trainer.governor.snapshot
    assert snapshot is not None and snapshot.model_state["conv1.host.weight"].shape[0] == 6
    surgery = [s for s in spans.get_finished_spans() if s.name == SPAN_SURGERY]
    assert len(surgery) == 1 and surgery[0].attributes is not None
    assert surgery[0].attributes["esper.outcome"] == "committed"
    assert surgery[0].attributes["esper.params.added"] == trainer.param_count() - params_before


def _widening_run(directory: Path, epochs: int, *, resume: bool = False) -> Trainer:
    """Two widenings (conv1 with a fossilized seed, then the dormant fc1), checkpointed."""
    model, kernels = _host(["conv1", "conv2", "fc1"], {"conv1": SeedState.FOSSILIZED})
    trainer = _trainer(
        model, kernels if not resume else [], surgery=SurgeryPolicyConfig(cooldown_steps=0),
        grow=False,
    )
    if not resume:
        assert trainer.surgery is not None
        trainer.surgery.record_fossilized("conv1")
        trainer.surgery.record_fossilized("fc1")
    data = _data()
    anyio.run(
        lambda: trainer.fit(
            data.train, data.val, epochs=epochs, checkpoint_dir=directory, resume=resume
        )
    )
    return trainer


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "split",
    [
        # conv1 is replayed on resume; fc1 is widened after it, from the restored policy state.
        pytest.param(1, id="between-widenings"),
        pytest.param(2, id="after-both"),
    ],
)
def test_resume_after_widenings_matches_an_uninterrupted_run(tmp_path: Path, split: int) -> None:
    whole = _widening_run(tmp_path / "whole", 4)
    _widening_run(tmp_path / "split", split)
    resumed = _widening_run(tmp_path / "split", 4, resume=True)

    assert [r["target"] for r in whole.surgeries] == ["conv1", "fc1"]
    assert resumed.surgeries == whole.surgeries
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and "conv1.unit_map.index" in a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert [r.train_loss for r in whole.result.history] == [
        r.train_loss for r in resumed.result.history
    ]
    state_a, state_b = whole.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert state_a["state"].keys() == state_b["state"].keys()
    for i, entry in state_a["state"].items():
        assert all(torch.equal(v, state_b["state"][i][k]) for k, v in entry.items())


@pytest.mark.timeout(60)
def test_a_refused_widening_leaves_training_unchanged() -> None:
    def run(surgery: SurgeryPolicyConfig | None) -> tuple[Trainer, InMemorySpanExporter]:
        data = _data()
        model, _ = _host(["conv1", "head"], {})
        telemetry, spans = _memory_telemetry()
        trainer = _trainer(model, [], surgery=surgery, telemetry=telemetry, grow=False)
        if trainer.surgery is not None:
            # The head feeds the model's output, which cannot take a wider input: refused.
            trainer.surgery.record_fossilized("head")
        anyio.run(lambda: trainer.fit(data.train, data.val, epochs=2))
        return trainer, spans

    plain, _ = run(None)
    refused, spans = run(SurgeryPolicyConfig(cooldown_steps=0))

    assert refused.surgeries == []
    assert [r.train_loss for r in refused.result.history] == [
        r.train_loss for r in plain.result.history
    ]
    a, b = plain.model.state_dict(), refused.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    names = [s.name for s in spans.get_finished_spans()]
    assert names.count(SPAN_SURGERY) == 1 and names.count(SPAN_ROLLBACK) == 1


def test_a_threshold_a_slot_cannot_reach_is_refused_at_construction() -> None:
    model, _ = _host(["conv1"], {})
    with pytest.raises(ValueError, match="fossil_threshold=1"):
        Trainer(model, surgery=SurgeryPolicyConfig(fossil_threshold=2))
