"""The CIFAR-10 loader reads files in the official python format (written here, tiny), refuses
crafted, truncated and malformed ones with typed errors without running anything in them, and
the conv host grows through the real Trainer on them."""

from __future__ import annotations

import builtins
import io
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from esper_async import Trainer
from esper_async.apps import _safe_pickle
from esper_async.apps.cifar import (
    CHANNEL_MEAN,
    CHANNEL_STD,
    CIFAR_DIR_NAME,
    CIFAR_ENV_VAR,
    CIFAR_SLOTS,
    MAX_FILE_BYTES,
    CifarHost,
    cifar_loaders,
    read_batch,
    read_label_names,
)
from esper_async.blueprints import SlotContract, SlotKind
from esper_async.compiler import BlueprintCompiler
from esper_async.control import ControllerConfig, HeuristicController
from esper_async.errors import DataError, DataMissingError
from esper_async.seeds import SeedState, wrap

NAMES = ["airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"]
_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
# The names a numpy 1 / Python 2 pickle spells the array rebuilders with, as the official files do.
_PY2_GLOBALS = {
    id(_RECONSTRUCT): b"numpy.core.multiarray\n_reconstruct\n",
    id(np.ndarray): b"numpy\nndarray\n",
    id(np.dtype): b"numpy\ndtype\n",
}


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes what Python 2's ``cPickle.dump(d, f, 2)`` wrote for the official files: strings as
    byte strings (``SHORT_BINSTRING``/``BINSTRING``), numpy rebuilders under ``numpy.core``."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        self.write(pickle.GLOBAL + _PY2_GLOBALS[id(obj)])


def _dumps(obj: Any, protocol: str | int) -> bytes:
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()
    assert isinstance(protocol, int)
    return pickle.dumps(obj, protocol=protocol)


def _batch(n: int, rng: np.random.Generator, label: str) -> dict[bytes, Any]:
    return {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{label[-6:]}_{i}.png".encode() for i in range(n)],
    }


def write_cifar(
    root: Path, *, per_batch: int = 6, test: int = 8, protocol: str | int = "py2", seed: int = 0
) -> dict[str, dict[bytes, Any]]:
    """A ``cifar-10-batches-py`` directory under ``root`` in the official format; its batches."""
    rng = np.random.default_rng(seed)
    base = root / CIFAR_DIR_NAME
    base.mkdir(parents=True)
    batches = {f"data_batch_{i}": _batch(per_batch, rng, f"training batch {i} of 5")
               for i in range(1, 6)}
    batches["test_batch"] = _batch(test, rng, "testing batch 1 of 1")
    for name, batch in batches.items():
        (base / name).write_bytes(_dumps(batch, protocol))
    meta = {b"num_cases_per_batch": per_batch, b"label_names": [n.encode() for n in NAMES],
            b"num_vis": 3072}
    (base / "batches.meta").write_bytes(_dumps(meta, protocol))
    return batches


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the loader's normalisation: ``(N, 3, 32, 32)`` floats → ``uint8 (N, 3072)``."""
    mean = torch.tensor(CHANNEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CHANNEL_STD).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8).reshape(len(x), -1).numpy()


