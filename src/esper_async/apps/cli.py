"""The ``esper-async`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import anyio
import structlog
import torch

from ..control._controller import EpochReport
from ..errors import DemoConfigError
from ..reliability import CheckpointError
from ..seeds import SeedState
from ..store._cli import add_store_parser, run_store_command
from ..telemetry import (
    ATTR_EPOCH,
    ATTR_TRAIN_LOSS,
    ATTR_VAL_ACC,
    ATTR_VAL_LOSS,
    EVENT_EPOCH_FIGURES,
    Telemetry,
)
from ..training.trainer import FitResult
from .demo import DemoConfig, DemoResult, load_demo_config, run_demo
from .trace_view import add_trace_parser

__all__ = ("main",)


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


class _Progress:
    """One status line per run: rewritten in place on a terminal, printed every 10 epochs if not."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.tty = sys.stderr.isatty()

    def __call__(self, label: str, report: EpochReport, fit: FitResult) -> None:
        # The figures of the epoch, as an event on the run span (current here) for the dashboard.
        Telemetry.event(
            EVENT_EPOCH_FIGURES,
            {
                ATTR_EPOCH: report.epoch,
                ATTR_TRAIN_LOSS: report.train_loss,
                ATTR_VAL_LOSS: report.val_loss,
                ATTR_VAL_ACC: report.val_acc,
            },
        )
        done = report.epoch + 1
        bar = "#" * (20 * done // self.epochs)
        live = (
            sum(1 for e in fit.events if e.target == SeedState.GERMINATED.value)
            - fit.count(SeedState.FOSSILIZED)
            - fit.count(SeedState.CULLED)
        )
        line = (
            f"{label:>7} [{bar:<20}] epoch {done:>3}/{self.epochs}  val_acc {report.val_acc:.3f}  "
            f"val_loss {report.val_loss:.3f}  fossilized {fit.count(SeedState.FOSSILIZED)}  "
            f"culled {fit.count(SeedState.CULLED)}  live {live}"
        )
        if self.tty:
            end = "\n" if done == self.epochs else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif done % 10 == 0 or done == self.epochs:
            print(line, file=sys.stderr, flush=True)


def format_table(result: DemoResult) -> str:
    """The demo's closing table."""
    rows = [("run", "test acc", "params", "fossilized", "culled", "wall s")]
    for run in (result.static, result.growth):
        rows.append(
            (
                run.label,
                f"{run.test_acc:.4f}",
                str(run.params),
                str(run.fossilized),
                str(run.culled),
                f"{run.wall_s:.1f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    try:
        if args.resume is not None:
            run_dir = args.resume
            try:
                cfg = load_demo_config(run_dir)
            except FileNotFoundError:
                print(f"esper-async: {run_dir} holds no demo run to resume (no demo.json)",
                      file=sys.stderr)
                return 2
        else:
            run_dir = args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
            cfg = DemoConfig(
                epochs=args.epochs,
                seed=args.seed,
                store=args.store,
                use_store=not args.no_store,
                run_dir=run_dir,
                device=args.device,
                surgery=args.surgery,
            )
    except DemoConfigError as exc:
        print(f"esper-async: {exc}", file=sys.stderr)
        return 2
    try:
        device = cfg.resolved_device()
    except RuntimeError as exc:
        print(f"esper-async: bad --device {cfg.device!r}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"esper-async: --device {cfg.device} needs CUDA, which is not available here",
              file=sys.stderr)
        return 2
    print(
        f"esper_async demo: digits (8x8, bundled), impaired conv host, {cfg.epochs} epochs, "
        f"seed {cfg.seed}, device {device}; slots {', '.join(cfg.slots)}"
    )
    try:
        result = anyio.run(lambda: run_demo(cfg, progress=_Progress(cfg.epochs)))
    except CheckpointError as exc:
        print(f"\nesper-async: cannot resume: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_table(result))
    print()
    for event in result.growth.fit.events:
        if event.target in (
            SeedState.GERMINATED.value,
            SeedState.FOSSILIZED.value,
            SeedState.CULLED.value,
        ):
            print(f"  epoch {event.epoch:>3}  {event.slot:<6} {event.target:<10} {event.reason}")
    for op in result.growth.surgeries:
        print(f"  surgery: {op}")
    gain = result.growth.test_acc - result.static.test_acc
    print(f"\ngrowth vs static: {gain:+.4f} test accuracy")
    where = f" (store: {result.store_path})" if result.store_path else ""
    print(
        f"kernels: {result.kernels_compiled} compiled, {result.kernels_from_store} loaded from "
        f"the store{where}"
    )
    print(f"trace: {run_dir} (view it with `esper-async trace {run_dir}`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one sub-command per job)."""
    parser = argparse.ArgumentParser(prog="esper-async", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log lifecycle events")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the digits host statically and with growth")
    demo.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    demo.add_argument("--seed", type=int, default=DemoConfig.seed)
    demo.add_argument("--store", default=None, help="kernel store directory (default: user cache)")
    demo.add_argument("--no-store", action="store_true", help="compile every kernel afresh")
    demo.add_argument(
        "--run-dir", default=None,
        help="where the trace and checkpoints go (default runs/demo-*)",
    )
    demo.add_argument(
        "--surgery", action="store_true",
        help="the growth run also widens each slot whose seed fossilized (WidenSlot)",
    )
    demo.add_argument(
        "--device", default=DemoConfig.device,
        help="cpu (default), cuda, cuda:N, or auto (CUDA when available)",
    )
    demo.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="continue the demo run in RUN_DIR from its last checkpoints (other options are "
        "read from the run)",
    )
    demo.set_defaults(func=_demo)
    add_store_parser(sub).set_defaults(func=lambda a: anyio.run(run_store_command, a))
    add_trace_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``esper-async``."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
