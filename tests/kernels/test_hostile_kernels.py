"""Hostile kernel artifacts: crafted the ways an attacker would, sent through every entry point.

Each payload would create a marker file when run. The sha256 of every crafted artifact is
recomputed, so the kernel id matches its bytes: the id proves nothing about where bytes came from.
The first test shows each payload is live (``torch.export.load`` runs it); the others show that
``load_kernel`` — directly, after a store hit, after a bundle import and a training run, and on
resuming a checkpoint — refuses them or reads them as inert data, and that the marker never
appears. The last tests show our own exported kernels still load and train exactly as torch's
loader would run them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
import torch
from torch import nn

from esper_async.apps.cli import main
from esper_async.blueprints import Blueprint, SlotContract, SlotKind, library
from esper_async.compiler import BlueprintCompiler
from esper_async.control import Decision, EpochReport, Germinate
from esper_async.errors import KernelIntegrityError, UnsafeKernelError
from esper_async.kernels import Kernel, KernelMetadata, export_kernel, load_kernel
from esper_async.kernels._archive import MAX_MEMBERS
from esper_async.reliability import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointStore,
    capture_state,
    restore_state,
)
from esper_async.seeds import SeedSlot, find_slots, wrap
from esper_async.store import KernelStore
from esper_async.training import Trainer

BLUEPRINT = Blueprint("low_rank", {"rank": 2})
SEED = 0


# -- the payload and the ways it is embedded ------------------------------------------------


class _CreatesFile:
    """Unpickling this opens ``path`` for writing, creating it: proof that code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _torch_saved(marker: Path, protocol: int = 2) -> bytes:
    buffer = io.BytesIO()
    torch.save(_CreatesFile(str(marker)), buffer, pickle_protocol=protocol)
    return buffer.getvalue()


def _rezip(
    artifact: bytes, *, replace: Mapping[str, bytes] = {}, add: Mapping[str, bytes] = {}
) -> bytes:
    """``artifact`` with members replaced or added (names relative to its root folder)."""
    source = zipfile.ZipFile(io.BytesIO(artifact))
    root = source.namelist()[0].split("/")[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            name = info.filename[len(root) + 1 :]
            target.writestr(info.filename, replace.get(name, source.read(info)))
        for name, data in add.items():
            target.writestr(f"{root}/{name}", data)
    return out.getvalue()


def _member(artifact: bytes, name: str) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(artifact))
    return source.read(f"{source.namelist()[0].split('/')[0]}/{name}")


