"""Post-hoc EMA (EDM2): reconstructions checked against EMAs tracked directly in a simulated
training, the maths against closed forms and numerical integrals, the files against crashes."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import ema_callbacks.posthoc as posthoc
from ema_callbacks import EMA
from ema_callbacks.files import FileProblem
from ema_callbacks.posthoc import (
    Snapshot,
    find_snapshots,
    load_snapshot,
    posthoc_command,
    power_function_correlation,
    reconstruct,
    reconstruct_many,
    save_snapshot,
    solve_coefficients,
)
from ema_callbacks.schedule import power_function_smoothing, sigma_rel_to_gamma

STEPS = 2000
EVERY = 100  # snapshot interval, in steps
TRACKED = (0.05, 0.10)  # the profiles written to snapshots
TARGETS = (0.07, 0.12)  # profiles tracked directly, only to check the reconstructions
HALF_LIVES = ("50ba", "200ba")


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@dataclass
class Training:
    fp16: Path  # snapshots stored as float16 (the default)
    fp32: Path  # the same snapshots stored as float32 (isolates the method's own error)
    direct: dict[float, dict[str, torch.Tensor]]  # power-function EMAs at the end
    direct_1000: dict[float, dict[str, torch.Tensor]]  # power-function EMAs at step 1000
    half_life: dict[str, dict[str, torch.Tensor]]
    scale: float  # distance between the 0.05 and 0.10 EMAs at the end


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Training:
    """An nn.Linear whose weights follow a seeded noisy random walk with drift, tracked by
    ``ema_callbacks.EMA`` with several power-function and half-life EMAs; snapshots of the
    sigma_rel 0.05 and 0.10 EMAs every 100 steps."""
    root = tmp_path_factory.mktemp("posthoc")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    drift = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    emas = {s: EMA(model, sigma_rel=s) for s in TRACKED + TARGETS}
    halves = {h: EMA(model, half_life=h) for h in HALF_LIVES}
    direct_1000: dict[float, dict[str, torch.Tensor]] = {}
    for step in range(1, STEPS + 1):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(0.01 * drift[n] + 0.05 * torch.randn(p.shape, generator=gen))
        for ema in (*emas.values(), *halves.values()):
            ema.step(model)
        if step == 1000:
            direct_1000 = {s: _clone(e.shadow) for s, e in emas.items()}
        if step % EVERY == 0:
            for s in TRACKED:
                name = f"ema-{step:06d}-{s:.3f}.safetensors"
                save_snapshot(root / "fp16" / name, emas[s].shadow, time=step, sigma_rel=s)
                save_snapshot(
                    root / "fp32" / name, emas[s].shadow, time=step, sigma_rel=s, dtype="float32"
                )
    direct = {s: _clone(e.shadow) for s, e in emas.items()}
    return Training(
        fp16=root / "fp16",
        fp32=root / "fp32",
        direct=direct,
        direct_1000=direct_1000,
        half_life={h: _clone(e.shadow) for h, e in halves.items()},
        scale=_distance(direct[0.05], direct[0.10]),
    )


# ---------------------------------------------------------------------------------------------
# Equivalence with directly tracked EMAs
# ---------------------------------------------------------------------------------------------

# Measured (relative to the distance between the 0.05 and 0.10 EMAs): float32 snapshots
# 1.5e-4 (0.07) and 2.5e-4 (0.12), the method's own error (the target profile is not exactly
# in the span of the snapshot profiles); float16 snapshots about 3e-3, dominated by float16
# rounding of weights of magnitude ~20. The nearest snapshot is 0.3 to 0.5 away, so these
# tolerances sit 4x above what was measured and 30x below "wrong".
TOL_FP32 = 1e-3
TOL_FP16 = 1e-2


@pytest.mark.parametrize("sigma_rel", TARGETS)
def test_reconstruction_matches_the_directly_tracked_ema(
    training: Training, sigma_rel: float
) -> None:
    target = training.direct[sigma_rel]
    nearest = min(_distance(target, training.direct[s]) for s in TRACKED)
    assert nearest > 0.2 * training.scale  # the test is meaningful: no snapshot is the answer
    assert _distance(reconstruct(training.fp32, sigma_rel=sigma_rel), target) < (
        TOL_FP32 * training.scale
    )
    assert _distance(reconstruct(training.fp16, sigma_rel=sigma_rel), target) < (
        TOL_FP16 * training.scale
    )


def test_reconstruct_many_equals_one_at_a_time(training: Training) -> None:
    many = reconstruct_many(training.fp32, list(TARGETS))
    for sigma_rel, out in zip(TARGETS, many, strict=True):
        one = reconstruct(training.fp32, sigma_rel=sigma_rel)
        assert all(out[k].dtype == torch.float32 for k in out)
        assert _distance(out, one) == 0.0


def test_reconstruction_at_an_earlier_snapshot_time(training: Training) -> None:
    # Later snapshots must be ignored: the result at 1000ba is the EMA as it was at step 1000.
    # Half as many snapshots cover the run so far, so the method's response error is larger
    # (0.009 against 0.0025 at 2000ba); measured 2.1e-3 (0.07) and 3.2e-3 (0.12) of the
    # distance between the 0.05 and 0.10 EMAs at step 1000 with float32 snapshots, 3.2e-3 and
    # 4.7e-3 with float16 ones.
    early = training.direct_1000
    scale = _distance(early[0.05], early[0.10])
    for sigma_rel, at, folder in (
        (0.07, "1000ba", training.fp32),
        (0.12, 1000, training.fp32),
        (0.07, "1000ba", training.fp16),
        (0.12, 1000, training.fp16),
    ):
        out = reconstruct(folder, sigma_rel=sigma_rel, at=at)
        assert _distance(out, early[sigma_rel]) < TOL_FP16 * scale
        assert _distance(early[sigma_rel], training.direct[sigma_rel]) > 50 * TOL_FP16 * scale


@pytest.mark.parametrize("sigma_rel", TRACKED)
def test_reconstructing_a_snapshot_profile_returns_the_snapshot(
    training: Training, sigma_rel: float
) -> None:
    snap = next(
        s for s in find_snapshots(training.fp16) if s.time == 1500 and s.sigma_rel == sigma_rel
    )
    stored = {k: v.float() for k, v in snap.tensors().items()}
    out = reconstruct(training.fp16, sigma_rel=sigma_rel, at="1500ba")
    assert _distance(out, stored) < 1e-6 * _distance(stored, {k: 0 * v for k, v in stored.items()})


# Measured: 50ba 1.2e-3 (float32 snapshots) and 1.1e-2 (float16, which the coefficients of
# magnitude ~2.5 amplify); 200ba 2.3e-2 either way — at 2000 steps a 200-step half-life is
# longer than the 0.10 profile (an extrapolation), and the method's response error is 0.024.
# The half-life EMAs are 0.29 and 1.5 away from the 0.05 EMA.
HALF_LIFE_TOL = {("50ba", "fp32"): 5e-3, ("50ba", "fp16"): 3e-2, ("200ba", "fp32"): 5e-2}


@pytest.mark.parametrize(("half_life", "storage"), sorted(HALF_LIFE_TOL))
def test_half_life_reconstruction_matches_the_directly_tracked_ema(
    training: Training, half_life: str, storage: str
) -> None:
    target = training.half_life[half_life]
    assert _distance(target, training.direct[0.05]) > 0.25 * training.scale
    folder = training.fp32 if storage == "fp32" else training.fp16
    out = reconstruct(folder, half_life=half_life)
    assert _distance(out, target) < HALF_LIFE_TOL[(half_life, storage)] * training.scale


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------


def test_published_sigma_rel_gamma_pairs_are_what_snapshots_and_solver_use(
    tmp_path: Path,
) -> None:
    for sigma_rel, gamma in ((0.05, 16.97), (0.10, 6.94)):
        snap = load_snapshot(
            save_snapshot(
                tmp_path / f"{sigma_rel}.safetensors",
                {"w": torch.ones(1)},
                time=1,
                sigma_rel=sigma_rel,
            )
        )
        assert round(snap.gamma, 2) == gamma
        # <p, p> at t = 1 is (g+1)^2 / (2g+1): the solver uses the same exponent.
        g = sigma_rel_to_gamma(sigma_rel)
        assert float(power_function_correlation(1, sigma_rel, 1, sigma_rel)) == pytest.approx(
            (g + 1) ** 2 / (2 * g + 1), rel=1e-12
        )
        assert round(g, 2) == gamma


def _profile(tau: torch.Tensor, t: float, gamma: float) -> torch.Tensor:
    """EDM2 Eq. 121: (gamma + 1) / t * (tau / t) ** gamma on [0, t], 0 after."""
    return torch.where(tau <= t, (gamma + 1) / t * (tau / t) ** gamma, torch.zeros_like(tau))


@pytest.mark.parametrize(
    ("ta", "sa", "tb", "sb"),
    [(1000, 0.05, 1000, 0.10), (600, 0.10, 1000, 0.05), (1000, 0.07, 350, 0.2)],
)
def test_inner_products_match_the_integral_of_the_profiles(
    ta: float, sa: float, tb: float, sb: float
) -> None:
    tau = torch.linspace(0, min(ta, tb), 400_001, dtype=torch.float64)
    ga, gb = sigma_rel_to_gamma(sa), sigma_rel_to_gamma(sb)
    integral = torch.trapezoid(_profile(tau, ta, ga) * _profile(tau, tb, gb), tau)
    ab = power_function_correlation([ta], [sa], [tb], [sb])
    ba = power_function_correlation([tb], [sb], [ta], [sa])
    assert float(ab) == pytest.approx(float(integral), rel=1e-6)
    assert float(ab) == float(ba)  # symmetric
    big = power_function_correlation([ta, tb, 800], [sa, sb, 0.1], [ta, tb, 800], [sa, sb, 0.1])
    assert torch.equal(big, big.T)


def test_coefficient_columns_sum_to_one() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        times = sorted(set((torch.randint(1, 200, (12,), generator=gen) * 50).tolist()))
        in_t = [t for t in times for _ in TRACKED]
        in_s = [s for _ in times for s in TRACKED]
        x = solve_coefficients(in_t, in_s, times[-1], [0.03, 0.07, 0.15, 0.25])
        assert x.dtype == torch.float64 and x.shape == (len(in_t), 4)
        assert float((x.sum(0) - 1).abs().max()) < 1e-12
    # Long runs and narrow profiles: no overflow (t^gamma is never formed).
    x = solve_coefficients([1e6, 2e6, 5e6, 1e7], [0.01, 0.02, 0.01, 0.02], 1e7, [0.015])
    assert torch.isfinite(x).all() and float(x.sum()) == pytest.approx(1.0)


def _recursion_response(betas: list[float]) -> torch.Tensor:
    """The weight each step's model gets in the EMA, by running the recursion on one-hots."""
    w = torch.zeros(len(betas), dtype=torch.float64)
    for step, beta in enumerate(betas):
        w *= beta
        w[step] += 1 - beta
    return w


