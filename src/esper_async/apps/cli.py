"""The ``esper-async`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
import torch

from .._files import read_regular, write_atomic
from ..control import EpochReport
from ..errors import DemoConfigError, StoreError
from ..reliability import CheckpointError
from ..seeds import SeedState
from ..store import add_store_parser, run_store_command
from ..telemetry import (
    ATTR_STORE_HIT,
    SPAN_STORE_GET,
    configure_logging,
    read_span_records,
    span_file_name,
)
from ..training.trainer import FitResult
from .demo import DemoConfig, DemoResult, load_demo_config, run_demo
from .lm_demo import LMDemoConfig, LMDemoResult, run_lm_demo
from .shakespeare import CorpusError
from .trace_view import add_trace_parser

__all__ = ("main",)


def _configure_logging(verbose: bool) -> None:
    # The whole chain, not only the factory: the library's quiet default routes through stdlib
    # logging, and its processors expect a stdlib logger.
    configure_logging(json=False, level=logging.INFO if verbose else logging.WARNING)


class _Progress:
    """One status line per run: rewritten in place on a terminal, printed every 10 epochs if not."""

    def __init__(self, epochs: int, *, resume: bool = False) -> None:
        self.epochs = epochs
        self.tty = sys.stderr.isatty()
        self.resume = resume
        #: label -> the first epoch this invocation trained (0-based).
        self.first_epoch: dict[str, int] = {}

    @staticmethod
    def _figure(report: EpochReport) -> str:
        bits = report.metrics.get("bits_per_token")
        if bits is not None:
            return f"bits/char {bits:.3f}"
        return f"val_acc {report.val_acc:.3f}"

    def _resumed(self, label: str, epoch: int) -> str:
        """How a run of a resumed demo starts, at its first reported ``epoch`` (0-based)."""
        if label == "static_final":
            return "trains again from scratch (it keeps no checkpoint)"
        if epoch == 0:
            return "starts from scratch (it wrote no checkpoint)"
        return (
            f"resumed from its checkpoint after epoch {epoch} of {self.epochs}, continuing at "
            f"epoch {epoch + 1}"
        )

    def __call__(self, label: str, report: EpochReport, fit: FitResult) -> None:
        if label not in self.first_epoch:
            self.first_epoch[label] = report.epoch
            if self.resume:
                print(f"{label:>12}: {self._resumed(label, report.epoch)}", file=sys.stderr,
                      flush=True)
        done = report.epoch + 1
        bar = "#" * (20 * done // self.epochs)
        live = (
            sum(1 for e in fit.events if e.target == SeedState.GERMINATED.value)
            - fit.count(SeedState.FOSSILIZED)
            - fit.count(SeedState.CULLED)
        )
        line = (
            f"{label:>12} [{bar:<20}] epoch {done:>3}/{self.epochs}  {self._figure(report)}  "
            f"val_loss {report.val_loss:.3f}  fossilized {fit.count(SeedState.FOSSILIZED)}  "
            f"culled {fit.count(SeedState.CULLED)}  live {live}"
        )
        if self.tty:
            end = "\n" if done == self.epochs else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif done % 10 == 0 or done == self.epochs:
            print(line, file=sys.stderr, flush=True)


def _align(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_lm_table(result: LMDemoResult) -> str:
    """The Shakespeare demo's closing table: one row per arm."""
    rows = [("arm", "val loss", "bits/char", "params", "tokens", "train FLOPs", "tokens/s",
             "wall s")]
    for arm in result.arms.values():
        rows.append((
            arm.label, f"{arm.val_loss:.4f}", f"{arm.bits_per_char:.4f}", str(arm.params),
            str(arm.tokens), f"{arm.flops['total']:.3e}", f"{arm.tokens_per_s:.0f}",
            f"{arm.wall_s:.1f}",
        ))
    return _align(rows)


def format_table(result: DemoResult) -> str:
    """The demo's closing table."""
    rows = [("run", "test acc", "params", "fossilized", "culled", "wall s")]
    for run in (result.static, result.growth, result.static_final):
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
    return _align(rows)