def _edit_model(artifact: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    model = json.loads(_member(artifact, "models/model.json"))
    edit(model)
    return _rezip(artifact, replace={"models/model.json": json.dumps(model).encode()})


def _weight_marked_pickled(artifact: bytes, marker: Path) -> bytes:
    config = json.loads(_member(artifact, "data/weights/model_weights_config.json"))
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    return _rezip(artifact, replace={
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        f"data/weights/{entry['path_name']}": _torch_saved(marker),
    })


def _constant_marked_pickled(artifact: bytes, marker: Path) -> bytes:
    config = {"config": {"c": {"path_name": "tensor_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}}}
    return _rezip(
        artifact,
        replace={"data/constants/model_constants_config.json": json.dumps(config).encode()},
        add={"data/constants/tensor_0": _torch_saved(marker)},
    )


def _opaque_constant(artifact: bytes, marker: Path) -> bytes:
    config = {"config": {"c": {"path_name": "opaque_obj_0", "is_param": False,
                               "use_pickle": True, "tensor_meta": None}}}
    return _rezip(
        artifact,
        replace={"data/constants/model_constants_config.json": json.dumps(config).encode()},
        add={"data/constants/opaque_obj_0": pickle.dumps(_CreatesFile(str(marker)))},
    )


def _sample_inputs_swapped(artifact: bytes, marker: Path) -> bytes:
    return _rezip(artifact, replace={"data/sample_inputs/model.pt": _torch_saved(marker)})


def _sample_inputs_swapped_protocol4(artifact: bytes, marker: Path) -> bytes:
    # Protocol 4 imports with STACK_GLOBAL (module and name pushed as strings) instead of GLOBAL.
    saved = _torch_saved(marker, protocol=4)
    return _rezip(artifact, replace={"data/sample_inputs/model.pt": saved})


def _extra_pickle_member(artifact: bytes, marker: Path) -> bytes:
    return _rezip(artifact, add={"data/extra.pkl": pickle.dumps(_CreatesFile(str(marker)))})


def _model_swapped_for_pickle(artifact: bytes, marker: Path) -> bytes:
    return _rezip(artifact, replace={"models/model.json": pickle.dumps(_CreatesFile(str(marker)))})


def _graph_opens_a_file(artifact: bytes, marker: Path) -> bytes:
    def edit(model: dict[str, Any]) -> None:
        graph = model["graph_module"]["graph"]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [
                {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 4}, "kind": 1},
            ],
            "outputs": [{"as_tensor": {"name": "opened"}}], "metadata": {}, "name": "opened",
        })
        graph["tensor_values"]["opened"] = next(iter(graph["tensor_values"].values()))

    return _edit_model(artifact, edit)


def _graph_calls_python(artifact: bytes, marker: Path) -> bytes:
    def edit(model: dict[str, Any]) -> None:
        node = model["graph_module"]["graph"]["nodes"][0]
        node["target"] = "torch.save"
        node["inputs"] = [{"name": "obj", "arg": {"as_string": "x"}, "kind": 1},
                          {"name": "f", "arg": {"as_string": str(marker)}, "kind": 1}]

    return _edit_model(artifact, edit)


def _parameter_name_injects_code(artifact: bytes, marker: Path) -> bytes:
    # FX writes get_attr targets into the generated forward as getattr(self, "<part>").
    config = json.loads(_member(artifact, "data/weights/model_weights_config.json"))
    model = json.loads(_member(artifact, "models/model.json"))
    spec = next(s["parameter"] for s in model["graph_module"]["signature"]["input_specs"]
                if "parameter" in s)
    name = spec["parameter_name"]
    evil = f'{name}")if open({str(marker)!r},"w")else("'
    spec["parameter_name"] = evil
    config["config"][evil] = config["config"].pop(name)
    return _rezip(artifact, replace={
        "models/model.json": json.dumps(model).encode(),
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
    })


def _guard_code(artifact: bytes, marker: Path) -> bytes:
    def edit(model: dict[str, Any]) -> None:
        model["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]

    return _edit_model(artifact, edit)


def _shape_expression(artifact: bytes, marker: Path) -> bytes:
    text = _member(artifact, "models/model.json").decode()
    symbol = re.search(r"Symbol\('s\d+', positive=True, integer=True\)", text)
    assert symbol is not None
    evil = f"{symbol.group(0)} + 0*len(str(open({str(marker)!r}, 'w')))"
    text = text.replace(json.dumps(symbol.group(0)), json.dumps(evil))
    return _rezip(artifact, replace={"models/model.json": text.encode()})


Craft = Callable[[bytes, Path], bytes]
#: name: (craft, torch.export.load runs it, what load_kernel does: "refused" or "inert")
VARIANTS: dict[str, tuple[Craft, bool, str]] = {
    "weight_marked_pickled": (_weight_marked_pickled, True, "refused"),
    "constant_marked_pickled": (_constant_marked_pickled, True, "refused"),
    "opaque_constant": (_opaque_constant, True, "refused"),
    "sample_inputs_swapped": (_sample_inputs_swapped, True, "refused"),
    "sample_inputs_swapped_protocol4": (_sample_inputs_swapped_protocol4, True, "refused"),
    "extra_pickle_member": (_extra_pickle_member, False, "refused"),
    "model_swapped_for_pickle": (_model_swapped_for_pickle, False, "refused"),
    "graph_opens_a_file": (_graph_opens_a_file, True, "refused"),
    "graph_calls_python": (_graph_calls_python, False, "refused"),
    "parameter_name_injects_code": (_parameter_name_injects_code, True, "refused"),
    # Strings torch would exec or sympify; load_kernel never reads them, so they stay data.
    "guard_code": (_guard_code, True, "inert"),
    "shape_expression": (_shape_expression, True, "inert"),
}
REFUSED = [pytest.param(n, id=n) for n, (_, _, o) in VARIANTS.items() if o == "refused"]
LIVE = [pytest.param(n, id=n) for n, (_, live, _) in VARIANTS.items() if live]
ALL = [pytest.param(n, id=n) for n in VARIANTS]
#: A few of the refused kinds, for the slower end-to-end paths.
END_TO_END = [
    pytest.param(n, id=n)
    for n in ("weight_marked_pickled", "sample_inputs_swapped", "extra_pickle_member")
]


# -- a tiny host, its slot and the genuine kernel the crafted ones start from ----------------


def _host() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 2))
    wrap(model, ["0"], example_input=torch.zeros(2, 6))
    return model


