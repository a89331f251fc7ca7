"""Reading bundles as hostile input: bounds enforced while reading, only plain members, and a
typed error naming the entry for every malformed manifest."""

from __future__ import annotations

import copy
import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from esper_async.errors import StoreError, StoreIntegrityError
from esper_async.kernels import Kernel
from esper_async.store import BundleEntry, BundleLimits
from esper_async.store._bundle import parse_manifest, stage_bundle, write_bundle

from . import _forge
from .conftest import request_for


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def _good(kernels: list[Kernel]) -> dict[str, Any]:
    return _forge.manifest(
        *(_forge.entry(k, request_for(k.blueprint, i=i)) for i, k in enumerate(kernels))
    )


def test_round_trip_stages_hash_checked_artifacts(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    requests = [request_for(k.blueprint, i=i) for i, k in enumerate(kernels[:2])]
    entries = [
        BundleEntry(r.key, k.metadata.to_json(), k.artifact, ("t",), (), r.document)
        for r, k in zip(requests, kernels, strict=False)
    ]
    write_bundle(tmp_path / "b.tar", entries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "staging"]  # no temporary
    staged = stage_bundle(tmp_path / "b.tar", staging)
    assert [e.key for e in staged.entries] == [r.key for r in requests]
    assert [e.metadata for e in staged.entries] == [k.metadata for k in kernels[:2]]
    for kernel in kernels[:2]:
        assert staged.files[kernel.kernel_id].read_bytes() == kernel.artifact
    staged.discard()
    assert list(staging.iterdir()) == []


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_bundles_are_read(
    tmp_path: Path, staging: Path, kernels: list[Kernel], compression: str
) -> None:
    path = _forge.write_bundle(
        tmp_path / "b.tar", _good(kernels[:1]), kernels[:1], compression=compression
    )
    staged = stage_bundle(path, staging)
    assert staged.files[kernels[0].kernel_id].read_bytes() == kernels[0].artifact


def test_a_tampered_artifact_stages_nothing(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    data = bytearray(kernels[1].artifact)
    data[len(data) // 2] ^= 0xFF
    bad = Kernel(bytes(data), kernels[1].metadata)
    path = _forge.write_bundle(tmp_path / "b.tar", _good(kernels[:2]), [kernels[0], bad])
    with pytest.raises(StoreIntegrityError, match=r"entry 1.*hashes to.*nothing was imported"):
        stage_bundle(path, staging)
    assert list(staging.iterdir()) == []


def test_a_missing_artifact_is_an_integrity_error(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    path = _forge.write_bundle(tmp_path / "b.tar", _good(kernels[:2]), kernels[:1])
    with pytest.raises(StoreIntegrityError, match="entry 1: no artifact"):
        stage_bundle(path, staging)
    assert list(staging.iterdir()) == []


# -- bounds --------------------------------------------------------------------------------


def test_a_compressed_bomb_is_refused_while_reading(tmp_path: Path, staging: Path) -> None:
    # 64 MiB of zeros compresses to ~64 kB; the cap stops it at its header, before any read.
    path = tmp_path / "bomb.tar.gz"
    with gzip.open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        empty = json.dumps(_forge.manifest()).encode()
        tar.addfile(_info("manifest.json", len(empty)), io.BytesIO(empty))
        tar.addfile(_info("blobs/" + "0" * 64, 64 * 2**20), _Zeros(64 * 2**20))
    assert path.stat().st_size < 2**20
    limits = BundleLimits(max_member_bytes=2**20, max_total_bytes=4 * 2**20)
    with pytest.raises(StoreError, match="over the 1048576 allowed"):
        stage_bundle(path, staging, limits)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        pytest.param(BundleLimits(max_member_bytes=1000), "over the 1000 allowed", id="member"),
        pytest.param(BundleLimits(max_total_bytes=30_000), "over 30000 bytes", id="total"),
        pytest.param(BundleLimits(max_members=2), "over 2 entries", id="entries"),
        pytest.param(BundleLimits(max_manifest_bytes=100), "over the 100 allowed", id="manifest"),
    ],
)
def test_each_bound_is_enforced(
    tmp_path: Path, staging: Path, kernels: list[Kernel], limits: BundleLimits, message: str
) -> None:
    path = _forge.write_bundle(tmp_path / "b.tar", _good(kernels[:3]), kernels[:3])
    with pytest.raises(StoreError, match=message):
        stage_bundle(path, staging, limits)
    assert list(staging.iterdir()) == []


def test_the_member_count_is_bounded_while_reading(
    tmp_path: Path, staging: Path, kernels: list[Kernel]
) -> None:
    path = _forge.write_bundle(tmp_path / "b.tar", _good(kernels[:3]), kernels[:3])
    with pytest.raises(StoreError, match="over 3 members"):  # 3 entries, 4 members
        stage_bundle(path, staging, BundleLimits(max_members=3))
    assert list(staging.iterdir()) == []


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path, staging: Path) -> None:
    info = _info("manifest.json", 2)
    info.pax_headers = {"comment": "x" * (2 * 2**20)}
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(StoreError, match="asks to read"):
        stage_bundle(path, staging)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_members"):
        BundleLimits(max_members=0)


# -- members -------------------------------------------------------------------------------


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"\0" * n
        self.left -= n
        return n


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = _info(name, 0, kind)
    info.linkname = target
    return info


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(_link("blobs/" + "a" * 64, "/etc/passwd", tarfile.SYMTYPE), id="symlink"),
        pytest.param(_link("blobs/" + "a" * 64, "manifest.json", tarfile.LNKTYPE), id="hardlink"),
        pytest.param(_info("blobs/" + "a" * 64, 0, tarfile.DIRTYPE), id="directory"),
        pytest.param(_info("blobs/" + "a" * 64, 0, tarfile.FIFOTYPE), id="fifo"),
        pytest.param(_info("blobs/" + "a" * 64, 0, tarfile.CHRTYPE), id="device"),
        pytest.param(("../../evil", b"x"), id="traversal"),
        pytest.param(("/etc/cron.d/evil", b"x"), id="absolute"),
        pytest.param(("blobs/../../" + "a" * 64, b"x"), id="traversal-in-blobs"),
        pytest.param(("blobs/" + "A" * 64, b"x"), id="not-a-digest"),
        pytest.param(("notes.txt", b"x"), id="unexpected-name"),
        pytest.param(("blobs/" + "b" * 64, b"x"), id="blob-not-in-manifest"),
    ],
)
def test_members_other_than_manifest_and_listed_blobs_are_refused(
    tmp_path: Path, staging: Path, member: tuple[str, bytes] | tarfile.TarInfo
) -> None:
    path = _forge.write_tar(
        tmp_path / "b.tar",
        [
            (
                "manifest.json",
                b'{"format": "esper_async.kernel_bundle", "version": 2, "entries": []}',
            ),
            member,
        ],
    )
    with pytest.raises(StoreError, match="refused"):
        stage_bundle(path, staging)
    assert list(staging.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.tar", "staging"]


def test_the_manifest_must_come_first(tmp_path: Path, staging: Path, kernels: list[Kernel]) -> None:
    blob = (f"blobs/{kernels[0].kernel_id}", kernels[0].artifact)
    raw = json.dumps(_good(kernels[:1])).encode()
    path = _forge.write_tar(tmp_path / "b.tar", [blob, ("manifest.json", raw)])
    with pytest.raises(StoreError, match=r"first member must be manifest\.json"):
        stage_bundle(path, staging)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"not a tar file at all", id="not-tar"),
        pytest.param(b"\x1f\x8b\x08\x00garbage", id="broken-gzip"),
        pytest.param(b"", id="empty-file"),
    ],
)
def test_files_that_are_not_bundles_are_refused(
    tmp_path: Path, staging: Path, content: bytes
) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(content)
    with pytest.raises(StoreError):
        stage_bundle(path, staging)


