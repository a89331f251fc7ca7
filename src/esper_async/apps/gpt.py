"""A GPT host in the nanoGPT mould: a decoder-only transformer for character-level text.

The model follows Karpathy's nanoGPT ``model.py``: token and position embeddings, pre-norm blocks
(LayerNorm → causal self-attention, LayerNorm → GELU MLP of 4× width), a final LayerNorm and an
output head tied to the token embedding, initialised from N(0, 0.02) with the residual
projections scaled by 1/√(2·n_layer).

Every place a seed slot may later wrap is a named module of its own, with a ``(N, T, D)`` output:

- ``blocks.{i}.attn.proj``: attention's output projection (before it joins the residual stream);
- ``blocks.{i}.mlp.proj``: the MLP's output projection;
- ``blocks.{i}.out``: an ``nn.Identity`` on the block's output (after both residual additions).

Attention uses ``F.scaled_dot_product_attention(is_causal=True)``; the model registers no causal-
mask buffer (nor any other buffer), so a finiteness check may look at every tensor it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = (
    "GPT",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "count_parameters",
    "identity_block",
    "init_like_new",
    "training_flops_per_token",
)

INIT_STD = 0.02  # GPT-2's initialisation, kept by nanoGPT
MLP_RATIO = 4


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`.

    :ivar vocab_size: number of token ids.
    :ivar block_size: the longest context (position embeddings).
    :ivar n_layer: transformer blocks.
    :ivar n_head: attention heads per block; must divide ``n_embd``.
    :ivar n_embd: residual width ``D``.
    :ivar dropout: dropout on embeddings, attention weights and residual branches (training only).
    :ivar bias: biases in the Linear and LayerNorm layers (nanoGPT's ``train.py`` default: none).
    """

    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("vocab_size", "block_size", "n_layer", "n_head")}
        small = {k: v for k, v in sizes.items() if v < 1}
        if small:
            raise ValueError(f"GPTConfig: these sizes must be >= 1: {small}")
        if self.n_embd < 1 or self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be a positive multiple of n_head "
                f"({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must lie in [0, 1), got {self.dropout}")

    @classmethod
    def narrow(cls, vocab_size: int) -> GPTConfig:
        """The narrow start size: 2 blocks, 1 head of 64, width 64, context 256 (~0.1M parameters
        plus ``64·vocab_size``). One head keeps nanoGPT's head size of 64, so adding heads widens
        attention without changing any existing head. A few hundred CPU steps at T=64 take
        well under a minute.

        :param vocab_size: number of token ids.
        """
        return cls(vocab_size=vocab_size, block_size=256, n_layer=2, n_head=1, n_embd=64)

    @classmethod
    def reference(cls, vocab_size: int) -> GPTConfig:
        """The reference size, nanoGPT's ``shakespeare_char``: 6 blocks, 6 heads, width 384,
        context 256, dropout 0.2, no biases (10.65M parameters at vocab 65).

        :param vocab_size: number of token ids.
        """
        return cls(
            vocab_size=vocab_size, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2
        )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(N, T, D) -> (N, T, D)``.

    :param config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        # (N, T, D) -> (N, heads, T, head size)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(n, t, d)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise MLP: ``D -> 4D -> GELU -> D``, ``(N, T, D) -> (N, T, D)``.

    :param config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, MLP_RATIO * config.n_embd, bias=config.bias)
        self.act = nn.GELU()
        self.proj = nn.Linear(MLP_RATIO * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block, ``(N, T, D) -> (N, T, D)``; ``out`` is an identity on its
    result, a place for a seed slot between blocks.

    :param config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return self.out(x)


class GPT(nn.Module):
    """A decoder-only transformer language model: token ids ``(N, T)`` → logits ``(N, T, vocab)``.

    :param config: the model's shape.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them.
        self.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        # GPT-2's scaling: each block adds two residual branches, so their output projections
        # start smaller to keep the residual stream's variance flat with depth.
        residual_std = INIT_STD / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            assert isinstance(block, Block)
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits for the next token at every position.

        :param idx: token ids, ``(N, T)`` int64 with ``T <= block_size``.
        :returns: ``(N, T, vocab_size)`` logits; position ``t`` sees tokens ``0..t`` only.
        :raises ValueError: if ``idx`` is not 2-D or ``T`` exceeds ``block_size``.
        """
        if idx.dim() != 2:
            raise ValueError(f"GPT takes token ids of shape (N, T), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(
                f"GPT: sequence of {t} tokens is longer than block_size {self.config.block_size}; "
                "crop the context or build the model with a larger block_size"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx``, one at a time, in eval mode.

        The context is cropped to the last ``block_size`` tokens; the model's training mode is
        restored afterwards.

        :param idx: prompt ids, ``(N, T0)`` int64 (``T0 >= 1``).
        :param max_new_tokens: tokens to add (``>= 0``).
        :param temperature: logits are divided by it; below 1 sharpens, above 1 flattens.
        :param top_k: sample only among the ``top_k`` likeliest tokens (``None``: all).
        :param generator: the RNG to sample with (on ``idx``'s device), for reproducible text.
        :returns: ``(N, T0 + max_new_tokens)``: the prompt followed by the samples.
        :raises ValueError: if ``idx`` is empty or not 2-D, ``max_new_tokens`` is negative,
            ``temperature`` is not positive, or ``top_k`` is below 1.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"generate() needs a prompt (N, T0 >= 1), got {tuple(idx.shape)}")
        if max_new_tokens < 0 or temperature <= 0.0 or (top_k is not None and top_k < 1):
            raise ValueError(
                "generate(): need max_new_tokens >= 0, temperature > 0, top_k >= 1 or None; got "
                f"{max_new_tokens}, {temperature}, {top_k}"
            )
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(idx[:, -self.config.block_size :])[:, -1, :] / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        finally:
            self.train(was_training)
        return idx


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)


def identity_block(config: GPTConfig) -> Block:
    """A new pre-norm :class:`Block` of ``config``'s shape that is the identity at birth: its
    attention and MLP output projections (``attn.proj``, ``mlp.proj``) are zero, so both residual
    branches add nothing (``x + 0 + 0``), while every other weight starts as :class:`GPT`'s do.
    The zero projections get gradients from the first step (their inputs are not zero). For
    depth growth: insert it after a block's ``out``, e.g.
    ``InsertAfter("blocks.0.out", identity_block(model.config))``.

    :param config: the host's shape (width, heads, dropout, biases).
    """
    block = Block(config)
    block.apply(_init_weights)
    for proj in (block.attn.proj, block.mlp.proj):
        nn.init.zeros_(proj.weight)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    return block


def init_like_new(config: GPTConfig, name: str, module: nn.Module) -> None:
    """Initialise ``module`` (at dotted path ``name`` in a :class:`GPT`, possibly wrapped in a
    seed slot: ``blocks.0.mlp.proj.host``) as :class:`GPT` initialises a fresh model: Linear and
    Embedding weights from N(0, 0.02), biases zero, attention's and the MLP's output projections
    (``attn.proj``, ``mlp.proj``) at GPT-2's residual scale ``0.02/√(2·n_layer)``; LayerNorms
    as PyTorch resets them. For re-initialising layers a widening made wider, so that a model
    built at the new widths (static_final) starts like one built that way from scratch.

    :param config: the model's shape (for ``n_layer``).
    :param name: the module's dotted path in the model.
    :param module: the module to initialise, in place.
    :raises TypeError: if ``module`` is not a Linear, Embedding or LayerNorm.
    """
    if isinstance(module, nn.LayerNorm):
        module.reset_parameters()
        return
    if not isinstance(module, nn.Linear | nn.Embedding):
        raise TypeError(
            f"init_like_new: {name!r} is a {type(module).__name__}; only Linear, Embedding and "
            "LayerNorm modules of a GPT have an initialisation here"
        )
    _init_weights(module)
    path = name.removesuffix(".host")
    if isinstance(module, nn.Linear) and path.endswith(("attn.proj", "mlp.proj")):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))


