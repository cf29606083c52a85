"""Post-hoc EMA: choose the EMA length after training (Karras et al. 2024, EDM2, Section 3).

During training, a few power-function EMAs (say ``sigma_rel`` 0.05 and 0.10) are tracked and
written to *snapshot* files every so often. After training, any other power-function EMA
(``sigma_rel``) or a traditional exponential EMA (``half_life``) at one of the snapshot times is
reconstructed as a linear combination of the snapshots, without retraining.

The maths. A power-function EMA with exponent ``gamma`` read at time ``t`` weighs the weights
of time ``tau`` by the profile (EDM2 Eq. 121)::

    p_{t,gamma}(tau) = (gamma + 1) / t * (tau / t) ** gamma      for 0 <= tau <= t, else 0

and its relative width is ``sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))`` (Eq. 123).
The inner product of two profiles has a closed form (Eq. 151, Algorithm 3)::

    <p_a, p_b> = (gamma_a+1)(gamma_b+1) (t_a/t_b)^(gamma_b if t_a < t_b else -gamma_a)
                 / ((gamma_a + gamma_b + 1) max(t_a, t_b))

With ``A = <p_in, p_in>`` and ``B = <p_in, p_out>``, the least-squares coefficients are
``X = A^-1 B``, each column normalised to sum to 1 (so the result is an average), and the
reconstruction is ``out_j = sum_i X[i, j] * snapshot_i``.

>>> X = solve_coefficients([1000, 1000, 2000, 2000], [0.05, 0.10, 0.05, 0.10], 2000, [0.07])
>>> X.shape, round(float(X.sum()), 12)
(torch.Size([4, 1]), 1.0)
>>> X[2:, 0].abs().sum() > X[:2, 0].abs().sum()    # mostly the latest snapshots
tensor(True)
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ema_callbacks.files import FileProblem, write_safetensors
from ema_callbacks.schedule import sigma_rel_to_gamma
from ema_callbacks.time_strings import Time, TimeUnit

__all__ = [
    "FORMAT",
    "Snapshot",
    "SnapshotWriter",
    "find_snapshots",
    "load_snapshot",
    "posthoc_command",
    "power_function_correlation",
    "reconstruct",
    "reconstruct_many",
    "save_snapshot",
    "solve_coefficients",
]

FORMAT = "ema_callbacks.posthoc"
"""The ``format`` metadata value that marks a safetensors file as a post-hoc EMA snapshot."""

RESULT_FORMAT = "ema_callbacks.posthoc.result"
_VERSION = 1
_SIGMA_REL_LIMIT = math.sqrt(1.0 / 12.0)
_STORAGE_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
# Bins of the discrete response grid used for half-life targets: one bin per step up to this
# many steps, a uniform grid (plus every snapshot time) beyond.
_MAX_GRID = 1 << 22
_COARSE_GRID = 1 << 20


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _gamma(sigma_rel: Any, name: str) -> float:
    """``sigma_rel_to_gamma`` with errors that name the caller's parameter."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(
            f"{name} must be a number between 0 and {_SIGMA_REL_LIMIT:.4f}; "
            f"got {sigma_rel!r} ({type(sigma_rel).__name__})"
        )
    if not 0.0 < sigma_rel < _SIGMA_REL_LIMIT:
        raise ValueError(
            f"{name} must be between 0 and {_SIGMA_REL_LIMIT:.4f} (exclusive); got {sigma_rel!r}"
        )
    try:
        return sigma_rel_to_gamma(float(sigma_rel))
    except (OverflowError, ZeroDivisionError, ValueError) as err:  # ValueError: below SIGMA_REL_MIN
        raise ValueError(
            f"{name} is too small to compute its power-function exponent (about "
            f"sigma_rel**-2); got {sigma_rel!r}"
        ) from err


