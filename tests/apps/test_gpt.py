from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from esper_async.apps.gpt import GPT, GPTConfig, count_parameters, training_flops_per_token
from esper_async.apps.shakespeare import load_shakespeare

VOCAB = 85  # the Shakespeare corpus: 84 training characters and the unknown id
TINY = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32)


def _model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_logits_shape_and_named_sublayers() -> None:
    model = _model()
    idx = torch.randint(0, VOCAB, (3, 20))
    shapes: dict[str, tuple[int, ...]] = {}
    names = ["blocks.0.attn.proj", "blocks.0.mlp.proj", "blocks.0.out", "blocks.1.out"]
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
    assert model(idx).shape == (3, 20, VOCAB)
    assert shapes == dict.fromkeys(names, (3, 20, TINY.n_embd))
    assert isinstance(modules["blocks.0.out"], torch.nn.Identity)
    assert list(model.buffers()) == []  # no causal-mask buffer: attention uses is_causal
    assert model.wte.weight is model.lm_head.weight


def test_changing_a_future_token_leaves_earlier_logits_alone() -> None:
    model = _model()
    idx = torch.randint(0, VOCAB, (2, 24))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=0, atol=1e-6)
    assert (after[:, 10:] - before[:, 10:]).abs().amax(dim=-1).min() > 1e-4


def test_initialisation_follows_nanogpt() -> None:
    model = _model(GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=2, n_embd=128))
    residual = 0.02 / math.sqrt(2 * 4)
    for block in model.blocks:
        for weight, std in [
            (block.attn.qkv.weight, 0.02),
            (block.mlp.fc.weight, 0.02),
            (block.attn.proj.weight, residual),
            (block.mlp.proj.weight, residual),
        ]:
            assert weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_bad_configs_and_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(vocab_size=VOCAB, n_head=5, n_embd=64)
    with pytest.raises(ValueError, match="vocab_size"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(vocab_size=VOCAB, dropout=1.0)
    model = _model()
    with pytest.raises(ValueError, match="longer than block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        model(torch.zeros(33, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature > 0"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, temperature=0.0)


def test_generate_extends_the_prompt_reproducibly() -> None:
    model = _model().train()
    prompt = torch.randint(0, VOCAB, (2, 5))

    def sample(seed: int, **kwargs: object) -> torch.Tensor:
        return model.generate(prompt, 40, generator=torch.Generator().manual_seed(seed), **kwargs)

    out = sample(0, top_k=10)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert torch.equal(out, sample(0, top_k=10)) and not torch.equal(out, sample(1, top_k=10))
    assert model.training  # the mode is restored
    # Beyond block_size the context is cropped, so the model never sees more than 32 tokens.
    greedy = sample(0, top_k=1)
    assert torch.equal(greedy, sample(1, top_k=1))
    model.eval()
    window = greedy[:, -TINY.block_size - 1 :]
    chosen = model(window[:, :-1])[:, -1].argmax(dim=-1)
    assert torch.equal(chosen, window[:, -1])


def test_a_tiny_model_learns_the_corpus() -> None:
    data = load_shakespeare()
    model = _model(GPTConfig.narrow(data.vocab.size)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for x, y in data.train_batches(batch_size=16, block_size=32, batches_per_epoch=30, seed=0):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(data.vocab.size), abs=0.2)  # near uniform at init
    assert sum(losses[-5:]) / 5 < losses[0] - 0.7


def test_reference_preset_is_nanogpt_shakespeare_char() -> None:
    config = GPTConfig.reference(65)
    n = count_parameters(_model(config))
    assert n == 10_646_784 and round(n / 1e6, 2) == 10.65  # nanoGPT: "number of parameters: 10.65M"
    assert (config.n_layer, config.n_head, config.n_embd, config.block_size) == (6, 6, 384, 256)
    assert config.dropout == 0.2 and not config.bias


@pytest.mark.parametrize("bias", [pytest.param(False, id="no-bias"), pytest.param(True, id="bias")])
def test_parameter_count_formula(bias: bool) -> None:
    config = dataclasses.replace(TINY, bias=bias)
    layers, width, vocab = config.n_layer, config.n_embd, config.vocab_size
    # Per block: qkv 3D², attention proj D², MLP 8D², two LayerNorm weights; a bias adds 11D.
    per_block = 12 * width**2 + (13 if bias else 2) * width
    expected = layers * per_block + (2 if bias else 1) * width + vocab * width
    model = _model(config)
    assert count_parameters(model) == expected
    assert count_parameters(model, non_embedding=False) == expected + config.block_size * width


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(GPTConfig.narrow(VOCAB), id="narrow"),
        pytest.param(dataclasses.replace(TINY, n_layer=3, bias=True), id="tiny-bias"),
    ],
)
def test_flops_estimate_matches_a_count_of_the_matmuls(config: GPTConfig) -> None:
    model = _model(config).train()
    seq_len, batch = 32, 2
    idx = torch.randint(0, VOCAB, (batch, seq_len))
    # The math backend spells attention out as matmuls, which the counter sees.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    measured = counter.get_total_flops() / (batch * seq_len)
    estimate = training_flops_per_token(config, seq_len)
    # The whole gap is the vectors (LayerNorm weights, biases), which do no matmul: 6 FLOPs each.
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert measured == estimate - 6 * vectors
    if config == GPTConfig.narrow(VOCAB):
        assert measured == pytest.approx(estimate, rel=0.01)
    with pytest.raises(ValueError, match="block_size"):
        training_flops_per_token(config, config.block_size + 1)