# -- malformed manifests ---------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def _set(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    target: Any = data
    for step in path[:-1]:
        target = target[step]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()
E0 = ("entries", 0)
MALFORMED = [
    pytest.param((), [1, 2], "must be a JSON object", id="manifest-is-a-list"),
    pytest.param(("format",), "tarball", "not an esper_async kernel bundle", id="format"),
    pytest.param(("version",), 1, "re-export", id="version-1"),
    pytest.param(("version",), True, "not an esper_async kernel bundle", id="version-bool"),
    pytest.param(("entries",), {"0": {}}, "'entries' list", id="entries-dict"),
    pytest.param(("entries",), _DELETE, "'entries' list", id="entries-missing"),
    pytest.param(("surprise",), 1, "no other fields", id="extra-top-field"),
    pytest.param(E0, "junk", "entry 0: must be a JSON object", id="entry-string"),
    pytest.param((*E0, "key"), _DELETE, "entry 0: 'key'", id="key-missing"),
    pytest.param((*E0, "key"), 7, "entry 0: 'key'", id="key-int"),
    pytest.param((*E0, "key"), "k" * 10**6, "entry 0: 'key'", id="key-huge"),
    pytest.param((*E0, "kernel_id"), None, "'kernel_id'", id="kernel-id-none"),
    pytest.param((*E0, "blob"), "../../etc/passwd", "'blob'", id="blob-path"),
    pytest.param((*E0, "request"), _DELETE, "no request document", id="request-missing"),
    pytest.param((*E0, "request"), [], "request must be a JSON object", id="request-list"),
    pytest.param((*E0, "request", "optimizer"), "fast", "'optimizer'", id="request-optimizer"),
    pytest.param((*E0, "request", "key_version"), 99, "key_version", id="request-key-version"),
    pytest.param((*E0, "request", "blueprint"), {"family": "nope"}, "blueprint", id="request-bp"),
    pytest.param((*E0, "request", "extra"), 1, "exactly the fields", id="request-extra"),
    pytest.param((*E0, "metadata"), None, "metadata must be a JSON object", id="metadata-none"),
    pytest.param((*E0, "metadata", "sha256"), 5, "'sha256'", id="metadata-sha-int"),
    pytest.param((*E0, "metadata", "contract"), _DELETE, "'contract'", id="contract-missing"),
    pytest.param(
        (*E0, "metadata", "contract"),
        {"kind": "linear", "shape": [-1]},
        "slot contract",
        id="contract-negative",
    ),
    pytest.param((*E0, "metadata", "input_shape"), "8", "'input_shape'", id="shape-string"),
    pytest.param((*E0, "metadata", "input_shape"), [16], "disagree", id="shape-vs-contract"),
    pytest.param((*E0, "metadata", "output_shape"), [[8]], "'output_shape'", id="shape-nested"),
    pytest.param((*E0, "metadata", "param_count"), -1, "'param_count'", id="params-negative"),
    pytest.param((*E0, "metadata", "init_seed"), 1.5, "'init_seed'", id="seed-float"),
    pytest.param((*E0, "metadata", "compile_s"), "slow", "'compile_s'", id="compile-s-string"),
    pytest.param((*E0, "metadata", "extra"), [1], "'extra'", id="extra-list"),
    pytest.param((*E0, "metadata", "torch_version"), "x" * 10**6, "'torch_version'", id="huge"),
    pytest.param((*E0, "metadata", "blueprint_json"), "{", "blueprint", id="bp-json-broken"),
    pytest.param(
        (*E0, "metadata", "blueprint_json"),
        {"family": "mlp"},
        "'blueprint_json'",
        id="bp-json-dict",
    ),
    pytest.param((*E0, "metadata", "surprise"), 1, "unknown field", id="metadata-extra"),
    pytest.param((*E0, "tags"), "a,b", "'tags'", id="tags-string"),
    pytest.param((*E0, "tags"), [["nested"]], "'tags'", id="tags-nested"),
    pytest.param((*E0, "tags"), ["t" * 10**5], "'tags'", id="tags-huge"),
]


