"""The store's trust boundary: it returns only what was asked for and never forgets committed
data. Each test plays a hostile user against real SQLite files, real blobs and real kernels."""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from esper_async.compiler import BlueprintCompiler, OptimizerOptions
from esper_async.errors import StoreError, StoreIntegrityError
from esper_async.kernels import Kernel, export_kernel
from esper_async.store import BundleLimits, KernelRequest, KernelStatus, KernelStore

from . import _forge
from .conftest import CONTRACT, request_for


def _compile_fn(kernel_like: Kernel, seed: int = 7):  # type: ignore[no-untyped-def]
    """A real compile (``export_kernel`` in a thread) of ``kernel_like``'s blueprint."""

    async def compile_fn() -> Kernel:
        return await anyio.to_thread.run_sync(
            lambda: export_kernel(kernel_like.blueprint, CONTRACT, seed=seed)
        )

    return compile_fn


def _rows(root: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(root / "store.sqlite3") as conn:
        return conn.execute("SELECT key, kernel_id, status FROM kernels ORDER BY key").fetchall()


def _blob_files(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").rglob("*") if p.is_file()}


def _lose_index(root: Path, *, emptied: bool) -> None:
    """Delete the SQLite index (and its WAL), or leave it as an empty file."""
    db = root / "store.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    if emptied:
        db.write_bytes(b"")


def _present(path: Path) -> bool:
    return os.path.lexists(path)


# -- 1. a hit is a kernel of what was asked for ---------------------------------------------


@pytest.mark.asyncio
async def test_a_bundle_mapping_one_blueprints_key_to_another_kernel_is_refused(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    asked, other = kernels[0], kernels[2]  # different blueprints
    request = request_for(asked.blueprint)
    forged = [  # both carry a "passed" validation report
        (_forge.entry(other, request), "not what its key asks for"),  # key, request of A
        (_forge.entry(other, request_for(other.blueprint), key=request.key), "not the hash"),
    ]
    async with KernelStore(tmp_path / "s") as store:
        for i, (item, message) in enumerate(forged):
            bundle = _forge.write_bundle(tmp_path / f"{i}.tar", _forge.manifest(item), [other])
            with pytest.raises(StoreIntegrityError, match=message):
                await store.import_bundle(bundle)
        assert await store.list_kernels() == []
        assert _blob_files(store.path) == set()
        # A later compile of A compiles A: nothing of B is served under A's key.
        kernel = await store.get_or_compile(request, _compile_fn(asked))
        assert kernel.blueprint == asked.blueprint
        assert (await store.stats()).compiles == 1


@pytest.mark.asyncio
async def test_a_row_edited_to_hold_another_kernel_is_quarantined_not_served(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    asked, other = kernels[0], kernels[2]
    request = request_for(asked.blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(request, asked)
        await store.put(request_for(other.blueprint), other)
    # Someone edits the index: A's key now names B's (intact) blob and metadata.
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        conn.execute(
            "UPDATE kernels SET kernel_id = ?, metadata_json = ? WHERE key = ?",
            (other.kernel_id, json.dumps(other.metadata.to_json()), request.key),
        )
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="not asked for"):
            await store.get(request.key)  # a bare key: checked against the stored request
        record = await store.record(request.key)
        assert record is not None and record.status is KernelStatus.QUARANTINED
        # Only the row is quarantined: B's blob still serves B.
        served = await store.get(request_for(other.blueprint))
        assert served is not None and served.kernel_id == other.kernel_id
        healed = await store.get_or_compile(request, _compile_fn(asked))
        assert healed.blueprint == asked.blueprint
        assert (await store.record(request.key)).status is KernelStatus.READY  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_a_request_is_checked_even_for_rows_stored_with_a_bare_key(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    asked, other = kernels[0], kernels[2]
    request = request_for(asked.blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(request.key, other)  # a bare key cannot be checked at put
        with pytest.raises(StoreIntegrityError, match="blueprint"):
            await store.get(request)  # ... but a request is, in memory
    async with KernelStore(tmp_path) as store:
        await store.put(request.key, other)  # replaces the quarantined row
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="blueprint"):
            await store.get(request)  # ... and from disk
        assert await store.get(request.key) is None  # quarantined: a miss


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"torch_version": "1.0.0"}, id="torch-version"),
        pytest.param({"device_kind": "cuda"}, id="device-kind"),
        pytest.param(
            {"contract": {"kind": "linear", "shape": [16], "dtype": "float32"}}, id="contract"
        ),
        pytest.param({"init_seed": 99}, id="init-seed"),
    ],
)
@pytest.mark.asyncio
async def test_put_refuses_a_kernel_the_request_does_not_ask_for(
    tmp_path: Path, kernels: list[Kernel], change: dict[str, object]
) -> None:
    kernel = kernels[0]
    forged = Kernel(kernel.artifact, replace(kernel.metadata, **change))  # type: ignore[arg-type]
    request = KernelRequest(
        kernel.blueprint,
        CONTRACT,
        torch_version=kernel.metadata.torch_version,
        device_kind="cpu",
        init_seed=kernel.metadata.init_seed,
    )
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="not stored"):
            await store.put(request, forged)
        assert await store.list_kernels() == []


