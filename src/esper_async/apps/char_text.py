"""Character-level text as tokens: a vocabulary, and loaders of ``(x, y)`` windows for a language
model.

The vocabulary is built from one text (the training split) and keeps one extra id for every
character it has not seen, so encoding never fails and never silently drops a character: text
from another split, or a prompt typed by a user, encodes to the same number of tokens as it has
characters. The loaders cut windows of ``block_size + 1`` tokens from a 1-D token tensor; ``x`` is
the first ``block_size`` tokens and ``y`` the same window shifted by one (the next token at every
position).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ("CharVocab", "EvalWindows", "RandomWindows")

# What decode() writes for the reserved unknown id: U+FFFD REPLACEMENT CHARACTER, the Unicode
# convention for "a character that could not be represented".
REPLACEMENT_CHAR = "\ufffd"


def _code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (UTF-32 is one unit per character)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: id ``i`` is ``chars[i]``; id ``len(chars)`` stands for any other
    character (:attr:`unknown_id`).

    :ivar chars: the known characters, unique, in code-point order.
    """

    chars: str

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars) or list(self.chars) != sorted(self.chars):
            raise ValueError("CharVocab.chars must be unique characters in code-point order")

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of the characters that occur in ``text``.

        :param text: the text to take the characters from (the training split).
        :raises ValueError: if ``text`` is empty.
        """
        if not text:
            raise ValueError("CharVocab.from_text() needs a non-empty text")
        return cls("".join(sorted(set(text))))

    @property
    def unknown_id(self) -> int:
        """The id that every character outside :attr:`chars` encodes to."""
        return len(self.chars)

    @property
    def size(self) -> int:
        """The number of ids (the known characters and the unknown id): a model's ``vocab_size``."""
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        """Encode ``text`` as a 1-D int64 tensor of ids, one per character.

        :param text: any text; characters outside the vocabulary become :attr:`unknown_id`.
        """
        points = _code_points(text)
        known = _code_points(self.chars)
        # A lookup table indexed by code point; this is what keeps encoding a 5-million-character
        # corpus at tens of milliseconds instead of seconds in a Python loop.
        table = np.full(int(known.max()) + 1 if known.size else 1, self.unknown_id, np.int64)
        table[known] = np.arange(known.size)
        inside = points < table.size
        ids = np.full(points.shape, self.unknown_id, np.int64)
        ids[inside] = table[points[inside]]
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor) -> str:
        """Turn ids back into text; :attr:`unknown_id` becomes U+FFFD.

        :param ids: a 1-D integer tensor (or a 0-D one) of ids below :attr:`size`.
        :raises ValueError: if ``ids`` is not 0-D or 1-D, or holds an id outside ``[0, size)``.
        """
        if ids.dim() > 1:
            raise ValueError(f"decode() takes a 1-D tensor of ids, got shape {tuple(ids.shape)}")
        flat = ids.reshape(-1).to(torch.int64).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise ValueError(
                f"decode(): ids must lie in [0, {self.size}); got {flat.min()}..{flat.max()}"
            )
        alphabet = np.concatenate([_code_points(self.chars), _code_points(REPLACEMENT_CHAR)])
        return alphabet[flat].astype("<u4").tobytes().decode("utf-32-le")


def _check_tokens(tokens: torch.Tensor, block_size: int, batch_size: int) -> None:
    if tokens.dim() != 1 or tokens.dtype != torch.int64:
        raise ValueError(
            f"token windows need a 1-D int64 tensor, got {tokens.dtype} of shape "
            f"{tuple(tokens.shape)}"
        )
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}")
    if tokens.numel() < block_size + 1:
        raise ValueError(
            f"a window of block_size {block_size} needs {block_size + 1} tokens; "
            f"the split has {tokens.numel()}: use a smaller block_size"
        )


def _windows(
    tokens: torch.Tensor, starts: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for windows starting at ``starts``: each ``(len(starts), block_size)``."""
    index = starts[:, None] + torch.arange(block_size + 1)
    window = tokens[index]
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class RandomWindows:
    """Training batches: windows at random offsets, a fixed number of batches per epoch.

    Each pass (``iter()``) is one epoch; it draws all of its offsets from :attr:`generator` when it
    starts, so the generator's state between epochs fixes every later batch. The trainer saves and
    restores ``loader.generator`` in checkpoints, which makes a resumed run see the same batches.

    :param tokens: the split, a 1-D int64 tensor.
    :param batch_size: ``B``, windows per batch.
    :param block_size: ``T``, tokens per window.
    :param batches_per_epoch: ``len()`` of the loader.
    :param seed: seeds a new generator (ignored when ``generator`` is given).
    :param generator: the generator to draw offsets from.
    :raises ValueError: if ``tokens`` is not 1-D int64, a size is below 1, or the split is
        shorter than one window.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        block_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_tokens(tokens, block_size, batch_size)
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.batches_per_epoch = batches_per_epoch
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Offsets run up to n - T - 1 so that the shifted target y still fits.
        high = self.tokens.numel() - self.block_size
        starts = torch.randint(
            0, high, (self.batches_per_epoch, self.batch_size), generator=self.generator
        )
        return (_windows(self.tokens, row, self.block_size) for row in starts)


class EvalWindows:
    """Evaluation batches: non-overlapping windows at stride ``block_size``, the same every pass.

    When ``max_batches`` caps the count, the windows kept are spread evenly over the whole split
    (not its first pages), so a capped evaluation still samples every work in it.

    :param tokens: the split, a 1-D int64 tensor.
    :param batch_size: windows per batch (the last batch may be smaller).
    :param block_size: ``T``, tokens per window.
    :param max_batches: at most this many batches (``None``: every window).
    :raises ValueError: if ``tokens`` is not 1-D int64, a size is below 1, or the split is
        shorter than one window.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        *,
        batch_size: int,
        block_size: int,
        max_batches: int | None = None,
    ) -> None:
        _check_tokens(tokens, block_size, batch_size)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        count = (tokens.numel() - 1) // block_size
        keep = count if max_batches is None else min(count, max_batches * batch_size)
        chosen = torch.arange(keep) * count // keep
        self.starts = chosen * block_size

    def __len__(self) -> int:
        return -(-self.starts.numel() // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, self.starts.numel(), self.batch_size):
            starts = self.starts[first : first + self.batch_size]
            yield _windows(self.tokens, starts, self.block_size)
