"""Accuracy against EMA half-life, from one training run (``ema-callbacks sweep``).

:func:`half_life_sweep` trains :func:`~ema_callbacks.examples.digits_mlp` on scikit-learn's
digits once, with a plain loop and one :class:`ema_callbacks.EMA` that tracks every half-life
of the sweep at once (all profiles updated in the same multi-tensor calls), plus two EDM2
power-function EMAs (``sigma_rel`` 0.05 and 0.10) written to post-hoc snapshots every
``snapshot_every`` steps. After training it evaluates the training weights and every tracked
profile on the validation split, then reconstructs a dense grid of half-lives from the snapshots
(:mod:`ema_callbacks.posthoc`) and evaluates those too, so tracked and reconstructed values can
be compared where both exist. :func:`format_sweep_table` and :func:`plot_sweep` turn the result
into the table and the plot of ``docs/profiles.md``.

The optimiser is deliberately noisy (SGD, learning rate 0.5, momentum 0.5, batches of 8): the
training weights bounce around, short half-lives average too little and long ones still
remember the early, poor weights, so the curve has a visible optimum.

>>> result = half_life_sweep(steps=40, half_lives=[2, 8], snapshot_every=10, grid=[4, 6])
>>> result.profiles
['ema_2ba', 'ema_8ba']
>>> len(result.accuracies), len(result.posthoc_at_tracked), len(result.reconstructed)
(2, 2, 2)
>>> print(format_sweep_table(result).splitlines()[0])
| half-life | tracked accuracy | tracked loss | post-hoc accuracy | post-hoc loss | fit error |
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ema_callbacks.examples import ProgressFn, digits_datasets, digits_mlp, evaluate_logits

__all__ = [
    "AveragesResult",
    "DEFAULT_HALF_LIVES",
    "SWEEP_BATCH_SIZE",
    "SWEEP_LR",
    "SWEEP_MOMENTUM",
    "SweepPoint",
    "SweepResult",
    "averages_over_time",
    "default_grid",
    "format_averages_table",
    "format_sweep_table",
    "half_life_sweep",
    "plot_averages",
    "plot_sweep",
]

#: The half-lives tracked directly (in optimizer steps), about a factor 2 apart.
DEFAULT_HALF_LIVES = (3, 7, 15, 30, 60, 125, 250, 500, 1000)
#: The sweep's optimiser: plain SGD with a large step on small batches, so the weights are noisy.
SWEEP_LR = 0.5
SWEEP_MOMENTUM = 0.5
SWEEP_BATCH_SIZE = 8
SWEEP_HIDDEN = 64
#: Reconstructions whose response is further than this from the requested one (relative) are
#: left out of the plotted curve (the library warns above it, too).
MAX_FIT_ERROR = 0.1


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated EMA: its half-life (steps), validation accuracy and loss, and for a
    post-hoc reconstruction the relative error of its response (``fit_error``, 0 = exact).

    >>> SweepPoint(30, 0.97, 0.1).fit_error is None
    True
    """

    half_life: int
    accuracy: float
    loss: float
    fit_error: float | None = None


