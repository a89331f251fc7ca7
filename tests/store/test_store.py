from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from esper_async.errors import CompileError, KernelIntegrityError, StoreError, StoreIntegrityError
from esper_async.kernels import Kernel, export_kernel, load_kernel
from esper_async.store import KernelStatus, KernelStore

from .conftest import CONTRACT, key_for


class Compiler:
    """A real compile function (``export_kernel`` in a thread) that counts its calls."""

    def __init__(self, kernel_source: Kernel, *, delay_s: float = 0.0) -> None:
        self.calls = 0
        self.blueprint = kernel_source.blueprint
        self.delay_s = delay_s
        self.started = anyio.Event()

    async def __call__(self) -> Kernel:
        self.calls += 1
        self.started.set()
        await anyio.sleep(self.delay_s)
        return await anyio.to_thread.run_sync(
            lambda: export_kernel(self.blueprint, CONTRACT, seed=100 + self.calls)
        )


def _corrupt(store: KernelStore, kernel_id: str) -> None:
    path = store.path / "blobs" / kernel_id[:2] / kernel_id
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.asyncio
async def test_put_then_get_from_memory_and_from_disk(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    kernel = kernels[0]
    key = key_for(kernel.blueprint)
    async with KernelStore(tmp_path) as store:
        assert await store.get(key) is None
        assert await store.put(key, kernel) == kernel.kernel_id
        assert await store.get(key) is kernel  # memory hit
        lru = (await store.stats()).lru
        assert (lru.hits, lru.misses, lru.entries, lru.nbytes) == (1, 1, 1, kernel.nbytes)
    async with KernelStore(tmp_path) as store:
        loaded = await store.get(key)
        assert loaded is not None and loaded is not kernel
        assert loaded.artifact == kernel.artifact and loaded.metadata == kernel.metadata
        assert (await store.stats()).disk_hits == 1
        load_kernel(loaded)  # the bytes from disk are a real, loadable kernel
    async with KernelStore(tmp_path) as store:
        record = await store.record(key)
        assert record is not None and record.hits == 2 and record.last_used_at is not None


@pytest.mark.asyncio
async def test_put_is_idempotent_and_the_first_ready_kernel_wins(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    first, second = kernels[0], kernels[1]  # same blueprint, different seeds and bytes
    key = key_for(first.blueprint)
    async with KernelStore(tmp_path) as store:
        assert (
            await store.put(key, first, tags=["a"], validation_report={"ok": True})
            == first.kernel_id
        )
        assert (
            await store.put(key, first, tags=["b"], validation_report={"ok": True})
            == first.kernel_id
        )
        assert await store.put(key, second) == first.kernel_id
        record = await store.record(key)
        assert record is not None and record.kernel_id == first.kernel_id
        assert record.tags == ("a", "b")
        assert len(await store.validation_reports(key)) == 1
        assert len(await store.list_kernels()) == 1


@pytest.mark.asyncio
async def test_put_refuses_bytes_that_do_not_match_the_kernel_id(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    forged = Kernel(artifact=kernels[1].artifact, metadata=kernels[0].metadata)
    async with KernelStore(tmp_path) as store:
        with pytest.raises(KernelIntegrityError):
            await store.put(key_for(forged.blueprint), forged)
        assert await store.list_kernels() == []
        assert list((tmp_path / "blobs").rglob("*")) == []


@pytest.mark.asyncio
async def test_memory_cache_is_bounded_in_bytes(tmp_path: Path, kernels: list[Kernel]) -> None:
    budget = kernels[0].nbytes + kernels[2].nbytes
    async with KernelStore(tmp_path, memory_bytes=budget) as store:
        for i, kernel in enumerate(kernels[:4]):
            await store.put(key_for(kernel.blueprint, i=i), kernel)
        lru = (await store.stats()).lru
        assert lru.nbytes <= budget and lru.evictions >= 2 and lru.entries < 4
        for i, kernel in enumerate(kernels[:4]):  # evicted ones come back from disk
            loaded = await store.get(key_for(kernel.blueprint, i=i))
            assert loaded is not None and loaded.kernel_id == kernel.kernel_id


@pytest.mark.asyncio
async def test_a_corrupt_blob_is_quarantined_never_loaded_and_healed_by_recompiling(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    kernel = kernels[0]
    key = key_for(kernel.blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(key, kernel)
    _corrupt(store, kernel.kernel_id)
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="quarantined") as caught:
            await store.get(key)
        assert caught.value.key == key
        record = await store.record(key)
        assert record is not None and record.status is KernelStatus.QUARANTINED
        quarantined = list((tmp_path / "quarantine").iterdir())
        assert len(quarantined) == 1 and quarantined[0].name.startswith(kernel.kernel_id)
        assert hashlib.sha256(quarantined[0].read_bytes()).hexdigest() != kernel.kernel_id
        assert await store.get(key) is None  # a quarantined entry is a miss from now on
        assert (await store.stats()).quarantine_events == 1

        compiler = Compiler(kernel)
        healed = await store.get_or_compile(key, compiler)
        assert compiler.calls == 1 and healed.kernel_id != kernel.kernel_id
        record = await store.record(key)
        assert record is not None and record.status is KernelStatus.READY
        assert record.kernel_id == healed.kernel_id
    async with KernelStore(tmp_path, memory_bytes=0) as store:
        again = await store.get(key)
        assert again is not None and again.artifact == healed.artifact


@pytest.mark.asyncio
async def test_a_missing_blob_is_reported_and_get_or_compile_recompiles(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    kernel = kernels[2]
    key = key_for(kernel.blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(key, kernel)
    (tmp_path / "blobs" / kernel.kernel_id[:2] / kernel.kernel_id).unlink()
    async with KernelStore(tmp_path) as store:
        compiler = Compiler(kernel)
        healed = await store.get_or_compile(key, compiler)
        assert compiler.calls == 1 and healed.blueprint == kernel.blueprint
        assert (await store.stats()).quarantine_events == 1


@pytest.mark.asyncio
async def test_single_flight_concurrent_requests_share_one_compile(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    key = key_for(kernels[0].blueprint, single_flight=True)
    compiler = Compiler(kernels[0], delay_s=0.05)
    results: list[Kernel] = []
    async with KernelStore(tmp_path) as store:

        async def request() -> None:
            results.append(await store.get_or_compile(key, compiler))

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(request)
        assert compiler.calls == 1
        assert len({k.kernel_id for k in results}) == 1 and len(results) == 5
        assert (await store.stats()).compiles == 1
        assert await store.get_or_compile(key, compiler) is results[0]
        assert compiler.calls == 1


@pytest.mark.asyncio
async def test_single_flight_shares_a_compile_error_then_retries(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    key = key_for(kernels[0].blueprint, failing=True)
    calls = 0

    async def failing() -> Kernel:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.05)
        raise CompileError("export failed", blueprint="mlp")

    errors: list[BaseException] = []
    async with KernelStore(tmp_path) as store:

        async def request() -> None:
            try:
                await store.get_or_compile(key, failing)
            except CompileError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(request)
        assert calls == 1 and len(errors) == 3
        assert await store.record(key) is None
        compiler = Compiler(kernels[0])
        assert (await store.get_or_compile(key, compiler)).blueprint == kernels[0].blueprint
        assert compiler.calls == 1


@pytest.mark.asyncio
async def test_a_cancelled_leader_hands_the_compile_to_a_waiter(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    key = key_for(kernels[0].blueprint, cancelled=True)
    slow = Compiler(kernels[0], delay_s=30.0)
    fast = Compiler(kernels[0])
    async with KernelStore(tmp_path) as store:
        async with anyio.create_task_group() as tg:
            leader = anyio.CancelScope()

            async def lead() -> None:
                with leader:
                    await store.get_or_compile(key, slow)

            tg.start_soon(lead)
            await slow.started.wait()  # the leader is compiling
            result: list[Kernel] = []

            async def follow() -> None:
                result.append(await store.get_or_compile(key, fast))

            tg.start_soon(follow)
            await anyio.wait_all_tasks_blocked()  # the follower waits on the leader's flight
            assert (await store.stats()).shared_waits == 1
            leader.cancel()
        assert slow.calls == 1 and fast.calls == 1 and result[0].blueprint == kernels[0].blueprint


@pytest.mark.asyncio
async def test_compile_fn_must_return_a_kernel(tmp_path: Path) -> None:
    async def wrong() -> Kernel:
        return "not a kernel"  # type: ignore[return-value]

    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreError, match="not a Kernel"):
            await store.get_or_compile("k" * 64, wrong)


@pytest.mark.asyncio
async def test_using_a_closed_store_and_reopening_an_open_one_fail_clearly(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    store = KernelStore(tmp_path)
    with pytest.raises(StoreError, match="not open"):
        await store.put(key_for(kernels[0].blueprint), kernels[0])
    async with store:
        with pytest.raises(StoreError, match="already open"):
            await store.__aenter__()
    with pytest.raises(ValueError, match="positive"):
        KernelStore(tmp_path, db_timeout_s=0)


@pytest.mark.asyncio
async def test_sqlite_errors_are_mapped_to_store_error(tmp_path: Path) -> None:
    (tmp_path / "store.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as caught:
        async with KernelStore(tmp_path):
            pass
    assert isinstance(caught.value.__cause__, sqlite3.DatabaseError)


@pytest.mark.asyncio
async def test_rejected_kernels_are_kept_but_never_served(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    kernel = kernels[4]
    key = key_for(kernel.blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(key, kernel, status="rejected", validation_report={"max_abs_err": 3.0})
        assert await store.get(key) is None
        reports = await store.validation_reports(key)
        assert reports == [
            {"passed": False, "report": {"max_abs_err": 3.0}, "at": reports[0]["at"]}
        ]
        good = replace(kernels[5])
        assert await store.put(key, good) == good.kernel_id  # a rejected entry is replaced
        assert (await store.get(key)) is good
