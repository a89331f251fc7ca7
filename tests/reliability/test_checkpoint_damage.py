"""Damaged checkpoints are detected before they are read, and a resume falls back to the newest
good one: a byte flipped in a parameter, in the optimizer's state, in the RNG state, in a kernel's
bytes or in the pickled structure, a truncated file, junk appended, an old unsealed file; and
payloads whose seal is sound but whose content does not restore."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import structlog
import structlog.testing
import torch
from _helpers import grow, host

from esper_async.reliability import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointMismatchError,
    CheckpointStore,
)
from esper_async.reliability._checkpoint_file import unseal
from esper_async.seeds import wrap
from esper_async.trainer import Trainer

TRAILER = 48
OLDER, NEWER = "ckpt-00000001.pt", "ckpt-00000002.pt"


def _loaders() -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], [(x, y)]


def _fresh() -> Trainer:
    """A trainer as a new process builds it to resume: the host wrapped, no seeds."""
    model = host()
    return Trainer(model, grow=False, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two checkpoints (epochs 1 and 2) of a run with a seed grafted in slot ``"0"``."""
    directory = tmp_path_factory.mktemp("pristine")
    trainer = _fresh()
    kernel = grow(trainer.model, trainer.optimizer, "0", rank=2)
    trainer.kernels[kernel.kernel_id] = kernel

    async def run() -> None:
        train, val = _loaders()
        await trainer.fit(train, val, epochs=2, checkpoint_dir=directory)

    anyio.run(run)
    assert sorted(p.name for p in directory.iterdir()) == [OLDER, NEWER]
    return directory


@pytest.fixture
def ckpts(pristine: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(pristine, directory)
    return directory


def _payload(path: Path) -> dict:
    return CheckpointStore(path.parent).read(path)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _inside(data: bytes, tensor: torch.Tensor) -> int:
    """The offset of the middle of ``tensor``'s storage in a checkpoint file (it must occur
    exactly once)."""
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) == -1, "the tensor's bytes are not unique"
    return at + len(raw) // 2


def _pickle_offset(data: bytes) -> int:
    """The middle of the pickled structure (the zip member ``*/data.pkl``)."""
    payload = unseal(data, path="")
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
        pickled = archive.read(info)
    # The member's bytes start after its local header (30 bytes, its name, its extra field).
    name_len, extra_len = struct.unpack("<HH", payload[info.header_offset + 26 :][:4])
    start = info.header_offset + 30 + name_len + extra_len
    assert payload[start : start + info.file_size] == pickled
    return start + info.file_size // 2


def _parameter(path: Path) -> int:
    payload = _payload(path)
    return _inside(path.read_bytes(), payload["model"]["2.host.weight"])


def _optimizer_state(path: Path) -> int:
    payload = _payload(path)
    return _inside(path.read_bytes(), payload["optimizer"]["state"][0]["exp_avg_sq"])


def _rng_state(path: Path) -> int:
    payload = _payload(path)
    return _inside(path.read_bytes(), payload["rng"]["torch"])


def _kernel_bytes(path: Path) -> int:
    payload = _payload(path)
    (entry,) = payload["kernels"].values()
    return _inside(path.read_bytes(), entry["artifact"])


