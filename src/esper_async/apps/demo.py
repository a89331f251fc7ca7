"""The main job: a deliberately narrow conv net on the digits, trained statically, grown, and as
``static_final`` (growth's final architecture, freshly initialised, trained from scratch)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from .._files import read_regular, write_atomic
from ..compiler import BlueprintCompiler
from ..control import ControllerConfig, EpochReport, HeuristicController
from ..errors import ControllerConfigError, DemoConfigError
from ..reliability import CHECKPOINT_PATTERN, CheckpointError, CheckpointStore
from ..seeds import SeedState, wrap
from ..store import KernelStore
from ..surgery import SurgeryPolicyConfig
from ..telemetry import Telemetry, TelemetryConfig
from ..training.trainer import FitResult, Trainer
from .data import digits_loaders
from .static_final import fossils_of, graft_fossils, graft_widenings

__all__ = (
    "DemoConfig",
    "DemoResult",
    "DigitsHost",
    "RunSummary",
    "evaluate_accuracy",
    "load_demo_config",
    "run_demo",
)

log = structlog.get_logger(__name__)

#: The demo's options, written into its run directory so ``--resume`` can read them back.
_CONFIG_FILE = "demo.json"
#: The modules of :class:`DigitsHost` a seed slot can wrap.
_HOST_MODULES = ("conv1", "conv2", "fc1", "head")
#: The fewest images ``limit`` may keep: the splits are stratified over the 10 classes.
_MIN_LIMIT = 100
#: Upper ends of the integer options: far above any useful value, low enough that a typo such as
#: ``batch_size: 10**20`` is refused here rather than failing deep inside the data loader.
_MOST: Mapping[str, int] = {"epochs": 100_000, "batch_size": 65_536, "checkpoint_every": 100_000}
#: Any other integer option (limits, controller counts) stays a 32-bit signed integer.
_MAX_INT = 2**31 - 1
#: The runs of a demo, in order; each checkpoints into ``run_dir/checkpoints/<label>``.
_RUNS = ("static", "growth")
#: The run trained last, from growth's fossils; it writes no checkpoints (its fresh modules are
#: no compiled kernels a checkpoint could hold) and, on ``--resume``, trains again from scratch.
_STATIC_FINAL = "static_final"


class DigitsHost(nn.Module):
    """An intentionally small ("impaired") conv net for 8×8 digits: too narrow to fit them well.

    ``(N, 1, 8, 8)`` → conv1 ``(N, c1, 8, 8)`` → conv2 ``(N, c2, 4, 4)`` → fc1 ``(N, hidden)`` →
    head ``(N, 10)``, with ReLUs between.
    """

    def __init__(self, *, c1: int = 4, c2: int = 4, hidden: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(c2 * 16, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.head(x)


@dataclass(frozen=True)
class DemoConfig:
    """Options of the demo. Defaults finish in well under a minute on 2 CPU cores.

    :ivar epochs: epochs of each run (static and growth).
    :ivar seed: seeds the host's initial weights, the data split and order, and the kernels.
    :ivar batch_size: training batch size.
    :ivar slots: host modules that get seed slots.
    :ivar limit: use only this many images (quick tests).
    """

    epochs: int = 40
    seed: int = 0
    batch_size: int = 64
    slots: tuple[str, ...] = ("conv1", "conv2", "fc1")
    limit: int | None = None
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    store: str | None = None
    """Kernel store directory; default :func:`~esper_async.store.default_store_path`."""
    use_store: bool = True
    run_dir: str | None = None
    """Where the run's trace (JSON-lines spans), options and checkpoints go (checkpoints in
    ``checkpoints/static`` and ``checkpoints/growth``; ``static_final`` writes none and is
    retrained on resume); ``None``: none of these."""
    checkpoint_every: int = 1
    """Epochs between checkpoints (with a ``run_dir``)."""
    resume: bool = False
    """Continue the runs from their checkpoints in ``run_dir`` (a finished run trains no more)."""
    surgery: bool = False
    """Let the growth run also widen each slot whose seed fossilized (``WidenSlot``, ×1.5 per
    widening, at most ×2), as one validated transaction at an epoch boundary."""
    device: str = "cpu"
    """Where both runs train and kernels are optimised: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, or
    ``"auto"`` (CUDA when available). On a GPU each step is launched from a worker thread and
    awaited through the CUDA completion bridge (see ``docs/async.md``)."""

    def __post_init__(self) -> None:
        """:raises DemoConfigError: if an option has the wrong type or is out of range."""
        _check_options(self)

    def resolved_device(self) -> torch.device:
        """:attr:`device` with ``"auto"`` resolved."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_json(self) -> dict[str, object]:
        """The options as JSON-ready data (the inverse of :meth:`from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: object, *, path: str | None = None) -> DemoConfig:
        """Read options written by :meth:`to_json`: every option must be there, with its type.

        :param data: the decoded JSON.
        :param path: the file it was read from, for messages.
        :raises DemoConfigError: naming the option that is unknown, missing, of the wrong type or
            out of range.
        """
        where = path or "the demo options"
        fields = _exact_keys(data, {f.name for f in dataclasses.fields(cls)}, "", where, path)
        slots = fields["slots"]
        if not isinstance(slots, list) or not all(isinstance(n, str) for n in slots):
            raise DemoConfigError(
                f"{where}: option 'slots' must be a list of module names, got {slots!r}",
                key="slots", path=path,
            )
        fields["slots"] = tuple(slots)
        try:
            controller = _exact_keys(
                fields["controller"], {f.name for f in dataclasses.fields(ControllerConfig)},
                "controller.", where, path,
            )
            if isinstance(controller["width_slots"], list):  # JSON has no tuples
                controller["width_slots"] = tuple(controller["width_slots"])
            fields["controller"] = ControllerConfig(**controller)
        except ControllerConfigError as exc:
            raise DemoConfigError(f"{where}: {exc}", key="controller", path=path) from exc
        device = fields["device"]
        if isinstance(device, str) and device != "auto":
            try:
                torch.device(device)
            except RuntimeError as exc:
                raise DemoConfigError(
                    f"{where}: option 'device' {device!r} is not a device ({exc})",
                    key="device", path=path,
                ) from exc
        try:
            return cls(**fields)
        except DemoConfigError as exc:
            raise DemoConfigError(f"{where}: {exc}", key=exc.key, path=path) from exc


def _exact_keys(
    data: object, known: set[str], prefix: str, where: str, path: str | None
) -> dict[str, Any]:
    """``data`` as a dict, if it is a JSON object with exactly the keys ``known``."""
    if not isinstance(data, dict):
        key = prefix.rstrip(".") or None
        what = f"option {key!r}" if key else "the file"
        raise DemoConfigError(
            f"{where}: {what} must be a JSON object, got {type(data).__name__}", key=key,
            path=path,
        )
    unknown = sorted(set(data) - known)
    if unknown:
        raise DemoConfigError(
            f"{where}: unknown option {prefix + str(unknown[0])!r}; the options are "
            f"{', '.join(sorted(known))}", key=prefix + str(unknown[0]), path=path,
        )
    missing = sorted(known - set(data))
    if missing:
        raise DemoConfigError(
            f"{where}: option {prefix + missing[0]!r} is missing", key=prefix + missing[0],
            path=path,
        )
    return dict(data)


def _check_options(cfg: DemoConfig) -> None:
    """Raise :class:`DemoConfigError` naming the first option of ``cfg`` that is invalid."""
    for key, least in (("epochs", 1), ("seed", 0), ("batch_size", 1), ("checkpoint_every", 1)):
        _check_int(key, getattr(cfg, key), least, _MOST.get(key, 2**32 - 1))
    if cfg.limit is not None:
        _check_int("limit", cfg.limit, _MIN_LIMIT)
    if (
        not isinstance(cfg.slots, tuple) or not cfg.slots
        or not all(isinstance(n, str) and n in _HOST_MODULES for n in cfg.slots)
        or len(set(cfg.slots)) != len(cfg.slots)
    ):
        raise DemoConfigError(
            f"option 'slots' must name distinct modules of the host among "
            f"{', '.join(_HOST_MODULES)}, got {cfg.slots!r}", key="slots",
        )
    for key in ("use_store", "resume", "surgery"):
        if not isinstance(getattr(cfg, key), bool):
            raise DemoConfigError(
                f"option {key!r} must be true or false, got {getattr(cfg, key)!r}", key=key
            )
    for key in ("store", "run_dir"):
        if getattr(cfg, key) is not None and not isinstance(getattr(cfg, key), str):
            raise DemoConfigError(
                f"option {key!r} must be a path or null, got {getattr(cfg, key)!r}", key=key
            )
    if not isinstance(cfg.device, str):
        raise DemoConfigError(f"option 'device' must be a string, got {cfg.device!r}",
                              key="device")
    if not isinstance(cfg.controller, ControllerConfig):
        raise DemoConfigError("option 'controller' must be a ControllerConfig",
                              key="controller")
    _check_controller(cfg.controller)


def _check_int(key: str, value: object, least: int, most: int = _MAX_INT) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise DemoConfigError(
            f"option {key!r} must be an integer >= {least}, got {value!r:.60}", key=key
        )
    if value > most:
        raise DemoConfigError(
            f"option {key!r} must be an integer <= {most}, got {value!r:.60}", key=key
        )


def _check_controller(controller: ControllerConfig) -> None:
    for f in dataclasses.fields(controller):
        key, value = f"controller.{f.name}", getattr(controller, f.name)
        if f.name == "width_slots":
            continue  # names or None: ControllerConfig checks them itself
        if f.type in ("int", int):
            _check_int(key, value, 0)
        elif f.type in ("bool", bool):
            if not isinstance(value, bool):
                raise DemoConfigError(f"option {key!r} must be true or false, got {value!r}",
                                      key=key)
        elif f.type in ("str", str):
            if not isinstance(value, str):
                raise DemoConfigError(f"option {key!r} must be a string, got {value!r}", key=key)
        elif not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(
            value
        ):
            raise DemoConfigError(f"option {key!r} must be a finite number, got {value!r}",
                                  key=key)


def load_demo_config(run_dir: str | Path, *, store: str | None = None) -> DemoConfig:
    """The options of the demo run in ``run_dir``, set to resume it.

    A ``store`` path in ``demo.json`` is read relative to ``run_dir`` and must lie inside it:
    a crafted file must not choose where a store is created. A store elsewhere is given with
    ``store`` (``esper-async demo --resume RUN_DIR --store DIR``).

    :param run_dir: the run's directory (it holds ``demo.json``).
    :param store: the kernel store to use instead of the one ``demo.json`` names.
    :raises FileNotFoundError: if ``run_dir`` holds no demo run.
    :raises DemoConfigError: if its ``demo.json`` cannot be read, is not JSON (or nests too
        deep), or an option in it is unknown, missing, of the wrong type or out of range, or its
        ``store`` lies outside ``run_dir`` (the error names the option).
    """
    path = Path(run_dir) / _CONFIG_FILE
    try:
        text = read_regular(path, cap=2**20).decode("utf-8")  # a FIFO or /dev/zero: refused
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise DemoConfigError(f"cannot read {path}: {exc}", key=None, path=str(path)) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DemoConfigError(
            f"{path} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            key=None, path=str(path),
        ) from exc
    except RecursionError as exc:
        raise DemoConfigError(
            f"{path} is not demo options: its JSON nests too deep", key=None, path=str(path)
        ) from exc
    config = DemoConfig.from_json(data, path=str(path))
    if store is None and config.store is not None:
        store = _store_inside(Path(run_dir), config.store, path)
    return dataclasses.replace(config, run_dir=str(run_dir), resume=True, store=store)


def _store_inside(run_dir: Path, store: str, path: Path) -> str:
    """``store`` (relative to ``run_dir``), if it lies inside ``run_dir``, links resolved."""
    target = run_dir / store  # an absolute ``store`` stays absolute
    root = os.path.realpath(run_dir)
    real = os.path.realpath(target)
    if os.path.commonpath([root, real]) != root:
        raise DemoConfigError(
            f"{path}: option 'store' {store!r} lies outside the run directory {run_dir}; a "
            "run's demo.json may only name a store inside it. To resume with that store, "
            "pass it on the command line: esper-async demo --resume RUN_DIR --store DIR",
            key="store", path=str(path),
        )
    return str(target)


def _checkpoint_dir(cfg: DemoConfig, label: str) -> Path | None:
    return None if cfg.run_dir is None else Path(cfg.run_dir) / "checkpoints" / label


def _check_resumable(cfg: DemoConfig) -> Mapping[str, bool]:
    """Which runs of ``cfg`` have checkpoints to resume from.

    :raises DemoConfigError: if ``cfg.resume`` is set without a ``run_dir``.
    :raises CheckpointError: if no run has any.
    """
    if cfg.run_dir is None:
        raise DemoConfigError("option 'resume' needs a 'run_dir' to resume from", key="resume")
    dirs = {label: _checkpoint_dir(cfg, label) for label in _RUNS}
    found = {label: bool(CheckpointStore(d).paths()) for label, d in dirs.items() if d}
    if not any(found.values()):
        raise CheckpointError(
            f"nothing to resume in {cfg.run_dir}: looked for {CHECKPOINT_PATTERN} files in "
            f"{' and '.join(str(d) for d in dirs.values())} and found none (the run stopped "
            "before its first checkpoint); start it anew", path=cfg.run_dir,
        )
    return found


@dataclass(frozen=True)
class RunSummary:
    """One run's outcome, as printed in the demo's table."""

    label: str
    test_acc: float
    params: int
    fossilized: int
    culled: int
    wall_s: float
    fit: FitResult
    surgeries: tuple[dict[str, object], ...] = ()
    """The architecture changes committed (``DemoConfig.surgery``)."""
    fossils: tuple[tuple[str, str], ...] = ()
    """``(slot, blueprint JSON)`` of every seed fossilized at the end."""


@dataclass(frozen=True)
class DemoResult:
    """The three runs, and where the growth run's kernels came from."""

    static: RunSummary
    growth: RunSummary
    static_final: RunSummary
    """Growth's final architecture (its widenings and fossilized seeds, built afresh), trained
    from scratch."""
    kernels_compiled: int
    kernels_from_store: int
    compile_s: float
    store_path: str | None


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, loader: object, device: torch.device | str | None = None
) -> float:
    """Accuracy of ``model`` over every batch of ``loader`` (moved to ``device`` if given)."""
    model.eval()
    correct = total = 0
    for x, y in loader:  # type: ignore[attr-defined]
        if device is not None:
            x, y = x.to(device), y.to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def _save_config(cfg: DemoConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    options = cfg.to_json()
    if cfg.store is not None:  # as --resume reads it: relative to the run directory
        inside = os.path.relpath(os.path.realpath(cfg.store), os.path.realpath(run_dir))
        outside = inside == os.pardir or inside.startswith(os.pardir + os.sep)
        options["store"] = os.path.abspath(cfg.store) if outside else inside
    write_atomic(run_dir / _CONFIG_FILE, json.dumps(options, indent=2).encode())


ProgressFn = Callable[[str, EpochReport, FitResult], None]


async def _run(
    label: str,
    cfg: DemoConfig,
    grow: bool,
    progress: ProgressFn | None,
    compiler: BlueprintCompiler,
    telemetry: Telemetry,
    resume: frozenset[str],
    fossils: tuple[tuple[str, str], ...] = (),
    widenings: tuple[dict[str, object], ...] = (),
) -> RunSummary:
    torch.manual_seed(cfg.seed)
    data = digits_loaders(batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit)
    model = DigitsHost()
    if grow or fossils or widenings:
        wrap(model, cfg.slots, example_input=torch.zeros(2, 1, 8, 8))
        graft_widenings(model, widenings, seed=cfg.seed)  # growth's widths, fresh
        graft_fossils(model, fossils, seed=cfg.seed)
    device = cfg.resolved_device()
    trainer = Trainer(
        model,
        grow=grow,
        seed=cfg.seed,
        device=device,
        compiler=compiler,
        telemetry=telemetry,
        controller=HeuristicController(cfg.controller, seed=cfg.seed),
        surgery=SurgeryPolicyConfig(cooldown_steps=0) if grow and cfg.surgery else None,
        progress="off",  # the CLI shows its own progress (one line per run)
    )
    checkpoints = None if label == _STATIC_FINAL else _checkpoint_dir(cfg, label)
    if resume and label not in resume and label != _STATIC_FINAL:
        log.info("demo.run_starts_afresh", run=label, reason="it wrote no checkpoint")
    fit = await trainer.fit(
        data.train,
        data.val,
        epochs=cfg.epochs,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        resume=label in resume,
        on_epoch=None if progress is None else (lambda r, f: progress(label, r, f)),
        label=label,
    )
    return RunSummary(
        label=label,
        test_acc=evaluate_accuracy(model, data.test, device),
        params=trainer.param_count(),
        fossilized=len(fossils) if label == _STATIC_FINAL else fit.count(SeedState.FOSSILIZED),
        culled=fit.count(SeedState.CULLED),
        wall_s=fit.wall_s,
        fit=fit,
        surgeries=tuple(trainer.surgeries),
        fossils=fossils_of(trainer.slots),
    )


async def run_demo(
    config: DemoConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    compiler: BlueprintCompiler | None = None,
) -> DemoResult:
    """Train the digits host statically, then with growth, then as ``static_final`` (growth's
    fossilized seeds, freshly built, part of the host from step 0), from the same seed.

    The compiler's worker processes start while the static run trains, so the growth run finds
    them warm.

    :param config: demo options.
    :param progress: called after every epoch of every run with its label (``"static"``,
        ``"growth"`` or ``"static_final"``), the epoch's report and the run so far.
    :param compiler: the compiler for the growth run (default: a new one).
    :raises CheckpointError: if ``config.resume`` is set and no run wrote a checkpoint, or
        a run's checkpoints are all damaged (the error lists each file and why).
    :raises DemoConfigError: if ``config.resume`` is set without a ``run_dir``.
    """
    cfg = config or DemoConfig()
    resume: frozenset[str] = frozenset()
    if cfg.resume:
        resume = frozenset(label for label, found in _check_resumable(cfg).items() if found)
    if cfg.run_dir is not None and not cfg.resume:
        _save_config(cfg, Path(cfg.run_dir))
    async with AsyncExitStack() as stack:
        telemetry = await stack.enter_async_context(
            Telemetry.create(
                run_dir=cfg.run_dir, config=TelemetryConfig(jsonl=cfg.run_dir is not None)
            )
        )
        store = None
        if cfg.use_store:
            store = await stack.enter_async_context(KernelStore(cfg.store))
        if compiler is None:
            compiler = BlueprintCompiler(
                device=str(cfg.resolved_device()), store=store, telemetry=telemetry
            )
        await stack.enter_async_context(compiler)
        static = await _run("static", cfg, False, progress, compiler, telemetry, resume)
        await compiler.wait_ready()
        growth = await _run("growth", cfg, True, progress, compiler, telemetry, resume)
        static_final = await _run(
            _STATIC_FINAL, cfg, False, progress, compiler, telemetry, resume, growth.fossils,
            growth.surgeries,
        )
    requested = growth.fit.count(SeedState.GERMINATED)
    return DemoResult(
        static=static,
        growth=growth,
        static_final=static_final,
        kernels_compiled=compiler.compiles,
        kernels_from_store=requested - compiler.compiles,
        compile_s=compiler.compile_seconds,
        store_path=None if store is None else str(store.path),
    )