@pytest.mark.asyncio
async def test_a_stored_request_that_does_not_hash_to_its_key_is_refused(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    request = request_for(kernels[0].blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(request, kernels[0])
    other = request_for(kernels[0].blueprint, edited=True)
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        conn.execute("UPDATE kernels SET request_json = ?", (other.text,))
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="does not hash to the key"):
            await store.get(request.key)


@pytest.mark.asyncio
async def test_the_compiler_never_serves_a_forged_row(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    options = OptimizerOptions(repeats=1, batch=4)
    asked, other = kernels[0].blueprint, kernels[2]
    async with KernelStore(tmp_path) as store:
        async with BlueprintCompiler(workers=1, options=options, store=store) as compiler:
            key = compiler.store_key(asked, CONTRACT, seed=0)
            await store.put(key, other)  # the row of A's compile holds B
            kernel = await compiler.compile(asked, CONTRACT, seed=0)
    assert kernel.blueprint == asked and kernel.metadata.init_seed == 0
    assert compiler.compiles == 1


# -- 2 and 3. imports are atomic, bounded and validated locally ------------------------------


@pytest.mark.asyncio
async def test_an_import_with_one_bad_entry_stores_nothing(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    good, bad = kernels[0], kernels[2]
    # The bad entry is consistent on paper (key, request and metadata agree on seed 5), but its
    # weights come from seed 0: only validating it locally can tell, and does.
    lying = Kernel(bad.artifact, replace(bad.metadata, init_seed=5))
    lying_request = KernelRequest(
        bad.blueprint,
        CONTRACT,
        torch_version=bad.metadata.torch_version,
        device_kind="cpu",
        init_seed=5,
    )
    manifest = _forge.manifest(
        _forge.entry(good, request_for(good.blueprint)), _forge.entry(lying, lying_request)
    )
    bundle = _forge.write_bundle(tmp_path / "b.tar", manifest, [good, bad])
    async with KernelStore(tmp_path / "s") as store:
        with pytest.raises(StoreIntegrityError, match=r"entry 1 .*failed local validation"):
            await store.import_bundle(bundle)
        assert await store.list_kernels() == []
        assert await store.get(request_for(good.blueprint)) is None
        assert _blob_files(store.path) == set()
        assert list((store.path / "tmp").iterdir()) == []


@pytest.mark.asyncio
async def test_an_imported_report_is_never_trusted(tmp_path: Path, kernels: list[Kernel]) -> None:
    kernel = kernels[0]
    request = request_for(kernel.blueprint)
    bundle = _forge.write_bundle(
        tmp_path / "b.tar", _forge.manifest(_forge.entry(kernel, request)), [kernel]
    )
    async with KernelStore(tmp_path / "s") as store:
        assert await store.import_bundle(bundle) == 1
        (report,) = await store.validation_reports(request.key)
        assert report["report"]["local"] and report["report"]["kernel_id"] == kernel.kernel_id
        assert {c["name"] for c in report["report"]["checks"]} >= {
            "forward[b=3]",
            "initial_weights",
        }
        served = await store.get(request)
        assert served is not None and served.artifact == kernel.artifact


@pytest.mark.asyncio
async def test_an_import_over_its_bounds_stores_nothing(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    manifest = _forge.manifest(
        *(_forge.entry(k, request_for(k.blueprint, i=i)) for i, k in enumerate(kernels[:2]))
    )
    bundle = _forge.write_bundle(tmp_path / "b.tar", manifest, kernels[:2], compression="gz")
    async with KernelStore(tmp_path / "s") as store:
        with pytest.raises(StoreError, match="allowed"):
            await store.import_bundle(bundle, limits=BundleLimits(max_member_bytes=1000))
        assert await store.list_kernels() == []
        assert list((store.path / "tmp").iterdir()) == []
        assert await store.import_bundle(bundle) == 2  # the default bounds admit it


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param({"metadata": {"sha256": None}}, id="metadata-junk"),
        pytest.param({"tags": {"a": 1}}, id="tags-dict"),
        pytest.param({"request": {"blueprint": [[[]]]}}, id="request-junk"),
    ],
)
@pytest.mark.asyncio
async def test_a_malformed_entry_after_a_good_one_is_a_store_error_and_stores_nothing(
    tmp_path: Path, kernels: list[Kernel], junk: dict[str, object]
) -> None:
    first, second = kernels[0], kernels[2]
    manifest = _forge.manifest(
        _forge.entry(first, request_for(first.blueprint)),
        _forge.entry(second, request_for(second.blueprint), **junk),
    )
    bundle = _forge.write_bundle(tmp_path / "b.tar", manifest, [first, second])
    async with KernelStore(tmp_path / "s") as store:
        with pytest.raises(StoreError, match="entry 1"):
            await store.import_bundle(bundle)
        assert await store.list_kernels() == []


# -- 5. an index lost over its blobs is refused, never reopened empty --------------------------


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
@pytest.mark.asyncio
async def test_a_lost_index_over_blobs_refuses_to_open(
    tmp_path: Path, kernels: list[Kernel], damage: str
) -> None:
    async with KernelStore(tmp_path) as store:
        await store.put(request_for(kernels[0].blueprint), kernels[0])
    _lose_index(tmp_path, emptied=damage == "emptied")
    for _ in range(2):  # refused every time, also once a refused open has created the file
        with pytest.raises(StoreIntegrityError, match="move blobs/ aside"):
            async with KernelStore(tmp_path):
                pass
    assert _blob_files(tmp_path) == {kernels[0].kernel_id}
    os.rename(tmp_path / "blobs", tmp_path / "blobs.saved")  # the recovery the message names
    async with KernelStore(tmp_path) as store:
        assert await store.list_kernels() == []


@pytest.mark.asyncio
async def test_a_crash_before_the_first_commit_still_opens(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    async with KernelStore(tmp_path) as store:
        await store._blobs.put(kernels[0].artifact)  # a put killed between blob and row
    async with KernelStore(tmp_path) as store:  # the index exists (migrated): not refused
        assert await store.list_kernels() == []


@pytest.mark.asyncio
async def test_gc_leaves_what_is_not_a_blob_file(tmp_path: Path, kernels: list[Kernel]) -> None:
    async with KernelStore(tmp_path, clock=lambda: 4e9) as store:
        digest = "ab" + "c" * 62
        (store.path / "blobs" / "ab" / digest).mkdir(parents=True)
        report = await store.gc(orphan_grace_s=0)
        assert report.orphan_blobs == 0
        assert (store.path / "blobs" / "ab" / digest).is_dir()


# -- 6. non-file blobs and unknown statuses ----------------------------------------------------


def _make_irregular(path: Path, kind: str, tmp_path: Path) -> None:
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"bytes from outside the store")
        path.symlink_to(tmp_path / "elsewhere")
    else:
        os.mkfifo(path)  # a read would block forever if the store opened it


@pytest.mark.parametrize("kind", ["directory", "symlink", "fifo"])
@pytest.mark.asyncio
async def test_a_blob_that_is_not_a_file_is_quarantined_and_recompiled(
    tmp_path: Path, kernels: list[Kernel], kind: str
) -> None:
    kernel = kernels[0]
    request = request_for(kernel.blueprint)
    async with KernelStore(tmp_path / "s", memory_bytes=0) as store:
        await store.put(request, kernel)
        blob = store._blobs.path_of(kernel.kernel_id)
        _make_irregular(blob, kind, tmp_path)
        with pytest.raises(StoreIntegrityError, match="not a regular file"):
            await store.get(request)
        assert not _present(blob)
        assert len(list((store.path / "quarantine").iterdir())) == 1
        healed = await store.get_or_compile(request, _compile_fn(kernel, seed=0))
        assert healed.blueprint == kernel.blueprint
        assert store._blobs.path_of(healed.kernel_id).is_file()
        served = await store.get(request)  # from disk: the new blob verifies
        assert served is not None and served.kernel_id == healed.kernel_id


@pytest.mark.asyncio
async def test_verify_quarantines_unreferenced_non_files_and_exits_non_zero(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    from .test_cli import _run

    async with KernelStore(tmp_path) as store:
        await store.put(request_for(kernels[0].blueprint), kernels[0])
    stray = tmp_path / "blobs" / "ab" / ("ab" + "0" * 62)
    stray.mkdir(parents=True)
    status, text = await _run("--path", str(tmp_path), "verify")
    assert status == 1 and "not a regular file" in text and not stray.exists()
    assert (await _run("--path", str(tmp_path), "verify"))[0] == 0


@pytest.mark.asyncio
async def test_an_unknown_status_is_an_integrity_error_and_a_clear_cli_message(
    tmp_path: Path, kernels: list[Kernel], capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_cli import _run

    request = request_for(kernels[0].blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(request, kernels[0])
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        conn.execute("UPDATE kernels SET status = 'half-baked'")
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="unknown status 'half-baked'"):
            await store.get(request)
        with pytest.raises(StoreIntegrityError, match="unknown status"):
            await store.list_kernels()
    capsys.readouterr()
    assert (await _run("--path", str(tmp_path), "ls"))[0] == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown status" in err and "Traceback" not in err
    status, text = await _run("--path", str(tmp_path), "verify")
    assert status == 1 and f"quarantined the row of key {request.key}" in text
    status, text = await _run("--path", str(tmp_path), "ls")
    assert status == 0 and "quarantined" in text
    assert _rows(tmp_path)[0][2] == "quarantined"


@pytest.mark.asyncio
async def test_verify_and_gc_refuse_a_lost_index_and_keep_every_blob(
    tmp_path: Path, kernels: list[Kernel], capsys: pytest.CaptureFixture[str]
) -> None:
    from .test_cli import _run

    async with KernelStore(tmp_path) as store:
        for i, kernel in enumerate(kernels[:2]):
            await store.put(request_for(kernel.blueprint, i=i), kernel)
    _lose_index(tmp_path, emptied=True)
    assert (await _run("--path", str(tmp_path), "verify"))[0] == 2
    assert (await _run("--path", str(tmp_path), "gc", "--orphan-grace-s", "0"))[0] == 2
    assert "move blobs/ aside" in capsys.readouterr().err
    assert _blob_files(tmp_path) == {k.kernel_id for k in kernels[:2]}


@pytest.mark.asyncio
async def test_a_malformed_stored_report_is_an_integrity_error(
    tmp_path: Path, kernels: list[Kernel]
) -> None:
    request = request_for(kernels[0].blueprint)
    async with KernelStore(tmp_path) as store:
        await store.put(request, kernels[0], validation_report={"ok": True})
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        conn.execute("UPDATE validation_reports SET report_json = '{not json'")
    async with KernelStore(tmp_path) as store:
        with pytest.raises(StoreIntegrityError, match="validation report of key"):
            await store.validation_reports(request.key)
