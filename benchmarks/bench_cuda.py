"""On a CUDA device: the EMA update against the HBM floor, the side-stream overlap, and the fused
optimizer step against the separate update, in one process and one run.

    python benchmarks/bench_cuda.py --write docs/performance_cuda.md

Sections (``--sections``, comma-separated):

- ``hbm``: the device's copy bandwidth (a 1 GiB ``copy_``, bytes read + written), the yardstick.
- ``update``: ``bench_api``'s rows (``EMA.step``, the engine, uniform, BEMA, the swap, the
  peers installed) on its four models and on 20 tensors of 16M float32, moved to the device.
  Floor: a bare ``torch._foreach_add_`` over the same tensors; HBM floor: the bytes an update must
  move (read the weights and the shadow, write the shadow) at the copy bandwidth.
- ``stream``: a training step (8 x Linear(4096, 4096), batch 2048, TF32, fused AdamW) with no
  EMA, with ``EMA.step`` on the default stream and with ``stream=True`` (the update on a side
  stream, overlapping the next forward). EMA: the step's time minus no EMA's, paired per round.
- ``fused``: ``bench_fused``'s rows on 20 tensors of 16M (float32, and bf16 with a float32
  shadow), the EMA's marginal cost paired per round, against the HBM floors of the separate
  update (read weights + read shadow + write shadow) and of the fused one (the shadow's read and
  write only).

Each call is timed with CUDA events after a 256 MiB write (the 60 MB L2 cold, as after a backward
pass); rows interleaved; each row the minimum of ``--repeats`` medians of ``--rounds`` calls.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_api
import bench_fused
import torch
from torch import nn

_FLUSH: list[torch.Tensor] = []


def _flush() -> None:
    if not _FLUSH:
        _FLUSH.append(torch.empty(64 * 2**20, device="cuda"))  # 256 MiB
    _FLUSH[0].fill_(1.0)


def measure(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    repeats: int,
    every: dict[str, list[float]] | None = None,
    inner: int = 1,
) -> dict[str, float]:
    """Interleaved, each sample ``inner`` calls between two CUDA events after the flush: the
    minimum of ``repeats`` medians of ``rounds`` samples, in ms per call; ``every``, when given,
    receives every sample in call order."""
    for fn in fns.values():
        fn()
    torch.cuda.synchronize()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                _flush()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) / inner)
        for k, ts in times.items():
            best[k] = min(best[k], statistics.median(ts))
            if every is not None:
                every.setdefault(k, []).extend(ts)
    return best


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (best of 10)."""
    x = torch.ones(2**28, device="cuda")
    y = torch.empty_like(x)
    res = measure({"copy": lambda: y.copy_(x)}, rounds=10, repeats=1)
    return 2 * x.numel() * 4 / (res["copy"] * 1e-3)


def update_section(bandwidth: float, rounds: int, repeats: int) -> list[str]:
    shapes = dict(bench_api.SHAPES)
    shapes["20x16M"] = ("20 tensors x 16M float32", [(16 * 2**20,)] * 20, torch.float32)
    lines = [
        "## The update against the floor and the HBM floor",
        "",
        "HBM floor: the bytes one update moves (weights read, shadow read and written: 12 per "
        "float32 parameter, 10 per bf16 one with a float32 shadow) at the copy bandwidth.",
        "",
    ]
    for key, (label, shape, dtype) in shapes.items():
        print(f"update {key}", file=sys.stderr, flush=True)
        model = bench_api.make_model(shape, dtype).cuda()
        n = sum(p.numel() for p in model.parameters())
        hbm = n * (12 if dtype == torch.float32 else 10) / bandwidth * 1e3
        res = measure(bench_api.rows(model), rounds, repeats)
        floor = res["floor: torch._foreach_add_"]
        step = res["**ema_callbacks EMA.step(model)**"]
        lines += [
            f"### {label} (HBM floor {hbm:.3f} ms)",
            "",
            "| row | ms | x floor | x HBM floor |",
            "|---|---:|---:|---:|",
        ]
        for k, v in res.items():
            if k.endswith("(EMA.swapped)"):
                lines.append(f"| {k} | {v:.3f} | {v / step:.2f}x an update | |")
            else:
                lines.append(f"| {k} | {v:.3f} | {v / floor:.2f} | {v / hbm:.2f} |")
        lines.append("")
        del model
        torch.cuda.empty_cache()
    return lines