def count_parameters(model: nn.Module, *, non_embedding: bool = True) -> int:
    """The number of parameters, each shared tensor counted once (the tied head and embedding).

    :param model: any module; for a :class:`GPT`, ``non_embedding`` applies.
    :param non_embedding: leave out the position embeddings, as nanoGPT's ``get_num_params``
        does (the token embedding stays: it is also the output head's weight).
    """
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    if non_embedding and isinstance(model, GPT):
        total -= model.wpe.weight.numel()
    return total


def training_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> int:
    """An estimate of the FLOPs one training step spends per token (forward and backward).

    This is nanoGPT's ``estimate_mfu`` count (from the PaLM paper, appendix B):
    ``6·N + 12·n_layer·n_embd·T``. ``6·N`` is the weight matmuls: 2 FLOPs per parameter per token
    forward, 4 backward (the gradients of inputs and of weights), with ``N`` the parameters less
    the position embeddings (a lookup, no matmul); the tied output head is in ``N`` and is a real
    ``D × vocab`` matmul. ``12·L·D·T`` is attention's two ``T × T`` products (``QKᵀ`` and the
    weighted sum of ``V``: ``4·D·T`` per token per layer forward, twice that backward), counted
    over the full ``T × T`` square although the causal mask makes half of it zeros. Not counted:
    LayerNorm, softmax, GELU, dropout, biases' additions, the loss and the optimizer step, all
    linear in ``D`` and small beside the matmuls. An estimate, not a measurement.

    :param config: the model's shape.
    :param seq_len: the training sequence length ``T`` (default: ``block_size``).
    :raises ValueError: if ``seq_len`` is below 1 or above ``block_size``.
    """
    t = config.block_size if seq_len is None else seq_len
    if not 1 <= t <= config.block_size:
        raise ValueError(f"seq_len must lie in [1, block_size={config.block_size}], got {t}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        n = count_parameters(GPT(config))
    return 6 * n + 12 * config.n_layer * config.n_embd * t