def _pickled_structure(path: Path) -> int:
    return _pickle_offset(path.read_bytes())


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_last_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _append_junk(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\x00junk")


def _unsealed(path: Path) -> None:
    """A checkpoint as esper_async wrote them before they carried a digest: a bare zip."""
    path.write_bytes(unseal(path.read_bytes(), path=str(path)))


DAMAGED = "is damaged: its content does not hash"
FLIPS = [
    pytest.param(_parameter, DAMAGED, id="parameter"),
    pytest.param(_optimizer_state, DAMAGED, id="optimizer-state"),
    pytest.param(_rng_state, DAMAGED, id="rng-state"),
    pytest.param(_kernel_bytes, DAMAGED, id="kernel-bytes"),
    pytest.param(_pickled_structure, DAMAGED, id="pickled-structure"),
    pytest.param(lambda p: p.stat().st_size - 1, DAMAGED, id="digest"),
    pytest.param(lambda p: p.stat().st_size - TRAILER + 8, "trailer records", id="length"),
    pytest.param(lambda p: p.stat().st_size - TRAILER, "truncated or has bytes appended",
                 id="trailer-magic"),
]
RESHAPES = [
    pytest.param(_truncate, "truncated or has bytes appended", id="truncated"),
    pytest.param(_drop_last_byte, "truncated or has bytes appended", id="last-byte-dropped"),
    pytest.param(_append_junk, "truncated or has bytes appended", id="junk-appended"),
    pytest.param(_unsealed, "has no digest", id="old-unsealed-format"),
]


def _resume_falls_back(ckpts: Path) -> list[dict]:
    """Resume from ``ckpts`` (its newest file damaged); check it lands on the older checkpoint
    exactly and continues as a resume from that checkpoint alone does."""
    expected = _payload(ckpts / OLDER)
    trainer = _fresh()
    with structlog.testing.capture_logs() as logs:
        restored = trainer.restore(ckpts)
    assert (restored.epoch, trainer.step) == (1, expected["step"])
    state = trainer.model.state_dict()
    assert state.keys() == expected["model"].keys()
    assert all(torch.equal(state[k], expected["model"][k]) for k in state)

    # Training resumes from there exactly as from a directory holding only the older file.
    alone = ckpts.parent / "alone"
    alone.mkdir()
    shutil.copy(ckpts / OLDER, alone / OLDER)
    reference = _fresh()
    train, val = _loaders()

    async def both() -> None:
        await trainer.fit(train, val, epochs=3, checkpoint_dir=ckpts, resume=True)
        await reference.fit(train, val, epochs=3, checkpoint_dir=alone, resume=True)

    with structlog.testing.capture_logs():
        anyio.run(both)
    a, b = trainer.model.state_dict(), reference.model.state_dict()
    assert trainer.step == reference.step == expected["step"] + 2 * 4
    assert all(torch.equal(a[k], b[k]) for k in b)
    return logs


def _warned_about(logs: list[dict], path: Path, text: str) -> None:
    hits = [e for e in logs if e["log_level"] == "warning" and e.get("path") == str(path)]
    assert hits, logs
    assert text in hits[0]["error"]


@pytest.mark.parametrize(("where", "message"), FLIPS)
def test_a_flipped_byte_is_detected_and_resume_falls_back(
    ckpts: Path, where: Callable[[Path], int], message: str
) -> None:
    newer = ckpts / NEWER
    _flip(newer, where(newer))
    with pytest.raises(CheckpointIntegrityError, match=message) as caught:
        _payload(newer)
    assert caught.value.path == str(newer)
    _warned_about(_resume_falls_back(ckpts), newer, message)


@pytest.mark.parametrize(("damage", "message"), RESHAPES)
def test_a_cut_or_extended_file_is_detected_and_resume_falls_back(
    ckpts: Path, damage: Callable[[Path], None], message: str
) -> None:
    newer = ckpts / NEWER
    damage(newer)
    with pytest.raises(CheckpointIntegrityError, match=message):
        _payload(newer)
    _warned_about(_resume_falls_back(ckpts), newer, message)


def test_a_flip_anywhere_is_detected(pristine: Path, tmp_path: Path) -> None:
    """Every 7th byte of the file, and each byte of the trailer, in memory; every 97th through
    the file reader: none goes unnoticed."""
    data = (pristine / NEWER).read_bytes()
    positions = sorted({*range(0, len(data), 7), *range(len(data) - TRAILER, len(data))})
    assert len(positions) > 5000
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0x01
        with pytest.raises(CheckpointIntegrityError):
            unseal(bytes(damaged), path="x")
    assert unseal(data, path="x") == data[:-TRAILER]
    store, path = CheckpointStore(tmp_path), tmp_path / NEWER
    for position in range(0, len(data), 97):
        damaged = bytearray(data)
        damaged[position] ^= 0x80
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointIntegrityError):
            store.read(path)
    path.write_bytes(data)
    assert store.read(path)["epoch"] == 2


