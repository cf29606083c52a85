"""Smoothing maths and the update schedule. Pure Python: no torch import.

An EMA update is ``ema <- beta * ema + (1 - beta) * weights``. This module decides *when* an
update is due and *which* ``beta`` it uses; the tensors are :mod:`ema_callbacks.weights`'s job.

Half-life semantics: the smoothing of one update comes from the progress actually made since
the previous update, in the half-life's unit::

    beta = 2 ** (-elapsed / half_life)

so that ``beta ** (half_life / elapsed) == 0.5``. With a fixed interval this equals Composer's
``2 ** (-interval / half_life)`` exactly; with variable batch sizes, token counts, skipped
updates or an interval in another unit it stays correct. ``half_life = 0`` means no averaging
(``beta = 0``: the EMA follows the model); an infinite half-life means the EMA never moves
(``beta = 1``).

>>> half_life_to_smoothing(50, 1)   # Composer's default-interval smoothing for '50ba'
0.9862327044933592
>>> round(smoothing_to_half_life(0.999, 1), 1)
692.8
>>> half_life_to_smoothing(0, 1), half_life_to_smoothing(float('inf'), 1)
(0.0, 1.0)
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ema_callbacks.time_strings import Time, TimeUnit

__all__ = [
    "Clock",
    "Schedule",
    "ScheduleState",
    "debiased_weight",
    "gamma_to_sigma_rel",
    "half_life_to_smoothing",
    "power_function_smoothing",
    "power_warmup_smoothing",
    "sigma_rel_to_gamma",
    "smoothing_to_half_life",
    "tf_dynamic_smoothing",
]

WARMUPS = ("none", "tf", "power", "debias")
SIGMA_REL_MIN = 1e-150  # the smallest sigma_rel whose exponent is computed in floats


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def half_life_to_smoothing(half_life: float, elapsed: float) -> float:
    """The ``beta`` of one update after ``elapsed`` progress, for a half-life in the same unit.

    ``2 ** (-elapsed / half_life)``; ``half_life == 0`` gives 0 (follow the model), an infinite
    half-life or ``elapsed == 0`` gives 1 (no change).

    >>> half_life_to_smoothing(10, 10)
    0.5
    >>> half_life_to_smoothing(10, 0)
    1.0
    """
    if half_life < 0 or elapsed < 0 or math.isnan(half_life) or math.isnan(elapsed):
        raise ValueError(
            f"half_life and elapsed must be non-negative numbers; got {half_life!r}, {elapsed!r}"
        )
    if half_life == 0:
        return 0.0
    if math.isinf(half_life) or elapsed == 0:
        return 1.0
    return float(2.0 ** (-elapsed / half_life))


def smoothing_to_half_life(smoothing: float, interval: float = 1.0) -> float:
    """The half-life of a constant ``smoothing`` applied once every ``interval``.

    ``interval * ln(1/2) / ln(smoothing)``: 0 for smoothing 0, infinite for smoothing 1.

    >>> smoothing_to_half_life(0.5, 3)
    3.0
    >>> smoothing_to_half_life(1.0)
    inf
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be between 0 and 1; got {smoothing!r}")
    if interval < 0 or math.isnan(interval):
        raise ValueError(f"interval must be a non-negative number; got {interval!r}")
    if smoothing == 0.0:
        return 0.0
    if smoothing == 1.0:
        return math.inf
    return interval * math.log(0.5) / math.log(smoothing)


def tf_dynamic_smoothing(smoothing: float, num_updates: int) -> float:
    """TensorFlow's dynamic decay: ``min(smoothing, (1 + n) / (10 + n))``.

    ``n`` counts the updates made before this one (the seeds' ``optax`` ``count``), so the first
    update uses 0.1.

    >>> tf_dynamic_smoothing(0.9999, 0)
    0.1
    >>> tf_dynamic_smoothing(0.5, 1000)
    0.5
    """
    return min(smoothing, (1.0 + num_updates) / (10.0 + num_updates))


