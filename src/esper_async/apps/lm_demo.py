"""The language-model demo: a narrow GPT on bundled Shakespeare, static, grown and static_final.

Three arms, from the same seed, data order, recipe (AdamW, constant ``lr``) and token budget:

* ``static``: the bare host (:meth:`GPTConfig.narrow` on the CPU).
* ``growth``: the same host with TOKEN slots at ``blocks.{i}.mlp.proj`` and ``blocks.{i}.out``,
  grown by the heuristic controller (:meth:`ControllerConfig.eager` by default, so that seeds
  germinate, blend and fossilize within a short run). With the controller's ``width_growth``,
  the host is also wrapped at ``blocks.{i}.mlp.fc`` (the MLP's hidden layer, ``4·D`` units),
  and those slots are widened, never seeded (:func:`lm_width_slots`): a widening grows the
  hidden layer and the columns of ``mlp.proj`` that read it; the residual stream, the
  embeddings and the tied head keep their width.
* ``static_final``: the architecture growth ended with (fossils and widenings), freshly
  initialised and trained from scratch (see :mod:`esper_async.apps.static_final`; widened
  layers start with the GPT's own initialisation, :func:`~esper_async.apps.gpt.init_like_new`).

:meth:`LMDemoConfig.quick` is the CPU size (a few minutes on 2 cores for all three arms);
:meth:`LMDemoConfig.full` the GPU size (nanoGPT's ``shakespeare_char`` host, 6×384, T=256).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog
import torch

from ..compiler import BlueprintCompiler, OptimizerOptions
from ..control import ControllerConfig, EpochReport, HeuristicController
from ..errors import DemoConfigError
from ..seeds import SeedState, wrap
from ..store import KernelStore
from ..telemetry import Telemetry, TelemetryConfig
from ..training import FlopLedger, LanguageModelTask
from ..training.trainer import FitResult, Trainer
from .gpt import GPT, GPTConfig, count_parameters, init_like_new
from .shakespeare import ShakespeareData, load_shakespeare
from .static_final import fossils_of, graft_fossils, graft_widenings

__all__ = (
    "ARMS", "LMArm", "LMDemoConfig", "LMDemoResult", "architecture", "first_reach", "lm_slots",
    "lm_width_slots", "run_lm_demo",
)

log = structlog.get_logger(__name__)

#: The arms, in the order they run (static_final needs growth's final architecture).
ARMS = ("static", "growth", "static_final")
#: The prompt the sample is generated from.
SAMPLE_PROMPT = "\n"


def architecture(model: torch.nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(parameter name, shape)`` of every parameter of ``model``, in order; a compiled kernel's
    wrapper segment (``seed.program.``) and an eager seed's (``seed.module.``, ``graft="eager"``:
    a run that ended before its kernel) read as the module they run (``seed.``), so a grown
    model and a fresh build of the same blueprints compare equal.

    :param model: any module.
    """
    return tuple(
        (_as_built(name), tuple(p.shape)) for name, p in model.named_parameters()
    )


def _as_built(name: str) -> str:
    return name.replace(".seed.program.", ".seed.").replace(".seed.module.", ".seed.")


