"""Read a kernel artifact (a ``torch.export.save`` archive) as plain data, checking it first.

``torch.export.load`` can run code found in an archive: it unpickles weights and constants the
archive marks as pickled, unpickles the sample inputs without restriction when a restricted load
fails, ``eval``\\ s symbolic-shape strings through sympy and ``exec``\\ s guard code and FX
source built from names in the graph. Kernel bytes are therefore never given to it. This module
reads the archive with :mod:`zipfile` and :mod:`json` only, on an allow-list:

* the zip: at most :data:`MAX_MEMBERS` members, all stored (no compression, so no zip bomb: the
  members together are no larger than the artifact), unencrypted, under one root folder, with no
  absolute, ``..``, backslash or duplicate names, and CRCs that match;
* members: only the paths ``torch.export.save`` writes for one program (:data:`_FIXED`, raw
  ``weight_<n>`` and ``tensor_<n>`` payloads); anything else is refused;
* weights and constants: raw little-endian bytes described by the JSON payload configs; an entry
  marked as pickled, a custom object, or a non-strided or symbolic-shaped tensor is refused;
* the sample inputs (a ``torch.save`` pickle torch writes into every archive): never unpickled,
  only scanned opcode by opcode; it may import nothing beyond the few tensor-rebuilding globals of
  :data:`_PICKLE_GLOBALS`.

The graph itself is rebuilt by :mod:`._graph`. Every refusal is an :class:`ArchiveRefused`
naming the offending member; :func:`~esper_async.kernels.load_kernel` maps it to
:class:`~esper_async.UnsafeKernelError`.
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import sys
import zipfile
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ("MAX_MEMBERS", "ArchiveRefused", "KernelArchive", "read_archive")

#: Most members an archive may have: a handful of fixed files plus one per weight storage.
MAX_MEMBERS = 4096

#: Members every archive of one exported program has, relative to its root folder.
_FIXED = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        "models/model.json",
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
        "data/sample_inputs/model.pt",
    }
)
_WEIGHTS_DIR = "data/weights/"
_CONSTANTS_DIR = "data/constants/"
_PAYLOAD = {
    _WEIGHTS_DIR: re.compile(r"weight_\d{1,9}"),
    _CONSTANTS_DIR: re.compile(r"tensor_\d{1,9}"),
}
_ROOT = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"

#: Serialized ``ScalarType`` values of torch's export schema (a stable, versioned enum).
DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.int8,
    3: torch.int16,
    4: torch.int32,
    5: torch.int64,
    6: torch.float16,
    7: torch.float32,
    8: torch.float64,
    12: torch.bool,
    13: torch.bfloat16,
}
#: Bound on a size, stride or offset: far past any real tensor, inside a C++ int64.
_MAX_EXTENT = 2**62
#: The schema's ``Layout.Strided``: the only layout a payload may have.
_STRIDED = 7

#: The globals the sample-inputs pickle may name: rebuilding plain tensors from their storages.
_PICKLE_GLOBALS = frozenset(
    {("torch._utils", "_rebuild_tensor_v2"), ("collections", "OrderedDict")}
    | {
        ("torch", f"{kind}Storage")
        for kind in (
            "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
        )
    }
)
#: Opcodes that import or call through a registry; STACK_GLOBAL is checked separately.
_PICKLE_REFUSED = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4"})
_PICKLE_STRINGS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING"}
)


class ArchiveRefused(Exception):
    """An archive holds something a kernel may not carry, or is not one this reader accepts.

    :ivar member: the member concerned, relative to the archive's root (``""`` for the zip).
    :ivar reason: what is wrong with it.
    """

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"{member or 'zip'}: {reason}")
        self.member = member
        self.reason = reason


@dataclass(frozen=True)
class KernelArchive:
    """The checked contents of a kernel archive.

    :ivar model: the program's JSON (``models/model.json``), parsed.
    :ivar weights: parameters and buffers by fully qualified name.
    :ivar constants: lifted tensor constants by name.
    """

    model: dict[str, Any]
    weights: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]


def read_archive(artifact: bytes) -> KernelArchive:
    """Check ``artifact`` and read its program JSON and tensors without unpickling anything.

    :raises ArchiveRefused: if any check fails.
    """
    members = _members(artifact, allowed=_allowed_member, what="kernel archive")
    if members.get("archive_format") != b"pt2":
        raise ArchiveRefused("archive_format", "this is not a pt2 archive")
    byteorder = members.get("byteorder", b"little").decode("ascii", "replace")
    if byteorder != sys.byteorder:
        raise ArchiveRefused("byteorder", f"payloads are {byteorder}-endian, this machine is not")
    for required in ("models/model.json", _WEIGHTS_DIR + "model_weights_config.json"):
        if required not in members:
            raise ArchiveRefused(required, "missing")
    if _SAMPLE_INPUTS in members:
        _scan_pickle_archive(members[_SAMPLE_INPUTS], _SAMPLE_INPUTS)
    model = _json(members, "models/model.json")
    weights = _payloads(members, _WEIGHTS_DIR, "model_weights_config.json")
    constants = _payloads(members, _CONSTANTS_DIR, "model_constants_config.json")
    return KernelArchive(model=model, weights=weights, constants=constants)


def _allowed_member(name: str) -> bool:
    if name in _FIXED:
        return True
    for folder, pattern in _PAYLOAD.items():
        if name.startswith(folder) and pattern.fullmatch(name[len(folder) :]):
            return True
    return False


def _members(data: bytes, *, allowed: Any, what: str) -> dict[str, bytes]:
    """The members of the zip ``data`` by name relative to its single root folder."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise ArchiveRefused("", f"not a readable {what} ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise ArchiveRefused("", f"{len(infos)} members; at most {MAX_MEMBERS} are read")
    declared = sum(info.file_size for info in infos)
    if declared > len(data):
        raise ArchiveRefused("", f"members declare {declared} bytes in a {len(data)}-byte zip")
    root: str | None = None
    out: dict[str, bytes] = {}
    for info in infos:
        full = info.filename
        head, sep, name = full.partition("/")
        if root is None:
            root = head
        bad_name = (
            not sep
            or head != root
            or not _ROOT.fullmatch(head)
            or "\\" in full
            or "\x00" in full
            or any(part in ("", ".", "..") for part in name.split("/"))
        )
        if bad_name:
            raise ArchiveRefused(full[:80], "a member name outside the archive's one root folder")
        if not allowed(name):
            raise ArchiveRefused(name[:80], f"not a member a {what} may have")
        if name in out:
            raise ArchiveRefused(name, "appears twice")
        if info.flag_bits & 0x1:
            raise ArchiveRefused(name, "encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ArchiveRefused(name, "compressed; torch.export.save stores members as they are")
        try:
            out[name] = archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, NotImplementedError) as exc:
            raise ArchiveRefused(name, f"unreadable ({exc})") from None
    return out


