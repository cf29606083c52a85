"""The public API's per-step cost (``EMA.step(model)``, the evaluation swap) against the floor and
every peer, in one process and one run.

    .venv-composer/bin/python benchmarks/bench_api.py --write docs/performance_api.md

Models: 50 tensors of 1M float32; 300 tensors like a ResNet (100 of 64x64x3x3, 200 of 256);
2,000 tensors of 4,096 float32; 2,000 bf16 tensors of 4,096 with a float32 shadow. Floor: a bare
``torch._foreach_add_`` over the same tensors (float32 shadows; for the bf16 model, float32 copies
of its weights: the float32 bytes). Rows are interleaved; each is the minimum over ``--repeats``
of the median of ``--rounds`` calls. Peers run where installed (timm ``ModelEmaV3``,
ema-pytorch, torch-ema, diffusers ``EMAModel``, Composer ``compute_ema``). Ratios, not timed tests.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

DECAY = 0.999
SHAPES: dict[str, tuple[str, list[tuple[int, ...]], torch.dtype]] = {
    "50x1M": ("50 tensors x 1M float32", [(1_000_000,)] * 50, torch.float32),
    "resnet": (
        "300 tensors, ResNet-like (100 x 64x64x3x3, 200 x 256)",
        [(64, 64, 3, 3)] * 100 + [(256,)] * 200,
        torch.float32,
    ),
    "2000x4096": ("2,000 tensors x 4,096 float32", [(4096,)] * 2000, torch.float32),
    "bf16": ("2,000 tensors x 4,096 bf16, float32 shadow", [(4096,)] * 2000, torch.bfloat16),
}


def make_model(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.params = nn.ParameterList(  # type: ignore[assignment]
        [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    )
    return model


def rows(model: nn.Module) -> dict[str, Callable[[], Any]]:
    from ema_callbacks import EMA

    params = list(model.parameters())
    floor_shadow = [p.detach().float().clone() for p in params]
    # the model's own tensors; for the bf16 model float32 copies of them (the float32 bytes)
    floor_src = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in params]
    ema = EMA(model, smoothing=DECAY)
    ema.step(model)
    out: dict[str, Callable[[], Any]] = {
        "floor: torch._foreach_add_": lambda: torch._foreach_add_(floor_shadow, floor_src),
        "**ema_callbacks EMA.step(model)**": lambda: ema.step(model),
    }
    weights = ema.controller.weights
    assert weights is not None
    out["ema_callbacks EMAWeights.update_"] = lambda: weights.update_(1 - DECAY)

    # What the update is made of: the EMA's own op on the floor's tensors (a lerp costs more
    # than an add per call on small tensors), and the per-update check for replaced tensors.
    def bare_lerp() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(floor_shadow, floor_src, 1 - DECAY)

    out["(part) bare torch._foreach_lerp_, float32"] = bare_lerp
    out["(part) replaced-tensor check (EMAWeights._check_live)"] = weights._check_live
    # The other averages through the same call (docs/averaging.md): uniform (SWA) is one lerp
    # like the EMA; BEMA adds three passes forming its evaluated weights.
    uniform = EMA(model, uniform=True)
    uniform.step(model)
    out["ema_callbacks EMA.step(model), uniform=True"] = lambda: uniform.step(model)
    bema = EMA(model, ema_power=0.5)
    bema.step(model)
    out["ema_callbacks EMA.step(model), BEMA"] = lambda: bema.step(model)

    def swap() -> None:
        with ema.swapped(model):
            pass

    out["ema_callbacks swap in+out (EMA.swapped)"] = swap
    try:
        from timm.utils.model_ema import ModelEmaV3

        kw = {"dtype": torch.float32} if params[0].dtype != torch.float32 else {}
        timm_ema = ModelEmaV3(model, decay=DECAY, **kw)
        out["timm ModelEmaV3.update"] = lambda: timm_ema.update(model)
    except ImportError:
        pass
    try:
        from ema_pytorch import EMA as EmaPytorch

        ep = EmaPytorch(
            model,
            beta=DECAY,
            update_after_step=0,
            update_every=1,
            use_foreach=True,
            include_online_model=False,
        )
        ep.update()
        ep.update()
        out["ema-pytorch EMA.update (own dtype)"] = ep.update
    except ImportError:
        pass
    try:
        from torch_ema import ExponentialMovingAverage

        te = ExponentialMovingAverage(model.parameters(), decay=DECAY)
        te.to(dtype=torch.float32)
        out["torch-ema update (float32)"] = te.update
    except ImportError:
        pass
    try:
        from diffusers.training_utils import EMAModel

        de = EMAModel(model.parameters(), decay=DECAY, foreach=True)
        de.to(dtype=torch.float32)
        out["diffusers EMAModel.step (float32)"] = lambda: de.step(model.parameters())
    except ImportError:
        pass
    try:
        from composer.algorithms.ema.ema import EMAParameters, compute_ema

        cp = EMAParameters(model)
        out["Composer compute_ema (own dtype)"] = lambda: compute_ema(model, cp, smoothing=DECAY)
    except ImportError:
        pass
    return out


def controller_us(rounds: int) -> float:
    """The controller's own work per step with one EMA: ``EMA.step`` on a one-scalar model
    minus the bare engine update of that model."""
    from ema_callbacks import EMA

    model = make_model([(1,)], torch.float32)
    ema = EMA(model, smoothing=DECAY)
    weights = ema.controller.weights
    assert weights is not None
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            ema.step(model)
        step = (time.perf_counter() - t0) / rounds
        t0 = time.perf_counter()
        for _ in range(rounds):
            weights.update_(1 - DECAY)
        engine = (time.perf_counter() - t0) / rounds
        best = min(best, step - engine)
    return best * 1e6


# Written before every timed call, so that every row starts with cold caches, as an EMA update
# does after the optimizer step (without it, the row after the floor paid for the floor's
# evictions and the rows after it found the shared weights warm: EMA.step measured ~20% above
# the same update_ call on a 2,000-tensor model).
_FLUSH = torch.empty(32 * 2**20)  # 128 MiB, 4x this machine's L3


def measure(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    repeats: int,
    every: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Interleaved in a rotating order, each call after the flush: the minimum of ``repeats``
    medians of ``rounds`` calls, in ms; ``every``, when given, receives every call's time (ms)
    in call order."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    keys = list(fns)
    for _ in range(repeats):
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds):
            # Each round starts at another row: the call after the floor's measured ~0.3 ms
            # slower on 2,000 tensors whichever row it was, so no row keeps that place.
            for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                fn = fns[k]
                _FLUSH.fill_(1.0)
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k, ts in times.items():
            best[k] = min(best[k], statistics.median(ts))
            if every is not None:
                every.setdefault(k, []).extend(ts)
    return best


def _python() -> str:
    """This interpreter as the report's command spells it (``.venv/bin/python`` from the
    repository's root)."""
    path = os.path.relpath(sys.executable)
    return "python" if path.startswith("..") else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shapes")
    parser.add_argument("--rounds", type=int, default=21, help="calls per median")
    parser.add_argument("--repeats", type=int, default=3, help="medians; the minimum is kept")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--write", help="write the markdown report to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        "# Performance through the public API",
        "",
        "```bash",
        f"{_python()} benchmarks/bench_api.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        f"Run {datetime.date.today().isoformat()}: {platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} threads, Python {platform.python_version()}; "
        f"min of {args.repeats} interleaved medians of {args.rounds} calls, each call "
        "after a 128 MiB write (cold caches, as after an optimizer step). "
        "x floor: time / the floor's time (swap: / `EMA.step`'s time).",
        "",
    ]
    for key in args.shapes.split(","):
        label, shapes, dtype = SHAPES[key]
        print(f"{key}: {label}", file=sys.stderr, flush=True)
        model = make_model(shapes, dtype)
        res = measure(rows(model), args.rounds, args.repeats)
        floor = res["floor: torch._foreach_add_"]
        step = res["**ema_callbacks EMA.step(model)**"]
        lines += [f"## {label}", "", "| row | ms | x floor |", "|---|---:|---:|"]
        for k, v in res.items():
            ratio = (
                f"{v / step:.2f}x an update" if k.endswith("(EMA.swapped)") else f"{v / floor:.2f}"
            )
            lines.append(f"| {k} | {v:.3g} | {ratio} |")
        lines.append("")
        del model
    us = controller_us(max(args.rounds * 50, 500))
    lines += [f"Controller's own work per step, one EMA: {us:.1f} us.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