def stream_section(rounds: int, repeats: int) -> list[str]:
    from ema_callbacks import EMA

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    x = torch.randn(2048, 4096, device="cuda")

    def config(ema_kind: str | None) -> Callable[[], Any]:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(8):
            layers += [nn.Linear(4096, 4096), nn.ReLU()]
        model = nn.Sequential(*layers).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        ema = None if ema_kind is None else EMA(model, smoothing=0.999, stream=ema_kind == "side")

        def step() -> None:
            loss = model(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
            if ema is not None:
                ema.step(model)

        return step

    fns = {
        "training step, no EMA": config(None),
        "training step + EMA.step (default stream)": config("default"),
        "training step + EMA.step(stream=True) (side stream)": config("side"),
    }
    every: dict[str, list[float]] = {}
    res = measure(fns, rounds, repeats, every, inner=5)
    base = every["training step, no EMA"]

    def marginal(k: str) -> float:
        return statistics.median(a - b for a, b in zip(every[k], base, strict=True))

    lines = [
        "## Side-stream overlap",
        "",
        "8 x Linear(4096, 4096) + ReLU (134M float32 parameters), batch 2048, TF32 matmuls, "
        "AdamW(fused=True); each sample 5 steps. EMA: the median over all samples of the row "
        "minus no EMA's in the same round.",
        "",
        "| row | ms per step | EMA ms |",
        "|---|---:|---:|",
    ]
    for k, v in res.items():
        extra = "" if k == "training step, no EMA" else f"{marginal(k):.3f}"
        lines.append(f"| {k} | {v:.3f} | {extra} |")
    default = marginal("training step + EMA.step (default stream)")
    side = marginal("training step + EMA.step(stream=True) (side stream)")
    lines += [
        "",
        f"Side stream / default stream EMA cost: {side:.3f} / {default:.3f} ms = "
        f"**{side / default:.2f}x** (1 - that is the part of the update hidden behind the "
        "next forward).",
        "",
    ]
    return lines


def fused_section(bandwidth: float, rounds: int, repeats: int) -> list[str]:
    numel = 16 * 2**20
    lines = [
        "## The EMA fused into the optimizer step",
        "",
        "20 tensors x 16M, AdamW(foreach=True), gradients set once. EMA: the median over all "
        "rounds of the row minus its optimizer alone in the same round (compiled rows against "
        "the compiled AdamW). HBM floors of the EMA's marginal cost: separate 12 bytes per "
        "parameter (10 for bf16 weights with a float32 shadow), fused 8 (the shadow's read and "
        "write).",
        "",
    ]
    for dtype, label, separate_bytes in (
        (torch.float32, "float32", 12),
        (torch.bfloat16, "bf16 weights, float32 shadow", 10),
    ):
        print(f"fused {label}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        fns = bench_fused.rows(dtype, numel, "cuda")
        compile_s = time.perf_counter() - t0
        every: dict[str, list[float]] = {}
        res = measure(fns, rounds, repeats, every)
        n = 20 * numel
        sep_floor = n * separate_bytes / bandwidth * 1e3
        fused_floor = n * 8 / bandwidth * 1e3
        lines += [
            f"### {label} (HBM floor of the EMA: separate {sep_floor:.3f} ms, fused "
            f"{fused_floor:.3f} ms; building and compiling the rows took {compile_s:.0f} s)",
            "",
            "| row | ms | EMA ms | EMA x its HBM floor |",
            "|---|---:|---:|---:|",
        ]
        for k, v in res.items():
            if k in ("eager AdamW", "compiled AdamW"):
                lines.append(f"| {k} | {v:.3f} | | |")
                continue
            c = bench_fused.cost(every, k)
            floor = fused_floor if k == bench_fused.FUSED else sep_floor
            lines.append(f"| {k} | {v:.3f} | {c:.3f} | {c / floor:.2f} |")
        lines.append("")
        if bench_fused.FUSED in res:
            fused = bench_fused.cost(every, bench_fused.FUSED)
            separate = bench_fused.cost(every, "compiled AdamW + EMA.step")
            lines.append(
                f"Fused EMA cost / separate EMA cost (after the compiled optimizer): "
                f"{fused:.3f} / {separate:.3f} ms = **{fused / separate:.2f}x**."
            )
        else:
            lines.append(
                f"`EMA.fused_step`: refused for these weights on torch {torch.__version__} "
                "(bf16 weights with a float32 shadow need torch >= 2.13)."
            )
        lines.append("")
        del fns
        torch.cuda.empty_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="hbm,update,stream,fused")
    parser.add_argument("--rounds", type=int, default=11, help="samples per median")
    parser.add_argument("--repeats", type=int, default=3, help="medians; the minimum is kept")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    sections = args.sections.split(",")
    lines = [
        "# Performance on a CUDA device",
        "",
        "```bash",
        "python benchmarks/bench_cuda.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {datetime.date.today().isoformat()}: {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, Python {platform.python_version()}; CUDA events, each call after "
        f"a 256 MiB write; min of {args.repeats} interleaved medians of {args.rounds} samples.",
        "",
    ]
    bandwidth = copy_bandwidth()
    lines += [f"Copy bandwidth (1 GiB, read + written): {bandwidth / 1e12:.2f} TB/s.", ""]

    def write() -> None:
        text = "\n".join(lines)
        if args.write:
            with open(args.write, "w") as f:
                f.write(text)

    for name in sections:
        if name == "hbm":
            continue
        t0 = time.perf_counter()
        try:
            if name == "update":
                lines += update_section(bandwidth, args.rounds, args.repeats)
            elif name == "stream":
                lines += stream_section(args.rounds, args.repeats)
            elif name == "fused":
                lines += fused_section(bandwidth, args.rounds, args.repeats)
            else:
                parser.error(f"--sections: unknown section {name!r}")
        except Exception as err:  # keep the other sections' results
            import traceback

            traceback.print_exc()
            lines += [f"## {name}: failed: {type(err).__name__}: {err}", ""]
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        write()
    print("\n".join(lines))
    write()


if __name__ == "__main__":
    main()
