"""Several real processes on one store: a writer killed with SIGKILL mid-put, and four
processes writing and reading at once."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from esper_async.kernels import Kernel
from esper_async.store import KernelStatus, KernelStore

WORKER = Path(__file__).with_name("_worker.py")
#: Worker processes get one torch thread each: the machine has two cores.
WORKER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
START_DEADLINE_S = 60.0


def _committed_keys(db: Path) -> set[str]:
    """The keys another process has committed, read through a separate sqlite3 connection."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return set()
    try:
        return {row[0] for row in conn.execute("SELECT key FROM kernels")}
    except sqlite3.OperationalError:  # not created yet
        return set()
    finally:
        conn.close()


def _spawn(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=WORKER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_after(child: subprocess.Popen[bytes], db: Path, at_least: int) -> set[str]:
    """SIGKILL ``child`` as soon as it has committed ``at_least`` rows; the rows seen then."""
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        seen = _committed_keys(db)
        if len(seen) >= at_least:
            break
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            _, stderr = child.communicate(timeout=30)
            pytest.fail(f"the writer stopped ({child.returncode}): {stderr.decode()[-2000:]}")
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return seen


def _assert_blob_files_are_whole(root: Path) -> None:
    for path in (root / "blobs").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path


@pytest.mark.asyncio
async def test_a_writer_killed_mid_put_leaves_no_half_entry_and_loses_nothing(
    tmp_path: Path, kernels: list[Kernel], kernels_file: Path
) -> None:
    root = tmp_path / "store"
    db = root / "store.sqlite3"
    by_id = {k.kernel_id: k for k in kernels}
    committed: set[str] = set()
    # Round one is killed while new blobs are still being written; round two while only rows
    # are (every blob exists by then).
    for prefix, extra in (("first", 2), ("second", 40)):
        child = _spawn("crash", root, kernels_file, prefix)
        committed |= _kill_after(child, db, len(committed) + extra)
        _assert_blob_files_are_whole(root)
        async with KernelStore(root, memory_bytes=0) as store:
            records = {r.key: r for r in await store.list_kernels()}
            assert committed <= set(records)  # nothing committed was lost
            for key, record in records.items():  # and what is visible is whole
                assert record.status is KernelStatus.READY
                loaded = await store.get(key)
                assert loaded is not None and loaded.artifact == by_id[loaded.kernel_id].artifact
            report = await store.verify()
            assert report.ok == report.checked and report.quarantined == ()
            await store.put(f"{prefix}-after-crash", kernels[0])  # still writable
        committed |= set(records) | {f"{prefix}-after-crash"}


@pytest.mark.asyncio
async def test_four_processes_write_and_read_one_store_at_once(
    tmp_path: Path, kernels: list[Kernel], kernels_file: Path
) -> None:
    workers = 4
    root = tmp_path / "store"
    results = [tmp_path / f"result-{i}.json" for i in range(workers)]
    children = [_spawn("mixed", root, kernels_file, i, workers, results[i]) for i in range(workers)]
    for child in children:
        _, stderr = await anyio.to_thread.run_sync(lambda c=child: c.communicate(timeout=120))
        assert child.returncode == 0, stderr.decode()[-3000:]
    seen = [json.loads(path.read_text()) for path in results]
    by_id = {k.kernel_id: k for k in kernels}
    # Every process saw every key, with the same kernel, and agreed on the shared key's winner.
    assert all(s["seen"] == seen[0]["seen"] for s in seen)
    assert len(seen[0]["seen"]) == workers * 3 * 2
    winners = {tuple(s["shared"]) for s in seen}
    assert len(winners) == 1 and len(next(iter(winners))) == 1
    _assert_blob_files_are_whole(root)
    async with KernelStore(root, memory_bytes=0) as store:
        records = await store.list_kernels()
        assert len(records) == workers * 3 * 2 + 1
        for record in records:
            loaded = await store.get(record.key)
            assert loaded is not None and loaded.artifact == by_id[record.kernel_id].artifact
        assert (await store.verify()).quarantined == ()
        assert sum(r.hits for r in records) > 0
