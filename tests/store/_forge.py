"""Hand-made bundles for the hostile-input tests: any manifest, any members, any compression."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from esper_async.kernels import Kernel
from esper_async.store import KernelRequest
from esper_async.store._bundle import BUNDLE_FORMAT, BUNDLE_VERSION


def entry(kernel: Kernel, asked: KernelRequest, /, **changes: Any) -> dict[str, Any]:
    """A manifest entry for ``kernel`` under ``asked`` (valid unless ``changes`` break it)."""
    item: dict[str, Any] = {
        "key": asked.key,
        "kernel_id": kernel.kernel_id,
        "metadata": kernel.metadata.to_json(),
        "request": copy.deepcopy(asked.document),
        "tags": ["forged"],
        "validation_reports": [{"passed": True, "report": {"max_abs_error": 0.0}}],
        "blob": f"blobs/{kernel.kernel_id}",
    }
    item.update(changes)
    return item


def manifest(*entries: dict[str, Any]) -> dict[str, Any]:
    """A manifest holding ``entries``."""
    return {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "entries": list(entries)}


def write_tar(
    path: Path,
    members: list[tuple[str, bytes] | tarfile.TarInfo],
    *,
    compression: str = "",
) -> Path:
    """Write ``members`` (name and bytes, or a ready TarInfo without data) in that order."""
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_bundle(
    path: Path, manifest_data: Any, kernels: list[Kernel], *, compression: str = ""
) -> Path:
    """A bundle with ``manifest_data`` (JSON-encoded unless bytes) and the kernels' blobs."""
    raw = manifest_data if isinstance(manifest_data, bytes) else json.dumps(manifest_data).encode()
    members: list[tuple[str, bytes] | tarfile.TarInfo] = [("manifest.json", raw)]
    seen: set[str] = set()
    for kernel in kernels:
        if kernel.kernel_id not in seen:
            seen.add(kernel.kernel_id)
            members.append((f"blobs/{kernel.kernel_id}", kernel.artifact))
    return write_tar(path, members, compression=compression)