def power_warmup_smoothing(num_updates: int, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """timm/diffusers power warm-up: ``1 - (1 + t / gamma) ** -power`` with ``t = n + 1``.

    ``n`` counts the averaging updates made before this one; timm and diffusers count the copy
    that initialises the EMA as their step 0, so their ``t`` is our ``n + 1``.

    >>> round(power_warmup_smoothing(0), 6)   # diffusers' second step, t = 1
    0.370039
    """
    t = num_updates + 1
    return 1.0 - (1.0 + t / gamma) ** (-power)


def debiased_weight(smoothing: float, bias_product: float) -> tuple[float, float]:
    """The lerp weight that makes a copy-initialised EMA equal optax's zero-init, debiased EMA.

    optax keeps ``m_t = b m_{t-1} + (1 - b) x_t`` from ``m_0 = 0`` and reports
    ``m_t / (1 - P_t)`` with ``P_t = b_1 b_2 ... b_t``. That debiased value is itself a lerp:
    ``d_t = d_{t-1} + w (x_t - d_{t-1})`` with ``w = (1 - b) / (1 - P_t)``, so the engine can keep
    ``d`` directly (swap and view need no division). Returns ``(w, P_t)`` given ``P_{t-1}``.

    >>> debiased_weight(0.9, 1.0)      # first update: the EMA becomes the weights
    (1.0, 0.9)
    >>> w, p = debiased_weight(0.9, 0.9); round(w, 6), round(p, 2)
    (0.526316, 0.81)
    """
    product = bias_product * smoothing
    if product >= 1.0:
        return 0.0, product
    return (1.0 - smoothing) / (1.0 - product), product


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's relative standard deviation of a power-function EMA to its exponent ``gamma``.

    ``gamma`` is the largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)`` (Karras et
    al. 2024, Eq. 126 / Algorithm 2); ``0 < sigma_rel < sqrt(1/12) ~ 0.2887``, and at least
    ``SIGMA_REL_MIN`` (1e-150: below it ``sigma_rel**-2`` overflows).

    >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
    (16.97, 6.94)
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"sigma_rel must be a number; got {sigma_rel!r}")
    limit = math.sqrt(1.0 / 12.0)
    if not 0.0 < sigma_rel < limit:
        raise ValueError(
            f"sigma_rel must be between 0 and {limit:.4f} (exclusive); got {sigma_rel!r}"
        )
    if sigma_rel < SIGMA_REL_MIN:
        raise ValueError(
            f"sigma_rel must be at least {SIGMA_REL_MIN:g} (the exponent of a smaller one, about "
            f"1/sigma_rel, is beyond what floats compute); got {sigma_rel!r}"
        )
    t = sigma_rel**-2

    def cubic(g: float) -> float:
        return ((g + 7.0) * g + 16.0 - t) * g + 12.0 - t

    # sigma_rel(gamma) decreases from sqrt(1/12) at gamma = -1 towards 0, so the root sits in
    # (-1, hi): bracket it and bisect to float precision.
    lo, hi = -1.0, 1.0
    while cubic(hi) < 0:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cubic(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 123: ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 (gamma + 3)))``.

    >>> round(gamma_to_sigma_rel(sigma_rel_to_gamma(0.1)), 12)
    0.1
    """
    if gamma <= -1:
        raise ValueError(f"gamma must be greater than -1; got {gamma!r}")
    # Written so that no intermediate overflows for a huge gamma.
    return math.sqrt((gamma + 1.0) / (gamma + 3.0)) / (gamma + 2.0)


def power_function_smoothing(now: float, elapsed: float, gamma: float) -> float:
    """EDM2's power-function EMA (Eq. 127): ``beta = (1 - elapsed / now) ** (gamma + 1)``.

    ``now`` is the training progress after this step, counted from the start of training.

    >>> power_function_smoothing(1, 1, 6.94)   # first step: copy
    0.0
    """
    if now <= 0:
        return 1.0
    return float(max(0.0, 1.0 - elapsed / now) ** (gamma + 1.0))


# ---------------------------------------------------------------------------------------------
# Clock and schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clock:
    """Training progress at an event, as the trainer counts it.

    ``batch`` counts optimizer steps; ``epoch`` may be fractional where the trainer knows the
    epoch length. ``sample``, ``token`` and ``duration`` (fraction of the planned run) are
    ``None`` where the trainer does not know them.

    >>> Clock(batch=10, epoch=0.5, sample=320).get(TimeUnit.SAMPLE)
    320
    """

    batch: int = 0
    epoch: float = 0.0
    sample: int | None = None
    token: int | None = None
    duration: float | None = None

    def get(self, unit: TimeUnit) -> float | None:
        """The progress in ``unit``, or ``None`` where it is unknown."""
        return getattr(self, _CLOCK_FIELDS[unit])  # type: ignore[no-any-return]

    def as_dict(self) -> dict[str, float]:
        """The known units, keyed by unit string (``{'ba': 10, 'ep': 0.5}``)."""
        out: dict[str, float] = {"ba": self.batch, "ep": self.epoch}
        if self.sample is not None:
            out["sp"] = self.sample
        if self.token is not None:
            out["tok"] = self.token
        if self.duration is not None:
            out["dur"] = self.duration
        return out


_CLOCK_FIELDS = {
    TimeUnit.BATCH: "batch",
    TimeUnit.EPOCH: "epoch",
    TimeUnit.SAMPLE: "sample",
    TimeUnit.TOKEN: "token",
    TimeUnit.DURATION: "duration",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _progress(key: str, value: float) -> float:
    """A progress count as a :class:`Clock` holds it: an ``int`` for the integral units
    (``ba``, ``sp``, ``tok``, also as ``start_ba``...), a ``float`` otherwise, so a state
    read back (or rebuilt on resume) has the types of the one written."""
    unit = key.removeprefix("start_")
    if unit in ("ba", "sp", "tok") and float(value).is_integer():
        return int(value)
    return float(value)


@dataclass
class ScheduleState:
    """What a schedule remembers between events; JSON-friendly so any trainer can store it.

    >>> ScheduleState.from_dict(ScheduleState(started=True, num_updates=3).to_dict()).num_updates
    3
    """

    started: bool = False
    last: dict[str, float] = field(default_factory=dict)  # progress at the last update, per unit
    num_updates: int = 0  # averaging updates since the EMA was initialised
    num_skipped: int = 0  # updates skipped by the non-finite guard
    bias_product: float = 1.0  # product of betas so far ('debias' warm-up)
    smoothing: float | None = None  # beta of the last update (for logging)

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "last": dict(self.last),
            "num_updates": self.num_updates,
            "num_skipped": self.num_skipped,
            "bias_product": self.bias_product,
            "smoothing": self.smoothing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "schedule") -> ScheduleState:
        """Read :meth:`to_dict`'s output; fields added later are read with defaults so old
        checkpoints keep loading. Raises ``ValueError`` naming the field (``where`` names the
        mapping) when the data is not such a state.

        >>> ScheduleState.from_dict(None)
        Traceback (most recent call last):
        ...
        ValueError: the EMA state's 'schedule' must be a mapping; got None
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"the EMA state's {where!r} must be a mapping; got {data!r}")
        last = data.get("last", {})
        if not isinstance(last, Mapping) or not all(
            _is_number(v) and not math.isnan(v) for v in last.values()
        ):
            raise ValueError(
                f"the EMA state's '{where}.last' must map units to numbers; got {last!r}"
            )
        for key, kind in (
            ("started", bool),
            ("num_updates", int),
            ("num_skipped", int),
            ("bias_product", float),
            ("smoothing", float),
        ):
            value = data.get(key)
            ok = (
                value is None
                or (kind is bool and isinstance(value, bool))
                or (kind is int and isinstance(value, int) and not isinstance(value, bool))
                or (kind is float and _is_number(value))
            )
            if not ok or (kind is int and value is not None and value < 0):
                rule = {bool: "True or False", int: "a non-negative integer", float: "a number"}
                raise ValueError(
                    f"the EMA state's '{where}.{key}' must be {rule[kind]}; got {value!r}"
                )
        bias_product = data.get("bias_product")
        smoothing = data.get("smoothing")
        return cls(
            started=bool(data.get("started", False)),
            last={str(k): _progress(str(k), v) for k, v in last.items()},
            num_updates=int(data.get("num_updates") or 0),
            num_skipped=int(data.get("num_skipped") or 0),
            bias_product=1.0 if bias_product is None else float(bias_product),
            smoothing=None if smoothing is None else float(smoothing),
        )