def _all(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# --- reading the official format -------------------------------------------------------------


@pytest.mark.parametrize("protocol", [pytest.param("py2", id="python2-format"),
                                      *(pytest.param(p, id=f"protocol-{p}") for p in range(6))])
def test_images_and_labels_round_trip(tmp_path: Path, protocol: str | int) -> None:
    batches = write_cifar(tmp_path, protocol=protocol)
    data = cifar_loaders(tmp_path / CIFAR_DIR_NAME, batch_size=4, val_fraction=0.2)
    assert data.classes == tuple(NAMES)
    x_test, y_test = _all(data.test)
    assert x_test.shape == (8, 3, 32, 32) and x_test.dtype == torch.float32
    assert y_test.dtype == torch.int64
    np.testing.assert_array_equal(_pixels(x_test), batches["test_batch"][b"data"])
    assert y_test.tolist() == batches["test_batch"][b"labels"]
    # Train and validation split the 30 training images between them, each exactly once.
    written = {
        (row.tobytes(), label)
        for i in range(1, 6)
        for row, label in zip(batches[f"data_batch_{i}"][b"data"],
                              batches[f"data_batch_{i}"][b"labels"], strict=True)
    }
    x_tr, y_tr = _all(data.train)
    x_val, y_val = _all(data.val)
    assert (len(y_tr), len(y_val)) == (24, 6)
    read = [(row.tobytes(), int(label))
            for x, y in ((x_tr, y_tr), (x_val, y_val))
            for row, label in zip(_pixels(x), y, strict=True)]
    assert len(set(read)) == 30 and set(read) == written


def test_normalisation_centres_each_channel_by_the_training_statistics(tmp_path: Path) -> None:
    base = tmp_path / CIFAR_DIR_NAME
    write_cifar(tmp_path)
    # An image whose every pixel sits at the channel means loads as zeros.
    means = np.repeat(np.round(np.array(CHANNEL_MEAN) * 255).astype(np.uint8), 1024)
    batch = {b"data": means[None, :], b"labels": [3]}
    (base / "test_batch").write_bytes(_dumps(batch, "py2"))
    x, y = _all(cifar_loaders(base).test)
    assert y.tolist() == [3]
    assert x.abs().max() < 0.5 / 255 / min(CHANNEL_STD)


def test_the_folder_holding_the_directory_and_the_environment_variable_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_cifar(tmp_path)
    assert cifar_loaders(tmp_path).directory == tmp_path / CIFAR_DIR_NAME
    monkeypatch.setenv(CIFAR_ENV_VAR, str(tmp_path / CIFAR_DIR_NAME))
    assert cifar_loaders().directory == tmp_path / CIFAR_DIR_NAME


def test_limit_reads_only_the_batch_files_it_needs(tmp_path: Path) -> None:
    batches = write_cifar(tmp_path)
    base = tmp_path / CIFAR_DIR_NAME
    for name in ("data_batch_3", "data_batch_4", "data_batch_5"):
        (base / name).write_bytes(b"not read")
    data = cifar_loaders(base, limit=10, val_fraction=0.2)
    _, y_tr = _all(data.train)
    _, y_val = _all(data.val)
    _, y_test = _all(data.test)
    assert (len(y_tr), len(y_val), len(y_test)) == (8, 2, 8)
    first_ten = batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"][:4]
    assert sorted(y_tr.tolist() + y_val.tolist()) == sorted(first_ten)
    with pytest.raises(DataError, match="data_batch_3"):
        cifar_loaders(base, limit=13)


def test_the_split_and_order_follow_the_seed(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    base = tmp_path / CIFAR_DIR_NAME
    a, b = cifar_loaders(base, seed=1), cifar_loaders(base, seed=1)
    c = cifar_loaders(base, seed=2)
    assert torch.equal(_all(a.val)[0], _all(b.val)[0])
    assert torch.equal(_all(a.train)[0], _all(b.train)[0])
    assert not torch.equal(_all(a.val)[0], _all(c.val)[0])


# --- files that are crafted, damaged or not CIFAR's ------------------------------------------


class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Exec(_Eval):
    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _as_labels(evil: Any) -> Any:
    """A valid-looking batch whose labels hold the payload."""
    return {b"data": np.zeros((1, 3072), np.uint8), b"labels": [evil]}


def _in_object_array(evil: Any) -> Any:
    """The payload inside a numpy object array (rebuilt through the allowed ``_reconstruct``)."""
    arr = np.empty(1, dtype=object)
    arr[0] = evil
    return {b"data": arr, b"labels": [0]}


@pytest.mark.parametrize("payload", [_System, _Eval, _Exec], ids=["os.system", "eval", "exec"])
@pytest.mark.parametrize(("place", "named"), [
    pytest.param(lambda evil: evil, "system|eval|exec", id="whole-file"),
    pytest.param(_as_labels, "system|eval|exec", id="in-labels"),
    # An object array is refused at its dtype, before the payload in it is reached.
    pytest.param(_in_object_array, "numpy.dtype of 'O8'", id="in-object-array"),
])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_crafted_pickle_is_refused_and_never_runs(
    tmp_path: Path, payload: type, place: Any, named: str, protocol: int
) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / CIFAR_DIR_NAME / "data_batch_1"
    path.write_bytes(pickle.dumps(place(payload(marker)), protocol=protocol))
    with pytest.raises(DataError, match=f"refused unread: its pickle imports .*({named})") as info:
        cifar_loaders(tmp_path)
    assert info.value.path == str(path)
    assert not marker.exists()


class _ShortObjectArray:
    """numpy's own pickle of an object array of 10**6 elements, holding a list of two: numpy
    2.4's ``ndarray.__setstate__`` reads past the list (the process crashes)."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = (1, (10**6,), np.dtype(object), False, [1, 2])
        return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), state)


def test_an_object_array_state_never_reaches_numpy(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _ShortObjectArray(), b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"numpy\.dtype of 'O8'"):
        read_batch(path)


@pytest.mark.parametrize("state", [
    pytest.param((1, (2, 3072), "u1", False, b"\x00" * 6144), id="dtype-not-a-dtype"),
    pytest.param((1, (2, -3072), np.dtype("u1"), False, b"\x00" * 6144), id="negative-shape"),
    pytest.param((1, (2, 3072), np.dtype("u1"), False, [0] * 6144), id="data-a-list"),
    pytest.param((1, (2, 3072), np.dtype([("a", "u1")]), False, b"\x00" * 6144),
                 id="structured-dtype"),
])
def test_array_states_other_than_numeric_bytes_are_refused(tmp_path: Path, state: Any) -> None:
    class _Crafted:
        def __reduce__(self) -> tuple[Any, ...]:
            return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), state)

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Crafted(), b"labels": [0, 0]}, protocol=4))
    with pytest.raises(DataError, match="refused unread"):
        read_batch(path)


def test_array_data_shorter_than_its_shape_is_corrupt(tmp_path: Path) -> None:
    class _Short:
        def __reduce__(self) -> tuple[Any, ...]:
            state = (1, (10**6, 3072), np.dtype("u1"), False, b"\x00" * 3072)
            return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), state)

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Short(), b"labels": [0]}, protocol=4))
    with pytest.raises(DataError, match=r"truncated or corrupt .*needs 3072000000 bytes"):
        read_batch(path)


class _HugeArray:
    """``ndarray((10**10,), uint8)``: 10 GB from a file of a hundred bytes."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (np.ndarray, ((10**10,), np.dtype(np.uint8)))


class _HugeReconstruct:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_RECONSTRUCT, (np.ndarray, (10**10,), b"b"))


@pytest.mark.parametrize(("payload", "named"), [
    pytest.param(_HugeArray, r"numpy\.ndarray called directly", id="ndarray(shape)"),
    pytest.param(_HugeReconstruct, r"numpy\._reconstruct of anything but an empty ndarray",
                 id="_reconstruct(shape)"),
])
def test_numpy_names_cannot_allocate_beyond_the_file(
    tmp_path: Path, payload: type, named: str
) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": payload(), b"labels": [0]}, protocol=2))
    assert len(path.read_bytes()) < 200
    with pytest.raises(DataError, match="refused unread: its pickle imports " + named):
        read_batch(path)


def test_bytes_calls_other_than_python3s_own_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    # _codecs.encode("...", "rot13"), the way Python 3 spells bytes in protocol 2, re-encoded.
    raw = pickle.dumps({b"data": b"x"}, protocol=2)
    assert raw.count(b"latin1") == 1  # memoised: both strings share it
    path.write_bytes(raw.replace(b"latin1", b"rot_13"))
    with pytest.raises(DataError, match=r"imports _codecs.encode with str, 'rot_13'"):
        read_batch(path)


def test_a_crafted_class_name_file_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    meta = tmp_path / CIFAR_DIR_NAME / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": [_System(marker)] * 10}))
    with pytest.raises(DataError, match=r"posix\.system"):
        read_label_names(tmp_path / CIFAR_DIR_NAME)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 1, 40, 0.5, -1], ids=["empty", "1-byte", "header",
                                                           "half", "all-but-last"])
