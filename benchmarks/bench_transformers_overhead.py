"""Time added per transformers training step by an EMA: ``EMATrainerCallback`` vs no EMA and vs
TRL's ``BEMACallback``, with the same update interval.

Same model, data and ``Trainer`` arguments; three runs per model (no EMA, ours, TRL's),
interleaved and repeated. The step time is the median time between consecutive
``on_step_begin`` calls after a warm-up, so it includes every callback of the step (both EMAs
update in ``on_step_end``). The overhead is the difference to the run without an EMA. TRL's
BEMA also keeps the initial weights and applies a bias correction, so it does more per update
than a plain EMA; it is the EMA callback the transformers ecosystem ships.

    .venv/bin/python benchmarks/bench_transformers_overhead.py --write docs/performance_transformers.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ema_callbacks.transformers import EMATrainerCallback


class MLPConfig(PretrainedConfig):
    model_type = "bench_mlp"

    def __init__(self, width: int = 256, depth: int = 4, **kwargs: Any) -> None:
        self.width, self.depth = width, depth
        super().__init__(**kwargs)


class MLP(PreTrainedModel):
    """A transformers model (TRL's BEMA rebuilds it from ``model.config``)."""

    config_class = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(config.depth):
            layers += [nn.Linear(config.width, config.width), nn.LayerNorm(config.width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(config.width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.net(x).squeeze(-1)
        result: dict[str, Any] = {"logits": out}
        if labels is not None:
            result["loss"] = ((out - labels) ** 2).mean()
        return result


class Data(torch.utils.data.Dataset):
    def __init__(self, n: int, width: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, width, generator=g)
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stamps.append(time.perf_counter())


def run(kind: str, width: int, depth: int, steps: int, interval: int, folder: str) -> list[float]:
    model = MLP(MLPConfig(width, depth))
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if kind == "ours":
        callbacks.append(EMATrainerCallback(smoothing=0.999, update_interval=f"{interval}ba"))
    elif kind == "trl":
        from trl.trainer.callbacks import BEMACallback

        callbacks.append(BEMACallback(update_freq=interval, update_after=0))
    args = TrainingArguments(
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        optim="sgd",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Data(32 * steps, width), callbacks=callbacks
    )
    trainer.train()
    return [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="256x4,1024x4", help="comma-separated WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=80, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per kind")
    parser.add_argument("--interval", type=int, default=1, help="update every N steps (both)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    try:
        import trl  # noqa: F401

        kinds = ["none", "ours", "trl"]
    except ImportError:
        kinds = ["none", "ours"]
    lines = [
        "# transformers overhead: `EMATrainerCallback` vs no EMA and TRL's `BEMACallback`",
        "",
        "```bash",
        ".venv/bin/python benchmarks/bench_transformers_overhead.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {datetime.date.today().isoformat()}: {platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} thread(s); ms per training step (median over "
        f"{args.steps - args.warmup - 1} steps after {args.warmup} warm-up steps, best of "
        f"{args.repeats} interleaved runs), batch 32, SGD, both EMAs updating every "
        f"{args.interval} step(s); in brackets the overhead over no EMA."
        + ("" if "trl" in kinds else " TRL is not installed: its column is missing."),
        "",
        "| model | params | no EMA | EMATrainerCallback | TRL BEMACallback |",
        "|---|---:|---:|---:|---:|",
    ]
    for spec in args.models.split(","):
        width, depth = (int(v) for v in spec.split("x"))
        best = {k: float("inf") for k in kinds}
        with tempfile.TemporaryDirectory() as folder:
            for _ in range(args.repeats):
                for kind in kinds:
                    gaps = run(kind, width, depth, args.steps, args.interval, folder)
                    best[kind] = min(best[kind], statistics.median(gaps[args.warmup :]) * 1e3)
        n = sum(p.numel() for p in MLP(MLPConfig(width, depth)).parameters())
        base = best["none"]
        cells = [f"{base:.3g}"] + [
            f"{best[k]:.3g} (+{best[k] - base:.3g})" if k in best else "n/a"
            for k in ("ours", "trl")
        ]
        lines.append(f"| {spec} | {n:,} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
