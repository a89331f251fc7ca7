"""The bundled data set: scikit-learn's 8×8 handwritten digits (1,797 images, no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ("DigitsLoaders", "digits_loaders")


@dataclass(frozen=True)
class DigitsLoaders:
    """Train, validation and test loaders over disjoint, stratified splits."""

    train: DataLoader[tuple[torch.Tensor, ...]]
    val: DataLoader[tuple[torch.Tensor, ...]]
    test: DataLoader[tuple[torch.Tensor, ...]]


def digits_loaders(
    *,
    batch_size: int = 64,
    seed: int = 0,
    fractions: tuple[float, float] = (0.6, 0.2),
    limit: int | None = None,
) -> DigitsLoaders:
    """Load the digits as ``(N, 1, 8, 8)`` float tensors in [0, 1] and int64 labels.

    :param batch_size: training batch size (evaluation uses 512).
    :param seed: seeds the split and the training shuffle order.
    :param fractions: train and validation fractions; the rest is the test split.
    :param limit: use only the first ``limit`` images (for quick tests).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    train_frac, val_frac = fractions
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=train_frac, random_state=seed, stratify=y
    )
    val_share = val_frac / (1.0 - train_frac)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=val_share, random_state=seed, stratify=y_rest
    )

    def loader(xs: np.ndarray, ys: np.ndarray, shuffle: bool, size: int) -> DataLoader:
        ds = TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys))
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=size, shuffle=shuffle, generator=gen)

    return DigitsLoaders(
        train=loader(x_train, y_train, True, batch_size),
        val=loader(x_val, y_val, False, 512),
        test=loader(x_test, y_test, False, 512),
    )
