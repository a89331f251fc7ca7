"""Residual-stream width growth (WidenResidual) on the project's GPT and on a user's transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from esper_async.errors import SurgeryError
from esper_async.surgery import (
    GrowthCouplingError,
    InsertIdentityBlocks,
    ModelSurgeon,
    WidenResidual,
    operation_record,
)

from ._helpers import assert_same, evaluate, fingerprint
from ._host_models import VOCAB, UserBlock, UserLM, adamw, lm_step, resumed, tiny_gpt, tokens
from ._host_models import trained as _trained

BUILDS = {
    "gpt": (tiny_gpt, 48),
    "gpt_bias": (lambda: tiny_gpt(bias=True), 64),
    "user": (UserLM, 40),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(BUILDS))
async def test_widening_preserves_function_and_carries_state(name: str) -> None:
    build, width = BUILDS[name]
    model, opt = _trained(build)
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    old = {
        n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for n, p in model.named_parameters()
    }
    groups = [len(g["params"]) for g in opt.param_groups]
    async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
        await tx.stage(WidenResidual(width, seed=3))
    assert tx.report is not None and tx.report.max_abs_diff is not None
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
    assert [len(g["params"]) for g in opt.param_groups] == groups
    grown = 0
    for n, p in model.named_parameters():
        value, state = old[n]
        if p.shape == value.shape:
            continue
        grown += 1
        assert all(new >= was for new, was in zip(p.shape, value.shape, strict=True))
        moments = opt.state[p]
        assert torch.equal(moments["step"], state["step"])
        assert moments["exp_avg"].shape == p.shape
        if p.dim() == 2 and n.endswith(("wte.weight", "tok.weight")):
            d = value.shape[1]
            assert torch.equal(p[:, :d], value)
            assert torch.equal(moments["exp_avg"][:, :d], state["exp_avg"][:, :d])
            assert torch.count_nonzero(moments["exp_avg"][:, d:]) == 0
    # every matrix touches the stream (only the MLP input projections' biases keep their size)
    assert grown >= sum(1 for p in model.parameters() if p.dim() == 2)
    if name.startswith("gpt"):
        assert model.blocks[0].attn.n_head == width // 16  # more heads of the same size
        assert model.blocks[0].attn.qkv.weight.shape == (3 * width, width)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["gpt", "user"])
async def test_gradients_reach_every_new_weight(name: str) -> None:
    build, width = BUILDS[name]
    model, opt = _trained(build)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    await ModelSurgeon().apply(model, opt, WidenResidual(width, seed=1), probe=tokens()[0])
    lm_step(model, opt, tokens(seed=4))  # new coordinates leave their birth values
    model.zero_grad()
    logits = model(tokens(seed=5)[0])
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens(seed=5)[1].reshape(-1)).backward()
    for n, p in model.named_parameters():
        old = shapes[n]
        for dim, size in enumerate(old):
            if p.shape[dim] > size:
                new = p.grad.narrow(dim, size, p.shape[dim] - size)
                assert new.abs().sum() > 0, (n, dim)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["gpt", "user"])
async def test_widening_rollback_is_bitwise(name: str) -> None:
    build, width = BUILDS[name]
    model, opt = _trained(build)
    before = fingerprint(model, opt)
    with pytest.raises(RuntimeError, match="abort"):
        async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
            await tx.stage(WidenResidual(width))
            assert next(model.parameters()).shape[-1] == width
            raise RuntimeError("abort")
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["gpt", "user"])
async def test_resume_after_widening_replays_exactly(name: str) -> None:
    build, width = BUILDS[name]
    model, opt = _trained(build)
    op = WidenResidual(width, seed=2)
    await ModelSurgeon().apply(model, opt, op, probe=tokens()[0])
    lm_step(model, opt, tokens(seed=3))
    fresh, fresh_opt = resumed(build, model, opt, [operation_record(op)])
    for seed in (4, 5):
        assert lm_step(model, opt, tokens(seed=seed)) == lm_step(
            fresh, fresh_opt, tokens(seed=seed)
        )
    for (n, p), (m, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q)


class OwnRMSNorm(nn.Module):
    """An RMSNorm written by hand, as many users do."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.eps = 1e-6
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OwnLayerNorm(nn.Module):
    """A LayerNorm written by hand."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


class LiteralEpsNorm(OwnRMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class LayerScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _with(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
    return model


def _own_norms(model: nn.Module, norm: type[nn.Module]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.RMSNorm, nn.LayerNorm)):
            _with(model, name, norm(32))
    return model


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("build", "norm"),
    [(UserLM, OwnRMSNorm), (tiny_gpt, OwnLayerNorm)],
    ids=["own_rmsnorm", "own_layernorm"],
)
async def test_hand_written_norms_grow_like_torch_s(build, norm) -> None:
    model, opt = _trained(lambda: _own_norms(build(), norm))
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    op = WidenResidual(48, seed=1)
    await ModelSurgeon().apply(model, opt, op, probe=tokens()[0])
    assert op.found is not None and len(op.found["custom_norms"]) == 5
    kinds = {info["kind"] for info in op.found["custom_norms"].values()}
    assert kinds == ({"rms"} if norm is OwnRMSNorm else {"layer"})
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
    if norm is OwnRMSNorm:
        assert model.norm.eps == pytest.approx(1e-6 * 32 / 48)  # found and scaled
    lm_step(model, opt, tokens(seed=4))
    fresh, fresh_opt = resumed(
        lambda: _own_norms(build(), norm), model, opt, [operation_record(op)]
    )
    assert lm_step(model, opt, tokens(seed=5)) == lm_step(fresh, fresh_opt, tokens(seed=5))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("edit", "where", "why"),
    [
        (
            lambda m: _with(m, "norm", nn.Sequential(Swish(), nn.RMSNorm(32))),
            "norm.0",
            "acts on the residual stream",
        ),
        (lambda m: _with(m, "layers.0.norm1", nn.LayerNorm(32)), "layers", "LayerNorm and RMSNorm"),
        (lambda m: _with(m, "norm", nn.GELU()), "norm", "GELU reads the residual stream"),
        (
            lambda m: _with(m, "norm", nn.Sequential(LayerScale(32), nn.RMSNorm(32))),
            "norm.0",
            "does not normalise",
        ),
        (lambda m: _with(m, "norm", LiteralEpsNorm(32)), "norm", "constant in its code"),
    ],
    ids=["custom_op", "mixed_norms", "activation", "layer_scale", "literal_eps"],
)
async def test_what_cannot_grow_is_refused(edit, where: str, why: str) -> None:
    torch.manual_seed(0)
    model = edit(UserLM())
    opt = adamw(model)
    before = fingerprint(model, opt)
    with pytest.raises(GrowthCouplingError, match=why) as info:
        await ModelSurgeon().apply(model, opt, WidenResidual(40), probe=tokens()[0])
    assert info.value.module.startswith(where) and info.value.reason
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_bad_widths_are_refused() -> None:
    model, opt = _trained(tiny_gpt, steps=0)
    for width, why in ((32, "must exceed"), (40, "does not divide")):
        with pytest.raises(SurgeryError, match=why):
            await ModelSurgeon().apply(model, opt, WidenResidual(width), probe=tokens()[0])


def test_user_block_is_a_plain_module() -> None:
    assert isinstance(UserBlock(8, 2).mlp.gate, nn.Linear)


@pytest.mark.asyncio
async def test_widening_one_projection_of_a_gated_mlp_is_refused() -> None:
    from esper_async.surgery import Widen

    model, opt = _trained(UserLM, steps=1)
    before = fingerprint(model, opt)
    with pytest.raises(GrowthCouplingError, match="gated MLP") as info:
        await ModelSurgeon().apply(model, opt, Widen("layers.0.mlp.gate", 120), probe=tokens()[0])
    assert info.value.module == "layers.0.mlp.gate" and "layers.0.mlp.up" in info.value.reason
    assert_same(before, fingerprint(model, opt))


@pytest.mark.asyncio
async def test_widening_the_slot_of_one_gated_projection_is_refused() -> None:
    from esper_async.seeds import wrap
    from esper_async.surgery import CoupledWidthError, WidenSlot

    model, opt = _trained(UserLM, steps=1)
    wrap(model, ["layers.0.mlp.gate"], example_input=tokens()[0])
    with pytest.raises(CoupledWidthError, match=r"gated \(SwiGLU.*WidenGated"):
        await ModelSurgeon().apply(
            model, opt, WidenSlot("layers.0.mlp.gate", 120), probe=tokens()[0]
        )


@pytest.mark.asyncio
async def test_a_gpt_grown_to_a_target_has_the_target_s_shapes_and_function() -> None:
    from esper_async.apps.gpt import GPT, GPTConfig
    from esper_async.surgery import Widen

    model, opt = _trained(lambda: tiny_gpt(n_layer=3))
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    async with ModelSurgeon().transaction(model, opt, probe=tokens()[0]) as tx:
        await tx.stage(WidenResidual(96, seed=1))  # 2 heads of 16 -> 6
        for i in range(3):
            await tx.stage(Widen(f"blocks.{i}.mlp.fc", 4 * 96, seed=i))
        await tx.stage(InsertIdentityBlocks("blocks", after=(0, 1, 2)))
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
    target = GPT(GPTConfig(VOCAB, block_size=12, n_layer=6, n_head=6, n_embd=96))
    shapes = {k: v.shape for k, v in target.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    assert all(block.attn.n_head == 6 for block in model.blocks)
    lm_step(model, opt, tokens(seed=1))  # and it trains


@pytest.mark.asyncio
async def test_grow_heads_adds_heads_to_a_user_s_fixed_head_attention() -> None:
    model, opt = _trained(UserLM)
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    op = WidenResidual(64, grow_heads=True)  # 2 heads of 16 -> 4
    await ModelSurgeon().apply(model, opt, op, probe=tokens()[0])
    attn = model.layers[0].attn
    assert attn.heads == 4 and attn.head_dim == 16
    assert attn.wq.weight.shape == (64, 64) and attn.wo.weight.shape == (64, 64)
    assert model.layers[0].mlp.gate.weight.shape == (96, 64)  # the MLP's hidden width stays
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
    lm_step(model, opt, tokens(seed=4))
    fresh, fresh_opt = resumed(UserLM, model, opt, [operation_record(op)])
    assert lm_step(model, opt, tokens(seed=5)) == lm_step(fresh, fresh_opt, tokens(seed=5))
    # without grow_heads the user's attention keeps its 2 heads (its code fixes them)
    model, opt = _trained(UserLM)
    await ModelSurgeon().apply(model, opt, WidenResidual(64), probe=tokens()[0])
    assert model.layers[0].attn.heads == 2 and model.layers[0].attn.wq.weight.shape == (32, 64)


class _MatmulAttention(nn.Module):
    """Attention written with matmuls, reading d from the input's shape."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.n_head = 2
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / (d // self.n_head) ** 0.5, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(b, t, d))


@pytest.mark.asyncio
async def test_attention_without_sdpa_needs_its_head_size() -> None:
    torch.manual_seed(0)
    model = tiny_gpt()
    for block in model.blocks:
        block.attn = _MatmulAttention(32)
    opt = adamw(model)
    x = tokens(seed=9)[0]
    before = evaluate(model, x)
    with pytest.raises(GrowthCouplingError, match="pass head_dim="):
        await ModelSurgeon().apply(model, opt, WidenResidual(48), probe=tokens()[0])
    await ModelSurgeon().apply(model, opt, WidenResidual(48, head_dim=16), probe=tokens()[0])
    assert model.blocks[0].attn.n_head == 3
    assert torch.allclose(evaluate(model, x), before, rtol=1e-4, atol=1e-5)
