"""Time added per Lightning training step by an EMA: ours vs Lightning's ``EMAWeightAveraging``.

Same model, same data, same Trainer; three runs per model (no EMA, ``EMACallback``,
``EMAWeightAveraging``), interleaved and repeated. The step time is the median time between
consecutive ``on_train_batch_start`` calls after a warm-up, so it includes every hook of the
step (the EMA update runs in ``on_train_batch_end``). The overhead is the difference to the
run without an EMA.

    .venv/bin/python benchmarks/bench_lightning_overhead.py            # writes the table
    .venv/bin/python benchmarks/bench_lightning_overhead.py --no-write # prints it only
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from ema_callbacks import smoothing_to_half_life
from ema_callbacks.lightning import EMACallback

OUT = Path(__file__).resolve().parents[1] / "docs" / "performance_lightning.md"
COMMAND = ".venv/bin/python benchmarks/bench_lightning_overhead.py"
DECAY = 0.999


class MLP(LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Batches:
    def __init__(self, n: int, batch: int, width: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(batch, width, generator=g), torch.randn(batch, 1, generator=g))]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter(self.data * self.n)


class StepTimer(Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def step_time(width: int, depth: int, ema: str, steps: int, warmup: int) -> float:
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    half_life = f"{round(smoothing_to_half_life(DECAY))}ba"
    if ema == "ours":
        callbacks.append(EMACallback(half_life=half_life))
    elif ema == "ours, no NaN check":
        callbacks.append(EMACallback(half_life=half_life, nonfinite="skip"))
    elif ema == "lightning":
        callbacks.append(EMAWeightAveraging(decay=DECAY))
    trainer = Trainer(
        max_steps=steps + 1,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MLP(width, depth), train_dataloaders=Batches(steps + 1, 32, width))
    gaps = [b - a for a, b in zip(timer.starts[warmup:-1], timer.starts[warmup + 1 :], strict=True)]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    models = [(64, 2), (256, 4), (1024, 4)]
    rows = []
    for width, depth in models:
        params = sum(p.numel() for p in MLP(width, depth).parameters())
        times: dict[str, list[float]] = {
            "none": [],
            "ours": [],
            "ours, no NaN check": [],
            "lightning": [],
        }
        for _ in range(args.repeats):
            for ema in times:
                times[ema].append(step_time(width, depth, ema, args.steps, args.warmup))
        best = {k: min(v) * 1e3 for k, v in times.items()}
        cells = [f"{best['none']:.3f}"] + [
            f"{best[k]:.3f} ({best[k] - best['none']:+.3f})" for k in list(times)[1:]
        ]
        rows.append(f"| MLP {width}x{depth} | {params:,} | " + " | ".join(cells) + " |")
    table = "\n".join(
        [
            "| model | parameters | no EMA | `EMACallback` | `EMACallback(nonfinite='skip')` "
            "| `EMAWeightAveraging` |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    import lightning

    text = f"""# Lightning overhead: `EMACallback` vs Lightning's `EMAWeightAveraging`

Milliseconds per training step, and in brackets the overhead over no EMA (median over {args.steps - 1 - args.warmup} steps after {args.warmup}
warm-up steps, best of {args.repeats} interleaved runs), same model, data and `Trainer`,
decay {DECAY} for both (`half_life='{round(smoothing_to_half_life(DECAY))}ba'` for ours), batch
32, SGD, one CPU thread. Overhead = time with the EMA minus time without it; it includes
every hook of the step (the update, our metric logging every `log_every_n_steps`, Lightning's
per-tensor Python loop). `EMACallback(nonfinite='skip')` adds the opt-in NaN/Inf check
(one extra read of the weights per update); the default `'ignore'` leaves it out, as
Lightning's callback does.

Command: `{COMMAND}`

Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, lightning
{lightning.__version__}, CPU only; the machine was shared, so timings are noisy.

{table}
"""
    print(text)
    if not args.no_write:
        OUT.write_text(text)
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
