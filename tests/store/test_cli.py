from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from esper_async.kernels import Kernel
from esper_async.store import SCHEMA_VERSION, KernelStore
from esper_async.store._cli import add_store_parser, run_store_command

from .conftest import request_for


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="esper-async")
    add_store_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["store", *argv])


async def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = await run_store_command(_parse(*argv), out=out)
    return status, out.getvalue()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


async def _fill(store_dir: Path, kernels: list[Kernel]) -> list[str]:
    requests = [request_for(k.blueprint, i=i) for i, k in enumerate(kernels)]
    async with KernelStore(store_dir) as store:
        for i, (request, kernel) in enumerate(zip(requests, kernels, strict=True)):
            await store.put(request, kernel, tags=[f"t{i % 2}"])
    return [r.key for r in requests]


@pytest.mark.asyncio
async def test_ls_and_stats(store_dir: Path, kernels: list[Kernel]) -> None:
    keys = await _fill(store_dir, kernels[:3])
    status, text = await _run("--path", str(store_dir), "ls")
    assert status == 0 and all(k[:12] in text for k in keys) and "ready" in text
    status, text = await _run("--path", str(store_dir), "--json", "ls", "--tag", "t1")
    assert status == 0 and [r["key"] for r in json.loads(text)] == [keys[1]]
    status, text = await _run("--path", str(store_dir), "--json", "stats")
    stats = json.loads(text)
    assert status == 0 and stats["kernels"] == {"ready": 3}
    assert stats["schema_version"] == SCHEMA_VERSION
    status, text = await _run("--path", str(store_dir), "stats")
    assert status == 0 and "3 ready" in text


@pytest.mark.asyncio
async def test_verify_reports_corruption_with_exit_status_1(
    store_dir: Path, kernels: list[Kernel]
) -> None:
    await _fill(store_dir, kernels[:2])
    assert (await _run("--path", str(store_dir), "verify"))[0] == 0
    blob = store_dir / "blobs" / kernels[1].kernel_id[:2] / kernels[1].kernel_id
    blob.write_bytes(b"corrupt")
    status, text = await _run("--path", str(store_dir), "verify")
    assert status == 1 and f"quarantined {kernels[1].kernel_id}" in text
    assert (await _run("--path", str(store_dir), "verify"))[0] == 0


@pytest.mark.asyncio
async def test_gc_export_and_import(store_dir: Path, tmp_path: Path, kernels: list[Kernel]) -> None:
    keys = await _fill(store_dir, kernels[:3])
    bundle = tmp_path / "b.tar"
    status, text = await _run("--path", str(store_dir), "export", str(bundle), "--tag", "t0")
    assert status == 0 and "exported 2" in text
    other = tmp_path / "other"
    status, text = await _run("--path", str(other), "import", str(bundle))
    assert status == 0 and "imported 2" in text
    status, text = await _run("--path", str(store_dir), "--json", "gc", "--max-size-mb", "0")
    assert status == 0 and sorted(json.loads(text)["removed_keys"]) == sorted(keys)
    status, text = await _run("--path", str(other), "gc", "--max-age-days", "1", "--dry-run")
    assert status == 0 and "would remove 0 kernel(s)" in text


@pytest.mark.asyncio
async def test_errors_exit_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "store.sqlite3").write_bytes(b"not sqlite" * 100)
    assert (await _run("--path", str(tmp_path), "ls"))[0] == 2
    assert "error:" in capsys.readouterr().err


def test_the_parser_needs_a_subcommand() -> None:
    with pytest.raises(SystemExit):
        _parse()


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(("--json", "--path", "{p}", "ls"), id="before"),
        pytest.param(("ls", "--json", "--path", "{p}"), id="after"),
        pytest.param(("--json", "ls", "--path", "{p}"), id="split"),
    ],
)
def test_common_options_go_before_or_after_the_sub_command(
    store_dir: Path, argv: tuple[str, ...]
) -> None:
    args = _parse(*(a.format(p=store_dir) for a in argv))
    assert (args.json, args.path, args.create, args.store_command) == (
        True,
        str(store_dir),
        False,
        "ls",
    )


@pytest.mark.asyncio
async def test_ls_json_after_the_sub_command_prints_json(
    store_dir: Path, kernels: list[Kernel]
) -> None:
    keys = await _fill(store_dir, kernels[:2])
    status, text = await _run("ls", "--json", "--path", str(store_dir))
    assert status == 0 and sorted(r["key"] for r in json.loads(text)) == sorted(keys)
