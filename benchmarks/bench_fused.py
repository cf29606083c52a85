"""The EMA fused into a compiled optimizer step (``EMA.fused_step``) against the separate update,
in one process and one run.

    .venv/bin/python benchmarks/bench_fused.py --write docs/performance_fused.md

Models: 20 tensors of 1M float32, and 20 bf16 tensors of 1M with a float32 shadow; AdamW
(``foreach=True``) with gradients set once. Rows, interleaved, each the minimum over
``--repeats`` of the median of ``--rounds`` calls, each call after a 128 MiB write (cold caches,
as after a backward pass): eager AdamW; eager AdamW + ``EMA.step``; ``torch.compile``d AdamW
(PyTorch's recipe); compiled AdamW + ``EMA.step``; ``EMA.fused_step``; and eager AdamW with the
peers' EMAs: torch's ``AveragedModel`` EMA (what Lightning's ``EMAWeightAveraging`` runs), and
where installed timm ``ModelEmaV3`` and Composer's ``compute_ema`` (``.venv-composer``). The EMA's marginal cost: the median over
every round of a row's time minus its optimizer alone's in the same round (paired: this shared
machine's speed drifts by several times between rounds, which a difference of two separate
minima does not cancel); the fused one against the separate update after the compiled optimizer.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from bench_api import measure  # interleaved, each call after a 128 MiB cache flush
from torch import nn

DECAY = 0.999
FUSED = "**EMA.fused_step (one compiled function)**"


def make_model(
    dtype: torch.dtype, numel: int = 1_000_000, device: str = "cpu"
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Module()
    model.params = nn.ParameterList(  # type: ignore[assignment]
        [nn.Parameter(torch.randn(numel, device=device).to(dtype)) for _ in range(20)]
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def rows(
    dtype: torch.dtype, numel: int = 1_000_000, device: str = "cpu"
) -> dict[str, Callable[[], Any]]:
    """The rows for 20 tensors of ``numel`` in ``dtype`` on ``device``, each its own model."""
    from ema_callbacks import EMA

    def make(dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer]:
        return make_model(dtype, numel, device)

    out: dict[str, Callable[[], Any]] = {}
    _m1, o1 = make(dtype)
    out["eager AdamW"] = o1.step
    m2, o2 = make(dtype)
    e2 = EMA(m2, smoothing=DECAY)
    out["eager AdamW + EMA.step"] = lambda: (o2.step(), e2.step(m2))
    _m3, o3 = make(dtype)
    compiled3 = torch.compile(o3.step)
    out["compiled AdamW"] = compiled3
    m4, o4 = make(dtype)
    compiled4 = torch.compile(o4.step)
    e4 = EMA(m4, smoothing=DECAY)
    out["compiled AdamW + EMA.step"] = lambda: (compiled4(), e4.step(m4))
    m5, o5 = make(dtype)
    e5 = EMA(m5, smoothing=DECAY)
    try:
        out[FUSED] = e5.fused_step(o5)
    except ValueError as err:  # bf16 on torch < 2.13: refused, with the reason
        print(f"{FUSED}: {err}", file=sys.stderr)
    m6, o6 = make(dtype)
    # What Lightning's EMAWeightAveraging runs per step: AveragedModel with the EMA multi_avg_fn
    # (its average in the model's dtype).
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    a6 = AveragedModel(m6, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    out["eager AdamW + AveragedModel EMA (Lightning EMAWeightAveraging)"] = lambda: (
        o6.step(),
        a6.update_parameters(m6),
    )
    try:
        from timm.utils.model_ema import ModelEmaV3

        m7, o7 = make(dtype)
        kw = {"dtype": torch.float32} if dtype != torch.float32 else {}
        t7 = ModelEmaV3(m7, decay=DECAY, **kw)
        out["eager AdamW + timm ModelEmaV3.update"] = lambda: (o7.step(), t7.update(m7))
    except ImportError:
        pass
    try:
        from composer.algorithms.ema.ema import EMAParameters, compute_ema

        m8, o8 = make(dtype)
        c8 = EMAParameters(m8)
        out["eager AdamW + Composer compute_ema (own dtype)"] = lambda: (
            o8.step(),
            compute_ema(m8, c8, smoothing=DECAY),
        )
    except ImportError:
        pass
    for fn in out.values():  # compile every graph (the fused step's copy and lerp ones, too)
        for _ in range(3):
            fn()
    return out


def cost(every: dict[str, list[float]], row: str) -> float:
    """The row's EMA cost: the median over the rounds of its time minus its optimizer alone's."""
    base = every["compiled AdamW" if ("compiled" in row or "fused" in row) else "eager AdamW"]
    return statistics.median(a - b for a, b in zip(every[row], base, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="calls per median")
    parser.add_argument("--repeats", type=int, default=3, help="medians; the minimum is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# The EMA fused into the optimizer step",
        "",
        "```bash",
        f"{sys.executable.replace(sys.prefix, sys.prefix.rsplit('/', 1)[-1])} "
        "benchmarks/bench_fused.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {datetime.date.today().isoformat()}: {platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} threads, Python {platform.python_version()}; "
        f"min of {args.repeats} interleaved medians of {args.rounds} calls, each after a "
        "128 MiB write. EMA: the median over all rounds of the row minus its optimizer alone "
        "in the same round.",
        "",
    ]
    for dtype, label in (
        (torch.float32, "20 tensors x 1M float32, AdamW"),
        (torch.bfloat16, "20 tensors x 1M bf16 (float32 shadow), AdamW"),
    ):
        print(label, file=sys.stderr, flush=True)
        every: dict[str, list[float]] = {}
        res = measure(rows(dtype), args.rounds, args.repeats, every)

        separate = cost(every, "compiled AdamW + EMA.step")
        lines += [f"## {label}", "", "| row | ms | EMA ms |", "|---|---:|---:|"]
        for k, v in res.items():
            ema = "" if k in ("eager AdamW", "compiled AdamW") else f"{cost(every, k):.2f}"
            lines.append(f"| {k} | {v:.2f} | {ema} |")
        lines.append("")
        if FUSED in res:
            fused = cost(every, FUSED)
            lines.append(
                f"Fused EMA cost / separate EMA cost (after the compiled optimizer): "
                f"{fused:.2f} / {separate:.2f} ms = **{fused / separate:.2f}x**."
            )
        else:
            lines.append("`EMA.fused_step`: refused for these weights on this torch (see stderr).")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