def _resealed(ckpts: Path, change: Callable[[dict], None]) -> Path:
    """Rewrite the newest checkpoint with ``change`` made to its payload and a sound seal: what a
    faulty writer would leave, which only the restore itself can catch."""
    newer = ckpts / NEWER
    payload = _payload(newer)
    change(payload)
    assert CheckpointStore(ckpts).save(payload) == newer
    return newer


def _bad_kernel(payload: dict) -> None:
    (entry,) = payload["kernels"].values()
    entry["artifact"][100] ^= 1


def _wrong_shape(payload: dict) -> None:
    payload["model"]["2.host.weight"] = torch.zeros(3, 3)


def _bad_record(payload: dict) -> None:
    payload["record"] = '{"history": '


def _float_epoch(payload: dict) -> None:
    payload["epoch"] = 2.0


def _no_rng(payload: dict) -> None:
    payload["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)


@pytest.mark.parametrize(
    ("change", "kind", "message"),
    [
        pytest.param(_bad_kernel, CheckpointIntegrityError, "kernel of slot '0' does not load",
                     id="kernel-integrity"),
        pytest.param(_wrong_shape, CheckpointMismatchError, "parameters do not fit",
                     id="shape-mismatch"),
        pytest.param(_bad_record, CheckpointIntegrityError, "structure does not decode",
                     id="malformed-json"),
        pytest.param(_float_epoch, CheckpointIntegrityError, "field 'epoch' is a float",
                     id="wrong-type"),
        pytest.param(_no_rng, CheckpointIntegrityError, "structure does not decode",
                     id="bad-rng-state"),
    ],
)
def test_a_sealed_checkpoint_that_does_not_restore_falls_back(
    ckpts: Path, change: Callable[[dict], None], kind: type[Exception], message: str
) -> None:
    newer = _resealed(ckpts, change)
    with pytest.raises(kind, match=message):
        _fresh().restore(newer)  # the file alone: no fallback, a typed error
    _warned_about(_resume_falls_back(ckpts), newer, message)


def test_when_no_checkpoint_is_good_the_error_lists_each(ckpts: Path) -> None:
    _flip(ckpts / NEWER, _parameter(ckpts / NEWER))
    _truncate(ckpts / OLDER)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores") as caught:
        _fresh().restore(ckpts)
    assert not isinstance(caught.value, CheckpointMismatchError)
    assert list(caught.value.tried) == [str(ckpts / NEWER), str(ckpts / OLDER)]
    assert "damaged" in caught.value.tried[str(ckpts / NEWER)]
    assert "truncated" in caught.value.tried[str(ckpts / OLDER)]
    assert len(str(caught.value)) < 600


def test_a_model_of_another_architecture_is_the_users_error(ckpts: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 3),
    )
    wrap(model, ["0", "2"], example_input=torch.zeros(2, 4))
    trainer = Trainer(model, grow=False)
    with pytest.raises(CheckpointMismatchError, match="the model does not fit any checkpoint"):
        trainer.restore(ckpts)


@pytest.mark.parametrize(
    "exists", [pytest.param(True, id="empty"), pytest.param(False, id="absent")]
)
def test_resuming_without_checkpoints_is_an_error(tmp_path: Path, exists: bool) -> None:
    directory = tmp_path / "ckpt"
    if exists:
        directory.mkdir()
    trainer = _fresh()
    train, val = _loaders()

    async def run() -> None:
        await trainer.fit(train, val, epochs=2, checkpoint_dir=directory, resume=True)

    with pytest.raises(CheckpointError, match=r"looked for ckpt-<8-digit epoch>\.pt files in"):
        anyio.run(run)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        trainer.restore(directory)
    assert trainer.step == 0
