"""Width (and depth) growth on the GPT: widening a block's MLP hidden layer (``mlp.fc`` → GELU →
``mlp.proj``) preserves the function, the residual stream cannot be widened, static_final replays
the widenings with the GPT's own initialisation, the LM demo grows width end to end, and an
identity block inserted after a block leaves the function as it was."""

from __future__ import annotations

import dataclasses
import math

import anyio
import pytest
import torch

from esper_async.apps.gpt import (
    GPT,
    Block,
    GPTConfig,
    count_parameters,
    identity_block,
    init_like_new,
)
from esper_async.apps.lm_demo import (
    ARMS,
    LMDemoConfig,
    architecture,
    lm_slots,
    lm_width_slots,
    run_lm_demo,
)
from esper_async.apps.static_final import graft_widenings
from esper_async.control import ControllerConfig
from esper_async.errors import DemoConfigError, SurgeryError
from esper_async.seeds import wrap
from esper_async.surgery import InsertAfter, SurgeryContext, WidenSlot
from esper_async.surgery._replay import operation_record
from esper_async.training import LanguageModelTask
from esper_async.training._widths import grow_width_operation

VOCAB = 30
SHAPE = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.2)


def _wrapped(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(SHAPE)
    wrap(model, lm_slots(SHAPE.n_layer, widen=True),
         example_input=torch.zeros(2, 8, dtype=torch.long))
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (4, 12), generator=generator)
    return x, torch.randint(0, VOCAB, (4, 12), generator=generator)


def _widen(model: GPT, target: str, width: int, init: str) -> WidenSlot:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    operation, _ = grow_width_operation(
        model, LanguageModelTask(), _batch(), target, width, init, seed=3
    )
    ctx = SurgeryContext(model, optimizer, probe=None)
    before = list(model.parameters())
    operation.apply(ctx)
    ctx.sync_optimizer(before)
    return operation


@pytest.mark.parametrize("init", ["gradmax", "zero_fanout", "split_noise", "net2wider"])
def test_widening_an_mlp_hidden_layer_preserves_the_function(init: str) -> None:
    model = _wrapped().eval()
    x, _ = _batch()
    with torch.no_grad():
        before = model(x)
    _widen(model, "blocks.0.mlp.fc", 6 * SHAPE.n_embd, init)
    model.eval()
    with torch.no_grad():
        after = model(x)
    fc = model.get_submodule("blocks.0.mlp.fc.host")
    proj = model.get_submodule("blocks.0.mlp.proj.host")
    assert (fc.out_features, proj.in_features) == (6 * SHAPE.n_embd, 6 * SHAPE.n_embd)
    assert model.get_submodule("blocks.1.mlp.fc.host").out_features == 4 * SHAPE.n_embd
    assert model.wte.weight.shape == (VOCAB, SHAPE.n_embd)  # the residual stream keeps its width
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    new_rows = fc.weight[4 * SHAPE.n_embd:]
    assert not torch.equal(new_rows, torch.zeros_like(new_rows))


def test_the_residual_stream_is_not_widened() -> None:
    model = _wrapped()
    ctx = SurgeryContext(model, None, probe=None)
    with pytest.raises(SurgeryError, match="cannot simply take a wider input"):
        WidenSlot("blocks.0.mlp.proj", 2 * SHAPE.n_embd).apply(ctx)


def test_static_final_replays_the_widening_with_the_gpts_own_initialisation() -> None:
    grown = _wrapped()
    record = operation_record(_widen(grown, "blocks.1.mlp.fc", 8 * SHAPE.n_embd, "gradmax"))
    final = _wrapped()
    assert count_parameters(final) < count_parameters(grown)
    changed = graft_widenings(final, [record], seed=0, reinit=lambda name, module: init_like_new(
        SHAPE, name, module
    ))
    assert sorted(changed) == ["blocks.1.mlp.fc.host", "blocks.1.mlp.proj.host"]
    assert architecture(final) == architecture(grown)
    assert count_parameters(final) == count_parameters(grown)
    fc = final.get_submodule("blocks.1.mlp.fc.host").weight
    proj = final.get_submodule("blocks.1.mlp.proj.host").weight
    assert not torch.equal(fc, grown.get_submodule("blocks.1.mlp.fc.host").weight)
    # N(0, 0.02), and GPT-2's residual scale on the projection (2048 draws each: ±6 %)
    assert fc.std().item() == pytest.approx(0.02, rel=0.1)
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * SHAPE.n_layer), rel=0.1)
    # the unwidened block is exactly the fresh model's
    fresh = _wrapped()
    assert torch.equal(final.get_submodule("blocks.0.mlp.fc.host").weight,
                       fresh.get_submodule("blocks.0.mlp.fc.host").weight)


def test_init_like_new_refuses_modules_it_has_no_rule_for() -> None:
    with pytest.raises(TypeError, match=r"blocks\.0\.act"):
        init_like_new(SHAPE, "blocks.0.act", torch.nn.GELU())


def test_width_growth_options_of_the_lm_demo() -> None:
    wide = dataclasses.replace(ControllerConfig.eager(), width_growth=True)
    cfg = LMDemoConfig.quick(n_layer=2, controller=wide)
    assert cfg.controller_config().width_slots == lm_width_slots(2)
    assert lm_slots(1, widen=True) == ("blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.0.out")
    assert LMDemoConfig.quick().controller_config() == ControllerConfig.eager()
    with pytest.raises(DemoConfigError, match="width_growth"):
        LMDemoConfig.quick(seeds=False)


def test_the_lm_demo_grows_width_alone_and_static_final_replays_it() -> None:
    wide = dataclasses.replace(ControllerConfig.eager(), width_growth=True, width_trial_epochs=1)
    cfg = LMDemoConfig.quick(
        epochs=5, steps_per_epoch=6, batch_size=8, block_size=16, eval_batches=2, n_layer=1,
        n_head=1, n_embd=16, sample_chars=0, use_store=False, controller=wide, seeds=False,
    )
    result = anyio.run(run_lm_demo, cfg)
    static, growth, final = (result.arms[a] for a in ARMS)
    assert [r["target"] for r in growth.surgeries] == ["blocks.0.mlp.fc"]
    assert growth.surgeries[0]["width"] == 8 * 16 and not growth.fossils
    assert final.architecture == growth.architecture != static.architecture
    assert final.params == growth.params == static.params + 2 * 16 * 4 * 16
    assert growth.summary()["widened"] == [dict(growth.surgeries[0])]
    assert final.val_loss != growth.val_loss


def test_an_identity_block_inserted_after_a_block_preserves_the_function_and_learns() -> None:
    torch.manual_seed(0)
    model = GPT(SHAPE).eval()
    x, y = _batch()
    with torch.no_grad():
        before = model(x)
    ctx = SurgeryContext(model, None, probe=None)
    InsertAfter("blocks.0.out", identity_block(SHAPE)).apply(ctx)
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after, before)
    new = model.get_submodule("blocks.0.out.1")
    assert isinstance(new, Block)
    loss = torch.nn.functional.cross_entropy(model.train()(x).flatten(0, 1), y.flatten())
    loss.backward()
    assert new.attn.proj.weight.grad is not None and new.mlp.proj.weight.grad is not None
    assert new.attn.proj.weight.grad.abs().sum() > 0 and new.mlp.proj.weight.grad.abs().sum() > 0