def test_a_truncated_file_is_a_typed_error(tmp_path: Path, keep: float) -> None:
    write_cifar(tmp_path)
    path = tmp_path / CIFAR_DIR_NAME / "test_batch"
    raw = path.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:cut])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        read_batch(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_bytes_after_the_pickle_are_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / CIFAR_DIR_NAME / "test_batch"
    path.write_bytes(path.read_bytes() + b"\x00junk")
    with pytest.raises(DataError, match="5 bytes after the pickle's end"):
        read_batch(path)


def test_a_file_larger_than_any_batch_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    with path.open("wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(DataError, match="more than a CIFAR-10 batch file"):
        read_batch(path)


@pytest.mark.parametrize(("batch", "message"), [
    pytest.param([1, 2, 3], "holds a list", id="not-a-dict"),
    pytest.param({b"labels": [0]}, "no 'data' entry", id="no-data"),
    pytest.param({b"data": np.zeros((1, 3072), np.uint8)}, "no 'labels' entry", id="no-labels"),
    pytest.param({b"data": np.zeros((1, 3072), np.float32), b"labels": [0]}, "float32",
                 id="float-data"),
    pytest.param({b"data": np.zeros((1, 1024), np.uint8), b"labels": [0]}, r"\(1, 1024\)",
                 id="wrong-width"),
    pytest.param({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, "N > 0",
                 id="no-images"),
    pytest.param({b"data": b"\x00" * 3072, b"labels": [0]}, "is a bytes", id="data-bytes"),
    pytest.param({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2",
                 id="label-count"),
    pytest.param({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
                 r"label 10 of image 1 is outside \[0, 10\)", id="label-10"),
    pytest.param({b"data": np.zeros((1, 3072), np.uint8), b"labels": [-1]}, "label -1",
                 id="label-negative"),
    pytest.param({b"data": np.zeros((1, 3072), np.uint8), b"labels": [True]},
                 "not a list of integers", id="label-bool"),
    pytest.param({b"data": np.zeros((1, 3072), np.uint8), b"labels": [b"cat"]},
                 "not a list of integers", id="label-bytes"),
])
def test_a_batch_not_of_cifar_shape_is_a_typed_error(
    tmp_path: Path, batch: Any, message: str
) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(_dumps(batch, 4))
    with pytest.raises(DataError, match=message):
        read_batch(path)


def test_class_names_must_be_ten(tmp_path: Path) -> None:
    (tmp_path / "batches.meta").write_bytes(_dumps({b"label_names": [b"cat"] * 9}, "py2"))
    with pytest.raises(DataError, match="not a list of 10 names"):
        read_label_names(tmp_path)


def test_a_missing_directory_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataMissingError, match="no CIFAR-10 directory at") as info:
        cifar_loaders(missing)
    assert str(missing) in str(info.value) and info.value.path == str(missing)
    assert isinstance(info.value, FileNotFoundError)


def test_a_missing_file_is_a_typed_error_naming_it(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    gone = tmp_path / CIFAR_DIR_NAME / "data_batch_4"
    gone.unlink()
    with pytest.raises(DataMissingError, match="holds no data_batch_4") as info:
        cifar_loaders(tmp_path)
    assert info.value.path == str(gone)
    with pytest.raises(DataMissingError, match="data_batch_4 is missing"):
        read_batch(gone)


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"val_fraction": 1.0}, "val_fraction", id="val-fraction"),
    pytest.param({"limit": 1}, "limit must be", id="limit"),
])
def test_options_that_leave_a_split_empty_are_refused(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    write_cifar(tmp_path)
    with pytest.raises(DataError, match=message):
        cifar_loaders(tmp_path, **options)


# --- the conv host ---------------------------------------------------------------------------


def test_the_host_maps_images_to_logits_and_its_slots_are_conv_slots() -> None:
    torch.manual_seed(0)
    host = CifarHost(width=4)
    assert host(CifarHost.example_input(3)).shape == (3, 10)
    slots = wrap(host, CIFAR_SLOTS, example_input=CifarHost.example_input())
    assert {name: s.contract for name, s in slots.items()} == {
        "stage1.conv2": SlotContract(SlotKind.CONV, (4, 32, 32)),
        "stage2.conv2": SlotContract(SlotKind.CONV, (8, 16, 16)),
        "stage3.conv2": SlotContract(SlotKind.CONV, (16, 8, 8)),
    }


@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_the_conv_host_grows_on_cifar_files_through_the_trainer(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=16, test=16)
    data = cifar_loaders(tmp_path, batch_size=16, val_fraction=0.2, limit=80)
    torch.manual_seed(0)
    host = CifarHost(width=4)
    wrap(host, ["stage3.conv2"], example_input=CifarHost.example_input())
    trainer = Trainer(
        host, grow=True, seed=0, controller=HeuristicController(ControllerConfig.eager()),
        compiler=BlueprintCompiler(workers=1),
    )
    fit = await trainer.fit(data.train, data.val, epochs=3)
    assert fit.steps == 3 * 4  # 64 training images, batches of 16
    assert fit.count(SeedState.GERMINATED) >= 1, fit.incidents
    assert all(math.isfinite(r.val_loss) for r in fit.history)
    assert host(_all(data.test)[0]).shape == (16, 10)


@pytest.mark.parametrize("name", [b"numpy.core.numeric\n_frombuffer", b"numpy\nndarray",
                                  b"numpy\ndtype", b"builtins\nbytes"])
def test_a_pickle_cannot_set_the_state_of_a_shared_stand_in(name: bytes) -> None:
    # BUILD with a (None, {...}) slot state would setattr on the stand-in every load shares,
    # changing how later files load (here: a function's __defaults__).
    key = b"__defaults__"
    raw = (b"c" + name + b"\nN}X" + len(key).to_bytes(4, "little") + key
           + b"K\x01K\x02\x86s\x86b.")
    with pytest.raises(_safe_pickle.PickleRefused, match="setting the state of"):
        _safe_pickle.loads(raw)
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    for protocol in (2, 5):  # the stand-ins still work as before
        np.testing.assert_array_equal(_safe_pickle.loads(pickle.dumps(array, protocol)), array)
