"""Writing kernel rows: the SQL shared by ``put``, bundle import and quarantine.

Each function runs inside the caller's write transaction (``KernelStore._db(mode="write")``),
so an import of many rows commits them together or not at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiosqlite

from ..blueprints import Blueprint
from ..kernels import KernelMetadata
from ._records import KernelStatus

__all__ = ("NewRow", "insert_row", "quarantine_row")


@dataclass(frozen=True)
class NewRow:
    """A kernel row about to be written.

    :ivar key: the store key.
    :ivar metadata: the kernel's metadata (its blob is already on disk).
    :ivar nbytes: the artifact's size.
    :ivar blueprint: the blueprint it was built from (for the lineage table).
    :ivar status: ``READY`` or ``REJECTED``.
    :ivar tags: labels to add.
    :ivar report: a validation report to record if the row is created or replaced.
    :ivar request_text: the canonical request document the key hashes, or ``None``.
    """

    key: str
    metadata: KernelMetadata
    nbytes: int
    blueprint: Blueprint
    status: KernelStatus
    tags: tuple[str, ...] = ()
    report: Mapping[str, Any] | None = None
    request_text: str | None = None

    @property
    def kernel_id(self) -> str:
        """The kernel id (the sha256 of the artifact)."""
        return self.metadata.sha256


async def insert_row(conn: aiosqlite.Connection, row: NewRow, now: float) -> str:
    """Create the row, or replace a row that is not ready; a ready row stays (first wins).

    :returns: the kernel id stored under the key afterwards.
    """
    metadata, blueprint = row.metadata, row.blueprint
    await conn.execute(
        "INSERT OR IGNORE INTO blueprints (blueprint_id, family, blueprint_json, "
        "first_seen_at) VALUES (?, ?, ?, ?)",
        (blueprint.id, blueprint.family, blueprint.to_json(), now),
    )
    sql = "SELECT kernel_id, status FROM kernels WHERE key = ?"
    async with conn.execute(sql, (row.key,)) as cursor:
        existing = await cursor.fetchone()
    values = (
        row.kernel_id,
        blueprint.id,
        blueprint.to_json(),
        json.dumps(metadata.to_json(), sort_keys=True),
        row.nbytes,
        now,
        row.status.value,
        metadata.torch_version,
        metadata.device_kind,
        row.request_text,
    )
    changed = True
    if existing is None:
        await conn.execute(
            "INSERT INTO kernels (kernel_id, blueprint_id, blueprint_json, metadata_json, "
            "nbytes, created_at, status, torch_version, device_kind, request_json, key) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, row.key),
        )
    elif existing[1] == KernelStatus.READY.value:
        changed = False
    else:
        await conn.execute(
            "UPDATE kernels SET kernel_id = ?, blueprint_id = ?, blueprint_json = ?, "
            "metadata_json = ?, nbytes = ?, created_at = ?, status = ?, "
            "torch_version = ?, device_kind = ?, request_json = ? WHERE key = ?",
            (*values, row.key),
        )
    await conn.executemany(
        "INSERT OR IGNORE INTO tags (key, tag) VALUES (?, ?)",
        [(row.key, t) for t in sorted(set(row.tags))],
    )
    if changed and row.report is not None:
        await conn.execute(
            "INSERT INTO validation_reports (key, passed, report_json, created_at) "
            "VALUES (?, ?, ?, ?)",
            (
                row.key,
                int(row.status is not KernelStatus.REJECTED),
                json.dumps(dict(row.report), sort_keys=True, default=str),
                now,
            ),
        )
    if changed or existing is None:
        return row.kernel_id
    return str(existing[0])


async def quarantine_row(
    conn: aiosqlite.Connection, key: str, kernel_id: str | None, reason: str, now: float
) -> None:
    """Mark one row quarantined (its blob is left alone: it may serve other keys) and log why."""
    await conn.execute(
        "UPDATE kernels SET status = ? WHERE key = ?", (KernelStatus.QUARANTINED.value, key)
    )
    await conn.execute(
        "INSERT INTO quarantine (kernel_id, key, reason, path, quarantined_at) "
        "VALUES (?, ?, ?, NULL, ?)",
        (kernel_id or "", key, reason, now),
    )
