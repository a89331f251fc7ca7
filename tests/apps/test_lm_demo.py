"""The Shakespeare demo end to end at tiny sizes, and static_final in the digits demo."""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import pytest
import torch

from esper_async.apps.demo import DemoConfig, run_demo
from esper_async.apps.gpt import GPT
from esper_async.apps.lm_demo import ARMS, LMDemoConfig, architecture, lm_slots, run_lm_demo
from esper_async.apps.shakespeare import load_shakespeare
from esper_async.apps.static_final import fossils_of, graft_fossils
from esper_async.control import ControllerConfig
from esper_async.errors import DemoConfigError
from esper_async.seeds import SeedState, find_slots, wrap

TINY = dict(
    epochs=7, steps_per_epoch=12, batch_size=8, block_size=16, eval_batches=2, n_layer=1,
    n_head=1, n_embd=32, sample_chars=40, use_store=False, device="cpu",
)


@pytest.fixture(scope="module")
def lm_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lm") / "run"


@pytest.fixture(scope="module")
def lm_result(lm_run_dir: Path):  # type: ignore[no-untyped-def]
    return anyio.run(lambda: run_lm_demo(LMDemoConfig.quick(**TINY, run_dir=str(lm_run_dir))))


def test_the_run_directory_holds_the_trace_of_the_three_arms(lm_result, lm_run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from esper_async.apps.cli import main
    from esper_async.telemetry import SPAN_RUN, read_span_records

    records = read_span_records(lm_run_dir)
    labels = [r.attributes.get("esper.label") for r in records if r.name == SPAN_RUN]
    assert sorted(labels) == ["growth", "static", "static_final"]
    assert main(["trace", str(lm_run_dir), "--events-only"]) == 0


def test_three_arms_train_on_the_same_token_budget(lm_result) -> None:  # type: ignore[no-untyped-def]
    assert tuple(lm_result.arms) == ARMS
    tokens = 7 * 12 * 8 * 16
    for arm in lm_result.arms.values():
        assert math.isfinite(arm.val_loss) and 0 < arm.val_loss < math.log(lm_result.vocab_size)
        assert arm.bits_per_char == pytest.approx(arm.val_loss / math.log(2))
        assert arm.tokens == tokens and arm.fit.steps == 7 * 12
        assert arm.flops["total"] > arm.flops["train_host"] > 0
    static, growth, final = (lm_result.arms[a] for a in ARMS)
    assert growth.flops["kernels"] > 0 and growth.flops["counterfactual"] > 0
    assert static.flops["train_seeds"] == 0 and final.flops["train_seeds"] > 0
    assert len(lm_result.sample) == 40


def test_growth_went_through_the_lifecycle(lm_result) -> None:  # type: ignore[no-untyped-def]
    targets = [e.target for e in lm_result.arms["growth"].fit.events]
    for state in (SeedState.GERMINATED, SeedState.BLENDING, SeedState.FOSSILIZED):
        assert state.value in targets
    assert lm_result.arms["growth"].fossils  # something was kept


def test_static_final_has_growths_final_architecture_with_fresh_values(lm_result) -> None:  # type: ignore[no-untyped-def]
    static, growth, final = (lm_result.arms[a] for a in ARMS)
    assert final.architecture == growth.architecture
    assert final.params == growth.params > static.params
    assert final.fossils == growth.fossils
    assert final.val_loss != growth.val_loss  # trained separately, from a fresh start


def test_graft_fossils_without_fossils_changes_nothing_and_refuses_unknown_slots() -> None:
    data = load_shakespeare()
    cfg = LMDemoConfig.quick(**TINY)

    def host() -> GPT:
        torch.manual_seed(0)
        model = GPT(cfg.gpt_config(data.vocab.size))
        wrap(model, lm_slots(1), example_input=torch.zeros(2, 16, dtype=torch.long))
        return model

    a, b = host(), host()
    graft_fossils(a, [], seed=0)
    assert architecture(a) == architecture(b)
    with pytest.raises(DemoConfigError, match="not a slot of this model"):
        graft_fossils(a, [("blocks.7.out", "{}")], seed=0)


def test_graft_fossils_reproduces_a_grown_models_fossils(lm_result) -> None:  # type: ignore[no-untyped-def]
    data = load_shakespeare()
    cfg = lm_result.config
    torch.manual_seed(0)
    model = GPT(cfg.gpt_config(data.vocab.size))
    wrap(model, lm_slots(cfg.n_layer), example_input=torch.zeros(2, 16, dtype=torch.long))
    fossils = lm_result.arms["growth"].fossils
    graft_fossils(model, fossils, seed=5)
    assert fossils_of(find_slots(model)) == fossils
    assert all(s.state is SeedState.FOSSILIZED for n, s in find_slots(model).items()
               if n in dict(fossils))
    other = GPT(cfg.gpt_config(data.vocab.size))
    wrap(other, lm_slots(cfg.n_layer), example_input=torch.zeros(2, 16, dtype=torch.long))
    graft_fossils(other, fossils, seed=6)
    seeded = [n for n, _ in model.named_parameters() if ".seed." in n]
    assert seeded
    params, others = dict(model.named_parameters()), dict(other.named_parameters())
    assert any(not torch.equal(params[n], others[n]) for n in seeded)


def test_bad_lm_options_are_refused() -> None:
    with pytest.raises(DemoConfigError, match="steps_per_epoch"):
        LMDemoConfig(steps_per_epoch=0)
    with pytest.raises(DemoConfigError, match="multiple of n_head"):
        LMDemoConfig(n_embd=30, n_head=4)
    with pytest.raises(DemoConfigError, match="'lr'"):
        LMDemoConfig(lr=float("nan"))


def test_digits_demo_trains_static_final_from_growths_fossils(tmp_path: Path) -> None:
    config = DemoConfig(
        epochs=6, limit=300, use_store=False, run_dir=str(tmp_path / "run"),
        controller=ControllerConfig.eager(),
    )
    result = anyio.run(run_demo, config)
    final = result.static_final
    assert final.label == "static_final"
    assert final.fossils == result.growth.fossils
    assert 0.0 <= final.test_acc <= 1.0 and math.isfinite(final.fit.history[-1].val_loss)
    assert final.fit.steps == result.growth.fit.steps == result.static.fit.steps
    fossil_params = final.params - result.static.params
    assert (fossil_params > 0) == bool(result.growth.fossils)
    assert (tmp_path / "run" / "checkpoints" / "growth").is_dir()


def test_cli_refuses_options_of_the_other_task(capsys: pytest.CaptureFixture[str]) -> None:
    from esper_async.apps.cli import main

    assert main(["demo", "--task", "shakespeare", "--resume", "runs/x"]) == 2
    assert "--resume apply to --task digits only" in capsys.readouterr().err
    assert main(["demo", "--steps", "5", "--no-store"]) == 2
    assert "--steps applies to --task shakespeare only" in capsys.readouterr().err
    assert main(["demo", "--task", "shakespeare", "--steps", "0", "--no-store"]) == 2
    assert "steps_per_epoch" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_cli_shakespeare_writes_its_trace_into_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from esper_async.apps.cli import main

    run = tmp_path / "lm"
    argv = ["demo", "--task", "shakespeare", "--epochs", "1", "--steps", "2", "--no-store"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    assert f"trace: {run} (view it with `esper-async trace {run}`)" in capsys.readouterr().out
    assert list(run.glob("spans-run-*.jsonl"))
    assert main(["trace", str(run), "--events-only"]) == 0
