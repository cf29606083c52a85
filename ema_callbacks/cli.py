"""The ``ema-callbacks`` command line (also ``python -m ema_callbacks``).

========================  ==================================================================
``demo``                  train on scikit-learn's digits with every installed trainer; raw vs
                          EMA accuracy and loss per trainer, and a PNG plot of the curves
``run CONFIG``            run a training described by a YAML file or a bundled example
                          (Composer, Lightning or transformers; ``run --list`` names them)
``export CHECKPOINT``     write the EMA weights of a Composer, Lightning or transformers
                          checkpoint as a plain safetensors state dict
``halflife``              convert between a per-update smoothing (decay) and a half-life
``posthoc SNAPSHOTS``     reconstruct an EMA of any width after training (EDM2 post-hoc EMA)
``sweep``                 accuracy against EMA half-life on digits, from one run: tracked
                          profiles and post-hoc reconstructions, a table and a PNG plot
``averages``              accuracy against training time on digits, from one run: an EMA,
                          BEMA and the uniform (SWA) average, a table and a PNG plot
========================  ==================================================================

Every command prints its results as ``key: value`` lines; errors and warnings are one line on
stderr, ``ema-callbacks COMMAND: error: ...`` (exit status 2 for bad usage, 1 for a failed
run) and ``ema-callbacks COMMAND: warning: ...``.

>>> main(['halflife', '--smoothing', '0.999', '--interval', '1ba'])
smoothing: 0.999
interval: 1ba
half_life: 693ba
0
>>> main(['halflife', '--half-life', '693ba'])     # the interval: 1 of the half-life's unit
half_life: 693ba
interval: 1ba
smoothing: 0.999000
0
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ema_callbacks.schedule import half_life_to_smoothing, smoothing_to_half_life
from ema_callbacks.time_strings import Time

__all__ = ["DEMO_TRAINERS", "main"]

# (label, module with run_digits_demo, the package it needs)
DEMO_TRAINERS: list[tuple[str, str, str]] = [
    ("lightning", "ema_callbacks.examples.lightning_digits", "lightning"),
    ("transformers", "ema_callbacks.examples.transformers_digits", "transformers"),
    ("composer", "ema_callbacks.examples.composer_digits", "composer"),
]

_NO_PLOT = 'none (matplotlib is not installed: pip install "ema-callbacks[demo]")'


def _halflife(args: argparse.Namespace) -> int:
    if args.interval is None:  # one of the half-life's unit (1ba with --smoothing)
        unit = "ba" if args.half_life is None else args.half_life.unit.value
        args.interval = Time.parse(f"1{unit}")
    interval = args.interval
    if args.smoothing is not None:
        half_life = smoothing_to_half_life(args.smoothing, float(interval.value))
        if math.isinf(half_life):
            value = "inf"
        elif interval.unit.integral:
            value = f"{half_life:.0f}"
        else:
            value = f"{half_life:.6g}"
        _report(
            {
                "smoothing": f"{args.smoothing:g}",
                "interval": interval,
                "half_life": f"{value}{interval.unit}",
            }
        )
    else:
        half_life_time = args.half_life
        if half_life_time.unit is not interval.unit:
            raise ValueError(
                "--half-life and --interval must use the same unit; "
                f"got {_typed(half_life_time)!r} and {_typed(interval)!r}"
            )
        beta = half_life_to_smoothing(float(half_life_time.value), float(interval.value))
        _report({"half_life": half_life_time, "interval": interval, "smoothing": f"{beta:.6f}"})
    return 0


def _report(values: dict[str, Any]) -> None:
    """The one output style of every command: ``key: value`` lines on stdout."""
    for key, value in values.items():
        print(f"{key}: {value}", flush=True)


class _Progress:
    """A tqdm bar on stderr, so that stdout holds only the results."""

    def __init__(self, label: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(desc=f"{label:12s}", total=1, unit="step", leave=True, file=sys.stderr)

    def __call__(self, done: int, total: int) -> None:
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)  # rate-limited by tqdm's mininterval

    def close(self) -> None:
        self.bar.close()


def _available(package: str) -> bool:
    """Whether ``package`` is installed: a module or regular package, not a namespace package
    (a folder of that name in the working directory, such as a ``composer/`` of one's own)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def _plot(results: dict[str, list[dict[str, Any]]], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (trainer, rows) in enumerate(results.items()):
        color = f"C{i}"
        epochs = [r["epoch"] for r in rows]
        for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
            ax.plot(
                epochs,
                [r[f"raw_{metric}"] for r in rows],
                "--",
                color=color,
                alpha=0.6,
                label=f"{trainer}: training weights",
            )
            ax.plot(
                epochs,
                [r[f"ema_{metric}"] for r in rows],
                "-",
                color=color,
                linewidth=2,
                label=f"{trainer}: EMA weights",
            )
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("scikit-learn digits: training weights vs EMA (ema_callbacks)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _demo(args: argparse.Namespace) -> int:
    from ema_callbacks.demo import digits_tensors, format_table
    from ema_callbacks.examples import run_digits_demo as run_plain

    started = time.perf_counter()
    digits_tensors()  # the data first: without scikit-learn this names the extra, at once
    wanted = args.trainers or ["plain"] + [label for label, _, _ in DEMO_TRAINERS]
    runs: list[tuple[str, Callable[..., list[dict[str, Any]]]]] = [("plain", run_plain)]
    skipped = []
    for label, module, package in DEMO_TRAINERS:
        if label not in wanted:
            continue
        if not _available(package):
            if args.trainers:  # asked for by name: a missing extra is a failed run
                raise ImportError(
                    f'--trainers {label}: {package} is not installed; pip install "ema-callbacks[{label}]"'
                )
            skipped.append(label)
            continue
        runs.append((label, importlib.import_module(module).run_digits_demo))
    _report(
        {
            "data": "scikit-learn digits (a small MLP)",
            "trainers": ", ".join(label for label, _ in runs),
            **({"not_installed": ", ".join(skipped)} if skipped else {}),
            "epochs": args.epochs,
            "half_life": args.half_life,
        }
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for label, fn in runs:
        progress = _Progress(label)
        try:
            results[label] = fn(
                epochs=args.epochs, half_life=str(args.half_life), seed=args.seed, progress=progress
            )
        finally:
            progress.close()
    print()
    print(format_table({label: rows[-1] for label, rows in results.items()}))
    print()
    plotted = _plot(results, args.plot)
    _report(
        {
            "plot": args.plot if plotted else _NO_PLOT,
            "seconds": f"{time.perf_counter() - started:.0f}",
        }
    )
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """Options and positionals in any order: ``run NAME --output-dir X trainer.max_epochs=1``
    (plain argparse leaves the overrides after an option unrecognised)."""

    _mixing = False

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def _run(args: argparse.Namespace) -> int:
    from ema_callbacks import run_config

    if args.list:
        if args.config is not None or args.overrides:
            raise ValueError("--list takes no config and no overrides")
        for name, path in run_config.bundled_configs().items():
            print(f"{name}: {run_config.describe_config(path)}")
        return 0
    if args.config is None:
        raise ValueError("run needs a config: a YAML file or a bundled name (see run --list)")
    if args.output is not None and not args.print_config:
        raise ValueError("-o/--output is for --print-config; the run's folder is --output-dir")
    if args.print_config:
        if args.overrides:
            raise ValueError("--print-config writes the file as it is: give no overrides")
        text = run_config.find_config(args.config).read_text(encoding="utf-8")
        if args.output is None:
            print(text, end="")
            return 0
        from pathlib import Path

        from ema_callbacks.files import atomic_write

        if Path(args.output).exists():
            raise ValueError(f"-o {args.output}: exists; choose a new file")
        atomic_write(args.output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"config: {args.output}")
        return 0
    config = run_config.load_config(args.config, args.overrides)
    folder = run_config.output_folder(config, args.output_dir)
    print(f"output_dir: {folder}", flush=True)
    result = run_config.train(config, folder)
    for key, value in sorted(result.metrics.items()):
        print(f"{key}: {value:g}")
    print(f"checkpoints: {result.checkpoints if result.checkpoints else '(none written)'}")
    if result.last_checkpoint is not None:
        print(f"last_checkpoint: {result.last_checkpoint}")
    print(f"ema_weights: {result.ema_weights if result.ema_weights else '(the EMA never started)'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ema_callbacks.export import export_ema

    summary = export_ema(
        args.checkpoint,
        args.output if args.output is not None else _default_export_output(args.format),
        dtype=args.dtype,
        name=args.name,
        profile=args.profile,
        strip_prefix=args.strip_prefix,
        format=args.format,
        force=args.force,
    )
    _report(summary)
    return 0


def _default_export_output(format: str) -> str:
    return "ema_model" if format == "hf" else "ema.safetensors"


def _posthoc(args: argparse.Namespace) -> int:
    from ema_callbacks.posthoc import _gamma, posthoc_command

    if args.sigma_rel is not None:
        _gamma(args.sigma_rel, "--sigma-rel")
    summary = posthoc_command(
        args.inputs,
        args.output,
        sigma_rel=args.sigma_rel,
        half_life=None if args.half_life is None else _typed(args.half_life),
        at=None if args.at is None else _typed(args.at),
        dtype=args.dtype,
        progress=True,
    )
    _report(summary)
    return 0


def _averages(args: argparse.Namespace) -> int:
    from ema_callbacks.examples.sweep import (
        averages_over_time,
        format_averages_table,
        plot_averages,
    )

    started = time.perf_counter()
    _report(
        {
            "data": "scikit-learn digits (a small MLP), trained once",
            "steps": args.steps,
            "averages": f"EMA (half-life {args.half_life}ba), BEMA and uniform, tracked together",
        }
    )
    progress = _Progress("averages")
    try:
        result = averages_over_time(
            steps=args.steps,
            every=min(args.every, args.steps),
            half_life=args.half_life,
            seed=args.seed,
            progress=progress,
        )
    finally:
        progress.close()
    print()
    print(format_averages_table(result))
    print()
    plotted = plot_averages(result, args.output)
    _report(
        {
            **{f"final_{name}": f"{result.final(name):.4f}" for name in result.accuracy},
            "plot": args.output if plotted else _NO_PLOT,
            "seconds": f"{time.perf_counter() - started:.0f}",
        }
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from ema_callbacks.examples.sweep import (
        DEFAULT_HALF_LIVES,
        format_sweep_table,
        half_life_sweep,
        plot_sweep,
    )

    started = time.perf_counter()
    _report(
        {
            "data": "scikit-learn digits (a small MLP), trained once",
            "steps": args.steps,
            "half_lives": f"{len(DEFAULT_HALF_LIVES)} tracked together in one EMA",
            "posthoc": "sigma_rel 0.05 and 0.10 snapshots, reconstructed on a grid",
        }
    )
    progress = _Progress("sweep")
    try:
        result = half_life_sweep(
            steps=args.steps, seed=args.seed, progress=progress, snapshot_folder=args.snapshots
        )
    finally:
        progress.close()
    table = format_sweep_table(result)
    print()
    print(table)
    print()
    if args.table:
        with open(args.table, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    plotted = plot_sweep(result, args.output)
    _report(
        {
            **({"table": args.table} if args.table else {}),
            **({"snapshots": args.snapshots} if args.snapshots else {}),
            "plot": args.output if plotted else _NO_PLOT,
            "training_seconds": f"{result.seconds:.1f}",
            "seconds": f"{time.perf_counter() - started:.0f}",
        }
    )
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Help with every option's default (as ArgumentDefaultsHelpFormatter, but silent where
    there is none to show: no default, a flag that is off, or help that already says)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if (
            "%(default)" in help
            or "default" in help
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return help
        return f"{help} (default: %(default)s)"


def _integer(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


@dataclasses.dataclass(frozen=True)
class _TypedTime(Time):
    """A parsed time string that remembers its text, so messages quote what the user typed."""

    typed: str = dataclasses.field(default="", compare=False, repr=False)


def _typed(value: Time) -> str:
    return getattr(value, "typed", "") or str(value)


def _time(positive: bool = False) -> Callable[[str], Time]:
    """A time string; ``positive``: also above zero and finite."""

    def parse(text: str) -> Time:
        try:
            value = Time.parse(text, "VALUE")
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("VALUE ")) from None
        if positive and (value.value == 0 or value.is_infinite):
            raise argparse.ArgumentTypeError(f"must be positive and finite; got {text!r}")
        return _TypedTime(value.value, value.unit, typed=text)

    parse.__name__ = "time string"
    return parse


def _smoothing(text: str) -> float:
    try:
        value = float(text)
        smoothing_to_half_life(value, 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number between 0 and 1; got {text!r}"
        ) from None
    return value


def _output_file(text: str) -> str:
    """A file to write: its folder must exist, and it must not be a folder itself."""
    folder = os.path.dirname(text) or "."
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder!r} does not exist")
    return text


def _parser() -> argparse.ArgumentParser:
    from ema_callbacks import __version__

    parser = argparse.ArgumentParser(
        prog="ema-callbacks",
        description="Exponential moving averages of model weights: the demo, YAML runs, "
        "exports of the EMA from checkpoints, post-hoc EMA and half-life arithmetic.",
        epilog="ema-callbacks COMMAND --help describes each command. Exit status: 0 done, "
        "1 the run failed (a damaged file, a missing extra), 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"ema-callbacks {__version__}")
    # Options every subcommand takes (after the subcommand's name).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the full traceback when the command fails"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=description,
            formatter_class=_HelpFormatter,
        )

    demo = command(
        "demo",
        "train on scikit-learn's digits: raw vs EMA, per trainer",
        "Train a small MLP on scikit-learn's digits (bundled with scikit-learn, nothing is "
        "downloaded) with a plain PyTorch loop and every installed trainer, evaluating the "
        "training weights and the EMA after every epoch; print a raw-vs-EMA table and write a "
        'PNG of the curves. Needs scikit-learn: pip install "ema-callbacks[demo]".',
    )
    demo.add_argument("--epochs", type=_integer(1), default=6, help="epochs per trainer")
    demo.add_argument(
        "--half-life", type=_time(), default="0.5ep", help="the EMA's half-life, a time string"
    )
    demo.add_argument("--seed", type=_integer(0), default=0, help="seeds data split and weights")
    demo.add_argument(
        "--plot", type=_output_file, default="ema_demo.png", help="where to write the PNG plot"
    )
    demo.add_argument(
        "--trainers",
        nargs="+",
        choices=["plain", *(label for label, _, _ in DEMO_TRAINERS)],
        metavar="TRAINER",
        help="only these: plain, lightning, transformers, composer (default: every installed "
        "one; plain always runs)",
    )
    demo.set_defaults(func=_demo)

    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a training described by a YAML file (or a bundled example config)",
        description=(
            "Check a run config (Composer, Lightning or transformers: its 'framework' key says "
            "which) against the trainer's own signatures, then train, keeping what the run "
            "writes: checkpoints and the EMA weights as safetensors. --list names the bundled "
            "examples; --print-config writes one out to start your own."
        ),
    )
    run.add_argument(
        "config", nargs="?", help="a YAML file, or a bundled config's name (see --list)"
    )
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="replace a value by dotted key, read as YAML: trainer.max_epochs=1, "
        "training_arguments.learning_rate=0.01, trainer.callbacks[0].init_args.half_life=1ep",
    )
    run.add_argument(
        "--output-dir",
        metavar="DIR",
        help="the run's folder (default: the config's own output path, else a new folder "
        "runs/NAME-TIME)",
    )
    run.add_argument("--list", action="store_true", help="list the bundled example configs")
    run.add_argument(
        "--print-config",
        action="store_true",
        help="write the config out (to stdout, or -o FILE) instead of running it",
    )
    run.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="with --print-config: the file to write (must not exist)",
    )
    run.__class__ = _IntermixedParser
    run.set_defaults(func=_run)

    export = command(
        "export",
        "write a checkpoint's EMA weights as safetensors or a save_pretrained folder",
        "Write the EMA weights of a checkpoint as a plain safetensors state dict (keys: the "
        "model's names without wrapper prefixes such as DDP's or Composer's 'module.'), or "
        "with --format hf a transformers save_pretrained folder. Never writes over an input.",
    )
    export.add_argument(
        "checkpoint",
        help="Composer .pt, Lightning .ckpt, transformers checkpoint-N/ folder, or a saved EMA state",
    )
    export.add_argument(
        "-o",
        "--output",
        default=None,
        help="the file to write (default: ema.safetensors), or the folder with --format hf "
        "(default: ema_model)",
    )
    export.add_argument(
        "--format",
        choices=["safetensors", "hf"],
        default="safetensors",
        help="safetensors: one state-dict file; hf: a save_pretrained folder (from a "
        "transformers checkpoint folder) for from_pretrained and push_to_hub",
    )
    export.add_argument(
        "--strip-prefix",
        action="append",
        metavar="PREFIX",
        help="keep the tensors under PREFIX (e.g. 'model.', the module inside a "
        "LightningModule), renamed without it; repeatable (default: keep every name)",
    )
    export.add_argument(
        "--dtype", help="cast floating tensors, e.g. float16 or bfloat16 (default: as stored)"
    )
    export.add_argument(
        "--name", help="which EMA, if a checkpoint folder holds several (default: the only one)"
    )
    export.add_argument(
        "--profile",
        help="which of several EMAs tracked together, e.g. ema_1000ba (default: the primary one)",
    )
    export.add_argument(
        "--force",
        action="store_true",
        help="allow a new file inside the input checkpoint folder, or replacing the model files "
        "of an existing --format hf folder (an input file is never written over)",
    )
    export.set_defaults(func=_export)

    hl = command(
        "halflife",
        "convert between smoothing (decay) and half-life",
        "Convert a per-update smoothing (decay, e.g. 0.999) into a half-life at an update "
        "interval, or a half-life into the smoothing per update: beta ** (half_life / interval) "
        "= 0.5.",
    )
    group = hl.add_mutually_exclusive_group(required=True)
    group.add_argument("--smoothing", type=_smoothing, help="per-update decay, e.g. 0.999")
    group.add_argument("--half-life", type=_time(), help="a time string, e.g. 693ba or 1ep")
    hl.add_argument(
        "--interval",
        type=_time(positive=True),
        help="the update interval, a time string (default: 1 of the half-life's unit, e.g. 1ep "
        "for --half-life 2ep; 1ba with --smoothing)",
    )
    hl.set_defaults(func=_halflife)

    ph = command(
        "posthoc",
        "reconstruct an EMA from post-hoc snapshots (EDM2)",
        "Reconstruct a power-function EMA (--sigma-rel) or an exponential EMA (--half-life) "
        "from post-hoc EMA snapshots and write it as a safetensors state dict. Never writes "
        "over an input.",
    )
    ph.add_argument(
        "inputs",
        nargs="+",
        metavar="SNAPSHOTS",
        help="snapshot files or folders (searched recursively)",
    )
    ph.add_argument(
        "-o", "--output", default="posthoc_ema.safetensors", help="the safetensors file to write"
    )
    target = ph.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--sigma-rel",
        type=float,
        help="relative width of the power-function EMA to reconstruct, between 0 and 0.2887",
    )
    target.add_argument(
        "--half-life",
        type=_time(positive=True),
        help="half-life of an exponential EMA, in the snapshots' unit (e.g. 2000ba)",
    )
    ph.add_argument(
        "--at",
        type=_time(),
        help="the snapshot time to reconstruct at (default: the latest snapshot's)",
    )
    ph.add_argument(
        "--dtype",
        default="float32",
        choices=["float16", "bfloat16", "float32", "float64"],
        help="storage dtype of the averaged tensors",
    )
    ph.set_defaults(func=_posthoc)

    sw = command(
        "sweep",
        "accuracy against EMA half-life on digits, from one run (table and plot)",
        "Train a small MLP on scikit-learn's digits once, tracking several half-lives in one "
        "EMA and post-hoc snapshots; print the validation accuracy of each tracked and "
        "reconstructed half-life and write a PNG plot. Needs scikit-learn.",
    )
    sw.add_argument("--steps", type=_integer(1), default=1000, help="optimizer steps")
    sw.add_argument("--seed", type=_integer(0), default=0, help="seeds data split and weights")
    sw.add_argument(
        "--output",
        type=_output_file,
        default="half_life_sweep.png",
        help="where to write the PNG plot",
    )
    sw.add_argument("--table", type=_output_file, help="also write the markdown table to this file")
    sw.add_argument(
        "--snapshots",
        metavar="FOLDER",
        help="keep the post-hoc snapshots in this folder (default: a temporary one, deleted)",
    )
    sw.set_defaults(func=_sweep)

    av = command(
        "averages",
        "accuracy against training time of an EMA, BEMA and uniform average on digits",
        "Train a small MLP on scikit-learn's digits once, tracking an EMA, BEMA (TRL's "
        "defaults) and the uniform average of SWA (from half-way) together; print their "
        "validation accuracy and the training weights' at evenly spaced steps and write a PNG "
        "plot. Needs scikit-learn.",
    )
    av.add_argument("--steps", type=_integer(1), default=1000, help="optimizer steps")
    av.add_argument("--every", type=_integer(1), default=25, help="steps between evaluations")
    av.add_argument(
        "--half-life", type=_integer(1), default=125, help="the EMA's half-life, in steps"
    )
    av.add_argument("--seed", type=_integer(0), default=0, help="seeds data split and weights")
    av.add_argument(
        "--output", type=_output_file, default="averages.png", help="where to write the PNG plot"
    )
    av.set_defaults(func=_averages)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0: done. 1: the run failed (a damaged or unreadable file, an output that cannot be written,
    a missing extra, a training error). 2: bad usage (an argument breaks a rule, with the flag
    named, or names a path that does not exist). Errors are one line on stderr; ``--debug`` shows the traceback as well.
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2), already printed
        return done.code if isinstance(done.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(args.command)
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            print(f"ema-callbacks {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:
            if debug:
                traceback.print_exc()
            status = _exit_status(err)
            message = _flag_names(_one_line(err), args.command)
            print(f"ema-callbacks {args.command}: error: {message}", file=sys.stderr)
            return status


def _warning_printer(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: ``ema-callbacks CMD: warning: MSG``, one
    line, without Python's file, line and category."""

    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        text = " ".join(str(message).split())
        print(f"ema-callbacks {command}: warning: {text}", file=sys.stderr, flush=True)

    return show


# The library's parameter names as the command line spells them, where a command passes its
# arguments on under those names.
_FLAGS = {
    "export": {"output": "--output", "dtype": "--dtype", "name": "--name", "profile": "--profile",
               "strip_prefix": "--strip-prefix", "format": "--format", "path": "CHECKPOINT"},
    "posthoc": {"folders_or_files": "SNAPSHOTS", "at": "--at", "half_life": "--half-life",
                "sigma_rel": "--sigma-rel", "dtype": "--dtype", "output": "--output"},
}  # fmt: skip


def _flag_names(message: str, command: str) -> str:
    """``at='30ba' must be ...`` -> ``--at '30ba' must be ...``: an error that starts with a
    parameter's name speaks of the flag instead."""
    for name, flag in _FLAGS.get(command, {}).items():
        match = re.match(rf"{name}(=|:|\s)", message)
        if match:
            sep = " " if match.group(1) == "=" else match.group(1)
            return flag + sep + message[match.end() :]
    return message


def _exit_status(err: BaseException) -> int:
    """2 for bad usage (a rule broken, a path that does not exist), 1 for a failed run (a damaged
    or unreadable file, an unwritable output, a missing extra, anything unexpected)."""
    from ema_callbacks.files import FileProblem

    if isinstance(err, FileNotFoundError):
        return 2
    if isinstance(err, FileProblem | OSError | ImportError):
        return 1
    if isinstance(err, ValueError | TypeError):
        return 2
    return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text
