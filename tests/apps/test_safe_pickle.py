"""The CIFAR pickle reader's hard bounds: crafted pickles that nest deep, share one value
exponentially, or reuse one large string for many arrays get ``DataError`` quickly and with
little memory; special files are refused before they are read."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import esper_async
from esper_async.apps import _safe_pickle
from esper_async.apps.cifar import read_batch
from esper_async.errors import DataError

HERE = Path(__file__).resolve().parent
SRC = Path(esper_async.__file__).resolve().parents[1]
_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
_BIG = 16 * 2**20


def _deep_key(depth: int) -> bytes:
    """``{((((None,),),)...): 0}``: a dict key a tuple nested ``depth`` deep (~1 byte a level)."""
    return b"\x80\x02}N" + b"\x85" * depth + b"K\x00s."


def _shared_key(levels: int) -> bytes:
    """``{t: 0}`` with ``t = (t, t)`` repeated ``levels`` times through the memo: a few bytes a
    level, a value of 2**levels leaves."""
    return b"\x80\x02}N" + b"q\x00h\x00\x86" * levels + b"K\x00s."


class _SharedArray:
    """An array whose state's data is one shared bytes object (pickle memoises it)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        state = (1, (len(self.data),), np.dtype(np.uint8), False, self.data)
        return (_RECONSTRUCT, (np.ndarray, (0,), b"b"), state)


def _shared_data(copies: int) -> bytes:
    """A 16 MiB file whose one 16 MiB bytes object is the data of ``copies`` arrays."""
    data = bytes(_BIG)
    raw = pickle.dumps({b"data": [_SharedArray(data) for _ in range(copies)], b"labels": [0]}, 4)
    assert _BIG < len(raw) < _BIG + 64 * copies + 1024  # the bytes are in the file once
    return raw


@pytest.fixture(scope="module")
def crafted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each crafted file read by ``read_batch`` in a child process (a crash or a hang there
    fails the tests below instead of the whole run); what happened, by name."""
    root = tmp_path_factory.mktemp("crafted")
    files = {  # the 16 MiB one first: its peak RSS is measured from the child's start
        "shared-data": _shared_data(256),
        "deep-key": _deep_key(1_000_000),
        "shared-key": _shared_key(40),
    }
    for name, raw in files.items():
        (root / name).write_bytes(raw)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)])}
    done = subprocess.run(
        [sys.executable, str(HERE / "_read_batch_child.py"), *(str(root / n) for n in files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the reader died ({done.returncode}): {done.stderr[-2000:]}"
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {Path(r["path"]).name: r for r in results}


def test_a_key_nested_a_million_deep_is_refused_without_recursion(
    crafted: dict[str, dict[str, Any]],
) -> None:
    result = crafted["deep-key"]
    assert result["error"] == "DataError", result
    assert f"nests values more than {_safe_pickle.MAX_DEPTH} deep" in result["message"]


def test_a_value_shared_exponentially_is_refused_quickly(
    crafted: dict[str, dict[str, Any]],
) -> None:
    assert len(_shared_key(40)) < 400
    result = crafted["shared-key"]
    assert result["error"] == "DataError", result
    assert "materialises more than its budget" in result["message"]
    assert result["seconds"] < 5  # 40 doublings: a runaway reader would take days


def test_one_string_behind_many_arrays_is_refused_within_the_budget(
    crafted: dict[str, dict[str, Any]],
) -> None:
    result = crafted["shared-data"]
    assert result["error"] == "DataError", result
    assert "materialises more than its budget" in result["message"]
    # 256 arrays of 16 MiB would be 4 GiB; the budget (8 bytes per byte of the file) stops it
    # after a handful. The child's peak RSS rises by the file, its bytes and those few arrays.
    assert result["rss_rise_mib"] < 12 * _BIG / 2**20, result


def test_the_budget_admits_a_file_of_its_own_data_read_whole(tmp_path: Path) -> None:
    # One large array, memoised and used once, in every protocol: an honest file stays within.
    data = np.random.default_rng(0).integers(0, 256, (64, 3072), dtype=np.uint8)
    for protocol in range(6):
        raw = pickle.dumps({b"data": data, b"labels": list(range(64))}, protocol)
        loaded = _safe_pickle.loads(raw)
        np.testing.assert_array_equal(loaded[b"data"], data)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(b"\x80\x02N" + b"q\x00h\x00\x86" * 3 + b".", None, id="small-shared-ok"),
        pytest.param(b"\x80\x02]q\x00h\x00a.", "to itself", id="list-in-itself"),
        pytest.param(b"\x80\x02]q\x00)\x85h\x00N\x85a0h\x00.", None, id="append-before-use-ok"),
        pytest.param(b"\x80\x02]q\x00h\x00\x850Na.", "after using it", id="append-after-use"),
        pytest.param(b"\x80\x02}K\x01K\x02s.", "dict key of type int", id="int-key"),
        pytest.param(
            b"\x80\x02r" + struct.pack("<I", 2**31) + b".", "memoises at index", id="memo-index"
        ),
        pytest.param(b"\x80\x02\x8b" + struct.pack("<i", 2**30) + b".", "integer of", id="long4"),
        pytest.param(b"\x80\x04\x8f.", "EMPTY_SET", id="set"),
        pytest.param(b"\x80\x02N\x81.", "NEWOBJ", id="newobj"),
    ],
)
def test_structures_outside_plain_data_are_refused(raw: bytes, match: str | None) -> None:
    if match is None:
        _safe_pickle.loads(raw)
        return
    with pytest.raises(_safe_pickle.PickleRefused, match=match):
        _safe_pickle.loads(raw)


def test_a_device_or_a_fifo_is_refused_before_it_is_read(tmp_path: Path) -> None:
    link = tmp_path / "data_batch_1"
    link.symlink_to("/dev/zero")
    with pytest.raises(DataError, match="a device, not a regular file"):
        read_batch(link)
    with pytest.raises(DataError, match="a device, not a regular file"):
        read_batch("/dev/zero")
    fifo = tmp_path / "test_batch"
    os.mkfifo(fifo)  # no writer: reading it would block forever
    with pytest.raises(DataError, match="a FIFO, not a regular file"):
        read_batch(fifo)
