"""CIFAR-10 from a user's own copy of its python files, and a small residual conv host for it.

Nothing is downloaded. Point :func:`cifar_loaders` at the directory the official
``cifar-10-python.tar.gz`` extracts to, ``cifar-10-batches-py/`` (or at the folder holding it):
``data_batch_1`` … ``data_batch_5`` (50,000 training images), ``test_batch`` (10,000) and
``batches.meta`` (the class names). Without an argument it reads ``$ESPER_CIFAR_DIR``, else
``~/.cache/esper_async/cifar-10-batches-py``.

**The files are pickles, and they are never unpickled as such.** A pickle can name any function
for the loader to call, so a crafted file could run code. They are read by
:mod:`esper_async.apps._safe_pickle`, which resolves the few names numpy and Python pickle plain
data with to stand-ins that build only numeric arrays from the file's own bytes; any other name
(``os.system``, ``builtins.eval``, anything) is refused before it is called, with
:class:`~esper_async.errors.DataError`. What loads is then checked: a dict with ``data``, a
``uint8`` array ``(N, 3072)`` (three 32×32 planes, red, green, blue), and ``labels``, ``N``
integers in ``[0, 10)``. A file that is missing raises
:class:`~esper_async.errors.DataMissingError`; one that is truncated, corrupt, too large or of the
wrong shape raises :class:`~esper_async.errors.DataError`, naming the file.

:class:`CifarHost` is a deliberately narrow ResNet-style net for ``(N, 3, 32, 32)`` images, with
conv layers to hold seed slots (:data:`CIFAR_SLOTS`), in the spirit of the digits demo's host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._files import FileTooLarge, read_regular
from ..errors import DataError, DataMissingError
from ._safe_pickle import PickleOverBound, PickleRefused, PickleUnsupported, loads

__all__ = (
    "CIFAR_CLASSES",
    "CIFAR_DIR_NAME",
    "CIFAR_ENV_VAR",
    "CIFAR_SLOTS",
    "CifarBatch",
    "CifarHost",
    "CifarLoaders",
    "cifar_loaders",
    "default_cifar_dir",
    "read_batch",
    "read_label_names",
    "resolve_cifar_dir",
)

log = structlog.get_logger(__name__)

#: The directory the official archive extracts to.
CIFAR_DIR_NAME = "cifar-10-batches-py"
#: The environment variable that names the directory when no path is given.
CIFAR_ENV_VAR = "ESPER_CIFAR_DIR"
CIFAR_CLASSES = 10
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
#: One image: three 32×32 planes (red, green, blue), row-major, in one row of ``data``.
IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32
#: A real batch file is about 30 MiB; refusing anything much larger bounds what a file can make
#: the loader allocate.
MAX_FILE_BYTES = 64 * 2**20
#: Per-channel mean and standard deviation of the 50,000 training images (the figures in common
#: use), so every split is normalised alike and none depends on the held-out ones.
CHANNEL_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_STD = (0.2470, 0.2435, 0.2616)
#: The host modules seed slots go in by default: the second conv of each residual stage.
CIFAR_SLOTS = ("stage1.conv2", "stage2.conv2", "stage3.conv2")
#: Evaluation batch size (as the digits loaders).
_EVAL_BATCH = 512


def _unpickle(path: Path) -> Any:
    """The object pickled in ``path``, read by :func:`._safe_pickle.loads`.

    :raises DataMissingError: if there is no such file.
    :raises DataError: if it is not a regular file, cannot be read, is too large, names a
        refused global, goes beyond the reader's bounds, or is not a whole pickle.
    """
    try:
        raw = read_regular(path, cap=MAX_FILE_BYTES)
    except FileNotFoundError as exc:
        raise DataMissingError(
            f"{path} is missing: a CIFAR-10 directory holds {', '.join(TRAIN_FILES[:1])}…"
            f"{TRAIN_FILES[-1]}, {TEST_FILE} and {META_FILE}", path=str(path),
        ) from exc
    except FileTooLarge as exc:
        raise DataError(
            f"{path}: {exc.strerror}, more than a CIFAR-10 batch file ever holds; it is not one",
            path=str(path),
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", path=str(path)) from exc
    try:
        obj = loads(raw)  # Python 2's strings (the official files') load as bytes
    except PickleOverBound as exc:
        raise DataError(
            f"{path} is refused: its pickle {exc}; a CIFAR-10 batch is plain arrays, lists "
            "and strings well within these bounds (nothing in it was run)", path=str(path),
        ) from None
    except PickleUnsupported as exc:
        raise DataError(
            f"{path} is refused unread: its pickle {exc}, and CIFAR-10 files hold only "
            "arrays, lists and strings (nothing in it was run); use the official files",
            path=str(path),
        ) from None
    except PickleRefused as exc:
        raise DataError(
            f"{path} is refused unread: its pickle imports {exc}, and CIFAR-10 files hold only "
            "arrays, lists and strings (nothing in it was run); use the official files",
            path=str(path),
        ) from None
    except (ValueError, MemoryError) as exc:  # truncated or malformed (UnicodeDecodeError, ...)
        raise DataError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:120]}); "
            "extract it again from cifar-10-python.tar.gz", path=str(path),
        ) from exc
    return obj


def _field(obj: dict[Any, Any], key: str, path: Path) -> Any:
    """``obj[key]``, under the byte-string key the official files use or a str one."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise DataError(
        f"{path} has no {key!r} entry (its keys: {sorted(map(repr, obj))[:6]}); it is not a "
        "CIFAR-10 python batch", path=str(path),
    )


