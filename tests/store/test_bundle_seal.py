"""Kernel bundles: with a seal key, a bundle whose manifest seal is missing, foreign or stale is
refused as a forgery; bundles are never written through a planted link, and a FIFO or a device
is refused before it is read."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from esper_async._seal import SEAL_KEY_ENV
from esper_async.errors import StoreError, StoreForgeryError
from esper_async.kernels import Kernel
from esper_async.store import BundleEntry, KernelStore
from esper_async.store._bundle import stage_bundle, write_bundle

from .conftest import request_for

KEY, OTHER = b"k" * 32, b"o" * 32


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def _entries(kernels: list[Kernel]) -> list[BundleEntry]:
    request = request_for(kernels[0].blueprint, i=0)
    kernel = kernels[0]
    return [
        BundleEntry(
            request.key, kernel.metadata.to_json(), kernel.artifact, (), (), request.document
        )
    ]


def _edit_manifest(path: Path) -> None:
    """Rewrite ``path`` with one manifest field changed, every other member (the seal too)
    copied as it was."""
    members: list[tuple[tarfile.TarInfo, bytes]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            handle = tar.extractfile(member)
            assert handle is not None
            members.append((member, handle.read()))
    manifest = json.loads(members[0][1])
    manifest["entries"][0]["tags"] = ["trusted"]
    members[0] = (members[0][0], json.dumps(manifest).encode())
    with tarfile.open(path, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_a_sealed_bundle_stages_with_its_key_and_without_one(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    write_bundle(tmp_path / "b.tar", _entries(kernels), seal_key=KEY)
    with tarfile.open(tmp_path / "b.tar") as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.seal"]
    for key in (KEY, None):  # without a key, the seal is neither required nor checked
        staged = stage_bundle(tmp_path / "b.tar", staging, seal_key=key)
        assert list(staged.files) == [kernels[0].kernel_id]
        staged.discard()


@pytest.mark.parametrize(
    ("forgery", "match"),
    [
        pytest.param("unsealed", "carries no seal", id="unsealed"),
        pytest.param("foreign", "sealed with another key", id="another-key"),
        pytest.param(
            "edited", "sealed with another key, or its manifest was altered", id="manifest-edited"
        ),
    ],
)
def test_a_forged_bundle_is_refused_with_the_key(
    tmp_path: Path, staging: Path, kernels: list[Kernel], forgery: str, match: str
) -> None:
    path = tmp_path / "b.tar"
    seal = {"unsealed": None, "foreign": OTHER, "edited": KEY}[forgery]
    write_bundle(path, _entries(kernels), seal_key=seal)
    if forgery == "edited":
        _edit_manifest(path)
    with pytest.raises(StoreForgeryError, match=match):
        stage_bundle(path, staging, seal_key=KEY)
    assert list(staging.iterdir()) == []  # nothing staged


def test_a_bundle_is_not_written_through_a_planted_link(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "b.tar.tmp").symlink_to(victim)
    write_bundle(tmp_path / "b.tar", _entries(kernels))
    assert victim.read_bytes() == b"precious"
    stage_bundle(tmp_path / "b.tar", staging).discard()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_bundle_that_is_not_a_file_is_refused_unread(
    tmp_path: Path, staging: Path, kind: str
) -> None:
    path = tmp_path / "b.tar"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: a plain open blocks forever
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(StoreError, match="not a regular file"):
        stage_bundle(path, staging)


@pytest.mark.asyncio
async def test_the_store_seals_and_checks_bundles_with_the_environment_key(
    tmp_path: Path, kernels: list[Kernel], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "kernels.tar"
    async with KernelStore(tmp_path / "a") as source:
        request = request_for(kernels[0].blueprint, i=0)
        await source.put(request, kernels[0])
        monkeypatch.setenv(SEAL_KEY_ENV, OTHER.decode())
        assert await source.export_bundle(bundle) == 1
    async with KernelStore(tmp_path / "b") as target:
        monkeypatch.setenv(SEAL_KEY_ENV, KEY.decode())
        with pytest.raises(StoreForgeryError, match="sealed with another key"):
            await target.import_bundle(bundle)
        assert await target.list_kernels() == []
        assert await target.import_bundle(bundle, seal_key=OTHER) == 1