def _contract() -> SlotContract:
    contract = find_slots(_host())["0"].contract
    assert contract is not None
    return contract


@pytest.fixture(scope="module")
def genuine() -> Kernel:
    return export_kernel(BLUEPRINT, _contract(), seed=SEED)


def _hostile(genuine: Kernel, variant: str, marker: Path) -> Kernel:
    """The crafted kernel, its metadata's sha256 recomputed so that its id matches its bytes."""
    craft = VARIANTS[variant][0]
    artifact = craft(genuine.artifact, marker)
    digest = hashlib.sha256(artifact).hexdigest()
    return Kernel(artifact, dataclasses.replace(genuine.metadata, sha256=digest))


def _loaders(n: int = 64) -> tuple[list[Any], list[Any]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)], [(x, y)]


class _GerminateOnce:
    """A controller that asks for one blueprint in the first dormant slot, once."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.asked = False

    def decide(
        self, report: EpochReport, history: Sequence[EpochReport], slots: Mapping[str, SeedSlot]
    ) -> list[Decision]:
        if self.asked:
            return []
        self.asked = True
        return [Germinate(next(iter(slots)), self.blueprint, "test")]


@pytest.fixture
def _keep_logging_config() -> Iterator[None]:
    """The CLI configures structlog for the stream that is stderr now; put it back after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


# -- the payloads are live ----------------------------------------------------------------