def format_surgery(op: Mapping[str, Any]) -> str:
    """One surgery record (``{"op": "widen_slot", "target": "conv1", "width": 6, ...}``) as
    ``widen_slot conv1 (width 6, seed 6)``."""
    rest = ", ".join(f"{k} {v}" for k, v in op.items() if k not in ("op", "target"))
    text = f"{op.get('op', '?')} {op.get('target', '')}".rstrip()
    return f"{text} ({rest})" if rest else text


def store_lookups(run_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """Kernel-store hits and misses this process recorded in ``run_dir``'s trace.

    :param run_dir: the run directory.
    :returns: ``(hits, misses)``; ``(0, 0)`` when this process wrote no trace there.
    """
    path = Path(run_dir) / span_file_name("run")
    if not path.is_file():
        return 0, 0
    lookups = [
        bool(r.attributes[ATTR_STORE_HIT])
        for r in read_span_records(path)
        if r.name == SPAN_STORE_GET and ATTR_STORE_HIT in r.attributes
    ]
    return sum(lookups), len(lookups) - sum(lookups)


_LIFECYCLE = (
    SeedState.GERMINATED.value, SeedState.BLENDING.value, SeedState.FOSSILIZED.value,
    SeedState.CULLED.value,
)


def _lm_demo(args: argparse.Namespace) -> int:
    digits_only = [
        flag for flag, given in (("--resume", args.resume is not None),
                                 ("--surgery", args.surgery)) if given
    ]
    if digits_only:
        print(f"esper-async: {', '.join(digits_only)} apply to --task digits only",
              file=sys.stderr)
        return 2
    try:
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                              else "cpu" if args.device == "auto" else args.device)
    except RuntimeError as exc:
        print(f"esper-async: bad --device {args.device!r}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"esper-async: --device {args.device} needs CUDA, which is not available here",
              file=sys.stderr)
        return 2
    run_dir = args.run_dir or time.strftime("runs/lm-%Y%m%d-%H%M%S")
    overrides: dict[str, Any] = {
        "seed": args.seed, "store": args.store, "use_store": not args.no_store,
        "device": str(device), "run_dir": run_dir,
    }
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.steps is not None:
        overrides["steps_per_epoch"] = args.steps
    try:
        make = LMDemoConfig.full if device.type == "cuda" else LMDemoConfig.quick
        cfg = make(**overrides)
    except DemoConfigError as exc:
        print(f"esper-async: {exc}", file=sys.stderr)
        return 2
    print(
        f"esper_async demo: Shakespeare (bundled, char-level), GPT {cfg.n_layer}x{cfg.n_embd} "
        f"({cfg.n_head} head(s)), T={cfg.block_size}, B={cfg.batch_size}, {cfg.epochs} epochs of "
        f"{cfg.steps_per_epoch} steps per arm, seed {cfg.seed}, device {device}"
    )
    try:
        result = anyio.run(lambda: run_lm_demo(cfg, progress=_Progress(cfg.epochs)))
    except (CorpusError, StoreError, DemoConfigError) as exc:
        print(f"esper-async: {exc}", file=sys.stderr)
        return 2
    print()
    print(format_lm_table(result))
    print("\ngrowth events:")
    for event in result.arms["growth"].fit.events:
        if event.target in _LIFECYCLE:
            print(f"  epoch {event.epoch:>3}  {event.slot:<18} {event.target:<10} {event.reason}")
    final = [name for name, _ in result.arms["growth"].fossils]
    print(f"final architecture: host + seeds in {', '.join(final) or 'no slot'}")
    if result.arms["growth"].fit.ended_eager:
        print(_ended_eager(result.arms["growth"].fit.ended_eager))
    gain = result.arms["growth"].val_loss - result.arms["static_final"].val_loss
    print(f"growth - static_final: {gain:+.4f} val loss (nats/char)")
    print(f"\nsample from the grown model (seed {cfg.seed}):\n{result.sample}")
    print(f"\ntrace: {run_dir} (view it with `esper-async trace {run_dir}`)")
    return 0


#: Written into a digits demo's run directory when all three runs finished: what the demo
#: printed, so that ``--resume`` of a finished run shows it instead of training anything again.
_RESULT_FILE = "demo-result.json"
#: The largest result file read back (it holds a table and a few dozen event lines).
_MAX_RESULT_BYTES = 1 << 20


