"""Several EMAs of one model: updated together against separately, in one process and one run.

    .venv-composer/bin/python benchmarks/bench_profiles.py --write docs/performance_profiles.md

For K EMAs (K = 1, 3, 5) of the engine benchmark's models (see ``bench_engine.py``), rows:

* the memory-traffic floor: K bare ``torch._foreach_add_(shadow_k, params)`` calls (each reads
  the weights and reads and writes one shadow: what K EMA updates must move at least);
* this project, K profiles in one controller (``update_together_``: one ``_foreach_lerp_`` per
  group with a weight per tensor; for bf16 weights one float32 staging of each batch for all K);
* this project, K separate ``EMAWeights.update_`` calls (what K single EMAs would cost);
* timm ``ModelEmaV3`` x K (a user keeping K EMAs with the fastest peer), in case (c) with a
  float32 shadow (``dtype=torch.float32``) so that it holds an EMA at all.

Timing: every implementation built first, then ``--rounds`` interleaved rounds; medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_engine import CASES, make_model

from ema_callbacks.weights import EMAWeights, update_together_

FACTORS = [1e-2, 1e-3, 1e-4, 3e-3, 3e-4]


def _floor(model: nn.Module, k: int) -> Callable[[], Any]:
    params = list(model.parameters())
    dtype = torch.float32 if params[0].dtype in (torch.bfloat16, torch.float16) else params[0].dtype
    shadows = [[p.detach().to(dtype, copy=True) for p in params] for _ in range(k)]

    def run() -> None:
        for s in shadows:
            torch._foreach_add_(s, params)

    return run


def _together(model: nn.Module, k: int) -> Callable[[], Any]:
    weights = [EMAWeights(model) for _ in range(k)]
    factors = FACTORS[:k]
    return lambda: update_together_(weights, factors, model)


def _separate(model: nn.Module, k: int) -> Callable[[], Any]:
    weights = [EMAWeights(model) for _ in range(k)]

    def run() -> None:
        for w, f in zip(weights, FACTORS[:k], strict=True):
            w.update_(f)

    return run


def _timm(model: nn.Module, k: int) -> Callable[[], Any]:
    from timm.utils.model_ema import ModelEmaV3

    fp32 = next(model.parameters()).dtype is torch.bfloat16
    emas = [
        ModelEmaV3(model, decay=1 - f, dtype=torch.float32 if fp32 else None) for f in FACTORS[:k]
    ]

    def run() -> None:
        for e in emas:
            e.update(model)

    return run


ROWS: dict[str, tuple[str, Callable[[nn.Module, int], Callable[[], Any]]]] = {
    "floor": ("floor: K x torch._foreach_add_", _floor),
    "together": ("**ema_callbacks: K profiles, updated together**", _together),
    "separate": ("ema_callbacks: K separate EMAWeights.update_", _separate),
    "timm": ("timm ModelEmaV3 x K", _timm),
}


def run_case(key: str, ks: list[int], rounds: int, quick: bool) -> dict[int, dict[str, float]]:
    model = make_model(CASES[key], quick)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        fns = {}
        for row, (_, build) in ROWS.items():
            try:
                fns[row] = build(model, k)
            except ImportError:
                continue
        for fn in fns.values():  # warm-up
            fn()
            fn()
        times: dict[str, list[float]] = {r: [] for r in fns}
        for _ in range(rounds):
            for row, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[row].append((time.perf_counter() - t0) * 1e3)
        out[k] = {r: statistics.median(v) for r, v in times.items()}
        del fns
    return out


def report(results: dict[str, dict[int, dict[str, float]]], command: str, wall: float) -> str:
    lines = [
        "# Several EMAs of one model: one fused update against K separate ones",
        "",
        f"Command: `{command}` ({wall:.0f} s, one process, one run; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads).",
        "",
        "Median time of one update of all K EMAs, in ms, and its ratio to the floor (K bare "
        "`_foreach_add_` passes). See `benchmarks/bench_profiles.py` for what each row is.",
        "",
    ]
    for key, per_k in results.items():
        lines += [f"## {CASES[key]['label']}", ""]
        ks = sorted(per_k)
        lines.append("| row | " + " | ".join(f"K={k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for row, (label, _) in ROWS.items():
            if row not in per_k[ks[0]]:
                continue
            cells = []
            for k in ks:
                t, floor = per_k[k][row], per_k[k]["floor"]
                cells.append(f"{t:.2f} ({t / floor:.2f}x)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## What it shows",
        "",
        "- Large float32 tensors (a): every row is at the memory-traffic floor; updating the K "
        "EMAs together or one after another moves the same bytes.",
        "- Many small tensors (b): one fused call over K x 2,000 tensors instead of K calls "
        "saves the per-call overhead; timm's per-EMA loops stay about 1.6x the floor.",
        "- bf16 weights with float32 shadows (c): each batch of weights is converted to float32 "
        "once for all K EMAs instead of K times, so updating together gets cheaper per EMA as "
        "K grows.",
        "- Memory: one float32 shadow per EMA, plus the engine's one bounded scratch (shared "
        "by the K EMAs) for (c).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="abc")
    parser.add_argument("--k", default="1,3,5")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    ks = [int(x) for x in args.k.split(",")]
    t0 = time.perf_counter()
    results = {}
    for key in args.cases:
        print(f"case {key}: {CASES[key]['label']}", file=sys.stderr, flush=True)
        results[key] = run_case(key, ks, args.rounds, args.quick)
    command = ".venv-composer/bin/python benchmarks/bench_profiles.py " + " ".join(sys.argv[1:])
    text = report(results, command.strip(), time.perf_counter() - t0)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