@dataclass(frozen=True)
class CifarBatch:
    """The images and labels of one batch file.

    :ivar data: ``uint8`` array ``(N, 3072)``, one image a row (red, green, blue planes).
    :ivar labels: ``int64`` array ``(N,)`` in ``[0, 10)``.
    """

    data: np.ndarray
    labels: np.ndarray


def read_batch(path: str | Path) -> CifarBatch:
    """Read and check one CIFAR-10 python batch file (``data_batch_i`` or ``test_batch``).

    :param path: the file.
    :raises DataMissingError: if it is not there.
    :raises DataError: if it is truncated, corrupt, crafted (it imports anything but numpy's
        array rebuilders; nothing in it runs), or its data or labels are not of CIFAR-10's
        shape, type and range.
    """
    path = Path(path)
    obj = _unpickle(path)
    if not isinstance(obj, dict):
        raise DataError(
            f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch",
            path=str(path),
        )
    data, labels = _field(obj, "data", path), _field(obj, "labels", path)
    if (
        not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
        or data.shape[1] != _PIXELS or data.shape[0] == 0
    ):
        what = (f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else f"a {type(data).__name__}")
        raise DataError(
            f"{path}: 'data' is {what}; a CIFAR-10 batch holds uint8 (N, {_PIXELS}) with N > 0",
            path=str(path),
        )
    return CifarBatch(data=data, labels=_check_labels(labels, len(data), path))