@dataclass
class SweepResult:
    """What :func:`half_life_sweep` measured.

    ``tracked``: one point per directly tracked half-life; ``posthoc_at_tracked``: the same
    half-lives reconstructed from the snapshots; ``reconstructed``: the dense grid of
    reconstructed half-lives (each with its ``fit_error``); ``raw_accuracy``/``raw_loss``: the
    training weights; ``sigma_rel``: ``{sigma_rel: (accuracy, loss)}`` of the tracked
    power-function EMAs; ``shadows``: the final EMA tensors of every profile by name;
    ``seconds``: the training loop's wall time.

    >>> r = SweepResult(steps=10, seed=0, raw_accuracy=0.9, raw_loss=0.3,
    ...                 tracked=[SweepPoint(3, 0.91, 0.2), SweepPoint(30, 0.95, 0.1)])
    >>> r.half_lives, r.accuracies, r.best.half_life
    ([3, 30], [0.91, 0.95], 30)
    """

    steps: int
    seed: int
    raw_accuracy: float
    raw_loss: float
    tracked: list[SweepPoint]
    posthoc_at_tracked: list[SweepPoint] = field(default_factory=list)
    reconstructed: list[SweepPoint] = field(default_factory=list)
    sigma_rel: dict[float, tuple[float, float]] = field(default_factory=dict)
    snapshot_every: int | None = None
    snapshots: int = 0
    shadows: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @property
    def half_lives(self) -> list[int]:
        """The tracked half-lives, in steps."""
        return [p.half_life for p in self.tracked]

    @property
    def accuracies(self) -> list[float]:
        """Validation accuracy of each tracked half-life."""
        return [p.accuracy for p in self.tracked]

    @property
    def profiles(self) -> list[str]:
        """The tracked half-lives' profile names (``'ema_30ba'``)."""
        return [f"ema_{h}ba" for h in self.half_lives]

    @property
    def best(self) -> SweepPoint:
        """The tracked half-life with the best accuracy (ties: the lower loss)."""
        return max(self.tracked, key=lambda p: (p.accuracy, -p.loss))

    @property
    def best_reconstructed(self) -> SweepPoint | None:
        """The best well-represented reconstruction of the dense grid (``None`` if none)."""
        good = [p for p in self.reconstructed if (p.fit_error or 0.0) <= MAX_FIT_ERROR]
        return max(good, key=lambda p: (p.accuracy, -p.loss)) if good else None


def _positive_ints(values: Sequence[int], name: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be positive integers (steps); got {v!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a value; got {list(values)}")
    return out


def default_grid(low: int = 3, high: int = 1000, points: int = 60) -> list[int]:
    """Log-spaced integer half-lives from ``low`` to ``high`` (duplicates after rounding
    dropped): the dense grid of reconstructed half-lives.

    >>> default_grid(1, 100, 5)
    [1, 3, 10, 32, 100]
    """
    ratio = (high / low) ** (1.0 / (points - 1))
    return sorted({round(low * ratio**i) for i in range(points)})


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    try:
        return evaluate_logits(model(x), y)
    finally:
        model.train(was)


def _train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    seed: int,
) -> Iterator[int]:
    """The sweep's training: ``steps`` optimizer steps on shuffled batches of
    ``SWEEP_BATCH_SIZE`` (reshuffled each epoch, the remainder dropped), yielding the step
    number after each."""
    order = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(x), generator=order), 0
    model.train()
    for step in range(1, steps + 1):
        if pos + SWEEP_BATCH_SIZE > len(x):  # a new epoch: reshuffle, drop the remainder
            perm, pos = torch.randperm(len(x), generator=order), 0
        index = perm[pos : pos + SWEEP_BATCH_SIZE]
        pos += SWEEP_BATCH_SIZE
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


