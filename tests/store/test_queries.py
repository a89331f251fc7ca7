from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

import pytest

from esper_async.errors import StoreError, StoreIntegrityError
from esper_async.kernels import Kernel
from esper_async.store import SCHEMA_VERSION, KernelStatus, KernelStore

from .conftest import key_for, request_for


class Clock:
    """An injectable clock for gc: tests move time instead of sleeping."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _fill(store: KernelStore, kernels: list[Kernel]) -> list[str]:
    keys = []
    for i, kernel in enumerate(kernels):
        request = request_for(kernel.blueprint, i=i)
        await store.put(request, kernel, tags=["even" if i % 2 == 0 else "odd", "all"])
        keys.append(request.key)
    return keys


@pytest.mark.asyncio
async def test_list_by_blueprint_tag_and_status(tmp_path: Path, kernels: list[Kernel]) -> None:
    async with KernelStore(tmp_path) as store:
        keys = await _fill(store, kernels)
        bp = kernels[0].blueprint
        by_blueprint = await store.list_kernels(blueprint=bp)
        assert [r.key for r in by_blueprint] == keys[:2]
        assert await store.list_kernels(blueprint=bp.id) == by_blueprint
        assert [r.key for r in await store.list_kernels(blueprint=bp.family)] == keys[:2]
        assert [r.key for r in await store.list_kernels(tag="odd")] == keys[1::2]
        assert len(await store.list_kernels(tag="all", limit=2)) == 2
        await store.add_validation_report(keys[3], {"max_abs_err": 9.0}, passed=False)
        rejected = await store.list_kernels(status=KernelStatus.REJECTED)
        assert [r.key for r in rejected] == [keys[3]]
        assert len(await store.list_kernels(status="ready")) == len(keys) - 1
        await store.tag(keys[0], "favourite")
        assert [r.key for r in await store.list_kernels(tag="favourite")] == [keys[0]]
        with pytest.raises(StoreError, match="nothing was tagged"):
            await store.tag("f" * 64, "x")
        lineage = await store.blueprints()
        assert [b.kernels for b in lineage] == [2, 2, 2]
        assert {b.family for b in lineage} == {k.blueprint.family for k in kernels}


@pytest.mark.asyncio
async def test_stats_count_kernels_bytes_and_blueprints(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    async with KernelStore(tmp_path) as store:
        keys = await _fill(store, kernels[:3])
        await store.put(key_for(kernels[0].blueprint, alias=True), kernels[0])  # shared blob
        await store.get(keys[0])
        stats = await store.stats()
        assert stats.kernels == {"ready": 4}
        assert stats.blueprints == 2
        assert stats.total_bytes == sum(k.nbytes for k in kernels[:3])
        assert stats.schema_version == SCHEMA_VERSION and stats.lru.hits == 1
        assert stats.to_json()["lru"]["hits"] == 1


@pytest.mark.asyncio
async def test_gc_by_age_uses_last_use(tmp_path: Path, kernels: list[Kernel]) -> None:
    clock = Clock(1_000_000.0)
    async with KernelStore(tmp_path, clock=clock) as store:
        keys = await _fill(store, kernels[:3])
        clock.now += 10 * 86400
        await store.get(keys[1])  # used recently: survives
        report = await store.gc(max_age_s=7 * 86400)
        assert set(report.removed_keys) == {keys[0], keys[2]}
        assert report.removed_blobs == 2
        assert report.freed_bytes == kernels[0].nbytes + kernels[2].nbytes
        assert [r.key for r in await store.list_kernels()] == [keys[1]]
        blobs = {p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()}
        assert blobs == {kernels[1].kernel_id}


@pytest.mark.asyncio
async def test_gc_by_size_drops_least_recently_used_and_keeps_shared_blobs(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    clock = Clock(1_000_000.0)
    async with KernelStore(tmp_path, clock=clock) as store:
        keys = await _fill(store, kernels[:4])
        alias = key_for(kernels[0].blueprint, alias=True)
        await store.put(alias, kernels[0])
        for key in (keys[0], alias, keys[3], keys[2]):
            clock.now += 1
            await store.get(key)
        budget = kernels[3].nbytes + kernels[2].nbytes
        dry = await store.gc(max_total_bytes=budget, dry_run=True)
        assert len(await store.list_kernels()) == 5 and dry.dry_run
        report = await store.gc(max_total_bytes=budget)
        assert report.removed_keys == dry.removed_keys
        assert list(report.removed_keys) == [keys[1], keys[0], alias]
        assert (await store.stats()).total_bytes <= budget
        assert {r.key for r in await store.list_kernels()} == {keys[2], keys[3]}


@pytest.mark.asyncio
async def test_gc_removes_orphans_and_stale_temporaries_after_a_grace_period(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    async with KernelStore(tmp_path) as store:
        await _fill(store, kernels[:1])
        orphan = await store._blobs.put(kernels[1].artifact)  # as a crashed put leaves it
        tmp = tmp_path / "tmp" / "half-written.tmp"
        tmp.write_bytes(b"partial")
        report = await store.gc()
        assert report.orphan_blobs == 0 and report.stale_files == 0  # too young
        old = time.time() - 7200
        os.utime(store._blobs.path_of(orphan), (old, old))
        os.utime(tmp, (old, old))
        report = await store.gc()
        assert report.orphan_blobs == 1 and report.stale_files == 1 and not tmp.exists()
        assert not store._blobs.path_of(orphan).exists()
        assert len(await store.list_kernels()) == 1


@pytest.mark.asyncio
async def test_verify_quarantines_corrupt_blobs(tmp_path: Path, kernels: list[Kernel]) -> None:
    async with KernelStore(tmp_path) as store:
        keys = await _fill(store, kernels[:3])
        path = store._blobs.path_of(kernels[1].kernel_id)
        path.write_bytes(path.read_bytes()[:-1])
        result = await store.verify()
        assert (result.checked, result.ok, result.quarantined) == (3, 2, (kernels[1].kernel_id,))
        record = await store.record(keys[1])
        assert record is not None and record.status is KernelStatus.QUARANTINED
        assert (await store.verify()).checked == 2


@pytest.mark.asyncio
async def test_export_and_import_a_bundle(tmp_path: Path, kernels: list[Kernel]) -> None:
    bundle = tmp_path / "kernels.tar"
    async with KernelStore(tmp_path / "a") as source:
        keys = await _fill(source, kernels[:4])
        await source.add_validation_report(keys[0], {"max_abs_err": 1e-7}, passed=True)
        assert await source.export_bundle(bundle, tag="even") == 2
        with tarfile.open(bundle) as tar:
            names = set(tar.getnames())
        assert names == {"manifest.json"} | {f"blobs/{k.kernel_id}" for k in kernels[:4:2]}
        with pytest.raises(StoreError, match="nothing was exported"):
            await source.export_bundle(tmp_path / "none.tar", keys=["0" * 64])
    async with KernelStore(tmp_path / "b") as target:
        assert await target.import_bundle(bundle) == 2
        assert await target.import_bundle(bundle) == 2  # idempotent
        records = {r.key: r for r in await target.list_kernels()}  # one commit: one created_at
        assert sorted(records) == sorted(keys[::2])
        assert records[keys[0]].tags == ("all", "even")
        # The source's reports are not carried over: the import validated each kernel itself.
        reports = await target.validation_reports(keys[0])
        assert len(reports) == 1 and reports[0]["passed"] and reports[0]["report"]["local"]
        assert reports[0]["report"]["kernel_id"] == kernels[0].kernel_id
        loaded = await target.get(keys[2])
        assert loaded is not None and loaded.artifact == kernels[2].artifact


@pytest.mark.asyncio
async def test_export_refuses_a_corrupt_artifact(tmp_path: Path, kernels: list[Kernel]) -> None:
    async with KernelStore(tmp_path / "s") as store:
        await _fill(store, kernels[:2])
        store._blobs.path_of(kernels[0].kernel_id).write_bytes(b"garbage")
        with pytest.raises(StoreIntegrityError):
            await store.export_bundle(tmp_path / "out.tar")
        assert not (tmp_path / "out.tar").exists()
        assert (await store.stats()).kernels == {"quarantined": 1, "ready": 1}