def _check_labels(labels: Any, count: int, path: Path) -> np.ndarray:
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        values = labels.astype(np.int64)
    elif isinstance(labels, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        values = np.asarray(labels, dtype=np.int64) if labels else np.zeros(0, np.int64)
    else:
        raise DataError(
            f"{path}: 'labels' is not a list of integers (got {type(labels).__name__})",
            path=str(path),
        )
    if len(values) != count:
        raise DataError(
            f"{path}: {len(values)} labels for {count} images", path=str(path)
        )
    bad = np.flatnonzero((values < 0) | (values >= CIFAR_CLASSES))
    if len(bad):
        raise DataError(
            f"{path}: label {int(values[bad[0]])} of image {int(bad[0])} is outside "
            f"[0, {CIFAR_CLASSES})", path=str(path),
        )
    return values


def read_label_names(directory: str | Path) -> tuple[str, ...]:
    """The ten class names in ``batches.meta`` of a CIFAR-10 directory.

    :param directory: the ``cifar-10-batches-py`` directory.
    :raises DataMissingError: if ``batches.meta`` is not there.
    :raises DataError: if it is damaged or crafted, or does not hold ten names.
    """
    path = Path(directory) / META_FILE
    obj = _unpickle(path)
    names = _field(obj, "label_names", path) if isinstance(obj, dict) else None
    if (
        not isinstance(names, list) or len(names) != CIFAR_CLASSES
        or not all(isinstance(n, bytes | str) for n in names)
    ):
        raise DataError(
            f"{path}: 'label_names' is not a list of {CIFAR_CLASSES} names", path=str(path)
        )
    try:
        return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: a class name is not UTF-8 ({exc})", path=str(path)) from exc


def default_cifar_dir() -> Path:
    """``$ESPER_CIFAR_DIR`` if set, else ``~/.cache/esper_async/cifar-10-batches-py``."""
    env = os.environ.get(CIFAR_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "esper_async" / CIFAR_DIR_NAME


def resolve_cifar_dir(root: str | Path | None = None) -> Path:
    """The CIFAR-10 directory ``root`` names: itself, or its ``cifar-10-batches-py`` child.

    :param root: the directory (default :func:`default_cifar_dir`).
    :raises DataMissingError: if neither holds every file of the set, naming the first missing.
    """
    base = default_cifar_dir() if root is None else Path(root).expanduser()
    if not (base / TEST_FILE).exists() and (base / CIFAR_DIR_NAME).is_dir():
        base = base / CIFAR_DIR_NAME
    if not base.is_dir():
        raise DataMissingError(
            f"no CIFAR-10 directory at {base}: extract cifar-10-python.tar.gz there, or point "
            f"${CIFAR_ENV_VAR} (or the path argument) at its {CIFAR_DIR_NAME} folder",
            path=str(base),
        )
    for name in (*TRAIN_FILES, TEST_FILE, META_FILE):
        if not (base / name).is_file():
            raise DataMissingError(
                f"{base} holds no {name}: a CIFAR-10 python directory holds "
                f"{TRAIN_FILES[0]}…{TRAIN_FILES[-1]}, {TEST_FILE} and {META_FILE}",
                path=str(base / name),
            )
    return base


def _read_images(paths: list[Path], limit: int | None) -> CifarBatch:
    """The batches of ``paths`` in order, stopping once ``limit`` images are read."""
    parts: list[CifarBatch] = []
    count = 0
    for path in paths:
        if limit is not None and count >= limit:
            break
        batch = read_batch(path)
        parts.append(batch)
        count += len(batch.labels)
    data = np.concatenate([p.data for p in parts])[:limit]
    labels = np.concatenate([p.labels for p in parts])[:limit]
    return CifarBatch(data=data, labels=labels)


def _to_tensor(data: np.ndarray) -> torch.Tensor:
    """``uint8 (N, 3072)`` → normalised ``float32 (N, 3, 32, 32)``."""
    x = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).astype(np.float32) / 255.0)
    mean = torch.tensor(CHANNEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CHANNEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class CifarLoaders:
    """Train, validation and test loaders, and the class names.

    :ivar train: shuffled training images (the training batches less the validation share).
    :ivar val: held out from the training batches.
    :ivar test: ``test_batch``.
    :ivar classes: the ten class names from ``batches.meta``.
    :ivar directory: the directory read.
    """

    train: DataLoader[tuple[torch.Tensor, ...]]
    val: DataLoader[tuple[torch.Tensor, ...]]
    test: DataLoader[tuple[torch.Tensor, ...]]
    classes: tuple[str, ...]
    directory: Path


def cifar_loaders(
    root: str | Path | None = None,
    *,
    batch_size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.1,
    limit: int | None = None,
) -> CifarLoaders:
    """Load CIFAR-10 as normalised ``(N, 3, 32, 32)`` float tensors and int64 labels.

    :param root: the ``cifar-10-batches-py`` directory or the folder holding it (default
        :func:`default_cifar_dir`: ``$ESPER_CIFAR_DIR`` or ``~/.cache/esper_async/…``).
    :param batch_size: training batch size (evaluation uses 512).
    :param seed: seeds the train/validation split and the training shuffle order.
    :param val_fraction: the share of the training images held out for validation.
    :param limit: read only the first ``limit`` training images and the first ``limit`` test
        images (quick runs; only the batch files needed are read).
    :raises DataMissingError: if the directory or one of its files is missing.
    :raises DataError: if a file is damaged, crafted or not of CIFAR-10's format, or the options
        leave a split empty.
    """
    base = resolve_cifar_dir(root)
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}", path=str(base))
    if limit is not None and (not isinstance(limit, int) or limit < 2):
        raise DataError(f"limit must be an integer >= 2, got {limit!r}", path=str(base))
    classes = read_label_names(base)
    train = _read_images([base / name for name in TRAIN_FILES], limit)
    test = _read_images([base / TEST_FILE], limit)
    order = np.random.default_rng(seed).permutation(len(train.labels))
    n_val = max(1, round(val_fraction * len(order)))
    if n_val >= len(order):
        raise DataError(
            f"{base}: {len(order)} training images leave none to train on after holding out "
            f"{n_val} for validation; raise limit", path=str(base),
        )
    val_idx, train_idx = order[:n_val], order[n_val:]
    log.info("cifar.loaded", directory=str(base), train=len(train_idx), val=len(val_idx),
             test=len(test.labels))

    def loader(data: np.ndarray, labels: np.ndarray, shuffle: bool, size: int) -> DataLoader:
        ds = TensorDataset(_to_tensor(data), torch.from_numpy(labels))
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=size, shuffle=shuffle, generator=gen)

    return CifarLoaders(
        train=loader(train.data[train_idx], train.labels[train_idx], True, batch_size),
        val=loader(train.data[val_idx], train.labels[val_idx], False, _EVAL_BATCH),
        test=loader(test.data, test.labels, False, _EVAL_BATCH),
        classes=classes,
        directory=base,
    )


