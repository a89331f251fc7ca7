"""The store's SQLite schema, its version and the migrations between versions.

The schema version lives in SQLite's ``PRAGMA user_version`` (0 for an empty file). A fresh
store runs every migration from 1 up, so the upgrade path is the path every store takes.
Migrations run inside one ``BEGIN IMMEDIATE`` transaction: when several processes open the
same store at once, the first takes the write lock and migrates, the others wait on the busy
timeout, then read the new version and find nothing to do.

Version history::

    1  kernels (key → kernel id, blueprint, metadata), validation_reports, usage
    2  blueprints (lineage: blueprint → kernels), kernel status / torch version / device kind
       columns, tags, quarantine log
    3  kernels.request_json: the request document each key is the hash of (NULL for rows
       written before; such rows are served, but cannot be exported)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosqlite

from ..errors import StoreError

__all__ = ("MIGRATIONS", "SCHEMA_VERSION", "migrate", "read_version")

_V1 = (
    """
    CREATE TABLE kernels (
        key            TEXT PRIMARY KEY,
        kernel_id      TEXT NOT NULL,
        blueprint_id   TEXT NOT NULL,
        blueprint_json TEXT NOT NULL,
        metadata_json  TEXT NOT NULL,
        nbytes         INTEGER NOT NULL,
        created_at     REAL NOT NULL
    )
    """,
    "CREATE INDEX kernels_blueprint ON kernels(blueprint_id)",
    """
    CREATE TABLE validation_reports (
        id          INTEGER PRIMARY KEY,
        key         TEXT NOT NULL REFERENCES kernels(key) ON DELETE CASCADE,
        passed      INTEGER NOT NULL,
        report_json TEXT NOT NULL,
        created_at  REAL NOT NULL
    )
    """,
    "CREATE INDEX validation_reports_key ON validation_reports(key)",
    """
    CREATE TABLE usage (
        key          TEXT PRIMARY KEY REFERENCES kernels(key) ON DELETE CASCADE,
        hits         INTEGER NOT NULL DEFAULT 0,
        last_used_at REAL
    )
    """,
)

_V2 = (
    """
    CREATE TABLE blueprints (
        blueprint_id   TEXT PRIMARY KEY,
        family         TEXT NOT NULL,
        blueprint_json TEXT NOT NULL,
        first_seen_at  REAL NOT NULL
    )
    """,
    # Lineage of the kernels v1 already holds; json_extract is built into SQLite >= 3.38.
    """
    INSERT OR IGNORE INTO blueprints (blueprint_id, family, blueprint_json, first_seen_at)
    SELECT blueprint_id, COALESCE(json_extract(blueprint_json, '$.family'), ''),
           blueprint_json, MIN(created_at)
    FROM kernels GROUP BY blueprint_id
    """,
    "ALTER TABLE kernels ADD COLUMN status TEXT NOT NULL DEFAULT 'ready'",
    "ALTER TABLE kernels ADD COLUMN torch_version TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE kernels ADD COLUMN device_kind TEXT NOT NULL DEFAULT ''",
    """
    UPDATE kernels SET
        torch_version = COALESCE(json_extract(metadata_json, '$.torch_version'), ''),
        device_kind = COALESCE(json_extract(metadata_json, '$.device_kind'), '')
    """,
    "CREATE INDEX kernels_status ON kernels(status)",
    "CREATE INDEX kernels_kernel_id ON kernels(kernel_id)",
    """
    CREATE TABLE tags (
        key TEXT NOT NULL REFERENCES kernels(key) ON DELETE CASCADE,
        tag TEXT NOT NULL,
        PRIMARY KEY (key, tag)
    )
    """,
    "CREATE INDEX tags_tag ON tags(tag)",
    """
    CREATE TABLE quarantine (
        id             INTEGER PRIMARY KEY,
        kernel_id      TEXT NOT NULL,
        key            TEXT,
        reason         TEXT NOT NULL,
        path           TEXT,
        quarantined_at REAL NOT NULL
    )
    """,
)

_V3 = ("ALTER TABLE kernels ADD COLUMN request_json TEXT",)

#: ``MIGRATIONS[v - 1]`` holds the statements that take a store from version ``v - 1`` to ``v``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3)

#: The schema version this code reads and writes.
SCHEMA_VERSION = len(MIGRATIONS)


async def read_version(conn: aiosqlite.Connection) -> int:
    """The schema version of the open database (0 for an empty one)."""
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def migrate(
    conn: aiosqlite.Connection, *, refuse_fresh: Callable[[], Awaitable[None]] | None = None
) -> tuple[int, int]:
    """Bring the schema up to :data:`SCHEMA_VERSION` inside the caller's write transaction.

    The caller opens ``BEGIN IMMEDIATE`` first (so the version read here cannot change under
    it) and commits or rolls back afterwards; a failed migration leaves the old version intact.

    :param conn: a connection in autocommit mode with a write transaction open.
    :param refuse_fresh: awaited before creating the schema in an empty database; it raises
        to refuse (the store uses it when blobs exist without an index).
    :returns: the versions before and after.
    :raises StoreError: if the store was written by a newer schema than this code knows, or
        whatever ``refuse_fresh`` raises.
    """
    found = await read_version(conn)
    if found == 0 and refuse_fresh is not None:
        await refuse_fresh()
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"the store has schema version {found}, newer than this esper_async reads "
            f"({SCHEMA_VERSION}); upgrade esper_async or point ESPER_ASYNC_STORE elsewhere"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1]:
            await conn.execute(statement)
        # PRAGMA does not take parameters; ``version`` is an int from this module.
        await conn.execute(f"PRAGMA user_version = {int(version)}")
    return found, SCHEMA_VERSION
