"""The ``ema-callbacks`` command line (also ``python -m ema_callbacks``).

Commands: ``demo`` (train on scikit-learn's digits, raw vs EMA) and ``halflife`` (convert
between a per-update smoothing and a half-life).

>>> main(['halflife', '--smoothing', '0.999', '--interval', '1ba'])
smoothing 0.999 per 1ba = half_life 693ba
0
>>> main(['halflife', '--half-life', '693ba', '--interval', '1ba'])
half_life 693ba at update_interval 1ba = smoothing 0.999000
0
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from ema_callbacks.schedule import half_life_to_smoothing, smoothing_to_half_life
from ema_callbacks.time_strings import Time

__all__ = ["main"]


def _halflife(args: argparse.Namespace) -> int:
    interval = Time.parse(args.interval, "--interval")
    if interval.value == 0 or interval.is_infinite:
        raise ValueError(f"--interval must be positive and finite; got '{interval}'")
    if args.smoothing is not None:
        half_life = smoothing_to_half_life(args.smoothing, float(interval.value))
        value = (
            "inf"
            if math.isinf(half_life)
            else f"{half_life:.0f}"
            if interval.unit.integral
            else f"{half_life:.6g}"
        )
        print(f"smoothing {args.smoothing:g} per {interval} = half_life {value}{interval.unit}")
    else:
        half_life_time = Time.parse(args.half_life, "--half-life")
        if half_life_time.unit is not interval.unit:
            raise ValueError(
                f"--half-life and --interval must use the same unit; got '{half_life_time}' and '{interval}'"
            )
        beta = half_life_to_smoothing(float(half_life_time.value), float(interval.value))
        print(f"half_life {half_life_time} at update_interval {interval} = smoothing {beta:.6f}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ema_callbacks.demo import format_table, run_plain

    print("Training a small MLP on scikit-learn's digits (plain PyTorch loop + ema_callbacks.EMA)")
    rows = run_plain(epochs=args.epochs, half_life=args.half_life, seed=args.seed)
    print()
    print(format_table({"plain": rows[-1]}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ema-callbacks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train on scikit-learn's digits and compare raw vs EMA weights"
    )
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--half-life", default="0.5ep")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    hl = sub.add_parser("halflife", help="convert between smoothing (decay) and half-life")
    group = hl.add_mutually_exclusive_group(required=True)
    group.add_argument("--smoothing", type=float, help="per-update decay, e.g. 0.999")
    group.add_argument("--half-life", help="a time string, e.g. 693ba")
    hl.add_argument("--interval", default="1ba", help="update interval (default 1ba)")
    hl.set_defaults(func=_halflife)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError) as err:
        print(f"ema-callbacks {args.command}: error: {err}", file=sys.stderr)
        return 2
