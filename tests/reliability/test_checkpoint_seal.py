"""Checkpoint files that are not regular files are skipped unread; with a seal key, a file whose
seal is missing, foreign or stale after tampering is refused as a forgery (never skipped), while
damage is still skipped for an older checkpoint."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch

from esper_async._seal import SEAL_KEY_ENV
from esper_async.reliability import (
    CheckpointForgeryError,
    CheckpointIntegrityError,
    CheckpointStore,
)
from esper_async.reliability._checkpoint_file import MAGIC, MAGIC_KEYED

KEY, OTHER = b"k" * 32, b"o" * 32
_TRAILER = struct.Struct(">8sQ32s")


def _payload(epoch: int, value: float = 1.0) -> dict[str, Any]:
    return {"epoch": epoch, "weight": torch.full((4, 4), value)}


def _restored(store: CheckpointStore) -> tuple[str, dict[str, Any]]:
    path, payload = store.restore(lambda _path, payload: payload)
    return path.name, payload


@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_a_checkpoint_that_is_not_a_file_is_skipped_unread(tmp_path: Path, kind: str) -> None:
    store = CheckpointStore(tmp_path)
    store.save(_payload(1))
    newer = tmp_path / "ckpt-00000002.pt"
    if kind == "fifo":
        os.mkfifo(newer)  # no writer: a plain read blocks forever
    else:
        newer.symlink_to("/dev/zero")  # a read without a bound allocates until memory runs out
    tracemalloc.start()
    try:
        name, payload = _restored(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert name == "ckpt-00000001.pt" and payload["epoch"] == 1
    assert peak < 16 * 2**20
    with pytest.raises(CheckpointIntegrityError, match="not a regular file"):
        store.read(newer)


def test_a_link_planted_at_the_temporary_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "ckpt-00000001.pt.tmp").symlink_to(victim)
    path = CheckpointStore(tmp_path).save(_payload(1))
    assert victim.read_bytes() == b"precious"
    assert not path.is_symlink() and CheckpointStore(tmp_path).read(path)["epoch"] == 1


def test_a_keyed_store_reads_its_own_checkpoints(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, seal_key=KEY).save(_payload(1))
    raw = (tmp_path / "ckpt-00000001.pt").read_bytes()
    assert raw[-_TRAILER.size :][:8] == MAGIC_KEYED
    assert _restored(CheckpointStore(tmp_path, seal_key=KEY))[0] == "ckpt-00000001.pt"
    # Without a key the digest is still checked and the seal is not: behaviour as before.
    assert _restored(CheckpointStore(tmp_path))[1]["epoch"] == 1


def test_the_key_comes_from_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv(SEAL_KEY_ENV, KEY.decode())
    CheckpointStore(tmp_path).save(_payload(1))
    assert _restored(CheckpointStore(tmp_path, seal_key=KEY))[1]["epoch"] == 1
    monkeypatch.setenv(SEAL_KEY_ENV, OTHER.decode())
    with pytest.raises(CheckpointForgeryError, match="sealed with another key"):
        CheckpointStore(tmp_path).restore(lambda _path, payload: payload)


def _forge(path: Path, value: float, *, keep_old_seal: bool) -> None:
    """Replace the weights in ``path`` and write a digest that matches, as anyone can."""
    raw = path.read_bytes()
    buffer = io.BytesIO()
    torch.save(_payload(2, value), buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    if keep_old_seal:  # the genuine file's seal, copied onto new content
        old_seal = raw[-_TRAILER.size - 32 : -_TRAILER.size]
        path.write_bytes(payload + old_seal + _TRAILER.pack(MAGIC_KEYED, len(payload), digest))
    else:  # an unkeyed file, as a run without the key writes
        path.write_bytes(payload + _TRAILER.pack(MAGIC, len(payload), digest))


@pytest.mark.parametrize(
    ("forgery", "match"),
    [
        pytest.param("foreign", "sealed with another key", id="another-runs-genuine-file"),
        pytest.param("unsealed", "carries no seal", id="tampered-and-digested"),
        pytest.param("old-seal", "sealed with another key", id="tampered-keeping-the-seal"),
    ],
)
def test_a_forged_checkpoint_is_refused_not_skipped(
    tmp_path: Path, forgery: str, match: str
) -> None:
    store = CheckpointStore(tmp_path, seal_key=KEY)
    store.save(_payload(1))
    newer = tmp_path / "ckpt-00000002.pt"
    if forgery == "foreign":
        CheckpointStore(tmp_path, seal_key=OTHER).save(_payload(2, 9.0))
    else:
        store.save(_payload(2))
        _forge(newer, 9.0, keep_old_seal=forgery == "old-seal")
    with pytest.raises(CheckpointForgeryError, match=match) as info:
        store.restore(lambda _path, payload: payload)  # an older good one is there: not used
    assert info.value.path == str(newer)
    # Without the key the forged file restores: what the seal protects against.
    assert float(_restored(CheckpointStore(tmp_path))[1]["weight"][0, 0]) == 9.0


def test_damage_to_a_keyed_checkpoint_is_still_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, seal_key=KEY)
    store.save(_payload(1))
    newer = store.save(_payload(2))
    raw = bytearray(newer.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    newer.write_bytes(bytes(raw))
    assert _restored(store)[0] == "ckpt-00000001.pt"
