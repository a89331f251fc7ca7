"""``esper-async store ls|stats|gc|verify|export|import``: look after a kernel store.

Errors of the store (one that cannot be opened, a malformed row, a refused bundle) are printed
as one ``error:`` line, never a traceback, with exit status 2.

The main ``esper-async`` parser calls :func:`add_store_parser` on its sub-parsers and, for the
``store`` command, awaits :func:`run_store_command`. This is a command-line front end, so it
prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ..errors import StoreError
from ._bundle import (
    DEFAULT_MAX_MEMBER_BYTES,
    DEFAULT_MAX_MEMBERS,
    DEFAULT_MAX_TOTAL_BYTES,
    BundleLimits,
)
from ._keys import STORE_ENV_VAR, default_store_path
from ._records import KernelRecord, KernelStatus
from ._store import KernelStore

__all__ = ("add_store_parser", "run_store_command")

#: Exit statuses.
EXIT_OK = 0
EXIT_PROBLEMS_FOUND = 1
EXIT_ERROR = 2


def add_store_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``store`` command and its sub-commands to ``subparsers``.

    :param subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    :returns: the ``store`` parser.
    """
    store = subparsers.add_parser(
        "store",
        help="inspect and look after the kernel store",
        description="Inspect and look after the kernel store.",
    )
    _common_options(store, top=True)
    commands = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")

    ls = commands.add_parser("ls", help="list kernels")
    ls.add_argument("--blueprint", help="blueprint id (bp-...) or family name")
    ls.add_argument("--tag", help="only kernels with this tag")
    ls.add_argument("--status", choices=[s.value for s in KernelStatus], help="only this status")
    ls.add_argument("--limit", type=int, default=None, help="at most this many")

    commands.add_parser("stats", help="store statistics")

    gc = commands.add_parser("gc", help="remove old kernels and unused files")
    gc.add_argument("--max-age-days", type=float, default=None, help="remove unused for this long")
    gc.add_argument("--max-size-mb", type=float, default=None, help="shrink artifacts to this size")
    gc.add_argument(
        "--orphan-grace-s",
        type=float,
        default=3600.0,
        help="keep unreferenced and temporary files younger than this (default 3600)",
    )
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")

    commands.add_parser(
        "verify", help="check every row and every artifact's sha256; quarantine bad ones"
    )

    export = commands.add_parser("export", help="write kernels to a bundle (tar)")
    export.add_argument("bundle", help="bundle file to write")
    export.add_argument("--blueprint", help="blueprint id (bp-...) or family name")
    export.add_argument("--tag", help="only kernels with this tag")
    export.add_argument("--key", action="append", dest="keys", help="a key to export (repeatable)")

    imp = commands.add_parser(
        "import", help="read kernels from a bundle (all or none; each is validated again)"
    )
    imp.add_argument("bundle", help="bundle file to read")
    mib = 1024 * 1024
    imp.add_argument(
        "--max-member-mb",
        type=float,
        default=DEFAULT_MAX_MEMBER_BYTES / mib,
        help="refuse an artifact larger than this (MiB)",
    )
    imp.add_argument(
        "--max-total-mb",
        type=float,
        default=DEFAULT_MAX_TOTAL_BYTES / mib,
        help="refuse a bundle holding more than this uncompressed (MiB)",
    )
    imp.add_argument(
        "--max-members",
        type=int,
        default=DEFAULT_MAX_MEMBERS,
        help="refuse a bundle with more members than this",
    )
    for command in commands.choices.values():
        _common_options(command, top=False)
    return store


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--path``, ``--json`` and ``--create``, taken before the sub-command's name
    (``store --json ls``) or after it (``store ls --json``). After it, the default is left out,
    so that it does not undo one given before."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--path",
        default=default(None),
        help=f"store directory (default: ${STORE_ENV_VAR} or the user cache directory)",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of text"
    )
    parser.add_argument(
        "--create",
        action="store_true",
        default=default(False),
        help="create the store directory if it does not exist (otherwise a missing store is "
        "refused; `import` always creates it)",
    )


def _store_path(args: argparse.Namespace) -> tuple[Path, bool]:
    """The store directory ``args`` name, and whether it is missing and may not be created
    (only ``--create`` and ``import`` create a store)."""
    path = Path(args.path).expanduser() if args.path else default_store_path()
    creates = getattr(args, "create", False) or args.store_command == "import"
    return path, not creates and not path.exists()