def _write_result(run_dir: Path, epochs: int, report: str) -> None:
    write_atomic(run_dir / _RESULT_FILE, json.dumps({"epochs": epochs, "report": report}).encode())


def _finished_report(run_dir: Path, epochs: int) -> str | None:
    """What the demo in ``run_dir`` printed when it finished ``epochs`` epochs of each run;
    ``None`` if it did not (or finished another number of epochs).

    :raises DemoConfigError: if the result file is there but is not one.
    """
    path = run_dir / _RESULT_FILE
    try:
        data = read_regular(path, cap=_MAX_RESULT_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a link out, a FIFO or device, too large: refused before the read
        raise DemoConfigError(f"cannot read {path}: {exc}; delete it to resume the run",
                              key=None, path=str(path)) from exc
    try:
        result = json.loads(data.decode("utf-8"))
        if not isinstance(result, dict) or not isinstance(result.get("report"), str):
            raise ValueError("no report in it")
    except (ValueError, RecursionError) as exc:
        raise DemoConfigError(f"{path} is not a demo result ({exc}); delete it to resume the "
                              "run", key=None, path=str(path)) from exc
    if result.get("epochs") != epochs:
        return None
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in result["report"])


def _demo(args: argparse.Namespace) -> int:
    if args.task == "shakespeare":
        return _lm_demo(args)
    if args.steps is not None:
        print("esper-async: --steps applies to --task shakespeare only", file=sys.stderr)
        return 2
    try:
        if args.resume is not None:
            run_dir = args.resume
            try:
                cfg = load_demo_config(run_dir, store=args.store)
            except FileNotFoundError:
                print(f"esper-async: {run_dir} holds no demo run to resume (no demo.json)",
                      file=sys.stderr)
                return 2
            finished = _finished_report(Path(run_dir), cfg.epochs)
            if finished is not None:
                print(f"{run_dir}: the demo had finished all {cfg.epochs} epochs of its three "
                      "runs; nothing to resume. Its results:\n")
                print(finished)
                return 0
        else:
            run_dir = args.run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
            cfg = DemoConfig(
                epochs=DemoConfig.epochs if args.epochs is None else args.epochs,
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
        progress = _Progress(cfg.epochs, resume=cfg.resume)
        result = anyio.run(lambda: run_demo(cfg, progress=progress))
    except CheckpointError as exc:
        print(f"\nesper-async: cannot resume: {exc}", file=sys.stderr)
        return 2
    except (StoreError, DemoConfigError) as exc:
        print(f"\nesper-async: {exc}", file=sys.stderr)
        return 2
    lines = ["", format_table(result), ""]
    for event in result.growth.fit.events:
        if event.target in (
            SeedState.GERMINATED.value,
            SeedState.FOSSILIZED.value,
            SeedState.CULLED.value,
        ):
            lines.append(
                f"  epoch {event.epoch:>3}  {event.slot:<6} {event.target:<10} {event.reason}"
            )
    lines += [f"  surgery: {format_surgery(op)}" for op in result.growth.surgeries]
    if result.growth.fit.ended_eager:
        lines.append(f"  {_ended_eager(result.growth.fit.ended_eager)}")
    if cfg.resume:
        for label in ("static", "growth"):
            if label not in progress.first_epoch:
                lines.append(f"  {label}: had finished all {cfg.epochs} epochs; nothing to resume")
    gain = result.growth.test_acc - result.static.test_acc
    final = result.growth.test_acc - result.static_final.test_acc
    lines.append(
        f"\ngrowth vs static: {gain:+.4f} test accuracy; growth vs static_final: {final:+.4f}"
    )
    if result.store_path is None:
        lines.append(f"kernels: {result.kernels_compiled} compiled (no store)")
    else:
        hits, misses = store_lookups(run_dir)
        lines.append(
            f"kernels: {result.kernels_compiled} compiled; store lookups: {hits} hit(s), "
            f"{misses} miss(es) (store: {result.store_path})"
        )
    lines.append(f"trace: {run_dir} (view it with `esper-async trace {run_dir}`)")
    report = "\n".join(lines)
    print(report)
    _write_result(Path(run_dir), cfg.epochs, report)
    return 0


def _ended_eager(slots: list[str]) -> str:
    """The summary's line for seeds that ended the run as their blueprint's eager module."""
    return (
        f"ended as their blueprint's eager module (the run ended before their kernel compiled; "
        f"the validator's reference): {', '.join(slots)}"
    )


def _version() -> str:
    try:
        return metadata.version("esper_async")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after the sub-command's name (after it, the
    default is left out so that it does not undo one given before)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log lifecycle events and epochs to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (one sub-command per job)."""
    parser = argparse.ArgumentParser(prog="esper-async", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}",
        help="print the version and exit",
    )
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train a host statically, with growth, and as growth's final architecture"
    )
    demo.add_argument(
        "--task", choices=("digits", "shakespeare"), default="digits",
        help="digits (default): the conv host on 8x8 digits; shakespeare: a GPT on bundled "
        "Shakespeare (CPU: the quick size; --device cuda: the reference size)",
    )
    demo.add_argument(
        "--epochs", type=int, default=None,
        help=f"epochs of each run (default {DemoConfig.epochs} for digits; shakespeare "
        f"{LMDemoConfig.epochs} on the CPU, {LMDemoConfig.full().epochs} on CUDA)",
    )
    demo.add_argument(
        "--steps", type=int, default=None,
        help=f"shakespeare only: training steps per epoch (default {LMDemoConfig.steps_per_epoch}"
        f" on the CPU, {LMDemoConfig.full().steps_per_epoch} on CUDA)",
    )
    demo.add_argument(
        "--seed", type=int, default=DemoConfig.seed,
        help=f"random seed of data split, model and growth (default {DemoConfig.seed})",
    )
    demo.add_argument(
        "--store", default=None,
        help="kernel store directory (default: user cache); with --resume, the store to use "
        "instead of the one the run's demo.json names",
    )
    demo.add_argument("--no-store", action="store_true", help="compile every kernel afresh")
    demo.add_argument(
        "--run-dir", default=None,
        help="where the trace goes, with the options and checkpoints for digits (default "
        "runs/demo-* for digits, runs/lm-* for shakespeare, which keeps no checkpoints)",
    )
    demo.add_argument(
        "--surgery", action="store_true",
        help="digits only: the growth run also widens each slot whose seed fossilized "
        "(WidenSlot)",
    )
    demo.add_argument(
        "--device", default=DemoConfig.device,
        help="cpu (default), cuda, cuda:N, or auto (CUDA when available)",
    )
    demo.add_argument(
        "--resume", metavar="RUN_DIR", default=None,
        help="digits only: continue the demo run in RUN_DIR from its last checkpoints (other "
        "options, but --store, are read from the run's demo.json; a finished run shows its "
        "results)",
    )
    demo.set_defaults(func=_demo)
    store = add_store_parser(sub)
    store.set_defaults(func=lambda a: anyio.run(run_store_command, a))
    for command in (demo, store, add_trace_parser(sub)):
        _global_options(command, top=False)
    return parser


@contextmanager
def _sigterm_as_interrupt() -> Iterator[list[bool]]:
    """SIGTERM stops the command like Ctrl-C: the event loop cancels the run, the compile
    workers are shut down, and the caller prints one line instead of tracebacks.

    :returns: a one-item list that is ``[True]`` once SIGTERM arrived.
    """
    seen = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        seen[0] = True
        signal.raise_signal(signal.SIGINT)  # asyncio's runner cancels its main task on SIGINT

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``esper-async``.

    :param argv: the arguments (``sys.argv[1:]`` when omitted).
    :returns: the exit status: 0 success, 1 nothing to show, 2 bad input, 130 interrupted
        (Ctrl-C), 143 stopped by SIGTERM.
    """
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    with _sigterm_as_interrupt() as terminated:
        try:
            status = int(args.func(args))
            if terminated[0]:  # the cancellation came too late to stop the command's work
                raise KeyboardInterrupt
            return status
        except KeyboardInterrupt:
            what = "SIGTERM" if terminated[0] else "interrupt"
            print(f"\nesper-async: stopped by {what}", file=sys.stderr)
            return 143 if terminated[0] else 130
        except BrokenPipeError:
            # The reader went away (`esper-async trace RUN | head`): stop quietly, and keep
            # Python from complaining again when it flushes stdout at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141


if __name__ == "__main__":
    sys.exit(main())