def first_reach(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """Where a loss curve first reaches ``target``, linearly interpolated between its points.

    ``xs`` is the cumulative budget (tokens, FLOPs) at each point and ``losses`` the loss there.
    The crossing between the last point above ``target`` and the first at or below it is
    interpolated; a curve already at or below ``target`` at its first point reaches it there
    (nothing earlier was measured). Non-finite losses never count as reaching it.

    :param xs: cumulative budget per point, non-decreasing.
    :param losses: loss per point, as many as ``xs``.
    :param target: the loss to reach.
    :returns: the budget at the crossing, or ``None`` if the curve never reaches ``target``.
    :raises DemoConfigError: if ``xs`` and ``losses`` differ in length.
    """
    if len(xs) != len(losses):
        raise DemoConfigError(
            f"first_reach: {len(xs)} budget points but {len(losses)} losses; pass one of each",
            key=None,
        )
    prev: tuple[float, float] | None = None
    for x, loss in zip(xs, losses, strict=True):
        if not math.isfinite(loss):
            prev = None
            continue
        if loss <= target:
            if prev is None:
                return float(x)
            x0, l0 = prev
            return float(x0 + (l0 - target) / (l0 - loss) * (x - x0))
        prev = (float(x), float(loss))
    return None


def lm_slots(n_layer: int, *, widen: bool = False) -> tuple[str, ...]:
    """The slots the demo grows in: each block's MLP output projection and its output, and with
    ``widen`` each block's MLP hidden layer (:func:`lm_width_slots`) first.

    :param n_layer: the host's blocks.
    :param widen: wrap the MLP hidden layers too, for width growth.
    """
    names = ("mlp.fc", "mlp.proj", "out") if widen else ("mlp.proj", "out")
    return tuple(f"blocks.{i}.{name}" for i in range(n_layer) for name in names)


def lm_width_slots(n_layer: int) -> tuple[str, ...]:
    """The slots width growth widens: each block's MLP hidden layer, ``blocks.{i}.mlp.fc`` (its
    consumer is ``mlp.proj``, through the GELU; nothing else reads it).

    :param n_layer: the host's blocks.
    """
    return tuple(f"blocks.{i}.mlp.fc" for i in range(n_layer))


@dataclass(frozen=True)
class LMDemoConfig:
    """Options of the Shakespeare demo. The defaults are the CPU quick run (:meth:`quick`).

    :ivar epochs: epochs of each arm.
    :ivar steps_per_epoch: training batches per epoch (random windows of the training split).
    :ivar batch_size: windows per batch.
    :ivar block_size: tokens per window (``T``).
    :ivar eval_batches: validation batches per evaluation (spread over the split).
    :ivar n_layer: the host's blocks.
    :ivar n_head: attention heads per block.
    :ivar n_embd: the host's width.
    :ivar dropout: the host's dropout.
    :ivar lr: AdamW's learning rate (the same for every arm; seeds join at it).
    :ivar seed: seeds the host's initial weights, the data order, the kernels and the sample.
    :ivar sample_chars: characters the grown model generates at the end.
    :ivar controller: the growth controller's thresholds. With ``width_growth`` on, the host is
        wrapped at :func:`lm_width_slots` too, and ``width_slots`` (unless given) is set to them.
    :ivar seeds: offer the growth controller the blueprint library (``False``: no seeds, width
        growth alone; needs ``controller.width_growth``).
    :ivar store: kernel store directory (``None``: the default store).
    :ivar use_store: look kernels up in (and add them to) the store.
    :ivar device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    :ivar kernel_forms: the execution forms the kernel optimizer measures (``None``: its
        defaults for the device, Inductor included on CUDA).
    :ivar run_dir: where the run's trace (JSON-lines spans of the three arms) goes, for
        ``esper-async trace``; ``None``: no trace. The arms write no checkpoints.
    """

    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 32
    block_size: int = 64
    eval_batches: int = 8
    n_layer: int = 2
    n_head: int = 1
    n_embd: int = 64
    dropout: float = 0.0
    lr: float = 3e-3
    seed: int = 0
    sample_chars: int = 200
    controller: ControllerConfig = field(default_factory=ControllerConfig.eager)
    seeds: bool = True
    store: str | None = None
    use_store: bool = True
    device: str = "cpu"
    kernel_forms: tuple[str, ...] | None = None
    run_dir: str | None = None

    def __post_init__(self) -> None:
        """:raises DemoConfigError: if an option is out of range."""
        for key, least in (
            ("epochs", 1), ("steps_per_epoch", 1), ("batch_size", 1), ("block_size", 1),
            ("eval_batches", 1), ("n_layer", 1), ("n_head", 1), ("n_embd", 1), ("seed", 0),
            ("sample_chars", 0),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise DemoConfigError(
                    f"option {key!r} must be an integer >= {least}, got {value!r}", key=key
                )
        if self.n_embd % self.n_head:
            raise DemoConfigError(
                f"option 'n_embd' ({self.n_embd}) must be a multiple of n_head ({self.n_head})",
                key="n_embd",
            )
        if not (isinstance(self.lr, float | int) and math.isfinite(self.lr) and self.lr > 0):
            raise DemoConfigError(f"option 'lr' must be a positive number, got {self.lr!r}",
                                  key="lr")
        if not 0.0 <= self.dropout < 1.0:
            raise DemoConfigError(f"option 'dropout' must lie in [0, 1), got {self.dropout!r}",
                                  key="dropout")
        if self.run_dir is not None and not isinstance(self.run_dir, str):
            raise DemoConfigError(
                f"option 'run_dir' must be a path or null, got {self.run_dir!r}", key="run_dir"
            )
        if not isinstance(self.seeds, bool) or not (self.seeds or self.controller.width_growth):
            raise DemoConfigError(
                f"option 'seeds' must be true or false, and false only with the controller's "
                f"width_growth on (else nothing can grow); got seeds={self.seeds!r}, "
                f"width_growth={self.controller.width_growth!r}",
                key="seeds",
            )

    @classmethod
    def quick(cls, **overrides: Any) -> LMDemoConfig:
        """The CPU quick run: :meth:`GPTConfig.narrow` (2 blocks, 1 head, width 64), T=64, B=32,
        10 epochs of 100 steps (1000 steps, 2.05M tokens per arm), lr 3e-3.

        :param overrides: options to change.
        """
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides: Any) -> LMDemoConfig:
        """The GPU run: nanoGPT's ``shakespeare_char`` host (:meth:`GPTConfig.reference`: 6
        blocks, 6 heads, width 384, dropout 0.2), T=256, B=64, lr 1e-3, 12 epochs of 50 steps
        (600 steps, 9.8M tokens per arm), 20 validation batches.

        :param overrides: options to change (``device`` defaults to ``"cuda"``).
        """
        options: dict[str, Any] = dict(
            epochs=12, steps_per_epoch=50, batch_size=64, block_size=256, eval_batches=20,
            n_layer=6, n_head=6, n_embd=384, dropout=0.2, lr=1e-3, device="cuda",
        )
        return cls(**{**options, **overrides})

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The host's shape (context ``max(256, block_size)``, as in :meth:`GPTConfig.narrow`).

        :param vocab_size: number of token ids.
        """
        return GPTConfig(
            vocab_size=vocab_size, block_size=max(256, self.block_size), n_layer=self.n_layer,
            n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout,
        )

    def controller_config(self) -> ControllerConfig:
        """:attr:`controller`, with ``width_slots`` set to :func:`lm_width_slots` when width growth
        is on and no slots were named."""
        cfg = self.controller
        if cfg.width_growth and cfg.width_slots is None:
            return dataclasses.replace(cfg, width_slots=lm_width_slots(self.n_layer))
        return cfg

    def resolved_device(self) -> torch.device:
        """:attr:`device` with ``"auto"`` resolved.

        :raises RuntimeError: if the device string is not a device.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def tokens_per_arm(self) -> int:
        """Training tokens each arm sees."""
        return self.epochs * self.steps_per_epoch * self.batch_size * self.block_size


@dataclass(frozen=True)
class LMArm:
    """One arm's outcome.

    :ivar label: ``"static"``, ``"growth"`` or ``"static_final"``.
    :ivar val_loss: final validation loss (nats per character).
    :ivar params: trainable parameters at the end, seeds included.
    :ivar tokens: training tokens seen.
    :ivar flops: training FLOPs by kind (:class:`FlopLedger`: steps, validation and
        counterfactual passes, kernel compiles), with ``"total"``.
    :ivar wall_s: wall seconds of the fit.
    :ivar fit: the fit's history and events.
    :ivar fossils: ``(slot, blueprint JSON)`` of every fossilized seed at the end.
    :ivar architecture: ``(parameter name, shape)`` of every parameter at the end.
    :ivar curve: per epoch, ``{"epoch", "tokens", "flops", "val_loss"}``: the epoch's
        validation loss with the training tokens and FLOPs counted up to its end.
    :ivar surgeries: the widenings committed during the fit (growth's width growth), as
        ``Trainer.surgeries`` records them.
    """

    label: str
    val_loss: float
    params: int
    tokens: int
    flops: dict[str, int]
    wall_s: float
    fit: FitResult
    fossils: tuple[tuple[str, str], ...]
    architecture: tuple[tuple[str, tuple[int, ...]], ...]
    curve: tuple[dict[str, float], ...] = ()
    surgeries: tuple[dict[str, Any], ...] = ()

    @property
    def bits_per_char(self) -> float:
        """:attr:`val_loss` in bits."""
        return self.val_loss / math.log(2)

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per wall second."""
        return self.tokens / self.wall_s if self.wall_s > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        """The arm's figures as JSON-ready data."""
        return {
            "arm": self.label, "val_loss": self.val_loss, "bits_per_char": self.bits_per_char,
            "params": self.params, "tokens": self.tokens, "flops": self.flops,
            "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s, "steps": self.fit.steps,
            "fossilized": [name for name, _ in self.fossils],
            "culled": self.fit.count(SeedState.CULLED),
            "widened": [dict(record) for record in self.surgeries],
            "curve": [dict(point) for point in self.curve],
        }


@dataclass(frozen=True)
class LMDemoResult:
    """The three arms, the grown model's sample, and the options they ran with."""

    arms: dict[str, LMArm]
    sample: str
    config: LMDemoConfig
    vocab_size: int
    kernels_compiled: int

    def summary(self) -> dict[str, Any]:
        """Every arm's figures, the sample and the options, as JSON-ready data."""
        return {
            "config": dataclasses.asdict(self.config),
            "vocab_size": self.vocab_size,
            "arms": {label: arm.summary() for label, arm in self.arms.items()},
            "growth_events": [dataclasses.asdict(e) for e in self.arms["growth"].fit.events],
            "kernels_compiled": self.kernels_compiled,
            "sample": self.sample,
        }


ProgressFn = Callable[[str, EpochReport, FitResult], None]


async def _arm(
    label: str,
    cfg: LMDemoConfig,
    data: ShakespeareData,
    device: torch.device,
    compiler: BlueprintCompiler | None,
    fossils: tuple[tuple[str, str], ...],
    widenings: Sequence[dict[str, Any]],
    progress: ProgressFn | None,
    telemetry: Telemetry | None = None,
) -> tuple[LMArm, GPT]:
    torch.manual_seed(cfg.seed)
    shape = cfg.gpt_config(data.vocab.size)
    model = GPT(shape)
    controller = cfg.controller_config()
    if label != "static":
        example = torch.zeros(2, cfg.block_size, dtype=torch.long)
        wrap(model, lm_slots(cfg.n_layer, widen=controller.width_growth), example_input=example)
        graft_widenings(model, widenings, seed=cfg.seed, reinit=partial(init_like_new, shape))
        graft_fossils(model, fossils, seed=cfg.seed)
    train = data.train_batches(
        batch_size=cfg.batch_size, block_size=cfg.block_size,
        batches_per_epoch=cfg.steps_per_epoch, seed=cfg.seed,
    )
    val = data.eval_batches(
        "val", batch_size=cfg.batch_size, block_size=cfg.block_size, max_batches=cfg.eval_batches
    )
    model = model.to(device)
    ledger = FlopLedger(model)
    trainer = Trainer(
        model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
        task=LanguageModelTask(),
        grow=label == "growth",
        seed=cfg.seed,
        device=device,
        compiler=compiler if label == "growth" else None,
        controller=HeuristicController(
            controller, seed=cfg.seed, blueprints=None if cfg.seeds else ()
        ),
        writes_checkpoints=False,
        telemetry=telemetry,
        progress="off",  # the CLI shows its own progress
    )
    seen = 0
    steps = 0
    curve: list[dict[str, float]] = []

    def on_epoch(report: EpochReport, fit: FitResult) -> None:
        nonlocal seen, steps
        ledger.end_epoch(report)
        for event in fit.events[seen:]:
            if event.target == SeedState.GERMINATED.value:
                slot = trainer.slots[event.slot]
                if slot.blueprint is not None and slot.contract is not None:
                    ledger.add_kernel(slot.blueprint, slot.contract)
        seen = len(fit.events)
        steps += report.steps
        curve.append({
            "epoch": report.epoch, "tokens": steps * cfg.batch_size * cfg.block_size,
            "flops": ledger.total, "val_loss": float(report.val_loss),
        })
        if progress is not None:
            progress(label, report, fit)

    # Seeds still alive at the end are judged (kept if they helped, else culled), so growth's
    # final architecture is its fossils alone, which static_final then reproduces.
    fit = await trainer.fit(ledger.train(train), ledger.val(val), epochs=cfg.epochs,
                            on_epoch=on_epoch, settle="judge", label=label)
    val_loss = fit.history[-1].val_loss if fit.history else float("nan")
    arm = LMArm(
        label=label,
        val_loss=float(val_loss),
        params=count_parameters(model),
        tokens=fit.steps * cfg.batch_size * cfg.block_size,
        flops=dict(ledger.totals, total=ledger.total),
        wall_s=fit.wall_s,
        fit=fit,
        fossils=fossils_of(trainer.slots),
        architecture=architecture(model),
        curve=tuple(curve),
        surgeries=tuple(trainer.surgeries) if label == "growth" else (),
    )
    log.info("lm_demo.arm_done", arm=label, val_loss=round(arm.val_loss, 4),
             params=arm.params, wall_s=round(arm.wall_s, 1))
    return arm, model


def _sample(model: GPT, data: ShakespeareData, cfg: LMDemoConfig, device: torch.device) -> str:
    if cfg.sample_chars == 0:
        return ""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = data.vocab.encode(SAMPLE_PROMPT).view(1, -1).to(device)
    ids = model.generate(prompt, cfg.sample_chars, top_k=None, generator=generator)
    return data.vocab.decode(ids[0, prompt.shape[1]:].cpu())


async def run_lm_demo(
    config: LMDemoConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    data: ShakespeareData | None = None,
) -> LMDemoResult:
    """Train the Shakespeare GPT host statically, with growth, and as static_final.

    The kernel compiler's workers start while the static arm trains. On CUDA, float32 matmuls
    may use TF32 (``torch.set_float32_matmul_precision("high")``) for every arm alike.

    :param config: demo options (default :meth:`LMDemoConfig.quick`).
    :param progress: called after every epoch of every arm with its label, the epoch's report
        and the fit so far.
    :param data: the corpus (default: :func:`load_shakespeare`).
    :raises CorpusMissingError: if the ``shakespeare`` package is not installed.
    :raises DemoConfigError: if the device is CUDA and CUDA is not available.
    """
    cfg = config or LMDemoConfig.quick()
    device = cfg.resolved_device()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DemoConfigError(
                f"option 'device' {cfg.device!r} needs CUDA, which is not available here",
                key="device",
            )
        torch.set_float32_matmul_precision("high")
    data = data or load_shakespeare()
    arms: dict[str, LMArm] = {}
    started = time.perf_counter()
    async with AsyncExitStack() as stack:
        telemetry = await stack.enter_async_context(
            Telemetry.create(
                run_dir=cfg.run_dir, config=TelemetryConfig(jsonl=cfg.run_dir is not None)
            )
        )
        store = None
        if cfg.use_store:
            store = await stack.enter_async_context(KernelStore(cfg.store))
        compiler = BlueprintCompiler(
            device=str(device), store=store, options=OptimizerOptions(forms=cfg.kernel_forms),
            telemetry=telemetry,
        )
        await stack.enter_async_context(compiler)
        arms["static"], _ = await _arm(
            "static", cfg, data, device, None, (), (), progress, telemetry
        )
        await compiler.wait_ready()
        arms["growth"], grown = await _arm(
            "growth", cfg, data, device, compiler, (), (), progress, telemetry
        )
        growth = arms["growth"]
        arms["static_final"], _ = await _arm(
            "static_final", cfg, data, device, None, growth.fossils, growth.surgeries, progress,
            telemetry,
        )
        compiles = compiler.compiles
    sample = _sample(grown, data, cfg, device)
    log.info("lm_demo.done", seconds=round(time.perf_counter() - started, 1))
    return LMDemoResult(
        arms=arms, sample=sample, config=cfg, vocab_size=data.vocab.size,
        kernels_compiled=compiles,
    )
