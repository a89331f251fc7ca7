"""Checks of the loaders a fit is given: a loader must yield batches every epoch, and a one-shot
iterator cannot serve more than one."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch

from ..errors import LoaderError

__all__ = ("batch_count", "check_loaders", "loader_generator", "no_batches")


def batch_count(loader: object) -> int | None:
    """``len(loader)`` where it has one (an ``IterableDataset``'s ``DataLoader`` may not).

    :param loader: any iterable of batches.
    :returns: its number of batches, or ``None`` when it does not say.
    """
    if not isinstance(loader, Sized):
        return None
    try:
        return len(loader)
    except TypeError:
        return None


def check_loaders(loaders: dict[str, object], epochs: int) -> None:
    """Refuse, before anything runs, loaders that cannot serve ``epochs`` epochs. Nothing is
    iterated (that would advance a ``DataLoader``'s RNG and change the run).

    :param loaders: each loader by its role (``"training"``, ``"validation"``).
    :param epochs: the epochs the fit is to run.
    :raises LoaderError: a loader has no batches (by its ``len``), or is a one-shot iterator (a
        generator: ``iter(x) is x``) and more than one epoch is to run.
    """
    for which, loader in loaders.items():
        if epochs > 1 and isinstance(loader, Iterator):
            raise LoaderError(
                f"the {which} loader is a one-shot iterator ({type(loader).__name__}): it would "
                f"be empty after the first of {epochs} epochs; pass a re-iterable such as a "
                "DataLoader or a list",
                loader=which,
            )
        if batch_count(loader) == 0:
            raise no_batches(which, later=False)


def no_batches(which: str, *, later: bool, epoch: int | None = None) -> LoaderError:
    """The error for a loader that yielded no batches.

    :param which: the loader's role.
    :param later: whether it did yield batches in an earlier epoch of the same fit.
    :param epoch: the epoch it yielded none in (``None``: seen by its ``len``, before training).
    """
    when = "" if epoch is None else f" in epoch {epoch}"
    if later:
        return LoaderError(
            f"the {which} loader yielded no batches{when}, though it did in an earlier epoch: "
            "pass a re-iterable such as a DataLoader or a list, not a one-shot iterator",
            loader=which,
        )
    need = (
        "fit() needs at least one batch to train on" if which == "training" else
        "every epoch's report and the controller's judgements are measured on it; pass a "
        "held-out set (one batch will do)"
    )
    return LoaderError(f"the {which} loader yielded no batches{when}: {need}", loader=which)


def loader_generator(loader: object) -> torch.Generator | None:
    """The RNG that orders a ``DataLoader``'s batches, if it has one (saved in checkpoints)."""
    sampler = getattr(loader, "sampler", None)
    generator = getattr(sampler, "generator", None) or getattr(loader, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None