@pytest.mark.parametrize(("path", "value", "message"), MALFORMED)
def test_malformed_manifests_raise_a_typed_error_naming_the_entry(
    kernels: list[Kernel], path: tuple[str | int, ...], value: Any, message: str
) -> None:
    bad = value if path == () else _set(_good(kernels[:1]), path, value)
    with pytest.raises(StoreError, match=message) as raised:
        parse_manifest(json.dumps(bad).encode(), Path("b.tar"), BundleLimits())
    assert len(str(raised.value)) < 400  # huge values are clipped, never echoed
    if path[:2] == E0:
        assert "entry 0" in str(raised.value)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(DEEP.encode(), id="deeply-nested"),
        pytest.param(b'{"format": NaN}', id="nan"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
        pytest.param(b"", id="empty"),
    ],
)
def test_manifests_that_are_not_json_raise_a_typed_error(raw: bytes) -> None:
    with pytest.raises(StoreError, match=r"bundle b\.tar manifest"):
        parse_manifest(raw, Path("b.tar"), BundleLimits())


#: Fields of entry 0 where any other value must be refused: they decide what the key means.
_KEYED_FIELDS = [
    ("key",),
    ("kernel_id",),
    ("request",),
    ("request", "blueprint"),
    ("request", "contract"),
    ("request", "torch_version"),
    ("request", "device_kind"),
    ("metadata",),
    ("metadata", "sha256"),
    ("metadata", "blueprint_json"),
    ("metadata", "contract"),
    ("metadata", "torch_version"),
    ("metadata", "device_kind"),
    ("metadata", "input_shape"),
]
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(_KEYED_FIELDS), value=_json)
def test_fuzzed_manifest_fields_always_raise_store_error(
    kernels: list[Kernel], field: tuple[str, ...], value: Any
) -> None:
    good = _good(kernels[:1])
    original: Any = good["entries"][0]
    for step in field:
        original = original[step]
    assume(value != original)
    bad = _set(good, (*E0, *field), value)
    with pytest.raises(StoreError) as raised:
        parse_manifest(json.dumps(bad).encode(), Path("b.tar"), BundleLimits())
    assert "entry 0" in str(raised.value) and len(str(raised.value)) < 400


@settings(max_examples=100, deadline=None)
@given(data=_json)
def test_fuzzed_whole_manifests_always_raise_store_error(data: Any) -> None:
    with pytest.raises(StoreError):
        parse_manifest(json.dumps(data).encode(), Path("b.tar"), BundleLimits())
