"""The main job: a deliberately narrow conv net on the digits, trained statically and grown."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .compiler import BlueprintCompiler
from .controller import ControllerConfig, EpochReport, HeuristicController
from .data import digits_loaders
from .seeds import SeedState, wrap
from .store import KernelStore
from .surgery import SurgeryPolicyConfig
from .telemetry import Telemetry, TelemetryConfig
from .trainer import FitResult, Trainer

__all__ = (
    "DemoConfig",
    "DemoResult",
    "DigitsHost",
    "RunSummary",
    "evaluate_accuracy",
    "load_demo_config",
    "run_demo",
)

#: The demo's options, written into its run directory so ``--resume`` can read them back.
_CONFIG_FILE = "demo.json"


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
    ``checkpoints/static`` and ``checkpoints/growth``); ``None``: none of these."""
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

    def resolved_device(self) -> torch.device:
        """:attr:`device` with ``"auto"`` resolved."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_json(self) -> dict[str, object]:
        """The options as JSON-ready data (the inverse of :meth:`from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> DemoConfig:
        """Read options written by :meth:`to_json`."""
        fields = dict(data)
        fields["slots"] = tuple(fields["slots"])  # type: ignore[arg-type]
        fields["controller"] = ControllerConfig(**fields["controller"])  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


def load_demo_config(run_dir: str | Path) -> DemoConfig:
    """The options of the demo run in ``run_dir``, set to resume it.

    :raises FileNotFoundError: if ``run_dir`` holds no demo run.
    """
    data = json.loads((Path(run_dir) / _CONFIG_FILE).read_text())
    return dataclasses.replace(DemoConfig.from_json(data), run_dir=str(run_dir), resume=True)


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


@dataclass(frozen=True)
class DemoResult:
    """Both runs, and where the growth run's kernels came from."""

    static: RunSummary
    growth: RunSummary
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
    (run_dir / _CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))


ProgressFn = Callable[[str, EpochReport, FitResult], None]


async def _run(
    label: str,
    cfg: DemoConfig,
    grow: bool,
    progress: ProgressFn | None,
    compiler: BlueprintCompiler,
    telemetry: Telemetry,
) -> RunSummary:
    torch.manual_seed(cfg.seed)
    data = digits_loaders(batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit)
    model = DigitsHost()
    if grow:
        wrap(model, cfg.slots, example_input=torch.zeros(2, 1, 8, 8))
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
    )
    checkpoints = None if cfg.run_dir is None else Path(cfg.run_dir) / "checkpoints" / label
    fit = await trainer.fit(
        data.train,
        data.val,
        epochs=cfg.epochs,
        checkpoint_dir=checkpoints,
        checkpoint_every=cfg.checkpoint_every,
        resume=cfg.resume,
        on_epoch=None if progress is None else (lambda r, f: progress(label, r, f)),
    )
    return RunSummary(
        label=label,
        test_acc=evaluate_accuracy(model, data.test, device),
        params=trainer.param_count(),
        fossilized=fit.count(SeedState.FOSSILIZED),
        culled=fit.count(SeedState.CULLED),
        wall_s=fit.wall_s,
        fit=fit,
        surgeries=tuple(trainer.surgeries),
    )


async def run_demo(
    config: DemoConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    compiler: BlueprintCompiler | None = None,
) -> DemoResult:
    """Train the digits host statically, then with growth, from the same seed.

    The compiler's worker processes start while the static run trains, so the growth run finds
    them warm.

    :param config: demo options.
    :param progress: called after every epoch of either run with its label (``"static"`` or
        ``"growth"``), the epoch's report and the run so far.
    :param compiler: the compiler for the growth run (default: a new one).
    """
    cfg = config or DemoConfig()
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
        static = await _run("static", cfg, False, progress, compiler, telemetry)
        await compiler.wait_ready()
        growth = await _run("growth", cfg, True, progress, compiler, telemetry)
    requested = growth.fit.count(SeedState.GERMINATED)
    return DemoResult(
        static=static,
        growth=growth,
        kernels_compiled=compiler.compiles,
        kernels_from_store=requested - compiler.compiles,
        compile_s=compiler.compile_seconds,
        store_path=None if store is None else str(store.path),
    )