# The payload leaves the file it opened unclosed; that warning is the point here.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("variant", LIVE)
def test_each_payload_runs_code_through_torch_export_load(
    genuine: Kernel, variant: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    kernel = _hostile(genuine, variant, marker)
    try:
        torch.export.load(io.BytesIO(kernel.artifact)).module()(torch.randn(2, 12))
    except Exception:
        pass  # the payload ran before torch noticed anything wrong, if it noticed
    assert marker.exists(), f"{variant} no longer runs code through torch.export.load"


# -- entry point 1: load_kernel -------------------------------------------------------------


@pytest.mark.parametrize("variant", ALL)
def test_load_kernel_refuses_or_reads_inert_and_never_runs_the_payload(
    genuine: Kernel, variant: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    kernel = _hostile(genuine, variant, marker)
    if VARIANTS[variant][2] == "refused":
        with pytest.raises(UnsafeKernelError) as caught:
            load_kernel(kernel)
        assert caught.value.kernel_id == kernel.kernel_id
        assert kernel.kernel_id[:12] in str(caught.value)
        assert caught.value.member and caught.value.member in str(caught.value)
    else:
        module = load_kernel(kernel)
        h = torch.randn(3, 12, requires_grad=True)
        module(h).sum().backward()  # loads, runs and trains: the strings were never read
        assert h.grad is not None
    assert not marker.exists()


# -- entry point 2: a store hit ---------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("variant", REFUSED)
async def test_a_store_hit_of_a_hostile_kernel_is_refused_on_load(
    genuine: Kernel, variant: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    kernel = _hostile(genuine, variant, marker)
    async with KernelStore(tmp_path / "store", memory_bytes=0) as store:
        await store.put("some-key", kernel, tags=("imported",))
        hit = await store.get("some-key")
    assert hit is not None and hit.artifact == kernel.artifact  # the store only checks the hash
    with pytest.raises(KernelIntegrityError):
        load_kernel(hit)
    assert not marker.exists()


# -- entry point 3: `esper-async store import`, then training that asks for it ---------------


@pytest.mark.usefixtures("_keep_logging_config")
@pytest.mark.parametrize("variant", END_TO_END)
def test_an_imported_bundle_never_runs_code_in_training(
    genuine: Kernel, variant: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    kernel = _hostile(genuine, variant, marker)
    bundle, victim = tmp_path / "kernels.tar", tmp_path / "victim-store"
    request = BlueprintCompiler().store_request(BLUEPRINT, _contract(), SEED)
    key = request.key

    async def publish() -> None:  # the attacker's own store, exported the ordinary way
        async with KernelStore(tmp_path / "attacker-store") as store:
            await store.put(request, kernel, tags=(BLUEPRINT.family,))
            assert await store.export_bundle(bundle) == 1

    anyio.run(publish)
    # The import validates every kernel again in this process: the crafted one is refused, and
    # nothing from the bundle is stored.
    assert main(["store", "--path", str(victim), "import", str(bundle)]) != 0

    async def train() -> tuple[Any, Trainer]:
        async with KernelStore(victim) as store:
            assert await store.get(key) is None
            model = _host()
            trainer = Trainer(
                model, controller=_GerminateOnce(BLUEPRINT),
                optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                compiler=BlueprintCompiler(workers=1, store=store),
            )
            train_loader, val_loader = _loaders()
            return await trainer.fit(train_loader, val_loader, epochs=3), trainer

    fit, trainer = anyio.run(train)
    assert not marker.exists()
    # The run compiled its own kernel for the blueprint and grafted it.
    assert trainer.compiler.compiles == 1
    assert [e.target for e in fit.events][:2] == ["germinated", "training"]
    assert len(fit.history) == 3 and all(torch.isfinite(torch.tensor(r.train_loss))
                                         for r in fit.history)


# -- entry point 4: resuming a checkpoint that carries the kernel -----------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("variant", END_TO_END)
async def test_resuming_a_checkpoint_with_a_hostile_kernel_is_refused(
    genuine: Kernel, variant: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    hostile = _hostile(genuine, variant, marker)
    # A genuine run state with a grafted seed, as the trainer checkpoints it...
    model = _host()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    slot = find_slots(model)["0"]
    slot.germinate(BLUEPRINT, "test")
    slot.graft(load_kernel(genuine), genuine.kernel_id)
    payload = capture_state(
        epoch=1, step=4, model=model, optimizer=opt, slots=find_slots(model),
        kernels={genuine.kernel_id: genuine}, stateful={}, record={},
    )
    # ...whose kernel the attacker swaps, id and all, writing it back with the project's writer.
    slots = json.loads(payload["slots"])
    slots["0"]["kernel_id"] = hostile.kernel_id
    payload["slots"] = json.dumps(slots)
    payload["kernels"] = {hostile.kernel_id: {
        "artifact": torch.frombuffer(bytearray(hostile.artifact), dtype=torch.uint8),
        "metadata": json.dumps(hostile.metadata.to_json()),
    }}
    checkpoints = CheckpointStore(tmp_path / "ckpt")
    checkpoints.save(payload)

    fresh = _host()
    with pytest.raises(CheckpointIntegrityError) as caught:
        restore_state(
            checkpoints.load(), model=fresh, optimizer=torch.optim.SGD(fresh.parameters()),
            slots=find_slots(fresh), stateful={},
        )
    assert isinstance(caught.value.__cause__, UnsafeKernelError)
    # The trainer's resume skips a checkpoint that does not restore; this was the only one.
    resumed = Trainer(_host(), grow=False)
    train_loader, val_loader = _loaders()
    with pytest.raises(CheckpointError, match="refused before deserialising"):
        await resumed.fit(train_loader, val_loader, epochs=2, checkpoint_dir=checkpoints.directory,
                          resume=True)
    assert all(slot.seed is None for slot in resumed.slots.values())
    assert not marker.exists()


# -- the archive's structure --------------------------------------------------------------


def _zip(entries: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate we add
        with zipfile.ZipFile(out, "w", compression) as target:
            for name, data in entries:
                target.writestr(name, data)
    return out.getvalue()


def _members_of(artifact: bytes) -> list[tuple[str, bytes]]:
    source = zipfile.ZipFile(io.BytesIO(artifact))
    return [(i.filename, source.read(i)) for i in source.infolist()]


def _one_member_deflated(artifact: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for name, data in _members_of(artifact):
            kind = zipfile.ZIP_DEFLATED if name.endswith("archive_format") else zipfile.ZIP_STORED
            target.writestr(name, data, compress_type=kind)
    return out.getvalue()


def _swapped_byteorder(artifact: bytes) -> bytes:
    other = b"big" if _member(artifact, "byteorder") == b"little" else b"little"
    return _rezip(artifact, replace={"byteorder": other})


#: case: (how to break a genuine archive, what the refusal says)
STRUCTURE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "path_traversal": (lambda a: _zip([*_members_of(a), ("archive/../../x.py", b"x")]), "root"),
    "absolute_path": (lambda a: _zip([*_members_of(a), ("/etc/evil", b"x")]), "root folder"),
    "second_root": (lambda a: _zip([*_members_of(a), ("other/models/model.json", b"{}")]), "root"),
    "duplicate_member": (lambda a: _zip([*_members_of(a), _members_of(a)[0]]), "twice"),
    # Deflated members inflate past the artifact (a zip bomb's signature) or are refused as such.
    "compressed": (lambda a: _zip(_members_of(a), zipfile.ZIP_DEFLATED), "declare|compressed"),
    "one_member_deflated": (_one_member_deflated, "compressed"),
    "too_many_members": (
        lambda a: _zip(_members_of(a) + [
            (f"archive/data/weights/weight_{1000 + i}", b"") for i in range(MAX_MEMBERS)
        ]),
        "members",
    ),
    "not_a_zip": (lambda a: b"\x80\x04not a zip at all", "not a readable"),
    "big_endian": (_swapped_byteorder, "endian"),
    "model_missing": (
        lambda a: _zip([(n, d) for n, d in _members_of(a) if not n.endswith("model.json")]),
        "missing",
    ),
}


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c in STRUCTURE])
def test_malformed_archives_are_refused_before_any_member_is_decoded(
    genuine: Kernel, case: str
) -> None:
    breaks, reason = STRUCTURE[case]
    artifact = breaks(genuine.artifact)
    kernel = Kernel(artifact, dataclasses.replace(
        genuine.metadata, sha256=hashlib.sha256(artifact).hexdigest()))
    with pytest.raises(UnsafeKernelError, match=reason):
        load_kernel(kernel)


def test_a_tampered_id_is_still_caught_first(genuine: Kernel, tmp_path: Path) -> None:
    kernel = _hostile(genuine, "weight_marked_pickled", tmp_path / "pwned")
    stale = Kernel(kernel.artifact, genuine.metadata)  # bytes changed, id not recomputed
    with pytest.raises(KernelIntegrityError, match="hashes to") as caught:
        load_kernel(stale)
    assert not isinstance(caught.value, UnsafeKernelError)


# -- our own kernels still load, run and train as torch's loader would run them -------------


def _contract_for(bp: Blueprint) -> SlotContract:
    if bp.slot_kind is SlotKind.CONV:
        return SlotContract(SlotKind.CONV, (4, 6, 6))
    if bp.slot_kind is SlotKind.TOKEN:
        return SlotContract(SlotKind.TOKEN, (8,))
    return SlotContract(SlotKind.LINEAR, (8,))


def _assert_runs_like_torch(kernel: Kernel, shape: tuple[int, ...]) -> None:
    ours = load_kernel(kernel)
    theirs = torch.export.load(io.BytesIO(kernel.artifact)).module()  # trusted bytes only
    named = dict(theirs.named_parameters())
    assert {n.removeprefix("program.") for n, _ in ours.named_parameters()} == set(named)
    assert {k.removeprefix("program.") for k in ours.state_dict()} == set(theirs.state_dict())
    with torch.no_grad():  # non-zero weights everywhere, so zero-initialised layers count too
        for name, p in ours.named_parameters():
            p.normal_()
            named[name.removeprefix("program.")].copy_(p)
    for batch in (1, 3):
        h = torch.randn(batch, *shape, requires_grad=True)
        mine, ref = ours(h), theirs(h)
        torch.testing.assert_close(mine, ref)
        g_mine = torch.autograd.grad(mine.square().sum(), [h, *ours.parameters()])
        g_ref = torch.autograd.grad(ref.square().sum(), [h, *theirs.parameters()])
        for a, b in zip(g_mine, g_ref, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("blueprint", [pytest.param(bp, id=bp.name) for bp in library()])
def test_every_library_kernel_loads_and_trains_as_torch_would_run_it(blueprint: Blueprint) -> None:
    contract = _contract_for(blueprint)
    kernel = export_kernel(blueprint, contract, seed=1)
    _assert_runs_like_torch(kernel, contract.batch_shape(1, tokens=4)[1:])
    module = load_kernel(kernel)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(contract.batch_shape(8), generator=gen)
    target = torch.randn(contract.batch_shape(8), generator=gen)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(module(h), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


class _Varied(nn.Module):
    """Buffers, a lifted constant, a multi-output op, size arithmetic, -inf and a dtype cast."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8))
        self.register_buffer("shift", torch.full((8,), 0.25), persistent=False)
        self.offset = torch.arange(8.0) / 8

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = torch.chunk(self.fc(h), 2, dim=-1)
        x = torch.cat([a * 2.0, b.clamp(min=float("-inf"), max=3.0)], dim=-1)
        x = nn.functional.gelu(x * self.scale + self.offset + self.shift, approximate="tanh")
        return x.reshape(h.shape[0], -1).reshape(h.shape[0], 8).to(torch.float32)


def test_a_program_with_buffers_constants_and_size_arithmetic_loads_like_torch(
    genuine: Kernel,
) -> None:
    program = torch.export.export(
        _Varied(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    artifact = buffer.getvalue()
    kernel = Kernel(artifact, dataclasses.replace(
        genuine.metadata, sha256=hashlib.sha256(artifact).hexdigest()))
    _assert_runs_like_torch(kernel, (8,))
    buffers = dict(load_kernel(kernel).named_buffers())
    assert set(buffers) == {"program.scale", "program.shift", "program.offset"}


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["torch211_residual_conv", "torch211_mlp"])
def test_kernels_written_by_torch_2_11_load_like_torch_loads_them(name: str) -> None:
    # Exported by export_kernel under torch 2.11.0+cu130 (the GPU machines' torch): the
    # allow-list holds for the archive layout and export schema (8.17) that version writes.
    artifact = (DATA / f"{name}.pt2").read_bytes()
    metadata = KernelMetadata.from_json(json.loads((DATA / f"{name}.json").read_text()))
    assert metadata.torch_version.startswith("2.11")
    _assert_runs_like_torch(Kernel(artifact, metadata), metadata.input_shape)


def test_loads_from_many_threads_at_once_all_succeed(genuine: Kernel) -> None:
    results: list[nn.Module] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            results.append(load_kernel(genuine))
        except BaseException as exc:  # recorded for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    h = torch.randn(3, 12)
    outs = [m(h) for m in results]
    assert all(torch.equal(outs[0], o) for o in outs[1:])