def _positive_time(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number; got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive, finite number; got {value!r}")
    return float(value)


def _vector(values: Any, name: str) -> list[Any]:
    if isinstance(values, torch.Tensor):
        return values.reshape(-1).tolist()
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a number or a sequence of numbers; got {values!r}")
    out = list(values)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _same_time(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


# ---------------------------------------------------------------------------------------------
# The maths
# ---------------------------------------------------------------------------------------------


def _correlation(
    a_times: torch.Tensor, a_gammas: torch.Tensor, b_times: torch.Tensor, b_gammas: torch.Tensor
) -> torch.Tensor:
    ta, ga = a_times.reshape(-1, 1), a_gammas.reshape(-1, 1)
    tb, gb = b_times.reshape(1, -1), b_gammas.reshape(1, -1)
    # (t_a / t_b) ** e computed in log space: exact for e = 0, no overflow for long runs.
    exponent = torch.where(ta < tb, gb, -ga)
    ratio = torch.exp(exponent * (torch.log(ta) - torch.log(tb)))
    num = (ga + 1.0) * (gb + 1.0) * ratio
    den = (ga + gb + 1.0) * torch.maximum(ta, tb)
    return num / den


def power_function_correlation(
    a_times: Any, a_sigma_rels: Any, b_times: Any, b_sigma_rels: Any
) -> torch.Tensor:
    """Inner products of power-function EMA profiles (EDM2 Eq. 151, Algorithm 3).

    ``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` for every pair, where ``p_{t,gamma}`` is
    the profile of Eq. 121 read at time ``t``. Times are in any one unit; a scalar broadcasts
    against the other argument of its pair. Returns a float64 tensor ``[len(a), len(b)]``.

    >>> c = power_function_correlation([100, 200], 0.1, [200], [0.05])
    >>> c.shape, c.dtype
    (torch.Size([2, 1]), torch.float64)
    >>> from ema_callbacks.schedule import sigma_rel_to_gamma
    >>> g = sigma_rel_to_gamma(0.1)                       # a profile with itself at t = 1
    >>> abs(float(power_function_correlation(1, 0.1, 1, 0.1)) - (g + 1) ** 2 / (2 * g + 1)) < 1e-12
    True
    """
    tensors = []
    for times, sigmas, tname, sname in (
        (a_times, a_sigma_rels, "a_times", "a_sigma_rels"),
        (b_times, b_sigma_rels, "b_times", "b_sigma_rels"),
    ):
        t = [_positive_time(v, tname) for v in _vector(times, tname)]
        g = [_gamma(v, sname) for v in _vector(sigmas, sname)]
        if len(t) == 1 and len(g) > 1:
            t = t * len(g)
        if len(g) == 1 and len(t) > 1:
            g = g * len(t)
        if len(t) != len(g):
            raise ValueError(
                f"{tname} and {sname} must have the same length (or one of them be a single "
                f"value); got {len(t)} and {len(g)}"
            )
        tensors += [torch.tensor(t, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)]
    return _correlation(*tensors)


def _normalised_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x = torch.linalg.solve(a, b)
    sums = x.sum(dim=0, keepdim=True)
    if not bool(torch.isfinite(x).all()) or bool((sums.abs() < 1e-12).any()):
        raise ValueError(
            "the post-hoc EMA system is singular: are there duplicate snapshots "
            "(the same time and sigma_rel twice)?"
        )
    return x / sums


def _check_inputs(in_times: Any, in_sigma_rels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    times = [_positive_time(v, "in_times") for v in _vector(in_times, "in_times")]
    sigmas = _vector(in_sigma_rels, "in_sigma_rels")
    if len(sigmas) == 1 and len(times) > 1:
        sigmas = sigmas * len(times)
    if len(times) != len(sigmas):
        raise ValueError(
            "in_times and in_sigma_rels must have the same length; "
            f"got {len(times)} and {len(sigmas)}"
        )
    gammas = [_gamma(s, "in_sigma_rels") for s in sigmas]
    seen: dict[tuple[float, float], int] = {}
    for i, key in enumerate(zip(times, gammas, strict=True)):
        if key in seen:
            raise ValueError(
                f"in_times/in_sigma_rels hold the same snapshot twice (positions {seen[key]} "
                f"and {i}: time {key[0]:g}, sigma_rel {sigmas[i]!r}); the system would be singular"
            )
        seen[key] = i
    return torch.tensor(times, dtype=torch.float64), torch.tensor(gammas, dtype=torch.float64)


def solve_coefficients(
    in_times: Any, in_sigma_rels: Any, out_time: Any, out_sigma_rels: Any
) -> torch.Tensor:
    """Post-hoc EMA coefficients ``X`` (float64, ``[n_in, n_out]``; EDM2 Algorithm 3).

    ``X = solve(A, B)`` with ``A = <p_in, p_in>`` and ``B = <p_in, p_out>``
    (:func:`power_function_correlation`); each column is then divided by its sum, so that the
    reconstruction ``out_j = sum_i X[i, j] snapshot_i`` is an average (the paper's
    normalisation). Use only snapshots with ``0 < time <= out_time``.

    >>> X = solve_coefficients([500, 1000], [0.1, 0.1], 1000, [0.1])   # an input itself
    >>> [round(float(v), 9) + 0.0 for v in X[:, 0]]
    [0.0, 1.0]
    >>> solve_coefficients([1000], [0.1], 1000, [0.3])
    Traceback (most recent call last):
    ...
    ValueError: out_sigma_rels must be between 0 and 0.2887 (exclusive); got 0.3
    """
    times, gammas = _check_inputs(in_times, in_sigma_rels)
    out = _positive_time(out_time, "out_time")
    out_gammas = torch.tensor(
        [_gamma(s, "out_sigma_rels") for s in _vector(out_sigma_rels, "out_sigma_rels")],
        dtype=torch.float64,
    )
    if bool((times > out * (1 + 1e-9)).any()):
        raise ValueError(
            f"in_times must not be later than out_time={out:g}; got {times.max().item():g}"
        )
    return _solve_power(times, gammas, out, out_gammas)[0]


def _solve_power(
    times: torch.Tensor, gammas: torch.Tensor, out_time: float, out_gammas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form coefficients and their relative fit errors."""
    out_times = torch.full_like(out_gammas, out_time)
    a = _correlation(times, gammas, times, gammas)
    b = _correlation(times, gammas, out_times, out_gammas)
    x = _normalised_solve(a, b)
    return x, _fit_errors(
        a, b, x, torch.diagonal(_correlation(out_times, out_gammas, out_times, out_gammas))
    )


def _grid(times: torch.Tensor, out_time: float, integral: bool) -> torch.Tensor:
    """Bin edges ``0 = e_0 < ... < e_n = out_time`` that include every input time."""
    if integral and out_time <= _MAX_GRID and all(float(t).is_integer() for t in times.tolist()):
        return torch.arange(0, int(out_time) + 1, dtype=torch.float64)
    edges = torch.linspace(0.0, out_time, _COARSE_GRID + 1, dtype=torch.float64)
    return torch.unique(torch.cat([edges, times, torch.tensor([out_time], dtype=torch.float64)]))


def _power_log_weights(edges: torch.Tensor, gamma: float) -> torch.Tensor:
    """``log(e_k^(g+1) - e_{k-1}^(g+1))`` for every bin: the power profile's mass per bin,
    times ``t^(g+1)``. With one bin per step this is exactly the response of the discrete
    recursion ``beta_t = (1 - 1/t)^(g+1)`` (the products telescope)."""
    log_e = torch.log(edges)
    hi, lo = log_e[1:], log_e[:-1]
    return (gamma + 1.0) * hi + torch.log(-torch.expm1((gamma + 1.0) * (lo - hi)))


def _exponential_log_weights(edges: torch.Tensor, half_life: float) -> torch.Tensor:
    """The exponential EMA's mass per bin at ``edges[-1]``: ``2^(-(T-e_k)/h) (1 - 2^(-w_k/h))``,
    the first bin also holding the initial copy. With one bin per step this is exactly the
    response of ``beta = 2^(-1/h)`` with a copy at step 1."""
    rate = math.log(2.0) / half_life
    end = edges[-1]
    hi, lo = edges[1:], edges[:-1]
    out = -rate * (end - hi) + torch.log(-torch.expm1(-rate * (hi - lo)))
    out[0] = -rate * (end - hi[0])
    return out


def _solve_half_life_coefficients(
    in_times: torch.Tensor,
    in_gammas: torch.Tensor,
    out_time: float,
    half_life: float,
    integral: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares coefficients ``[n_in, 1]`` and the relative fit error for an exponential EMA target, computed on the
    discrete response grid (one bin per step for integral units; see :func:`_grid`).

    Inner products are sums over bins; a snapshot at ``t`` covers bins up to ``t`` and its
    weights are ``w_k(g) / t^(g+1)``, so every pair needs only a cumulative sum per pair of
    distinct exponents (in log space, so long runs and large exponents neither overflow nor
    underflow).
    """
    edges = _grid(in_times, out_time, integral)
    index = torch.searchsorted(edges, in_times) - 1  # last bin of each snapshot
    distinct = sorted(set(in_gammas.tolist()))
    logw = {g: _power_log_weights(edges, g) for g in distinct}
    log_exp = _exponential_log_weights(edges, half_life)
    n = len(in_times)
    log_scale = (in_gammas + 1.0) * torch.log(in_times)
    log_a = torch.empty(n, n, dtype=torch.float64)
    log_b = torch.empty(n, 1, dtype=torch.float64)
    for ga in distinct:
        rows = (in_gammas == ga).nonzero().reshape(-1)
        log_b[rows, 0] = torch.logcumsumexp(logw[ga] + log_exp, 0)[index[rows]]
        for gb in distinct:
            cols = (in_gammas == gb).nonzero().reshape(-1)
            cum = torch.logcumsumexp(logw[ga] + logw[gb], 0)
            last = torch.minimum(index[rows].reshape(-1, 1), index[cols].reshape(1, -1))
            log_a[rows.reshape(-1, 1), cols.reshape(1, -1)] = cum[last]
    a = torch.exp(log_a - log_scale.reshape(-1, 1) - log_scale.reshape(1, -1))
    b = torch.exp(log_b - log_scale.reshape(-1, 1))
    x = _normalised_solve(a, b)
    norm2 = torch.exp(torch.logsumexp(2.0 * log_exp, 0)).reshape(1)
    return x, _fit_errors(a, b, x, norm2)


def _fit_errors(
    a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, norm2: torch.Tensor
) -> torch.Tensor:
    """``||sum_i x_i p_i - p_out|| / ||p_out||`` per output, from the Gram matrices: how far
    the reconstructed EMA's response is from the requested one (0 = exact)."""
    squared = (x * (a @ x)).sum(0) - 2.0 * (x * b).sum(0) + norm2
    return torch.sqrt(torch.clamp(squared, min=0.0) / norm2)


# ---------------------------------------------------------------------------------------------
# Snapshot files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A post-hoc EMA snapshot file: its metadata, read eagerly; its tensors, read on demand.

    ``buffers`` names the tensors that are not averaged (copied from the model); the others are
    power-function EMA values with relative width ``sigma_rel`` at ``time`` (in ``unit``,
    counted from the start of training).

    >>> import tempfile, torch
    >>> path = save_snapshot(tempfile.mkdtemp() + '/s.safetensors', {'w': torch.ones(2)},
    ...                      time=100, sigma_rel=0.1)
    >>> snap = load_snapshot(path)
    >>> snap.time, snap.unit, snap.sigma_rel, round(snap.gamma, 2)
    (100.0, 'ba', 0.1, 6.94)
    >>> snap.tensors()['w'].dtype
    torch.float16
    """

    path: Path
    time: float
    unit: str
    sigma_rel: float
    gamma: float
    buffers: tuple[str, ...] = field(default=())
    version: int = _VERSION
    aliases: tuple[tuple[str, str], ...] = field(default=())
    run: str | None = None  # the run that wrote it (EMAController.snapshot_run), if recorded

    def tensors(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load the tensors (safetensors, never pickle) onto ``device``; a tied tensor is stored
        once (see ``aliases``)."""
        try:
            return load_file(str(self.path), device=str(device))
        except Exception as err:
            raise _damaged(self.path, err) from err

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor names and shapes, read from the header without loading the tensors."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as err:
            raise _damaged(self.path, err) from err


def _damaged(path: Path, err: BaseException) -> FileProblem:
    if isinstance(err, FileProblem):
        return err
    if path.is_file() and path.stat().st_size == 0:
        return FileProblem(f"{path}: empty file (0 bytes), not a safetensors snapshot")
    return FileProblem(
        f"{path}: damaged or truncated safetensors file ({' '.join(str(err).split())[:120]})"
    )


def _storage_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in _STORAGE_DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype in _STORAGE_DTYPES:
        return _STORAGE_DTYPES[dtype]
    raise ValueError(f"dtype must be None or one of {sorted(_STORAGE_DTYPES)}; got {dtype!r}")


def _atomic_save(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file atomically, every tied name as its own copy
    (:func:`ema_callbacks.files.write_safetensors`)."""
    write_safetensors(path, tensors, metadata)


def _time_and_unit(time: Any, unit: str | None, name: str) -> tuple[float, str]:
    if isinstance(time, (str, Time)):
        parsed = Time.parse(time, name)
        if unit is not None and TimeUnit(unit.lower()) is not parsed.unit:
            raise ValueError(
                f"{name}={str(parsed)!r} is in '{parsed.unit}' but unit={unit!r}; give one unit"
            )
        return _positive_time(float(parsed.value), name), parsed.unit.value
    value = _positive_time(time, name)
    unit = "ba" if unit is None else unit
    if not isinstance(unit, str) or unit.lower() not in {u.value for u in TimeUnit}:
        raise ValueError(f"unit must be one of 'ba', 'ep', 'sp', 'tok', 'dur'; got {unit!r}")
    parsed = Time(value, TimeUnit(unit.lower()))  # validates whole numbers for ba/sp/tok
    return float(parsed.value), parsed.unit.value


def save_snapshot(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    time: float | str,
    unit: str | None = None,
    sigma_rel: float,
    dtype: str | torch.dtype | None = "float16",
    buffers: Mapping[str, torch.Tensor] | None = None,
    aliases: Mapping[str, str] | None = None,
    run: str | None = None,
) -> Path:
    """Write a post-hoc EMA snapshot: a safetensors file with string metadata.

    ``tensors`` are the power-function EMA values (relative width ``sigma_rel``) at ``time``,
    counted from the start of training in ``unit`` (default ``'ba'``; or pass a time string
    like ``'1000ba'``). Floating tensors are stored in ``dtype`` (``'float16'``, as EDM2 does;
    ``None`` keeps each tensor's dtype). ``buffers`` are tensors that are not averaged (BatchNorm
    statistics, frozen weights) and are stored as they are, as are integer tensors in
    ``tensors``: a reconstruction copies them from its latest snapshot. The metadata is
    ``format='ema_callbacks.posthoc'``, ``version``, ``time``, ``unit``, ``sigma_rel``, ``gamma``
    and ``buffers`` (a JSON list). ``aliases`` (``{other name: stored name}``, tied tensors
    such as ``head.weight = emb.weight``) are kept in the metadata (``aliases``, a JSON object):
    the tensor is stored once and a reconstruction writes it under every name. ``run`` (a
    string) records which training run wrote the file (metadata ``run``; the controller's
    ``snapshot_keep`` deletes only its own run's files). The write is
    atomic (temporary file, then ``os.replace``), with the umask's mode. Returns the path.

    >>> import tempfile, torch
    >>> p = save_snapshot(tempfile.mkdtemp() + '/ema.safetensors', {'w': torch.ones(3)},
    ...                   time='2000ba', sigma_rel=0.05)
    >>> load_snapshot(p).time
    2000.0
    >>> save_snapshot(p, {'w': torch.ones(3)}, time=0, sigma_rel=0.05)
    Traceback (most recent call last):
    ...
    ValueError: time must be a positive, finite number; got 0
    """
    target = Path(path)
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"tensors must be a mapping of names to tensors; got {type(tensors).__name__}"
        )
    value, unit_text = _time_and_unit(time, unit, "time")
    gamma = _gamma(sigma_rel, "sigma_rel")
    storage = _storage_dtype(dtype)
    extra = dict(buffers or {})
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    for source, averaged in ((tensors, True), (extra, False)):
        for name, tensor in source.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"tensors and buffers must map names (str) to tensors; got {name!r}: "
                    f"{type(tensor).__name__}"
                )
            if name in out:
                raise ValueError(f"{name!r} is in both tensors and buffers")
            t = tensor.detach()
            if averaged and t.is_floating_point() and storage is not None:
                converted = t.to(device="cpu", dtype=storage, copy=True)
                if bool(torch.isinf(converted).any()) and not bool(torch.isinf(t).any()):
                    raise ValueError(
                        f"tensor {name!r} overflows {storage} (largest magnitude "
                        f"{t.abs().max().item():.3g}); pass dtype='float32' or 'bfloat16'"
                    )
            else:
                converted = t.to(device="cpu", copy=True)
            if not (averaged and t.is_floating_point()):
                kept.append(name)
            out[name] = converted.contiguous()
    if not out:
        raise ValueError("tensors must not be empty")
    tied = _check_aliases(aliases, out)
    metadata = {
        "format": FORMAT,
        "version": str(_VERSION),
        "time": repr(value),
        "unit": unit_text,
        "sigma_rel": repr(float(sigma_rel)),
        "gamma": repr(gamma),
        "buffers": json.dumps(sorted(kept)),
    }
    if tied:
        metadata["aliases"] = json.dumps(tied, sort_keys=True)
    if run is not None:
        if not isinstance(run, str) or not run:
            raise TypeError(f"run must be a non-empty string or None; got {run!r}")
        metadata["run"] = run
    _atomic_save(target, out, metadata)
    return target


def _check_aliases(aliases: Any, stored: Mapping[str, Any]) -> dict[str, str]:
    if aliases is None:
        return {}
    if not isinstance(aliases, Mapping):
        raise TypeError(f"aliases must be a mapping of names to names; got {aliases!r}")
    out: dict[str, str] = {}
    for alias, name in aliases.items():
        if not isinstance(alias, str) or not isinstance(name, str):
            raise TypeError(f"aliases must map names (str) to names (str); got {alias!r}: {name!r}")
        if name not in stored:
            raise ValueError(f"aliases: {alias!r} names {name!r}, which is not among the tensors")
        if alias in stored:
            raise ValueError(f"aliases: {alias!r} is also a stored tensor")
        out[alias] = name
    return out


def _read_metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except Exception as err:
        raise _damaged(path, err) from err
    return dict(meta) if meta else None


def _snapshot_from(path: Path, meta: Mapping[str, str]) -> Snapshot:
    try:
        version = int(meta.get("version", "1"))
        sigma_rel = float(meta["sigma_rel"])
        time = float(meta["time"])
        unit = TimeUnit(meta["unit"]).value
        gamma = float(meta["gamma"]) if "gamma" in meta else sigma_rel_to_gamma(sigma_rel)
        buffers = tuple(json.loads(meta.get("buffers", "[]")))
        aliases = tuple(sorted(dict(json.loads(meta.get("aliases", "{}"))).items()))
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise FileProblem(f"{path}: broken post-hoc EMA snapshot metadata ({err!r})") from err
    if version > _VERSION:
        raise ValueError(
            f"{path}: snapshot version {version} is newer than this ema_callbacks "
            f"(reads up to {_VERSION}); upgrade ema_callbacks"
        )
    run = meta.get("run") or None
    return Snapshot(path, time, unit, sigma_rel, gamma, buffers, version, aliases, run)


def load_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read a snapshot's metadata (not its tensors). Raises
    :class:`~ema_callbacks.files.FileProblem` (a ``ValueError``) for a file that is not a
    post-hoc EMA snapshot or is damaged.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> other = tempfile.mkdtemp() + '/model.safetensors'
    >>> save_file({'w': torch.ones(1)}, other)
    >>> load_snapshot(other)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ema_callbacks.files.FileProblem: ... is not a post-hoc EMA snapshot (metadata format=None, expected 'ema_callbacks.posthoc')
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"no snapshot file at {str(target)!r}")
    meta = _read_metadata(target) or {}
    if meta.get("format") != FORMAT:
        raise FileProblem(
            f"{target} is not a post-hoc EMA snapshot (metadata format={meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    return _snapshot_from(target, meta)


def find_snapshots(
    folders_or_files: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    skip_damaged: bool = False,
) -> list[Snapshot]:
    """Snapshots in folders (searched recursively for ``*.safetensors``) and files, sorted by
    ``(time, sigma_rel)``. Safetensors files without the snapshot metadata (models, exported
    results) are skipped in folders; a file named explicitly must be a snapshot. A damaged or
    unreadable ``*.safetensors`` file in a folder is a :class:`~ema_callbacks.files.FileProblem`
    naming it (a reconstruction without it would silently differ), or, with
    ``skip_damaged=True``, skipped with a warning.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> for t in (200, 100):
    ...     _ = save_snapshot(f'{d}/run/ema-{t}.safetensors', {'w': torch.ones(1)},
    ...                       time=t, sigma_rel=0.1)
    >>> [s.time for s in find_snapshots(d)]
    [100.0, 200.0]
    """
    if isinstance(folders_or_files, (str, os.PathLike)):
        items: list[Any] = [folders_or_files]
    elif isinstance(folders_or_files, Iterable):
        items = list(folders_or_files)
    else:
        raise TypeError(
            f"folders_or_files must be a path or a list of paths; got {folders_or_files!r}"
        )
    found: dict[Path, Snapshot] = {}
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"folders_or_files must hold paths; got {item!r}")
        root = Path(item)
        if root.is_dir():
            for file in sorted(root.rglob("*.safetensors")):
                if not file.is_file():
                    continue
                try:
                    meta = _read_metadata(file) or {}
                except FileProblem as err:  # not a readable safetensors file
                    if not skip_damaged:
                        raise
                    warnings.warn(f"skipping {err}", stacklevel=2)
                    continue
                if meta.get("format") == FORMAT:
                    found[file.resolve()] = _snapshot_from(file, meta)
        elif root.is_file():
            found[root.resolve()] = load_snapshot(root)
        else:
            raise FileNotFoundError(f"folders_or_files: no such file or folder {str(root)!r}")
    return sorted(found.values(), key=lambda s: (s.time, s.sigma_rel, str(s.path)))


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


class SnapshotWriter:
    """When and how a training run writes its post-hoc snapshots: every ``every`` (a time
    string), one file per started ``sigma_rel`` profile, named
    ``ema-{time}-sigma_rel{s}.safetensors`` (time counted in the profile's update unit since
    the start of training), stored in ``dtype``, keeping only the latest ``keep`` snapshot
    times of this run (``None``: all). Each writer is one run (:attr:`run`, a random id in the
    files' metadata, saved in the controller's state so a resumed run stays the same run): it
    deletes only its own run's files and refuses a folder holding another run's snapshots.
    :class:`~ema_callbacks.controller.EMAController` owns one when given ``snapshot_every``.

    >>> import tempfile
    >>> from ema_callbacks.controller import EMAController
    >>> ctrl = EMAController.create(sigma_rel=0.1, snapshot_every='2ba')
    >>> writer = ctrl.snapshots
    >>> str(writer.schedule.update_interval), writer.dtype, writer.keep, len(writer.run)
    ('2ba', 'float16', None, 16)
    >>> SnapshotWriter('2ba', dtype='int8')
    Traceback (most recent call last):
    ...
    ValueError: snapshot_dtype must be one of 'float16', 'bfloat16', 'float32', 'float64'; got 'int8'
    """

    def __init__(self, every: Any, dtype: str = "float16", keep: int | None = None) -> None:
        from ema_callbacks.schedule import Schedule, ScheduleState

        self.check_options(dtype, keep)
        self.schedule = Schedule(
            smoothing=0.0, update_interval=every, names={"update_interval": "snapshot_every"}
        )
        self.dtype = dtype
        self.keep = keep
        self.state = ScheduleState()
        self.run = _new_run_id()
        self._checked: set[str] = set()

    @staticmethod
    def check_options(dtype: Any, keep: Any) -> None:
        """``ValueError`` for a ``snapshot_dtype`` or ``snapshot_keep`` that is not one."""
        if not isinstance(dtype, str) or dtype not in _STORAGE_DTYPES:
            raise ValueError(
                f"snapshot_dtype must be one of {', '.join(map(repr, _STORAGE_DTYPES))}; "
                f"got {dtype!r}"
            )
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
            raise ValueError(f"snapshot_keep must be a positive integer or None; got {keep!r}")

    def restart(self) -> None:
        """A new run: a fresh schedule state and run id."""
        from ema_callbacks.schedule import ScheduleState

        self.state = ScheduleState()
        self.run = _new_run_id()
        self._checked.clear()

    def resume(self, state: Any, run: Any) -> None:
        """Continue a saved run: its schedule state and, where recorded, its run id."""
        self.state = state
        if isinstance(run, str) and run:
            self.run = run
            self._checked.clear()

    def due(self, profiles: Sequence[Any], clock: Any) -> bool:
        """Whether a snapshot is due at ``clock``: ``every`` crossed and some ``sigma_rel``
        profile started."""
        if not any(p.schedule.sigma_rel is not None and p.started for p in profiles):
            return False
        return self.schedule.due(clock, self.state) is not None

    def write(
        self, profiles: Sequence[Any], folder: str | Path, clock: Any, *, write: bool = True
    ) -> list[Path]:
        """Snapshot every started ``sigma_rel`` profile into ``folder`` and record the time.
        Sharded EMAs are gathered (a collective: every rank calls this; only ranks with
        ``write=True`` write). With ``keep``, the files of older snapshot times of this run in
        ``folder`` are deleted. Returns the paths written."""
        if write:
            self.check_folder(folder)
        written: list[Path] = []
        for p in profiles:
            if p.schedule.sigma_rel is None or not p.started or p.weights is None:
                continue
            unit = p.schedule.update_interval.unit
            time = float(p.state.last.get(unit.value, 0.0))
            if time <= 0:
                continue
            tensors = p.weights.full_state_dict()  # FSDP2 / ZeRO-3 shards gathered
            if not write:
                continue
            averaged = {k: v for k, v in tensors.items() if p.weights._average.get(k, True)}
            label = Time(int(time) if time.is_integer() else time, unit)
            path = Path(folder) / f"ema-{label}-sigma_rel{p.schedule.sigma_rel:g}.safetensors"
            written.append(
                save_snapshot(
                    path,
                    averaged,
                    time=time,
                    unit=unit.value,
                    sigma_rel=p.schedule.sigma_rel,
                    dtype=self.dtype,
                    buffers={k: v for k, v in tensors.items() if k not in averaged},
                    aliases={a: n for a, n in p.weights.aliases.items() if n in tensors},
                    run=self.run,
                )
            )
        self.schedule.commit(clock, self.state, self.schedule.due(clock, self.state))
        if write and self.keep is not None and written:
            found = [
                s
                for s in find_snapshots(folder, skip_damaged=True)
                if s.path.parent == Path(folder).resolve() and s.run == self.run
            ]
            times = sorted({s.time for s in found})
            old = set(times[: max(0, len(times) - self.keep)])
            for s in found:
                if s.time in old:
                    s.path.unlink(missing_ok=True)
        return written

    def check_folder(self, folder: str | Path) -> None:
        """Refuse (``ValueError`` naming the folder and a file) a folder that holds snapshots
        of another run: their names would collide with this run's, ``keep`` could not tell them
        apart and a reconstruction would mix two runs. Checked once per folder."""
        key = os.path.realpath(os.fspath(folder))
        if key in self._checked:
            return
        if os.path.isdir(key):
            others = [
                s
                for s in find_snapshots(key, skip_damaged=True)
                if s.path.parent == Path(key) and s.run != self.run
            ]
            if others:
                first = others[0]
                who = "a run" if first.run is None else f"run {first.run}"
                raise ValueError(
                    f"snapshot folder {os.fspath(folder)!r} holds {len(others)} post-hoc EMA "
                    f"snapshot(s) of another run (e.g. {first.path.name}, written by {who}; this "
                    f"run is {self.run}); their names would collide and snapshot_keep "
                    "and a reconstruction would mix the runs: give this run its own "
                    "snapshot_folder, or move those files away"
                )
        self._checked.add(key)


def _new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def _as_snapshots(snapshots: Any) -> list[Snapshot]:
    if isinstance(snapshots, (str, os.PathLike)):
        return find_snapshots(snapshots)
    if isinstance(snapshots, Snapshot):
        return [snapshots]
    if not isinstance(snapshots, Iterable):
        raise TypeError(
            f"snapshots must be Snapshot objects, paths or a folder; got {type(snapshots).__name__}"
        )
    items = list(snapshots)
    out: list[Snapshot] = []
    paths = [s for s in items if not isinstance(s, Snapshot)]
    for s in items:
        if isinstance(s, Snapshot):
            out.append(s)
    if paths:
        out += find_snapshots(paths)
    return sorted(out, key=lambda s: (s.time, s.sigma_rel, str(s.path)))


def _select(snapshots: Any, at: Any) -> tuple[list[Snapshot], float, str]:
    """The snapshots a reconstruction at ``at`` uses, the output time and the unit."""
    snaps = _as_snapshots(snapshots)
    if not snaps:
        raise ValueError("snapshots: no post-hoc EMA snapshots given (or found in the folders)")
    units = sorted({s.unit for s in snaps})
    if len(units) > 1:
        raise ValueError(
            f"snapshots mix time units {units}; a reconstruction needs one unit "
            "(pass the snapshots of one run)"
        )
    unit = units[0]
    if at is None:
        out_time = max(s.time for s in snaps)
    elif isinstance(at, (str, Time)):
        parsed = Time.parse(at, "at")
        if parsed.unit.value != unit:
            raise ValueError(f"at={str(parsed)!r} must be in the snapshots' unit '{unit}'")
        out_time = float(parsed.value)
    else:
        out_time = _positive_time(at, "at")
    times = sorted({s.time for s in snaps})
    if not any(_same_time(out_time, t) for t in times):
        shown = ("..., " if len(times) > 5 else "") + ", ".join(f"{t:g}{unit}" for t in times[-5:])
        raise ValueError(
            f"at must be the time of one of the snapshots (the latest by default); got "
            f"{out_time:g}{unit}, snapshots are at {shown}"
        )
    used = [s for s in snaps if 0 < s.time <= out_time or _same_time(s.time, out_time)]
    seen: dict[tuple[float, float], Snapshot] = {}
    for s in used:
        key = (s.time, s.gamma)
        if key in seen:
            raise ValueError(
                f"snapshots: two snapshots with time {s.time:g}{unit} and sigma_rel "
                f"{s.sigma_rel!r}: {seen[key].path} and {s.path}; keep one"
            )
        seen[key] = s
    _check_consistent(used)
    return used, out_time, unit


def _check_consistent(used: list[Snapshot]) -> None:
    """Every snapshot must average the same tensors, with the same shapes (headers only)."""
    reference = used[-1]
    shapes = reference.shapes()
    averaged = {k: v for k, v in shapes.items() if k not in set(reference.buffers)}
    for s in used[:-1]:
        other = s.shapes()
        mine = {k: v for k, v in other.items() if k not in set(s.buffers)}
        missing = sorted(set(averaged) - set(mine))
        unexpected = sorted(set(mine) - set(averaged))
        if missing or unexpected:
            raise ValueError(
                f"snapshot {s.path} does not match {reference.path}: missing {missing}, "
                f"unexpected {unexpected}"
            )
        for k, shape in mine.items():
            if shape != averaged[k]:
                raise ValueError(
                    f"snapshot {s.path}: {k!r} has shape {shape}, {reference.path} has "
                    f"{averaged[k]}"
                )


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr when asked for, tqdm is installed, stderr is a terminal and there
    are enough files to wait for; None otherwise."""
    if not enabled or total < 4:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="snapshots", unit="file", disable=None, leave=False)


def _stream(
    used: list[Snapshot], coefficients: torch.Tensor, progress: bool = False
) -> list[dict[str, torch.Tensor]]:
    """``out_j = sum_i X[i, j] snapshot_i`` in float32, loading one snapshot at a time; buffers
    from the latest snapshot; a tied tensor under each of its names (the same tensor)."""
    bar = _progress_bar(len(used), progress)
    try:
        outs = _accumulate(used, coefficients, bar)
    finally:
        if bar is not None:
            bar.close()
    aliases = dict(used[-1].aliases)
    for out in outs:
        for alias, name in aliases.items():
            if name in out and alias not in out:
                out[alias] = out[name]
    return outs


def _accumulate(
    used: list[Snapshot], coefficients: torch.Tensor, bar: Any
) -> list[dict[str, torch.Tensor]]:
    reference = used[-1]
    averaged = [k for k in reference.shapes() if k not in set(reference.buffers)]
    n_out = coefficients.shape[1]
    outs: list[dict[str, torch.Tensor]] = [{} for _ in range(n_out)]
    for i, snap in enumerate(used):
        tensors = snap.tensors()
        for name in averaged:
            value = tensors[name].to(torch.float32)
            for j in range(n_out):
                c = float(coefficients[i, j])
                if i == 0:
                    outs[j][name] = value * c
                else:
                    outs[j][name].add_(value, alpha=c)
        if i == len(used) - 1:
            for j in range(n_out):
                for name in reference.buffers:
                    outs[j][name] = tensors[name].clone()
        del tensors
        if bar is not None:
            bar.update(1)
    return outs


_FIT_WARNING = 0.1


@dataclass(frozen=True)
class _Plan:
    used: list[Snapshot]
    coefficients: torch.Tensor  # [n_in, n_out]
    fit_errors: torch.Tensor  # [n_out]
    time: float
    unit: str


def _plan(
    snapshots: Any,
    sigma_rels: Sequence[float] | None,
    half_life: str | None,
    at: Any,
) -> _Plan:
    h = None if half_life is None else Time.parse(half_life, "half_life")
    if h is not None and (h.is_infinite or h.value == 0):
        raise ValueError(
            "half_life must be positive and finite for a post-hoc reconstruction; "
            f"got {half_life!r}"
        )
    used, out_time, unit = _select(snapshots, at)
    times = torch.tensor([s.time for s in used], dtype=torch.float64)
    gammas = torch.tensor([s.gamma for s in used], dtype=torch.float64)
    if h is None:
        assert sigma_rels is not None
        out_gammas = torch.tensor([_gamma(s, "sigma_rel") for s in sigma_rels], dtype=torch.float64)
        x, errors = _solve_power(times, gammas, out_time, out_gammas)
        labels = [f"sigma_rel={s!r}" for s in sigma_rels]
    else:
        if h.unit.value != unit:
            raise ValueError(f"half_life={half_life!r} must be in the snapshots' unit '{unit}'")
        x, errors = _solve_half_life_coefficients(
            times, gammas, out_time, float(h.value), integral=TimeUnit(unit).integral
        )
        labels = [f"half_life='{h}'"]
    for label, error in zip(labels, errors.tolist(), strict=True):
        if error > _FIT_WARNING:
            warnings.warn(
                f"post-hoc EMA {label} at {out_time:g}{unit} is poorly represented by the "
                f"snapshots (relative response error {error:.2f}): choose a target between the "
                "snapshot profiles, or write snapshots more often",
                UserWarning,
                stacklevel=3,
            )
    return _Plan(used, x, errors, out_time, unit)


def reconstruct_many(
    snapshots: Any, sigma_rels: Sequence[float], at: str | float | None = None
) -> list[dict[str, torch.Tensor]]:
    """Reconstruct several power-function EMAs at once, reading each snapshot once.

    ``snapshots``: :class:`Snapshot` objects, snapshot files or folders. ``at``: the output
    time (a time string like ``'2000ba'`` or a number in the snapshots' unit); it must be one of
    the snapshot times, the latest by default; the snapshots up to it are used. Returns one
    float32 state dict per ``sigma_rel`` (buffers from the latest snapshot used). Memory: one
    snapshot plus the outputs.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> for t in (100, 200):
    ...     for s in (0.05, 0.1):
    ...         _ = save_snapshot(f'{d}/{t}-{s}.safetensors', {'w': torch.full((2,), t / 100)},
    ...                           time=t, sigma_rel=s)
    >>> outs = reconstruct_many(d, [0.05, 0.1], at='200ba')
    >>> [o['w'].tolist() for o in outs]    # these are inputs: reproduced exactly
    [[2.0, 2.0], [2.0, 2.0]]
    """
    targets = _vector(sigma_rels, "sigma_rels")
    for s in targets:
        _gamma(s, "sigma_rels")
    plan = _plan(snapshots, targets, None, at)
    return _stream(plan.used, plan.coefficients)


def reconstruct(
    snapshots: Any,
    sigma_rel: float | None = None,
    half_life: str | None = None,
    at: str | float | None = None,
) -> dict[str, torch.Tensor]:
    """Reconstruct one EMA from post-hoc snapshots: a power-function EMA (``sigma_rel``) or a
    traditional exponential EMA (``half_life``, a time string in the snapshots' unit).

    For ``sigma_rel`` the coefficients are EDM2's closed form (:func:`solve_coefficients`). For
    ``half_life`` the inner products are computed on the discrete step grid ``1..at`` (the
    exponential EMA ``beta = 2^(-1/h)`` with a copy at step 1 against each snapshot's exact
    discrete power-function response), then solved and normalised the same way. ``at`` and
    ``snapshots`` are as in :func:`reconstruct_many`. A ``UserWarning`` says when the target's
    response is poorly represented by the snapshots (relative error above 0.1).

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> for t in (100, 200):
    ...     for s in (0.05, 0.1):
    ...         _ = save_snapshot(f'{d}/{t}-{s}.safetensors', {'w': torch.ones(2)},
    ...                           time=t, sigma_rel=s)
    >>> reconstruct(d, sigma_rel=0.07)['w']          # an average of ones is ones
    tensor([1., 1.])
    >>> reconstruct(d, half_life='10ba')['w']
    tensor([1., 1.])
    >>> reconstruct(d)
    Traceback (most recent call last):
    ...
    ValueError: give exactly one of sigma_rel or half_life; got neither
    """
    _one_target(sigma_rel, half_life)
    plan = _plan(snapshots, None if sigma_rel is None else [sigma_rel], half_life, at)
    return _stream(plan.used, plan.coefficients)[0]


def _one_target(sigma_rel: Any, half_life: Any) -> None:
    if (sigma_rel is None) == (half_life is None):
        got = (
            "neither"
            if sigma_rel is None
            else f"sigma_rel={sigma_rel!r} and half_life={half_life!r}"
        )
        raise ValueError(f"give exactly one of sigma_rel or half_life; got {got}")
    if sigma_rel is not None:
        _gamma(sigma_rel, "sigma_rel")


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------


def posthoc_command(
    inputs: list[str],
    output: str,
    sigma_rel: float | None = None,
    half_life: str | None = None,
    at: str | None = None,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[str, Any]:
    """``ema-callbacks posthoc``: reconstruct one EMA and write it as a plain safetensors state
    dict (float32 by default), loadable with ``model.load_state_dict(..., strict=True)`` when
    the snapshots hold every tensor of the model. Buffers (tensors that are not averaged) come
    from the latest snapshot used. ``inputs``: snapshot files or folders. Returns a summary,
    with ``fit_error`` the relative distance between the requested and the reconstructed
    response (0 = exact). Keys are the EMA's names (the model's names without wrapper prefixes),
    the same ``ema-callbacks export`` writes for the run, every name of a tied tensor included.
    ``output`` may not be one of the snapshots (nor any file in an input folder other than an
    earlier result). ``progress`` shows a bar on a terminal when many files are read.

    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> model = torch.nn.Linear(2, 1)
    >>> for t in (100, 200):
    ...     for s in (0.05, 0.1):
    ...         _ = save_snapshot(f'{d}/snaps/{t}-{s}.safetensors', model.state_dict(),
    ...                           time=t, sigma_rel=s)
    >>> summary = posthoc_command([f'{d}/snaps'], f'{d}/ema.safetensors', sigma_rel=0.08)
    >>> summary['snapshots'], summary['time'], summary['fit_error'] < 0.1
    (4, '200ba', True)
    >>> from safetensors.torch import load_file
    >>> model.load_state_dict(load_file(f'{d}/ema.safetensors'), strict=True)
    <All keys matched successfully>
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    if not isinstance(output, (str, os.PathLike)):
        raise TypeError(f"output must be a file path; got {output!r}")
    storage = _storage_dtype(dtype)
    _one_target(sigma_rel, half_life)
    plan = _plan(inputs, None if sigma_rel is None else [sigma_rel], half_life, at)
    _check_output(output, inputs, plan.used)
    state = _stream(plan.used, plan.coefficients, progress)[0]
    buffers = set(plan.used[-1].buffers)
    if storage is not None:
        state = {
            k: (v if k in buffers or not v.is_floating_point() else v.to(storage))
            for k, v in state.items()
        }
    at_text = str(Time(plan.time, TimeUnit(plan.unit)))
    if sigma_rel is not None:
        target, value = "sigma_rel", repr(float(sigma_rel))
    else:
        target, value = "half_life", str(Time.parse(half_life, "half_life"))  # type: ignore[arg-type]
    fit_error = float(plan.fit_errors[0])
    metadata = {
        "format": RESULT_FORMAT,
        "version": str(_VERSION),
        "time": at_text,
        target: value,
        "snapshots": str(len(plan.used)),
        "fit_error": repr(fit_error),
    }
    path = Path(output)
    _atomic_save(output, state, metadata)  # the path as given: 'folder/' is refused
    return {
        "output": str(path),
        "time": at_text,
        target: sigma_rel if sigma_rel is not None else value,
        "snapshots": len(plan.used),
        "tensors": len(state),
        "fit_error": fit_error,
    }


def _is_result(path: Path) -> bool:
    """An earlier ``posthoc`` result (which a new one may replace)."""
    try:
        return (_read_metadata(path) or {}).get("format") == RESULT_FORMAT
    except FileProblem:
        return False


def _check_output(output: Any, inputs: Sequence[Any], used: Sequence[Snapshot]) -> None:
    """Refuse an output that is an input: a snapshot, a file named as input, or a file in an
    input folder that is not an earlier post-hoc result."""
    from ema_callbacks.export import check_output

    files = [Path(p) for p in inputs if not Path(p).is_dir()] + [s.path for s in used]
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    check_output(output, files, folders, force=True, replaceable=_is_result)
