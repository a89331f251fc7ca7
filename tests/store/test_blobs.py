from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import pytest_asyncio

from esper_async.errors import StoreError, StoreIntegrityError
from esper_async.store._blobs import BlobStore

DATA = b"artifact bytes " * 100
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest_asyncio.fixture
async def blobs(tmp_path: Path) -> BlobStore:
    store = BlobStore(tmp_path)
    await store.ensure_dirs()
    return store


@pytest.mark.asyncio
async def test_put_writes_a_content_addressed_file_and_read_verifies(blobs: BlobStore) -> None:
    assert await blobs.put(DATA) == DIGEST
    path = blobs.path_of(DIGEST)
    assert path == blobs.root / "blobs" / DIGEST[:2] / DIGEST
    assert path.read_bytes() == DATA
    assert await blobs.read(DIGEST) == DATA
    assert list(blobs.tmp_dir.iterdir()) == []


@pytest.mark.asyncio
async def test_put_is_idempotent_and_checks_an_announced_digest(blobs: BlobStore) -> None:
    await blobs.put(DATA)
    before = blobs.path_of(DIGEST).stat().st_ino
    assert await blobs.put(DATA, DIGEST) == DIGEST
    assert blobs.path_of(DIGEST).stat().st_ino == before  # kept, not rewritten
    with pytest.raises(StoreIntegrityError, match="hashes to"):
        await blobs.put(DATA, "0" * 64)


@pytest.mark.asyncio
async def test_corrupt_and_missing_blobs_are_reported(blobs: BlobStore) -> None:
    with pytest.raises(StoreIntegrityError, match="missing") as missing:
        await blobs.read(DIGEST)
    assert missing.value.key == DIGEST
    await blobs.put(DATA)
    path = blobs.path_of(DIGEST)
    flipped = bytearray(DATA)
    flipped[7] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreIntegrityError, match="corrupt"):
        await blobs.read(DIGEST)


@pytest.mark.asyncio
async def test_put_heals_a_corrupt_file_of_the_same_size(blobs: BlobStore) -> None:
    await blobs.put(DATA)
    path = blobs.path_of(DIGEST)
    path.write_bytes(b"X" * len(DATA))
    await blobs.put(DATA)
    assert await blobs.read(DIGEST) == DATA


@pytest.mark.asyncio
async def test_quarantine_moves_the_file_aside(blobs: BlobStore) -> None:
    await blobs.put(DATA)
    moved = await blobs.quarantine(DIGEST)
    assert moved is not None and moved.parent == blobs.quarantine_dir
    assert moved.read_bytes() == DATA
    assert not blobs.path_of(DIGEST).exists()
    assert await blobs.quarantine(DIGEST) is None
    assert await blobs.remove(DIGEST) is False


@pytest.mark.asyncio
async def test_listing_and_stale_file_removal(blobs: BlobStore) -> None:
    await blobs.put(DATA)
    await blobs.put(b"other")
    listed = {d: size for d, size, _ in blobs.iter_digests()}
    assert listed == {DIGEST: len(DATA), hashlib.sha256(b"other").hexdigest(): 5}
    old = blobs.tmp_dir / "leftover.tmp"
    old.write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    fresh = blobs.tmp_dir / "in-flight.tmp"
    fresh.write_bytes(b"half")
    assert blobs.remove_stale(blobs.tmp_dir, time.time() - 3600) == 1
    assert not old.exists() and fresh.exists()


def test_bad_digests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a hex sha256"):
        BlobStore(tmp_path).path_of("../../etc/passwd")