def half_life_sweep(
    steps: int = 1000,
    half_lives: Sequence[int] = DEFAULT_HALF_LIVES,
    sigma_rels: Sequence[float] = (0.05, 0.10),
    snapshot_every: int = 25,
    grid: Sequence[int] | None = None,
    seed: int = 0,
    snapshot_dtype: str = "float16",
    snapshot_folder: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> SweepResult:
    """Train once, evaluate every tracked half-life and a dense grid of post-hoc ones.

    Args:
        steps: optimizer steps (batches of :data:`SWEEP_BATCH_SIZE`; 1000 is about 6 epochs).
        half_lives: the half-lives (in steps) tracked directly by one :class:`ema_callbacks.EMA`.
        sigma_rels: the power-function EMAs tracked for post-hoc reconstruction (empty: none,
            and no snapshots).
        snapshot_every: steps between snapshots of the ``sigma_rels`` profiles (one more is
            written after the last step, the time the reconstructions are made at).
        grid: half-lives (steps) to reconstruct after training (default: 60 log-spaced from 3
            to 1000); those whose fit error exceeds 0.1 are kept in the result, flagged by
            their ``fit_error``.
        seed: seeds the data split, the initial weights, dropout and the batch order.
        snapshot_dtype: the snapshots' floating dtype (``'float16'`` as EDM2, or
            ``'float32'``).
        snapshot_folder: where to write the snapshots (default: a temporary folder, deleted).
        progress: ``progress(done, total)`` after every optimizer step.

    Runs torch single-threaded (fastest for this tiny model, and the same float results on any
    core count); the thread count is restored afterwards.

    >>> r = half_life_sweep(steps=20, half_lives=[5], sigma_rels=())
    >>> r.profiles, r.reconstructed, r.snapshots
    (['ema_5ba'], [], 0)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    tracked_h = _positive_ints(half_lives, "half_lives")
    if not tracked_h:
        raise ValueError("half_lives must not be empty")
    sigmas = [float(s) for s in sigma_rels]
    if (
        isinstance(snapshot_every, bool)
        or not isinstance(snapshot_every, int)
        or snapshot_every < 1
    ):
        raise ValueError(f"snapshot_every must be a positive integer; got {snapshot_every!r}")
    grid_h = default_grid() if grid is None else _positive_ints(grid, "grid")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and never oversubscribes
    try:
        return _sweep(
            steps,
            tracked_h,
            sigmas,
            snapshot_every,
            grid_h,
            seed,
            snapshot_dtype,
            snapshot_folder,
            progress,
        )
    finally:
        torch.set_num_threads(threads)


def _sweep(
    steps: int,
    tracked_h: list[int],
    sigmas: list[float],
    snapshot_every: int,
    grid_h: list[int],
    seed: int,
    snapshot_dtype: str,
    snapshot_folder: str | Path | None,
    progress: ProgressFn | None,
) -> SweepResult:
    from ema_callbacks.ema import EMA
    from ema_callbacks.posthoc import save_snapshot

    torch.manual_seed(seed)
    train, val = digits_datasets(seed)
    x, y = train.tensors
    xv, yv = val.tensors
    model = digits_mlp(hidden=SWEEP_HIDDEN)
    optimizer = torch.optim.SGD(model.parameters(), lr=SWEEP_LR, momentum=SWEEP_MOMENTUM)
    profiles: list[dict[str, Any]] = [{"half_life": f"{h}ba"} for h in tracked_h]
    profiles += [{"sigma_rel": s} for s in sigmas]
    # one EMA, every profile: updated together in the same multi-tensor calls
    ema = EMA(model, profiles=profiles)
    sigma_names = ema.profiles[len(tracked_h) :]

    with tempfile.TemporaryDirectory(prefix="ema_sweep_") as scratch:
        folder = Path(scratch if snapshot_folder is None else snapshot_folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        started = time.perf_counter()
        for step in _train_steps(model, optimizer, x, y, steps, seed):
            ema.step(model)
            if sigmas and (step % snapshot_every == 0 or step == steps):  # and at the end
                for s, name in zip(sigmas, sigma_names, strict=True):
                    save_snapshot(
                        folder / f"ema-{step}ba-sigma_rel{s:g}.safetensors",
                        ema.shadow_of(name),
                        time=step,
                        sigma_rel=s,
                        dtype=snapshot_dtype,
                    )
                    written += 1
            if progress is not None:
                progress(step, steps)
        seconds = time.perf_counter() - started

        raw = _evaluate(model, xv, yv)
        tracked = []
        for h, name in zip(tracked_h, ema.profiles, strict=False):
            with ema.swapped(model, profile=name):
                tracked.append(SweepPoint(h, *_evaluate(model, xv, yv)))
        sigma_results = {}
        for s, name in zip(sigmas, sigma_names, strict=True):
            with ema.swapped(model, profile=name):
                sigma_results[s] = _evaluate(model, xv, yv)
        shadows = {
            name: {k: v.detach().clone() for k, v in ema.shadow_of(name).items()}
            for name in ema.profiles
        }

        at_tracked: list[SweepPoint] = []
        dense: list[SweepPoint] = []
        if written:
            scratch_model = copy.deepcopy(model)
            points = _reconstruct_points(folder, scratch_model, xv, yv, [*tracked_h, *grid_h])
            at_tracked = points[: len(tracked_h)]
            dense = points[len(tracked_h) :]

    return SweepResult(
        steps=steps,
        seed=seed,
        raw_accuracy=raw[0],
        raw_loss=raw[1],
        tracked=tracked,
        posthoc_at_tracked=at_tracked,
        reconstructed=dense,
        sigma_rel=sigma_results,
        snapshot_every=snapshot_every if sigmas else None,
        snapshots=written,
        shadows=shadows,
        seconds=seconds,
    )


def _reconstruct_points(
    folder: Path, model: nn.Module, xv: torch.Tensor, yv: torch.Tensor, half_lives: list[int]
) -> list[SweepPoint]:
    """Reconstruct every half-life at the latest snapshot time, reading each snapshot once,
    and evaluate each result in ``model`` (a scratch copy)."""
    from ema_callbacks.posthoc import _plan, _stream, find_snapshots

    snapshots = find_snapshots(folder)
    plans = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # poorly represented targets: reported as fit_error
        for h in half_lives:
            plans.append(_plan(snapshots, None, f"{h}ba", None))
    coefficients = torch.cat([p.coefficients for p in plans], dim=1)
    states = _stream(plans[0].used, coefficients)
    points = []
    for h, plan, state in zip(half_lives, plans, states, strict=True):
        model.load_state_dict(state, strict=True)
        points.append(SweepPoint(h, *_evaluate(model, xv, yv), float(plan.fit_errors[0])))
    return points


def format_sweep_table(result: SweepResult) -> str:
    """A markdown table: the training weights, then every tracked half-life with its tracked
    and post-hoc (reconstructed) accuracy and loss and the reconstruction's fit error (values
    whose fit error exceeds 0.1 are marked ``*``: the snapshots cannot represent that
    half-life well), then the best of each.

    >>> r = SweepResult(steps=10, seed=0, raw_accuracy=0.9, raw_loss=0.3,
    ...                 tracked=[SweepPoint(3, 0.91, 0.2)])
    >>> print(format_sweep_table(r))
    | half-life | tracked accuracy | tracked loss | post-hoc accuracy | post-hoc loss | fit error |
    |---:|---:|---:|---:|---:|---:|
    | training weights | 0.9000 | 0.3000 | | | |
    | 3ba | 0.9100 | 0.2000 | | | |
    <BLANKLINE>
    best tracked: 3ba (accuracy 0.9100, loss 0.2000)
    """
    lines = [
        "| half-life | tracked accuracy | tracked loss | post-hoc accuracy | post-hoc loss "
        "| fit error |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| training weights | {result.raw_accuracy:.4f} | {result.raw_loss:.4f} | | | |",
    ]
    posthoc = {p.half_life: p for p in result.posthoc_at_tracked}
    for p in result.tracked:
        row = f"| {p.half_life}ba | {p.accuracy:.4f} | {p.loss:.4f} |"
        q = posthoc.get(p.half_life)
        if q is None or q.fit_error is None:
            row += " | | |"
        else:
            mark = "*" if q.fit_error > MAX_FIT_ERROR else ""
            row += f" {q.accuracy:.4f}{mark} | {q.loss:.4f}{mark} | {q.fit_error:.3f} |"
        lines.append(row)
    best = result.best
    lines += [
        "",
        f"best tracked: {best.half_life}ba (accuracy {best.accuracy:.4f}, loss {best.loss:.4f})",
    ]
    rec = result.best_reconstructed
    if rec is not None:
        lines.append(
            f"best post-hoc on the grid: {rec.half_life}ba (accuracy {rec.accuracy:.4f}, "
            f"loss {rec.loss:.4f}, fit error {rec.fit_error:.3f})"
        )
    if any((q.fit_error or 0.0) > MAX_FIT_ERROR for q in result.posthoc_at_tracked):
        lines.append(f"* fit error above {MAX_FIT_ERROR}: outside what the snapshots can represent")
    return "\n".join(lines)


def plot_sweep(result: SweepResult, path: str | Path, title: str | None = None) -> bool:
    """Plot validation accuracy and loss against half-life (log scale): the training weights
    (dashed), every tracked half-life (dots), the post-hoc reconstructions of the dense grid
    (line, where the fit error is at most 0.1) and of the tracked half-lives (open squares).
    Writes a PNG with matplotlib's Agg backend; returns False (and writes nothing) when
    matplotlib is not installed.

    >>> import tempfile, os
    >>> r = SweepResult(steps=10, seed=0, raw_accuracy=0.9, raw_loss=0.3,
    ...                 tracked=[SweepPoint(3, 0.91, 0.2), SweepPoint(30, 0.95, 0.1)])
    >>> path = os.path.join(tempfile.mkdtemp(), 'sweep.png')
    >>> written = plot_sweep(r, path)       # False without matplotlib
    >>> written == os.path.isfile(path)
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    good = [p for p in result.reconstructed if (p.fit_error or 0.0) <= MAX_FIT_ERROR]
    poor = [q for q in result.posthoc_at_tracked if (q.fit_error or 0.0) > MAX_FIT_ERROR]
    fine = [q for q in result.posthoc_at_tracked if (q.fit_error or 0.0) <= MAX_FIT_ERROR]
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        raw = result.raw_accuracy if metric == "accuracy" else result.raw_loss
        ax.axhline(raw, color="0.4", linestyle="--", linewidth=1, label="training weights")
        if good:
            ax.axvspan(
                good[0].half_life,
                good[-1].half_life,
                color="C1",
                alpha=0.07,
                label=f"post-hoc range (fit error <= {MAX_FIT_ERROR})",
            )
            ax.plot(
                [p.half_life for p in good],
                [getattr(p, metric) for p in good],
                "-",
                color="C1",
                linewidth=2,
                alpha=0.85,
                label=f"post-hoc, reconstructed from {result.snapshots} snapshots",
            )
        ax.plot(
            result.half_lives,
            [getattr(p, metric) for p in result.tracked],
            "o-",
            color="C0",
            linewidth=0.8,
            markersize=7,
            label=f"tracked during training ({len(result.tracked)} EMAs, one run)",
        )
        if fine:
            ax.plot(
                [q.half_life for q in fine],
                [getattr(q, metric) for q in fine],
                "s",
                markerfacecolor="none",
                markeredgecolor="C1",
                markersize=12,
                markeredgewidth=1.5,
                label="post-hoc at a tracked half-life",
            )
        if poor:
            ax.plot(
                [q.half_life for q in poor],
                [getattr(q, metric) for q in poor],
                "x",
                color="C3",
                markersize=7,
                label=f"post-hoc, fit error > {MAX_FIT_ERROR} (unreliable)",
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.set_xlabel("EMA half-life (optimizer steps)")
        ax.set_ylabel(f"validation {metric}" + (" (log scale)" if metric == "loss" else ""))
        ax.grid(alpha=0.3)
    losses = [result.raw_loss, *(p.loss for p in result.tracked), *(p.loss for p in good)]
    axes[1].set_yscale("log")
    ticks = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
    low, high = min(losses), max(losses)
    shown = [t for t in ticks if low / 1.2 <= t <= high * 1.2] or [low, high]
    axes[1].yaxis.set_major_locator(FixedLocator(shown))
    axes[1].yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[0].legend(fontsize=7.5, loc="lower left")
    fig.suptitle(
        title
        or (
            f"scikit-learn digits, one run of {result.steps} steps (SGD lr {SWEEP_LR:g}, "
            f"momentum {SWEEP_MOMENTUM:g}, batch {SWEEP_BATCH_SIZE}): validation metrics "
            "against EMA half-life"
        ),
        fontsize=10.5,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# EMA, BEMA and uniform against training time
# ---------------------------------------------------------------------------------------------


@dataclass
class AveragesResult:
    """What :func:`averages_over_time` measured: at each evaluated ``step``, the validation
    accuracy of the training weights (``'training'``) and of every average, by its name (NaN
    before an average has started).

    >>> r = AveragesResult(steps=[10, 20], accuracy={'training': [0.5, 0.6], 'bema': [0.55, 0.7]})
    >>> r.final('bema')
    0.7
    """

    steps: list[int] = field(default_factory=list)
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def final(self, name: str) -> float:
        """The accuracy of ``name`` at the last evaluated step."""
        return self.accuracy[name][-1]


def averages_over_time(
    steps: int = 1000,
    every: int = 25,
    half_life: int = 125,
    uniform_start: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> AveragesResult:
    """Train the sweep's model once with three averages tracked together: an EMA
    (``half_life`` steps), BEMA (TRL's defaults, updated every step) and the uniform average of
    SWA from ``uniform_start`` (default half-way); evaluate the training weights and each
    average on the validation split every ``every`` steps (each swapped in, O(1)).

    >>> r = averages_over_time(steps=40, every=20, half_life=8)
    >>> r.steps, sorted(r.accuracy)
    ([20, 40], ['bema', 'ema', 'training', 'uniform'])
    """
    from ema_callbacks.ema import EMA

    if every < 1 or steps < every:
        raise ValueError(f"every must be between 1 and steps; got every={every}, steps={steps}")
    start = steps // 2 if uniform_start is None else uniform_start
    torch.manual_seed(seed)
    train, val = digits_datasets(seed)
    x, y = train.tensors
    xv, yv = val.tensors
    model = digits_mlp(hidden=SWEEP_HIDDEN)
    optimizer = torch.optim.SGD(model.parameters(), lr=SWEEP_LR, momentum=SWEEP_MOMENTUM)
    averages = EMA(
        model,
        profiles=[
            {"name": "ema", "half_life": f"{half_life}ba"},
            {"name": "bema", "ema_power": 0.5, "bias_power": 0.2, "lag": 10},
            {"name": "uniform", "uniform": True, "start": f"{start}ba"},
        ],
    )
    result = AveragesResult(
        accuracy={n: [] for n in ("training", *averages.profiles)},
        labels={
            "training": "training weights",
            "ema": f"EMA, half-life {half_life} steps",
            "bema": "BEMA (ema_power 0.5, bias_power 0.2, lag 10)",
            "uniform": f"uniform (SWA) from step {start}",
        },
    )
    started = time.perf_counter()
    for step in _train_steps(model, optimizer, x, y, steps, seed):
        averages.step(model)
        if step % every == 0:
            result.steps.append(step)
            result.accuracy["training"].append(_evaluate(model, xv, yv)[0])
            for name in averages.profiles:
                if not averages.controller.profile(name).started:  # uniform before its start
                    result.accuracy[name].append(math.nan)
                    continue
                with averages.swapped(model, profile=name):
                    result.accuracy[name].append(_evaluate(model, xv, yv)[0])
        if progress is not None:
            progress(step, steps)
    result.seconds = time.perf_counter() - started
    return result


def format_averages_table(result: AveragesResult, rows: int = 10) -> str:
    """A markdown table of the accuracies at about ``rows`` evenly spaced evaluated steps
    (the last one included).

    >>> r = AveragesResult(steps=[10, 20], accuracy={'training': [0.5, 0.6], 'ema': [0.55, 0.7]})
    >>> print(format_averages_table(r))
    | step | training | ema |
    |---:|---:|---:|
    | 10 | 0.5000 | 0.5500 |
    | 20 | 0.6000 | 0.7000 |
    """
    names = list(result.accuracy)
    stride = max(1, len(result.steps) // rows)
    picked = sorted({*range(len(result.steps) - 1, -1, -stride)})
    lines = ["| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i in picked:
        values = " | ".join(
            "-" if math.isnan(result.accuracy[n][i]) else f"{result.accuracy[n][i]:.4f}"
            for n in names
        )
        lines.append(f"| {result.steps[i]} | {values} |")
    return "\n".join(lines)


def plot_averages(result: AveragesResult, path: str | Path) -> bool:
    """Plot validation accuracy against optimizer steps for the training weights and every
    average; returns False (and writes nothing) without matplotlib.

    >>> import tempfile, os
    >>> r = AveragesResult(steps=[10, 20], accuracy={'training': [0.5, 0.6], 'ema': [0.55, 0.7]})
    >>> path = os.path.join(tempfile.mkdtemp(), 'averages.png')
    >>> plot_averages(r, path) == os.path.isfile(path)
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for name, values in result.accuracy.items():
        style = {"color": "0.5", "linewidth": 0.8} if name == "training" else {"linewidth": 1.8}
        ax.plot(result.steps, values, label=result.labels.get(name, name), **style)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation accuracy")
    late = [
        a
        for values in result.accuracy.values()
        for step, a in zip(result.steps, values, strict=True)
        if step >= result.steps[-1] / 5 and not math.isnan(a)
    ]
    ax.set_ylim(min(late) - 0.02, min(1.0, max(late) + 0.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Digits MLP, one run: EMA, BEMA and uniform averages of the same weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
