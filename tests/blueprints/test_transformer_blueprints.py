"""Token-slot (transformer) blueprint families: zero at birth, trainable, causal, exportable."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from esper_async.apps.gpt import GPT, GPTConfig
from esper_async.blueprints import Blueprint, SlotContract, SlotKind, build, library
from esper_async.compiler import KernelOptimizer, KernelValidator, OptimizerOptions
from esper_async.errors import BlueprintError
from esper_async.kernels import export_kernel, load_kernel

D = 12
TOKEN = SlotContract(SlotKind.TOKEN, (D,))

#: Each family, a few option variants, and the parameters of its zero-initialised output path.
VARIANTS: list[tuple[Blueprint, tuple[str, ...]]] = [
    (Blueprint("lora", {"rank": 4}), ("up.weight",)),
    (Blueprint("lora", {"rank": 64}), ("up.weight",)),  # rank clipped to D
    (Blueprint("mlp_expand", {"expansion": 2}), ("proj.weight", "proj.bias")),
    (Blueprint("mlp_expand", {"expansion": 1, "norm": False}), ("proj.weight", "proj.bias")),
    (Blueprint("attn_heads", {"heads": 2, "head_dim": 4}), ("proj.weight", "proj.bias")),
    (Blueprint("attn_heads", {"heads": 1, "head_dim": 7}), ("proj.weight", "proj.bias")),
    (
        Blueprint("block", {"heads": 3, "head_dim": 4, "expansion": 2}),
        ("attn.proj.weight", "attn.proj.bias", "mlp.proj.weight", "mlp.proj.bias"),
    ),
    (Blueprint("norm"), ("gate.weight", "gate.bias")),
    (Blueprint("norm", {"eps": 1e-3}), ("gate.weight", "gate.bias")),
]
CASES = [pytest.param(bp, zeros, id=bp.name) for bp, zeros in VARIANTS]
CAUSAL = [
    pytest.param(Blueprint("attn_heads", {"heads": 2, "head_dim": 4}), id="attn_heads"),
    pytest.param(Blueprint("block", {"heads": 2, "head_dim": 4, "expansion": 1}), id="block"),
]
TOKEN_LIBRARY = [pytest.param(bp, id=bp.name) for bp in library(SlotKind.TOKEN)]


def _randomise(*modules: nn.Module, seed: int = 0) -> None:
    """Give every parameter (zero-initialised ones too) the same random values in each module."""
    gen = torch.Generator().manual_seed(seed)
    groups = zip(*(list(m.parameters()) for m in modules), strict=True)
    with torch.no_grad():
        for group in groups:
            values = torch.randn(group[0].shape, generator=gen) * 0.5
            for p in group:
                p.copy_(values)


@pytest.mark.parametrize(("bp", "zeros"), CASES)
@pytest.mark.parametrize("tokens", [1, 2, 9])
def test_a_fresh_token_seed_preserves_the_slot_output(
    bp: Blueprint, zeros: tuple[str, ...], tokens: int
) -> None:
    module = build(bp, TOKEN, seed=0)
    h = torch.randn(3, tokens, D) * 3.0
    out = module(h)
    assert out.shape == h.shape
    assert torch.count_nonzero(out) == 0
    assert torch.equal(h + out, h)


@pytest.mark.parametrize(("bp", "zeros"), CASES)
def test_the_zero_output_path_gets_gradients_and_one_step_makes_the_seed_nonzero(
    bp: Blueprint, zeros: tuple[str, ...]
) -> None:
    module = build(bp, TOKEN, seed=0)
    params = dict(module.named_parameters())
    for name in zeros:
        assert torch.count_nonzero(params[name]) == 0, name  # zero at birth
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, D, generator=gen)
    target = torch.randn(2, 5, D, generator=gen)
    loss = nn.functional.mse_loss(h + module(h), target)
    loss.backward()
    for name in zeros:
        grad = params[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert torch.count_nonzero(module(h)) > 0


@pytest.mark.parametrize("bp", CAUSAL)
def test_attention_seeds_are_causal_once_their_output_projection_is_not_zero(
    bp: Blueprint,
) -> None:
    module = build(bp, TOKEN, seed=0)
    _randomise(module)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 8, D, generator=gen)
    later = h.clone()
    later[:, 5:] = torch.randn(2, 3, D, generator=gen)  # change tokens 5, 6, 7
    with torch.no_grad():
        out, out_later = module(h), module(later)
    torch.testing.assert_close(out[:, :5], out_later[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, 5:], out_later[:, 5:])
    # and it does mix tokens: changing token 2 alone changes position 6's output
    earlier = h.clone()
    earlier[:, 2] = torch.randn(2, D, generator=gen)  # not a constant shift: LayerNorm drops one
    with torch.no_grad():
        assert not torch.allclose(module(earlier)[:, 6], out[:, 6])


@pytest.mark.parametrize("bp", TOKEN_LIBRARY)
def test_token_kernels_round_trip_at_two_sequence_lengths_and_train(bp: Blueprint) -> None:
    kernel = export_kernel(bp, TOKEN, seed=1)
    assert kernel.contract == TOKEN
    assert kernel.metadata.input_shape == (D,) and kernel.metadata.output_shape == (D,)
    reference = build(bp, TOKEN, seed=1)
    fresh = load_kernel(kernel)
    h = torch.randn(2, 4, D)
    assert torch.count_nonzero(fresh(h)) == 0  # exported zero at birth

    loaded = load_kernel(kernel)
    _randomise(loaded, reference, seed=3)
    for batch, tokens in ((1, 3), (4, 11)):
        x = torch.randn(batch, tokens, D)
        x_kernel = x.clone().requires_grad_(True)
        x_ref = x.clone().requires_grad_(True)
        out, expected = loaded(x_kernel), reference(x_ref)
        assert out.shape == (batch, tokens, D)
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x_kernel.grad, x_ref.grad)

    opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(4, 6, D, generator=gen)
    target = h + torch.randn(4, 6, D, generator=gen)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.mse_loss(h + fresh(h), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_the_validator_and_optimizer_run_token_kernels_over_batch_and_sequence() -> None:
    kernel = export_kernel(Blueprint("block", {"heads": 2, "head_dim": 4}), TOKEN, seed=5)
    report = KernelValidator(seed=1).validate(kernel)
    assert report.passed, [c for c in report.checks if not c.passed]
    assert {"shape[b=1]", "shape[b=3]", "gradients[b=3]"} <= {c.name for c in report.checks}
    result = KernelOptimizer(OptimizerOptions(forms=("export",), repeats=1, batch=2)).optimize(
        kernel
    )
    assert result.form == "export" and not result.errors and "export" in result.timings_ms


def test_a_token_seed_on_a_gpt_sublayer_leaves_the_logits_unchanged_at_birth() -> None:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=D)
    model = GPT(config).eval()
    idx = torch.randint(0, 11, (2, 7))
    with torch.no_grad():
        before = model(idx)
    seeds = {
        "blocks.0.attn.proj": build(Blueprint("attn_heads"), TOKEN, seed=1),
        "blocks.0.mlp.proj": build(Blueprint("mlp_expand"), TOKEN, seed=2),
        "blocks.1.out": build(Blueprint("block"), TOKEN, seed=3),
    }
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, s=seed: out + s(out))
        for name, seed in seeds.items()
    ]
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
            _randomise(seeds["blocks.1.out"])  # a trained seed does change the model
            assert not torch.allclose(model(idx), before)
    finally:
        for hook in hooks:
            hook.remove()


BAD_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("lora", {"rank": 0}),
    ("lora", {"rank": 5000}),
    ("lora", {"rank": "4"}),
    ("lora", {"rank": True}),
    ("lora", {"alpha": 2}),
    ("mlp_expand", {"expansion": 0}),
    ("mlp_expand", {"expansion": 9}),
    ("mlp_expand", {"expansion": 2.0}),
    ("mlp_expand", {"norm": 1}),
    ("mlp_expand", {"norm": "yes"}),
    ("attn_heads", {"heads": 0}),
    ("attn_heads", {"heads": 65}),
    ("attn_heads", {"head_dim": 0}),
    ("attn_heads", {"head_dim": 257}),
    ("attn_heads", {"heads": 1.5}),
    ("attn_heads", {"causal": False}),
    ("block", {"heads": 0}),
    ("block", {"head_dim": -1}),
    ("block", {"expansion": 0}),
    ("block", {"expansion": [2]}),
    ("norm", {"eps": 0.0}),
    ("norm", {"eps": 0.5}),
    ("norm", {"eps": "small"}),
    ("norm", {"rank": 2}),
]


@pytest.mark.parametrize(
    ("family", "options"),
    [pytest.param(f, o, id=f"{f}-{sorted(o.items())}") for f, o in BAD_OPTIONS],
)
def test_bad_options_of_each_token_family_are_a_blueprint_error(
    family: str, options: dict[str, Any]
) -> None:
    with pytest.raises(BlueprintError, match=family):
        Blueprint(family, options)


def test_token_blueprints_fit_token_slots_only_and_the_library_offers_every_family() -> None:
    families = {bp.family for bp in library(SlotKind.TOKEN)}
    assert families == {"lora", "mlp_expand", "attn_heads", "block", "norm"}
    assert all(bp.slot_kind is SlotKind.TOKEN for bp in library("token"))
    with pytest.raises(BlueprintError, match="fits token slots"):
        build(Blueprint("lora"), SlotContract(SlotKind.LINEAR, (D,)))
    with pytest.raises(BlueprintError, match="fits linear slots"):
        build(Blueprint("low_rank"), TOKEN)


def test_a_token_contract_is_per_token_and_round_trips_through_json() -> None:
    assert TOKEN.leading_dims == 2 and TOKEN.batch_shape(3, tokens=7) == (3, 7, D)
    assert SlotContract(SlotKind.LINEAR, (D,)).batch_shape(3, tokens=7) == (3, D)
    assert SlotContract.from_json(TOKEN.to_json()) == TOKEN
    with pytest.raises(BlueprintError, match="rank 1"):
        SlotContract(SlotKind.TOKEN, (7, D))