class _Stage(nn.Module):
    """A residual stage: conv1 (stride ``stride``) → BN → ReLU → conv2 → BN, plus a shortcut
    (identity, or a strided 1×1 conv where the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarHost(nn.Module):
    """A narrow ResNet-style conv net for CIFAR-shaped images, with conv layers for seed slots.

    ``(N, 3, 32, 32)`` → stem ``(N, w, 32, 32)`` → stage1 ``(N, w, 32, 32)`` → stage2
    ``(N, 2w, 16, 16)`` → stage3 ``(N, 4w, 8, 8)`` → global average pool → head ``(N, 10)``.
    Each stage is two 3×3 convs with batch norm and a residual shortcut; :data:`CIFAR_SLOTS`
    names the convs seed slots go in by default (wrap with :func:`esper_async.wrap` and
    :meth:`example_input`).

    :param width: channels of the stem and the first stage (the later stages double it).
    :param classes: outputs of the head.
    """

    def __init__(self, *, width: int = 8, classes: int = CIFAR_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stage1 = _Stage(width, width, 1)
        self.stage2 = _Stage(width, 2 * width, 2)
        self.stage3 = _Stage(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, classes)

    @staticmethod
    def example_input(batch: int = 2) -> torch.Tensor:
        """Zeros ``(batch, 3, 32, 32)``, for :func:`esper_async.wrap`'s shape probe."""
        return torch.zeros(batch, *IMAGE_SHAPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.head(x.mean(dim=(2, 3)))