@dataclass(frozen=True)
class Update:
    """A due update: ``weight`` is the lerp weight ``1 - beta`` (1 means copy the weights)."""

    weight: float
    smoothing: float
    initialise: bool


def _as_typed(value: Any) -> str:
    """``value`` quoted as the user typed it (a string as is, a :class:`Time` as its string)."""
    return repr(value) if isinstance(value, str) else repr(str(value))


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    if isinstance(value, int):
        # An integer a float cannot hold would be rounded (2**53 + 1) or overflow.
        if abs(value) > 2**53 and (abs(value) > sys.float_info.max or float(value) != value):
            raise ValueError(f"{name} must be a number a float holds exactly; got {value!r}")
        return float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, not NaN; got {value!r}")
    return float(value)


class Schedule:
    """When an EMA update is due and with which smoothing. Validated once, here.

    Exactly one of ``half_life`` (a time string; ``float('inf')`` for a frozen EMA),
    ``smoothing`` (a constant per-update decay, as in flax/optax/TF) or ``sigma_rel`` (EDM2's
    power-function EMA) sets the averaging; with none of them, ``half_life='1000ba'``.

    ``update_interval`` defaults to 1 in the half-life's unit for ``ba`` and ``ep`` (Composer),
    and to ``'1ba'`` otherwise. Before ``start`` the EMA is not started (no averaging, no swap);
    at the first update at or after it, it becomes a copy of the weights.

    ``warmup``: ``'none'``; ``'tf'`` caps beta at ``(1+n)/(10+n)``; ``'power'`` caps it at
    ``1-(1+t/warmup_gamma)^-warmup_power`` (timm, diffusers); ``'debias'`` is optax's zero-init
    EMA with bias correction. ``rampup_ratio`` is EDM2's ramp: the half-life is at most this
    fraction of the progress since start.

    ``names`` renames options in error messages, for callers whose users know them by another
    name (``{'update_interval': 'snapshot_every'}``, ``{'start': 'ema_start'}``).

    >>> s = Schedule(half_life='50ba')
    >>> s.update_interval, s.half_life
    (Time(value=1, unit=<TimeUnit.BATCH: 'ba'>), Time(value=50, unit=<TimeUnit.BATCH: 'ba'>))
    >>> state = ScheduleState()
    >>> s.due(Clock(batch=1), state).initialise        # first update initialises
    True
    >>> s.commit(Clock(batch=1), state, s.due(Clock(batch=1), state))
    >>> round(s.due(Clock(batch=2), state).smoothing, 6)
    0.986233
    >>> Schedule(half_life='50ba', smoothing=0.9)
    Traceback (most recent call last):
    ...
    ValueError: give exactly one of half_life, smoothing or sigma_rel; got half_life='50ba', smoothing=0.9
    """

    def __init__(
        self,
        half_life: str | Time | float | None = None,
        smoothing: float | None = None,
        sigma_rel: float | None = None,
        update_interval: str | Time | None = None,
        start: str | Time = "0ba",
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        rampup_ratio: float | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        label = dict(names or {})
        interval_name = label.get("update_interval", "update_interval")
        start_name = label.get("start", "start")
        given = {
            k: v
            for k, v in (
                ("half_life", half_life),
                ("smoothing", smoothing),
                ("sigma_rel", sigma_rel),
            )
            if v is not None
        }
        if len(given) > 1:
            shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"give exactly one of half_life, smoothing or sigma_rel; got {shown}")
        if not given:
            half_life = "1000ba"

        self.half_life: Time | None = None
        self.smoothing: float | None = None
        self.sigma_rel: float | None = None
        self.gamma: float | None = None
        if smoothing is not None:
            value = _number(smoothing, "smoothing")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"smoothing must be between 0 and 1; got {smoothing!r}")
            self.smoothing = value
        elif sigma_rel is not None:
            self.sigma_rel = _number(sigma_rel, "sigma_rel")
            self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        else:
            if isinstance(half_life, float) and not isinstance(half_life, bool):
                if not math.isinf(half_life) or half_life < 0:
                    raise ValueError(
                        "half_life as a number must be float('inf') (an EMA that never moves); "
                        f"use a time string like '1000ba' otherwise; got {half_life!r}"
                    )
                self.half_life = Time(math.inf, TimeUnit.BATCH)
            else:
                assert half_life is not None
                self.half_life = Time.parse(half_life, "half_life")  # type: ignore[arg-type]

        if update_interval is None:
            if self.half_life is not None and self.half_life.unit in (
                TimeUnit.BATCH,
                TimeUnit.EPOCH,
            ):
                update_interval = Time(1, self.half_life.unit)
            else:
                update_interval = Time(1, TimeUnit.BATCH)
        self.update_interval = Time.parse(update_interval, interval_name)
        if self.update_interval.value == 0 or self.update_interval.is_infinite:
            raise ValueError(
                f"{interval_name} must be positive and finite; got {_as_typed(update_interval)}"
            )
        self.start = Time.parse(start, start_name)
        if self.start.is_infinite:
            raise ValueError(f"{start_name} must be finite; got {_as_typed(start)}")

        if not isinstance(warmup, str):
            raise TypeError(f"warmup must be one of {WARMUPS}; got {warmup!r}")
        if warmup not in WARMUPS:
            raise ValueError(f"warmup must be one of {WARMUPS}; got {warmup!r}")
        if warmup != "none" and self.sigma_rel is not None:
            raise ValueError(
                f"warmup={warmup!r} cannot be combined with sigma_rel: the power-function EMA "
                "has its own warm-up"
            )
        self.warmup = warmup
        self.warmup_gamma = _number(warmup_gamma, "warmup_gamma")
        if not 0 < self.warmup_gamma < math.inf:
            raise ValueError(f"warmup_gamma must be positive and finite; got {warmup_gamma!r}")
        self.warmup_power = _number(warmup_power, "warmup_power")
        if not 0 < self.warmup_power < math.inf:
            raise ValueError(f"warmup_power must be positive and finite; got {warmup_power!r}")
        self.rampup_ratio: float | None = None
        if rampup_ratio is not None:
            if self.half_life is None:
                raise ValueError("rampup_ratio needs a half_life (it caps the half-life)")
            self.rampup_ratio = _number(rampup_ratio, "rampup_ratio")
            if not 0 < self.rampup_ratio < math.inf:
                raise ValueError(f"rampup_ratio must be positive and finite; got {rampup_ratio!r}")

    # -- introspection --------------------------------------------------------------------

    @property
    def units(self) -> set[TimeUnit]:
        """Every unit the clock must count for this schedule."""
        return set(self._units)

    @functools.cached_property
    def _units(self) -> frozenset[TimeUnit]:
        units = {self.update_interval.unit, self.start.unit}
        if self.half_life is not None:
            units.add(self.half_life.unit)
        return frozenset(units)

    def describe(self) -> str:
        """A short human label (``'half_life=50ba'``), used in metric names and messages."""
        if self.half_life is not None:
            return f"half_life={self.half_life}"
        if self.smoothing is not None:
            return f"smoothing={self.smoothing:g}"
        return f"sigma_rel={self.sigma_rel:g}"

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this schedule (plain strings and numbers)."""
        return {
            "half_life": None if self.half_life is None else str(self.half_life),
            "smoothing": self.smoothing,
            "sigma_rel": self.sigma_rel,
            "update_interval": str(self.update_interval),
            "start": str(self.start),
            "warmup": self.warmup,
            "warmup_gamma": self.warmup_gamma,
            "warmup_power": self.warmup_power,
            "rampup_ratio": self.rampup_ratio,
        }

    # -- decisions ------------------------------------------------------------------------

    def _now(self, clock: Clock, unit: TimeUnit) -> float:
        value = clock.get(unit)
        if value is None:
            raise ValueError(
                f"this EMA schedule counts '{unit.value}' but the clock does not know it; "
                "the trainer adapter must supply it"
            )
        return float(value)

    def due(self, clock: Clock, state: ScheduleState) -> Update | None:
        """The update due at ``clock``, or ``None``. Does not change ``state``."""
        for needed in self._units:
            self._now(clock, needed)  # every unit the schedule uses must be counted
        unit = self.update_interval.unit
        interval = self.update_interval.value
        now = self._now(clock, unit)
        last = state.last.get(unit.value, 0.0)
        # Due when progress crosses a multiple of the interval since the last update. The small
        # tolerance keeps fractional epochs (0.25 * 4) on the right side of the boundary.
        if math.floor(now / interval + 1e-9) <= math.floor(last / interval + 1e-9):
            return None
        if not state.started:
            # The first due update at or after `start` initialises the EMA as a copy.
            if self._now(clock, self.start.unit) < self.start.value:
                return None
            return Update(weight=1.0, smoothing=0.0, initialise=True)
        beta = self._smoothing(clock, state)
        if self.warmup == "debias":
            weight, _ = debiased_weight(beta, state.bias_product)
        else:
            weight = 1.0 - beta
        return Update(weight=weight, smoothing=beta, initialise=False)

    def _smoothing(self, clock: Clock, state: ScheduleState) -> float:
        n = state.num_updates
        if self.smoothing is not None:
            beta = self.smoothing
        elif self.gamma is not None:
            unit = self.update_interval.unit
            now = self._now(clock, unit)
            elapsed = now - state.last.get(unit.value, 0.0)
            beta = power_function_smoothing(now, elapsed, self.gamma)
        else:
            assert self.half_life is not None
            unit = self.half_life.unit
            now = self._now(clock, unit)
            elapsed = max(0.0, now - state.last.get(unit.value, now))
            half_life = float(self.half_life.value)
            if self.rampup_ratio is not None:
                since_start = max(0.0, now - state.last.get(f"start_{unit.value}", 0.0))
                half_life = min(half_life, since_start * self.rampup_ratio)
            beta = half_life_to_smoothing(half_life, elapsed)
        if self.warmup == "tf":
            beta = tf_dynamic_smoothing(beta, n)
        elif self.warmup == "power":
            beta = min(beta, power_warmup_smoothing(n, self.warmup_gamma, self.warmup_power))
        return beta

    def commit(self, clock: Clock, state: ScheduleState, update: Update | None) -> None:
        """Record that ``update`` was applied at ``clock``."""
        if update is None:
            return
        last = clock.as_dict()
        if update.initialise:
            state.started = True
            state.num_updates = 0
            state.bias_product = 1.0
            state.smoothing = None
            last.update({f"start_{k}": v for k, v in clock.as_dict().items()})
        else:
            state.num_updates += 1
            state.smoothing = update.smoothing
            if self.warmup == "debias":
                state.bias_product *= update.smoothing
            last.update({k: v for k, v in state.last.items() if k.startswith("start_")})
        state.last = last

    def resumed_state(self, clock: Clock) -> ScheduleState:
        """The state of a started EMA whose last update was at the latest interval multiple at
        or before ``clock``: what a checkpoint from an EMA that updates on every multiple
        (Composer's) implies, since it does not store when it last updated.

        >>> Schedule(half_life='10ba', update_interval='4ba').resumed_state(Clock(batch=10)).last['ba']
        8
        """
        last = clock.as_dict()
        interval = self.update_interval
        now = clock.get(interval.unit)
        if now is not None:
            last[interval.unit.value] = float(
                math.floor(now / interval.value + 1e-9) * interval.value
            )
        return ScheduleState(started=True, last={k: _progress(k, v) for k, v in last.items()})

    def skip(self, state: ScheduleState) -> None:
        """Record that a due update was skipped (non-finite weights); time is not advanced, so
        the next update's smoothing covers the skipped progress."""
        state.num_skipped += 1