def test_discrete_responses_are_those_of_the_tracked_recursions() -> None:
    T, gamma, h = 300, sigma_rel_to_gamma(0.1), 40.0
    edges = torch.arange(0, T + 1, dtype=torch.float64)
    power = _recursion_response([power_function_smoothing(t, 1, gamma) for t in range(1, T + 1)])
    closed = torch.exp(posthoc._power_log_weights(edges, gamma) - (gamma + 1) * math.log(T))
    assert torch.allclose(closed, power, rtol=1e-10, atol=1e-15)
    expo = _recursion_response([0.0] + [2 ** (-1 / h)] * (T - 1))  # copy at step 1
    closed = torch.exp(posthoc._exponential_log_weights(edges, h))
    assert torch.allclose(closed, expo, rtol=1e-10, atol=1e-15)


def test_half_life_coefficients_are_the_least_squares_solution() -> None:
    """The cumulative-sum, log-space solver equals a brute-force least squares over the
    explicit discrete responses, normalised."""
    T, h = 1200, 150.0
    times = [t for t in range(100, T + 1, 100) for _ in TRACKED]
    sigmas = [s for _ in range(100, T + 1, 100) for s in TRACKED]
    gammas = [sigma_rel_to_gamma(s) for s in sigmas]
    k = torch.arange(1, T + 1, dtype=torch.float64)
    rows = []
    for t, g in zip(times, gammas, strict=True):
        r = (k / t) ** (g + 1) - ((k - 1) / t) ** (g + 1)
        rows.append(torch.where(k <= t, r, torch.zeros_like(r)))
    responses = torch.stack(rows)
    beta = 2 ** (-1 / h)
    target = (1 - beta) * beta ** (T - k)
    target[0] = beta ** (T - 1)
    expected = torch.linalg.lstsq(responses.T, target.unsqueeze(1)).solution
    expected = expected / expected.sum()
    x, error = posthoc._solve_half_life_coefficients(
        torch.tensor(times, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64), T, h
    )
    assert float((x - expected).abs().max()) < 1e-9
    residual = (responses.T @ x).squeeze(1) - target
    assert float(error) == pytest.approx(float(residual.norm() / target.norm()), rel=1e-6)