def _json(members: dict[str, bytes], name: str) -> dict[str, Any]:
    try:
        value = json.loads(members[name].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveRefused(name, f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise ArchiveRefused(name, "not a JSON object")
    return value


def _payloads(members: dict[str, bytes], folder: str, config_name: str) -> dict[str, torch.Tensor]:
    """Tensors described by a payload config, read from raw bytes, aliasing preserved."""
    config_path = folder + config_name
    if config_path not in members:
        return {}
    entries = _json(members, config_path).get("config")
    if not isinstance(entries, dict):
        raise ArchiveRefused(config_path, "has no 'config' mapping")
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, entry in entries.items():
        where = f"{config_path} entry {str(fqn)[:60]!r}"
        if not isinstance(entry, dict) or entry.get("use_pickle") is not False:
            raise ArchiveRefused(config_path, f"{where} is marked as pickled")
        path = entry.get("path_name")
        if not isinstance(path, str) or not _PAYLOAD[folder].fullmatch(path):
            raise ArchiveRefused(config_path, f"{where} points at {str(path)[:40]!r}")
        member = folder + path
        if member not in members:
            raise ArchiveRefused(member, "missing")
        meta = entry.get("tensor_meta")
        if not isinstance(meta, dict):
            raise ArchiveRefused(config_path, f"{where} has no tensor_meta")
        dtype, sizes, strides, offset = _tensor_meta(meta, config_path, where)
        if path not in flat:
            flat[path] = _flat(members[member], dtype, member)
        tensor = _strided(flat[path], sizes, strides, offset, member)
        requires_grad = meta.get("requires_grad") is True
        if entry.get("is_param") is not True:
            out[fqn] = tensor
        elif requires_grad and not (dtype.is_floating_point or dtype.is_complex):
            raise ArchiveRefused(config_path, f"{where} is a {dtype} parameter that needs grad")
        else:
            out[fqn] = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return out


def _tensor_meta(
    meta: dict[str, Any], member: str, where: str
) -> tuple[torch.dtype, list[int], list[int], int]:
    code = meta.get("dtype")
    dtype = DTYPES.get(code) if type(code) is int else None
    if dtype is None:
        raise ArchiveRefused(member, f"{where} has dtype {meta.get('dtype')!r}, not one read")
    if meta.get("layout", _STRIDED) != _STRIDED:
        raise ArchiveRefused(member, f"{where} is not a strided tensor")
    sizes = _ints(meta.get("sizes"), member, where)
    strides = _ints(meta.get("strides"), member, where)
    offset = _ints([meta.get("storage_offset")], member, where)[0]
    if len(sizes) != len(strides) or any(v < 0 for v in (*sizes, *strides, offset)):
        raise ArchiveRefused(member, f"{where} has inconsistent sizes and strides")
    return dtype, sizes, strides, offset


def _ints(values: Any, member: str, where: str) -> list[int]:
    """Concrete sizes (``{"as_int": n}``); a payload with symbolic sizes is refused."""
    if not isinstance(values, list):
        raise ArchiveRefused(member, f"{where} has no sizes")
    out = []
    for value in values:
        if not isinstance(value, dict) or type(value.get("as_int")) is not int:
            raise ArchiveRefused(member, f"{where} has a size that is not an integer")
        if not -_MAX_EXTENT < value["as_int"] < _MAX_EXTENT:
            raise ArchiveRefused(member, f"{where} has a size out of range")
        out.append(value["as_int"])
    return out


def _flat(data: bytes, dtype: torch.dtype, member: str) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if len(data) % size:
        raise ArchiveRefused(member, f"{len(data)} bytes is not a whole number of {dtype}")
    if not data:
        return torch.empty(0, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    if dtype is torch.bool and bool((flat.view(torch.uint8) > 1).any()):
        raise ArchiveRefused(member, "a bool tensor with bytes other than 0 and 1")
    return flat


def _strided(
    flat: torch.Tensor, sizes: list[int], strides: list[int], offset: int, member: str
) -> torch.Tensor:
    if 0 in sizes:
        return torch.empty(sizes, dtype=flat.dtype)
    if flat.numel() == 0:
        # torch.export.save writes no bytes only for tensors without data (fake tensors), which
        # a kernel never holds; inventing zeros of a declared size would let a file size memory.
        raise ArchiveRefused(member, f"holds no bytes for a tensor of shape {sizes[:8]}")
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))
    if last >= flat.numel():
        raise ArchiveRefused(member, f"a view reaches element {last} of {flat.numel()}")
    return torch.as_strided(flat, sizes, strides, offset)


def _scan_pickle_archive(data: bytes, member: str) -> None:
    """Check the ``torch.save`` zip ``data`` without unpickling it: its pickle may only rebuild
    tensors (see :data:`_PICKLE_GLOBALS`)."""
    try:
        inner = _members(data, allowed=lambda name: True, what="torch.save file")
    except ArchiveRefused as exc:
        raise ArchiveRefused(member, exc.reason) from None
    pickles = [name for name in inner if name.endswith(".pkl")]
    if pickles != ["data.pkl"]:
        raise ArchiveRefused(member, f"holds pickles {sorted(pickles)[:4]}, not one data.pkl")
    try:
        _scan_pickle(inner["data.pkl"])
    except ValueError as exc:
        raise ArchiveRefused(member, f"its pickle {exc}") from None


def _scan_pickle(data: bytes) -> None:
    """Walk the opcodes of pickle ``data`` (nothing is executed); raise ``ValueError`` on an
    import outside :data:`_PICKLE_GLOBALS` or an opcode that imports through a registry."""
    strings: list[str] = []
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in _PICKLE_REFUSED:
                raise ValueError(f"uses opcode {name}")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                _check_global(module, attr)
            elif name == "STACK_GLOBAL":
                # Only when the module and name were pushed just before as literal strings.
                if len(strings) < 2:
                    raise ValueError("imports a name it does not spell out")
                _check_global(strings[-2], strings[-1])
            if name in _PICKLE_STRINGS:
                strings.append(str(arg))
            elif name not in ("BINPUT", "LONG_BINPUT", "MEMOIZE", "PUT"):
                strings.clear()
    except ValueError:
        raise
    except Exception as exc:  # pickletools raises assorted errors on malformed streams
        raise ValueError(f"is malformed ({exc})") from None


def _check_global(module: str, attr: str) -> None:
    if (module, attr) not in _PICKLE_GLOBALS:
        raise ValueError(f"imports {module[:40]}.{attr[:40]}")
