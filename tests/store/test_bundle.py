from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from esper_async.errors import StoreError, StoreIntegrityError
from esper_async.kernels import Kernel
from esper_async.store import BundleEntry
from esper_async.store._bundle import read_bundle, write_bundle


def _entries(kernels: list[Kernel]) -> list[BundleEntry]:
    return [
        BundleEntry(f"key-{i}", k.metadata.to_json(), k.artifact, ("t",), ({"passed": True},))
        for i, k in enumerate(kernels)
    ]


def test_round_trip(tmp_path: Path, kernels: list[Kernel]) -> None:
    entries = [
        *_entries(kernels[:2]),
        BundleEntry("alias", kernels[0].metadata.to_json(), kernels[0].artifact),
    ]
    write_bundle(tmp_path / "b.tar", entries)
    assert read_bundle(tmp_path / "b.tar") == entries
    assert [p.name for p in tmp_path.iterdir()] == ["b.tar"]  # no temporary left


def test_a_tampered_artifact_fails_the_whole_bundle(tmp_path: Path, kernels: list[Kernel]) -> None:
    entries = _entries(kernels[:2])
    path = tmp_path / "b.tar"
    write_bundle(path, entries)
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    name = f"blobs/{kernels[1].kernel_id}"
    members[name] = members[name][:-1] + bytes([members[name][-1] ^ 0xFF])
    with tarfile.open(path, "w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(StoreIntegrityError, match="nothing was imported"):
        read_bundle(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a tar file at all", id="not-tar"),
        pytest.param(json.dumps({"format": "other", "version": 1}).encode(), id="wrong-format"),
    ],
)
def test_files_that_are_not_bundles_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "b.tar"
    if content.startswith(b"{"):
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    else:
        path.write_bytes(content)
    with pytest.raises(StoreError):
        read_bundle(path)
