from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import aiosqlite
import anyio
import pytest

from esper_async.errors import StoreError
from esper_async.kernels import Kernel
from esper_async.store import SCHEMA_VERSION, KernelStatus, KernelStore
from esper_async.store._blobs import BlobStore
from esper_async.store._schema import migrate, read_version

from .conftest import key_for

# The version-1 schema as it was released, written out here by hand: the test must keep
# describing v1 even when the migrations in the code change.
V1_DDL = """
CREATE TABLE kernels (
    key TEXT PRIMARY KEY, kernel_id TEXT NOT NULL, blueprint_id TEXT NOT NULL,
    blueprint_json TEXT NOT NULL, metadata_json TEXT NOT NULL, nbytes INTEGER NOT NULL,
    created_at REAL NOT NULL);
CREATE INDEX kernels_blueprint ON kernels(blueprint_id);
CREATE TABLE validation_reports (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL REFERENCES kernels(key) ON DELETE CASCADE,
    passed INTEGER NOT NULL, report_json TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX validation_reports_key ON validation_reports(key);
CREATE TABLE usage (
    key TEXT PRIMARY KEY REFERENCES kernels(key) ON DELETE CASCADE,
    hits INTEGER NOT NULL DEFAULT 0, last_used_at REAL);
PRAGMA user_version = 1;
"""


async def _write_v1_store(root: Path, kernels: list[Kernel]) -> list[str]:
    """A v1 store holding ``kernels`` (rows, usage, one report and the blobs)."""
    await anyio.Path(root).mkdir(parents=True)
    blobs = BlobStore(root)
    await blobs.ensure_dirs()
    conn = sqlite3.connect(root / "store.sqlite3")
    conn.executescript(V1_DDL)
    keys = []
    for i, kernel in enumerate(kernels):
        key = key_for(kernel.blueprint, v1=i)
        keys.append(key)
        bp = kernel.blueprint
        conn.execute(
            "INSERT INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                kernel.kernel_id,
                bp.id,
                bp.to_json(),
                json.dumps(kernel.metadata.to_json()),
                kernel.nbytes,
                1000.0 + i,
            ),
        )
        conn.execute("INSERT INTO usage VALUES (?, ?, ?)", (key, 3 + i, 2000.0 + i))
        await blobs.put(kernel.artifact)
    conn.execute(
        "INSERT INTO validation_reports (key, passed, report_json, created_at) VALUES (?,1,?,?)",
        (keys[0], json.dumps({"max_abs_err": 1e-6}), 1500.0),
    )
    conn.commit()
    conn.close()
    return keys


@pytest.mark.asyncio
async def test_a_fresh_database_gets_every_migration(tmp_path: Path) -> None:
    async with aiosqlite.connect(tmp_path / "db.sqlite3", isolation_level=None) as conn:
        await conn.execute("BEGIN IMMEDIATE")
        assert await migrate(conn) == (0, SCHEMA_VERSION)
        await conn.execute("COMMIT")
        assert await read_version(conn) == SCHEMA_VERSION
        async with conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cur:
            tables = {row[0] for row in await cur.fetchall()}
    assert {"kernels", "blueprints", "tags", "usage", "validation_reports", "quarantine"} <= tables


@pytest.mark.asyncio
async def test_v1_store_is_migrated_with_its_data_kept(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    root = tmp_path / "store"
    keys = await _write_v1_store(root, kernels[:3])
    async with KernelStore(root) as store:
        assert (await store.stats()).schema_version == SCHEMA_VERSION
        records = await store.list_kernels()
        assert [r.key for r in records] == keys
        for record, kernel in zip(records, kernels[:3], strict=True):
            assert record.kernel_id == kernel.kernel_id
            assert record.status is KernelStatus.READY
            assert record.torch_version == kernel.metadata.torch_version
            assert record.device_kind == "cpu"
            assert record.family == kernel.blueprint.family
        assert [r.hits for r in records] == [3, 4, 5]
        lineage = {b.blueprint_id: b.kernels for b in await store.blueprints()}
        assert lineage == {kernels[0].blueprint.id: 2, kernels[2].blueprint.id: 1}
        reports = await store.validation_reports(keys[0])
        assert reports[0]["report"] == {"max_abs_err": 1e-6} and reports[0]["passed"]
        loaded = await store.get(keys[2])
        assert loaded is not None and loaded.artifact == kernels[2].artifact
    async with KernelStore(root) as store:  # reopening migrates nothing and keeps everything
        assert len(await store.list_kernels()) == 3


@pytest.mark.asyncio
async def test_a_failed_migration_leaves_the_old_version_intact(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    root = tmp_path / "store"
    keys = await _write_v1_store(root, kernels[:1])
    conn = sqlite3.connect(root / "store.sqlite3")
    conn.execute("CREATE TABLE tags (unrelated TEXT)")  # v2 creates `tags`: it will fail
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="migrate the schema") as failed:
        async with KernelStore(root):
            pass
    assert isinstance(failed.value.__cause__, sqlite3.Error)
    conn = sqlite3.connect(root / "store.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert conn.execute("SELECT key FROM kernels").fetchall() == [(keys[0],)]
    columns = {row[1] for row in conn.execute("PRAGMA table_info(kernels)")}
    assert "status" not in columns
    conn.close()


@pytest.mark.asyncio
async def test_a_store_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    conn = sqlite3.connect(root / "store.sqlite3")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this esper_async"):
        async with KernelStore(root):
            pass
