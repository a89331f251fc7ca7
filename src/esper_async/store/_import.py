"""Validating the kernels of a bundle again, locally, before any of them is stored.

An imported "passed" report proves nothing, so every artifact is run through the project's own
:class:`~esper_async.compiler.KernelValidator` (loaded in its recorded execution form, compared
with an eager module built from its blueprint and seed) in this process. Any failure refuses the
whole import.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import anyio

from ..blueprints import Blueprint
from ..errors import StoreIntegrityError
from ..kernels import Kernel
from ._bundle import ManifestEntry, StagedBundle
from ._keys import canonical_text
from ._records import KernelStatus
from ._rows import NewRow
from ._untrusted import clip

__all__ = ("checked_rows", "validate_entry")


async def checked_rows(staged: StagedBundle) -> list[NewRow]:
    """Validate every entry of a staged bundle (each in a worker thread) and return the rows
    to commit; the first failure refuses the whole bundle.

    :raises StoreIntegrityError: if a kernel fails validation.
    """
    rows: list[NewRow] = []
    for entry in staged.entries:
        where = f"bundle {staged.source.name} entry {entry.index} (key {entry.key[:12]})"
        report, nbytes = await anyio.to_thread.run_sync(
            validate_entry, entry, staged.files[entry.kernel_id], where
        )
        rows.append(
            NewRow(
                key=entry.key,
                metadata=entry.metadata,
                nbytes=nbytes,
                blueprint=Blueprint.from_json(entry.metadata.blueprint_json),
                status=KernelStatus.READY,
                tags=entry.tags,
                report=report,
                request_text=canonical_text(entry.request),
            )
        )
    return rows


def validate_entry(entry: ManifestEntry, staged: Path, where: str) -> tuple[dict[str, Any], int]:
    """Load the staged artifact of ``entry`` and validate it (blocking: run in a thread).

    :param entry: a checked manifest entry.
    :param staged: the file its artifact was staged to (hash checked while staging).
    :param where: the entry, for messages.
    :returns: the local validation report (JSON-ready) and the artifact's size.
    :raises StoreIntegrityError: if the kernel fails validation (or validating it raises).
    """
    # Imported here: the compiler package imports the store.
    from ..compiler._validator import KernelValidator

    artifact = staged.read_bytes()
    if hashlib.sha256(artifact).hexdigest() != entry.kernel_id:
        raise StoreIntegrityError(
            f"{where}: the staged artifact changed on disk; nothing was imported", key=entry.key
        )
    kernel = Kernel(artifact=artifact, metadata=entry.metadata)
    try:
        report = KernelValidator(seed=entry.metadata.init_seed).validate(kernel)
    except Exception as exc:
        raise StoreIntegrityError(
            f"{where}: validating kernel {entry.kernel_id[:12]} raised "
            f"{type(exc).__name__}: {clip(str(exc), 120)}; nothing was imported",
            key=entry.key,
        ) from exc
    if not report.passed:
        failed = ", ".join(f"{c.name} ({clip(c.detail, 60)})" for c in report.failures[:4])
        raise StoreIntegrityError(
            f"{where}: kernel {entry.kernel_id[:12]} failed local validation: {failed}; "
            "nothing was imported",
            key=entry.key,
        )
    return {"local": True, **report.to_json()}, len(artifact)