async def run_store_command(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """Run the ``store`` sub-command that ``args`` names.

    :param args: parsed by a parser set up with :func:`add_store_parser`.
    :param out: where to print (standard output by default).
    :returns: 0 on success, 1 when ``verify`` found (and quarantined) anything wrong, 2 on
        errors (a store that cannot be opened, a refused bundle, a malformed row ...).
    """
    out = out or sys.stdout
    path, missing = _store_path(args)
    if missing:
        print(
            f"error: no kernel store at {path}; check --path (or ${STORE_ENV_VAR}), or pass "
            "--create to make a new one there",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        async with KernelStore(path) as store:
            return await _dispatch(store, args, out)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # bad limits given on the command line
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


async def _dispatch(store: KernelStore, args: argparse.Namespace, out: TextIO) -> int:
    command = args.store_command
    if command == "ls":
        records = await store.list_kernels(
            blueprint=args.blueprint, tag=args.tag, status=args.status, limit=args.limit
        )
        if args.json:
            _print_json([r.to_json() for r in records], out)
        else:
            _print_records(records, out)
        return EXIT_OK
    if command == "stats":
        stats = await store.stats()
        if args.json:
            _print_json(stats.to_json(), out)
        else:
            kernels = ", ".join(f"{n} {s}" for s, n in sorted(stats.kernels.items())) or "none"
            print(f"store        {stats.path} (schema v{stats.schema_version})", file=out)
            print(f"kernels      {kernels}", file=out)
            print(f"blueprints   {stats.blueprints}", file=out)
            print(f"artifacts    {_size(stats.total_bytes)}", file=out)
            print(f"quarantined  {stats.quarantine_events} event(s)", file=out)
        return EXIT_OK
    if command == "gc":
        report = await store.gc(
            max_age_s=None if args.max_age_days is None else args.max_age_days * 86400.0,
            max_total_bytes=None if args.max_size_mb is None else int(args.max_size_mb * 1e6),
            orphan_grace_s=args.orphan_grace_s,
            dry_run=args.dry_run,
        )
        payload = {
            "removed_keys": list(report.removed_keys),
            "removed_blobs": report.removed_blobs,
            "orphan_blobs": report.orphan_blobs,
            "stale_files": report.stale_files,
            "freed_bytes": report.freed_bytes,
            "dry_run": report.dry_run,
        }
        if args.json:
            _print_json(payload, out)
        else:
            verb = "would remove" if report.dry_run else "removed"
            print(
                f"{verb} {len(report.removed_keys)} kernel(s), {report.orphan_blobs} orphan "
                f"blob(s), {report.stale_files} stale file(s); freed {_size(report.freed_bytes)}",
                file=out,
            )
        return EXIT_OK
    if command == "verify":
        result = await store.verify()
        if args.json:
            _print_json(
                {
                    "checked": result.checked,
                    "ok": result.ok,
                    "quarantined": list(result.quarantined),
                    "orphans": result.orphans,
                    "bad_rows": list(result.bad_rows),
                    "irregular": list(result.irregular),
                    "problems": result.problems,
                },
                out,
            )
        else:
            print(f"checked {result.checked} artifact(s): {result.ok} ok", file=out)
            for kernel_id in result.quarantined:
                print(f"quarantined {kernel_id} (recompiled on next use)", file=out)
            for key in result.bad_rows:
                print(f"quarantined the row of key {key} (it failed its checks)", file=out)
            for digest in result.irregular:
                print(f"moved {digest} to quarantine/ (not a regular file)", file=out)
            if result.orphans:
                print(f"{result.orphans} unreferenced blob(s); `store gc` removes them", file=out)
        return EXIT_PROBLEMS_FOUND if result.problems else EXIT_OK
    if command == "export":
        count = await store.export_bundle(
            args.bundle, keys=args.keys, blueprint=args.blueprint, tag=args.tag
        )
        print(f"exported {count} kernel(s) to {args.bundle}", file=out)
        return EXIT_OK
    if command == "import":
        limits = BundleLimits(
            max_member_bytes=int(args.max_member_mb * 1024 * 1024),
            max_total_bytes=int(args.max_total_mb * 1024 * 1024),
            max_members=args.max_members,
        )
        count = await store.import_bundle(args.bundle, limits=limits)
        print(f"imported {count} kernel(s) from {args.bundle}", file=out)
        return EXIT_OK
    raise StoreError(f"unknown store command {command!r}; try ls, stats, gc, verify")


def _print_json(payload: Any, out: TextIO) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True), file=out)


def _print_records(records: list[KernelRecord], out: TextIO) -> None:
    if not records:
        print("no kernels", file=out)
        return
    print(f"{'KEY':14} {'KERNEL':14} {'STATUS':11} {'SIZE':>9} {'HITS':>5}  BLUEPRINT", file=out)
    for r in records:
        tags = f"  [{', '.join(r.tags)}]" if r.tags else ""
        print(
            f"{r.key[:12]:14} {r.kernel_id[:12]:14} {r.status.value:11} {_size(r.nbytes):>9} "
            f"{r.hits:>5}  {r.family} {r.blueprint_id}{tags}",
            file=out,
        )


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{nbytes} B"  # pragma: no cover