def test_half_life_on_a_coarse_grid_for_long_runs_in_samples(tmp_path: Path) -> None:
    for t in (2_000_000, 4_000_000, 6_000_000, 8_000_000):
        for s in TRACKED:
            save_snapshot(
                tmp_path / f"{t}-{s}.safetensors",
                {"w": torch.ones(2)},
                time=t,
                unit="sp",
                sigma_rel=s,
            )
    out = reconstruct(tmp_path, half_life="500000sp", at="8000000sp")
    assert torch.allclose(out["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# Snapshot files
# ---------------------------------------------------------------------------------------------


def test_snapshot_round_trip_float16_by_default_and_buffers_kept(tmp_path: Path) -> None:
    w = torch.randn(3, 4, dtype=torch.float64)
    counter = torch.tensor(7)
    mean = torch.randn(4)
    path = save_snapshot(
        tmp_path / "s.safetensors",
        {"w": w, "num_batches_tracked": counter},
        time="1500ba",
        sigma_rel=0.05,
        buffers={"running_mean": mean},
    )
    snap = load_snapshot(path)
    assert snap == Snapshot(
        path, 1500.0, "ba", 0.05, sigma_rel_to_gamma(0.05), ("num_batches_tracked", "running_mean")
    )
    tensors = snap.tensors()
    assert tensors["w"].dtype == torch.float16
    assert torch.equal(tensors["w"], w.to(torch.float16))
    assert torch.equal(tensors["num_batches_tracked"], counter)  # integers are kept, not cast
    assert torch.equal(tensors["running_mean"], mean)  # buffers keep their dtype
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "ema_callbacks.posthoc" and meta["unit"] == "ba"
    assert float(meta["time"]) == 1500 and float(meta["sigma_rel"]) == 0.05
    assert float(meta["gamma"]) == pytest.approx(16.97, abs=0.005)
    assert all(isinstance(v, str) for v in meta.values())
    p32 = save_snapshot(
        tmp_path / "f.safetensors", {"w": w}, time=3, sigma_rel=0.1, dtype="float32"
    )
    assert load_snapshot(p32).tensors()["w"].dtype == torch.float32
    pep = save_snapshot(tmp_path / "e.safetensors", {"w": w}, time=2.5, unit="ep", sigma_rel=0.1)
    assert (load_snapshot(pep).time, load_snapshot(pep).unit) == (2.5, "ep")


def test_snapshot_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "s.safetensors"
    seen: dict[str, object] = {}
    real_replace = os.replace

    def spying_replace(src: str, dst: str) -> None:
        # At the moment of the rename the temp file is complete and the final name unused.
        seen["final_exists"] = Path(dst).exists()
        seen["temp_in_same_folder"] = Path(src).parent == Path(dst).parent
        seen["temp_complete"] = torch.equal(load_file(src)["w"], torch.ones(1000).half())
        seen["temp_ignored"] = not Path(src).name.endswith(".safetensors")
        real_replace(src, dst)

    monkeypatch.setattr(posthoc.os, "replace", spying_replace)
    save_snapshot(final, {"w": torch.ones(1000)}, time=10, sigma_rel=0.1)
    assert seen == {
        "final_exists": False,
        "temp_in_same_folder": True,
        "temp_complete": True,
        "temp_ignored": True,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # the temp file is gone

    # A crash while writing leaves the previous file intact and no temp file behind.
    def crashing_save(tensors: dict[str, torch.Tensor], filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(final, {"w": torch.zeros(1000)}, time=20, sigma_rel=0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert load_snapshot(final).time == 10
    assert torch.equal(load_snapshot(final).tensors()["w"], torch.ones(1000).half())


def test_find_snapshots_sorts_recurses_and_ignores_other_files(tmp_path: Path) -> None:
    for t, s in ((300, 0.1), (100, 0.1), (300, 0.05), (200, 0.05)):
        save_snapshot(
            tmp_path / f"run/sub{t % 200}/{t}-{s}.safetensors",
            {"w": torch.ones(1)},
            time=t,
            sigma_rel=s,
        )
    save_file({"w": torch.ones(1)}, str(tmp_path / "run" / "model.safetensors"))
    save_file({"w": torch.ones(1)}, str(tmp_path / "run" / "tagged.safetensors"), {"format": "pt"})
    (tmp_path / "run" / "broken.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "run" / "notes.txt").write_text("hi")
    # a damaged file is an error naming it (a reconstruction without it would differ) ...
    with pytest.raises(FileProblem, match="broken.safetensors: damaged or truncated"):
        find_snapshots(tmp_path / "run")
    # ... or, for a training run scanning its folder, skipped with a warning
    with pytest.warns(UserWarning, match="broken.safetensors"):
        snaps = find_snapshots(tmp_path / "run", skip_damaged=True)
    assert [(s.time, s.sigma_rel) for s in snaps] == [
        (100, 0.1),
        (200, 0.05),
        (300, 0.05),
        (300, 0.1),
    ]
    # Files and folders together, without duplicates.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = find_snapshots([tmp_path / "run", snaps[0].path], skip_damaged=True)
    assert [s.path for s in both] == [s.path for s in snaps]
    with pytest.raises(ValueError, match="is not a post-hoc EMA snapshot"):
        find_snapshots([tmp_path / "run" / "model.safetensors"])
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        find_snapshots(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def test_posthoc_command_writes_a_state_dict_for_the_bare_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, sigma_rel=0.05, buffers="ignore")
    ema10 = EMA(model, sigma_rel=0.10, buffers="ignore")
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 41):
        with torch.no_grad():
            model(torch.randn(8, 3, generator=gen))  # updates the BatchNorm statistics
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ema.step(model)
        ema10.step(model)
        if step % 10 == 0:
            buffers = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("1.r")}
            buffers["1.num_batches_tracked"] = model[1].num_batches_tracked.clone()
            for s, e in ((0.05, ema), (0.10, ema10)):
                save_snapshot(
                    tmp_path / "snaps" / f"{step}-{s}.safetensors",
                    e.shadow,
                    time=step,
                    sigma_rel=s,
                    buffers=buffers,
                )
    out = tmp_path / "snaps" / "posthoc.safetensors"  # inside the input folder on purpose
    summary = posthoc_command(
        [str(tmp_path / "snaps")], str(out), sigma_rel=0.07, half_life=None, at=None
    )
    assert summary["snapshots"] == 8 and summary["time"] == "40ba" and summary["tensors"] == 7
    state = load_file(str(out))
    bare = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    bare.load_state_dict(state, strict=True)
    assert state["0.weight"].dtype == torch.float32
    assert torch.equal(state["1.running_mean"], model[1].running_mean)  # latest snapshot's
    assert int(state["1.num_batches_tracked"]) == 40
    expected = reconstruct(tmp_path / "snaps", sigma_rel=0.07)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert len(find_snapshots(tmp_path / "snaps")) == 8  # the result is not taken for a snapshot
    summary = posthoc_command(
        [str(tmp_path / "snaps")], str(out), sigma_rel=None, half_life="3ba", at="30ba"
    )
    assert summary["snapshots"] == 6 and summary["half_life"] == "3ba"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def snaps(tmp_path: Path) -> Path:
    for t in (100, 200):
        for s in TRACKED:
            save_snapshot(
                tmp_path / f"{t}-{s}.safetensors", {"w": torch.ones(2)}, time=t, sigma_rel=s
            )
    return tmp_path


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "exactly one of sigma_rel or half_life; got neither"),
        ({"sigma_rel": 0.1, "half_life": "5ba"}, ValueError, "exactly one of sigma_rel"),
        ({"sigma_rel": 0.3}, ValueError, r"sigma_rel must be between 0 and 0.2887"),
        ({"sigma_rel": 0.0}, ValueError, r"sigma_rel must be between 0 and 0.2887"),
        ({"sigma_rel": True}, TypeError, "sigma_rel must be a number"),
        ({"sigma_rel": "0.1"}, TypeError, "sigma_rel must be a number"),
        ({"sigma_rel": 0.1, "at": "150ba"}, ValueError, "at must be the time of one of the"),
        ({"sigma_rel": 0.1, "at": 150}, ValueError, "at must be the time of one of the"),
        ({"sigma_rel": 0.1, "at": "1ep"}, ValueError, "at='1ep' must be in the snapshots' unit"),
        ({"sigma_rel": 0.1, "at": -3}, ValueError, "at must be a positive"),
        ({"half_life": "5ep"}, ValueError, "half_life='5ep' must be in the snapshots' unit"),
        ({"half_life": "0ba"}, ValueError, "half_life must be positive and finite"),
        ({"half_life": "infba"}, ValueError, "half_life must be positive and finite"),
        ({"half_life": 5}, TypeError, "half_life must be a time string"),
    ],
)
def test_reconstruct_rejects_bad_targets(
    snaps: Path, kwargs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        reconstruct(snaps, **kwargs)


def test_reconstruct_rejects_bad_snapshot_sets(
    snaps: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="snapshots: no post-hoc EMA snapshots"):
        reconstruct(empty, sigma_rel=0.1)
    with pytest.raises(TypeError, match="snapshots must be"):
        reconstruct(3, sigma_rel=0.1)
    with pytest.raises(ValueError, match=r"sigma_rels must be between"):
        reconstruct_many(snaps, [0.1, 0.5])
    other = tmp_path_factory.mktemp("other")
    save_snapshot(other / "x.safetensors", {"w": torch.ones(2)}, time=200, unit="sp", sigma_rel=0.1)
    with pytest.raises(ValueError, match=r"mix time units \['ba', 'sp'\]"):
        reconstruct([snaps, other], sigma_rel=0.1)
    dup = tmp_path_factory.mktemp("dup")
    save_snapshot(dup / "copy.safetensors", {"w": torch.ones(2)}, time=200, sigma_rel=0.1)
    with pytest.raises(ValueError, match="two snapshots with time 200ba and sigma_rel 0.1"):
        reconstruct([snaps, dup], sigma_rel=0.07)
    renamed = tmp_path_factory.mktemp("renamed")
    save_snapshot(renamed / "x.safetensors", {"v": torch.ones(2)}, time=300, sigma_rel=0.1)
    with pytest.raises(ValueError, match=r"missing \['v'\], unexpected \['w'\]"):
        reconstruct([snaps, renamed], sigma_rel=0.07)


def test_save_snapshot_and_solver_reject_bad_input(tmp_path: Path) -> None:
    p = tmp_path / "s.safetensors"
    w = {"w": torch.ones(2)}
    cases: list[tuple[dict, type[Exception], str]] = [
        ({"time": 0, "sigma_rel": 0.1}, ValueError, "time must be a positive"),
        ({"time": float("inf"), "sigma_rel": 0.1}, ValueError, "time must be a positive"),
        ({"time": "10ba", "unit": "ep", "sigma_rel": 0.1}, ValueError, "give one unit"),
        ({"time": 1.5, "sigma_rel": 0.1}, ValueError, "whole number"),
        ({"time": 10, "unit": "s", "sigma_rel": 0.1}, ValueError, "unit must be one of"),
        ({"time": 10, "sigma_rel": 0.5}, ValueError, "sigma_rel must be between"),
        ({"time": 10, "sigma_rel": 0.1, "dtype": "int8"}, ValueError, "dtype must be"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            save_snapshot(p, w, **kwargs)
    with pytest.raises(ValueError, match="overflows torch.float16"):
        save_snapshot(p, {"w": torch.full((2,), 1e6)}, time=1, sigma_rel=0.1)
    with pytest.raises(TypeError, match="tensors must be a mapping"):
        save_snapshot(p, [torch.ones(2)], time=1, sigma_rel=0.1)  # type: ignore[arg-type]
    assert not p.exists()
    with pytest.raises(ValueError, match="in_times must not be later than out_time"):
        solve_coefficients([100, 200], [0.1, 0.1], 100, [0.07])
    with pytest.raises(ValueError, match="same snapshot twice"):
        solve_coefficients([100, 100], [0.1, 0.1], 100, [0.07])
    with pytest.raises(ValueError, match="same length"):
        solve_coefficients([100, 200], [0.1, 0.1, 0.05], 200, [0.07])
    with pytest.raises(TypeError, match="in_times must be a positive number"):
        solve_coefficients(["100"], [0.1], 100, [0.07])


def test_poorly_represented_targets_warn(snaps: Path) -> None:
    with pytest.warns(UserWarning, match="poorly represented"):
        reconstruct(snaps, half_life="80ba")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reconstruct(snaps, sigma_rel=0.07)
