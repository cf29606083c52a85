"""Per-step cost of the EMA through each trainer adapter: the separate update against
``fused_optimizer=True``, with the trainer's real ``Trainer``, in one process and one run.

    .venv/bin/python benchmarks/bench_fused_adapters.py --trainer lightning \\
        --write docs/performance_fused_lightning.md
    .venv/bin/python benchmarks/bench_fused_adapters.py --trainer transformers \\
        --write docs/performance_fused_transformers.md
    .venv-composer/bin/python benchmarks/bench_fused_adapters.py --trainer composer \\
        --write docs/performance_fused_composer.md

Rows per model (an MLP, AdamW ``foreach=True``, batch 32), interleaved and repeated: no EMA;
the adapter's separate update (after the trainer's eager optimizer step); the optimizer step
compiled as :class:`~ema_callbacks.fused.FusedUpdate` compiles it, no EMA; that compiled step
followed by the separate update; and ``fused_optimizer=True``. Each run times the whole step
(between batch starts) and the part from the optimizer step (after the trainer's closure) to
the end of the batch's hooks, which holds the update in every row, after the warm-up (which
holds the compilations): the median of the first, the minimum of the second.
The EMA's cost: the fastest run's minimum minus its optimizer alone's (eager or compiled).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ema_callbacks.fused import _raw_step, replace_step

ROWS = ("no EMA", "separate EMA", "compiled optimizer", "compiled optimizer + separate EMA")
FUSED = "**fused_optimizer=True**"
HALF_LIFE = "693ba"  # smoothing 0.999 per step


def compile_step(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """The optimizer's step compiled alone, as the fused step's graph for steps with no update
    due; installed with :func:`replace_step` (returns its remover)."""
    raw = _raw_step(optimizer)
    compiled = torch.compile(lambda: raw(optimizer))

    def run() -> None:
        with torch.no_grad():
            compiled()
        optimizer._opt_called = True  # type: ignore[attr-defined]

    return replace_step(optimizer, run)


class Phase:
    """The time from the optimizer step (after the closure, when the trainer passes one) to
    the end of the batch's hooks, the EMA's included: what the EMA adds to, without the
    forward and backward, whose noise on this shared machine exceeds the EMA's cost."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.times: list[float] = []

    def install(self, optimizer: torch.optim.Optimizer) -> None:
        """Wrap ``optimizer.step`` as it is now (the fused or compiled step, or the class's)."""
        inner = optimizer.step

        def step(closure: Callable[[], Any] | None = None) -> Any:
            if closure is None:
                self.t0 = time.perf_counter()
                return inner()

            def timed() -> Any:
                loss = closure()
                self.t0 = time.perf_counter()
                return loss

            return inner(closure=timed)  # type: ignore[call-arg]

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = step  # type: ignore[method-assign]

    def end(self) -> None:
        if self.t0 is not None:
            self.times.append(time.perf_counter() - self.t0)
        self.t0 = None


def mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def loader(width: int, steps: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """``steps`` batches of 32 (the same one each time)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, width, generator=g), torch.randn(32, 1, generator=g)
    data = torch.utils.data.TensorDataset(x.repeat(steps, 1), y.repeat(steps, 1))
    return torch.utils.data.DataLoader(data, batch_size=32)


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, foreach=True)


# -- one run per trainer: returns the gaps between batch starts (seconds) --------------------


def lightning_run(row: str, width: int, depth: int, steps: int) -> list[float]:
    from lightning.pytorch import Callback, LightningModule, Trainer

    from ema_callbacks.lightning import EMACallback

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width, depth)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return adamw(self.parameters())

    stamps: list[float] = []
    phase = Phase()

    class Timer(Callback):  # after the EMA callback: its hooks run after the EMA's
        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if row.startswith("compiled"):
                compile_step(trainer.optimizers[0])
            phase.install(trainer.optimizers[0])

        def on_train_batch_start(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

        def on_train_batch_end(self, *args: Any) -> None:
            phase.end()

    callbacks: list[Any] = []
    if row != "no EMA" and row != "compiled optimizer":
        callbacks.append(EMACallback(half_life=HALF_LIFE, fused_optimizer=row == FUSED))
    callbacks.append(Timer())
    trainer = Trainer(
        max_steps=steps,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(Module(), train_dataloaders=loader(width, steps))
    return [b - a for a, b in itertools.pairwise(stamps)], phase.times


def transformers_run(row: str, width: int, depth: int, steps: int) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ema_callbacks.transformers import EMATrainerCallback

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width, depth)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}

    class Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.x, self.y = torch.randn(32, width, generator=g), torch.randn(32, generator=g)

        def __len__(self) -> int:
            return 32 * steps

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i % 32], "labels": self.y[i % 32]}

    stamps: list[float] = []
    phase = Phase()

    class Timer(TrainerCallback):  # after the EMA callback: its hooks run after the EMA's
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            opt = kw["optimizer"]
            while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
                opt = opt.optimizer
            if row.startswith("compiled"):
                compile_step(opt)
            phase.install(opt)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            phase.end()

    callbacks: list[Any] = []
    if row != "no EMA" and row != "compiled optimizer":
        callbacks.append(EMATrainerCallback(half_life=HALF_LIFE, fused_optimizer=row == FUSED))
    callbacks.append(Timer())
    model = Model()
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder,
            max_steps=steps,
            per_device_train_batch_size=32,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            lr_scheduler_type="constant",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Data(),
            callbacks=callbacks,
            optimizers=(adamw(model.parameters()), None),
        )
        trainer.train()
    return [b - a for a, b in itertools.pairwise(stamps)], phase.times


def composer_run(row: str, width: int, depth: int, steps: int) -> list[float]:
    from composer import Callback, Trainer
    from composer.models import ComposerModel

    from ema_callbacks.composer import EMA

    class Model(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width, depth)

        def forward(self, batch: Any) -> torch.Tensor:
            return self.net(batch[0])  # type: ignore[no-any-return]

        def loss(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            return nn.functional.mse_loss(outputs, batch[1])

    stamps: list[float] = []
    phase = Phase()

    class Timer(Callback):  # callbacks run after the algorithms at every event
        def fit_start(self, state: Any, logger: Any) -> None:
            if row.startswith("compiled"):
                compile_step(state.optimizers[0])
            phase.install(state.optimizers[0])

        def batch_start(self, state: Any, logger: Any) -> None:
            stamps.append(time.perf_counter())

        def batch_end(self, state: Any, logger: Any) -> None:
            phase.end()

    algorithms: list[Any] = []
    if row != "no EMA" and row != "compiled optimizer":
        algorithms.append(EMA(half_life=HALF_LIFE, fused_optimizer=row == FUSED))
    model = Model()
    trainer = Trainer(
        model=model,
        train_dataloader=loader(width, steps),
        max_duration=f"{steps}ba",
        optimizers=adamw(model.parameters()),
        algorithms=algorithms,
        callbacks=[Timer()],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    return [b - a for a, b in itertools.pairwise(stamps)], phase.times


RUNS = {"lightning": lightning_run, "transformers": transformers_run, "composer": composer_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", choices=sorted(RUNS), required=True)
    parser.add_argument("--models", default="1024x4,2048x4", help="comma-separated WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=15, help="steps left out (compilation)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs per row")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("composer").setLevel(logging.ERROR)
    run = RUNS[args.trainer]
    version = __import__({"lightning": "lightning"}.get(args.trainer, args.trainer)).__version__
    lines = [
        f"# {args.trainer}: the EMA per training step, separate or `fused_optimizer=True`",
        "",
        "```bash",
        f"{sys.executable.replace(sys.prefix, sys.prefix.rsplit('/', 1)[-1])} "
        "benchmarks/bench_fused_adapters.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {datetime.date.today().isoformat()}: {platform.machine()}, torch "
        f"{torch.__version__}, {args.trainer} {version}, {args.threads} threads; MLP with "
        "LayerNorm, AdamW(foreach=True), batch 32, half_life='693ba' (0.999 per step). Per run, "
        f"over steps {args.warmup + 1}..{args.steps - 1} (the first {args.warmup} hold the "
        "compilations), the median of the whole step and the minimum of the time from the "
        "optimizer step (after the trainer's closure) to the end of the batch's hooks, which "
        f"holds the update in every row; the fastest of {args.repeats} interleaved runs. EMA: "
        "that minimum minus its optimizer alone's (eager or compiled). The forward and "
        "backward are left out, and minima taken, because this shared machine's speed "
        "drifts by more than the EMA costs.",
        "",
    ]
    rows = (*ROWS, FUSED)
    for spec in args.models.split(","):
        width, depth = (int(v) for v in spec.split("x"))
        n = sum(p.numel() for p in mlp(width, depth).parameters())
        steps: dict[str, list[float]] = {r: [] for r in rows}
        phases: dict[str, list[float]] = {r: [] for r in rows}
        for _ in range(args.repeats):
            for r in rows:
                # every run compiles afresh: dynamo keeps graphs per code object, and past its
                # recompile limit it would run the baseline's compiled step eagerly
                torch._dynamo.reset()
                gaps, phase = run(r, width, depth, args.steps)
                steps[r].append(statistics.median(gaps[args.warmup :]) * 1e3)
                phases[r].append(min(phase[args.warmup :]) * 1e3)
                print(
                    f"{spec} {r}: step {steps[r][-1]:.2f} ms, optimizer step to batch end "
                    f"{phases[r][-1]:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        base = {
            "separate EMA": "no EMA",
            "compiled optimizer + separate EMA": "compiled optimizer",
            FUSED: "compiled optimizer",
        }
        ema = {r: min(phases[r]) - min(phases[b]) for r, b in base.items()}
        lines += [
            f"## MLP {spec} ({n / 1e6:.1f} M parameters)",
            "",
            "| row | ms per step | ms from optimizer step to batch end | EMA ms |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            cost = f"{ema[r]:+.2f}" if r in ema else ""
            lines.append(f"| {r} | {min(steps[r]):.2f} | {min(phases[r]):.2f} | {cost} |")
        separate = ema["compiled optimizer + separate EMA"]
        lines += [
            "",
            f"Fused EMA / separate EMA after the compiled optimizer: {ema[FUSED]:.2f} / "
            f"{separate:.2f} ms"
            + (f" = **{ema[FUSED] / separate:.2f}x**." if separate > 0 else "."),
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
