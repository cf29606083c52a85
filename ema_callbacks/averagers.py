"""How each average moves: one :class:`Averager` per method. Pure Python (torch is imported only
by the tensor steps of averagers that keep extra tensors).

A :class:`~ema_callbacks.schedule.Schedule` decides *when* an update is due; its averager decides
*how far* it moves the average and which tensors it keeps:

=================  ====================================  =====================================
averager           selected by                           the lerp weight of an update
=================  ====================================  =====================================
:class:`HalfLife`  ``half_life='50ba'`` (the default)    ``1 - 2 ** (-elapsed / half_life)``
:class:`Constant`  ``smoothing=0.999``                   ``1 - smoothing``
:class:`Power`     ``sigma_rel=0.05`` (EDM2)             ``1 - (1 - elapsed / now) ** (g + 1)``
:class:`BEMA`      ``ema_power``, ``bias_power``, ...    ``max((lag + m t) ** -p, min)``
:class:`Uniform`   ``uniform=True`` (SWA)                ``1 / (n + 1)``
=================  ====================================  =====================================

The first three take the warm-ups (``warmup='tf'``, ``'power'``, ``'debias'``) and EDM2's
``rampup_ratio`` (half-life only). Every average starts as a copy of the weights at its first
due update.

The *evaluated* weights (swapped in, viewed, exported, snapshotted, kept after fit) are what
:class:`~ema_callbacks.weights.EMAWeights` calls ``shadow``. For every averager but BEMA they are
the running average itself, so the update lerps into them and a swap is an O(1) exchange of
storage. An averager whose evaluated weights are formed from the running average (BEMA:
``ema + alpha * (theta - theta0)``) names extra per-weight tensors in :attr:`Averager.buffers`,
lerps into the one named :attr:`Averager.running`, and forms the evaluated weights in
:meth:`Averager.finish_` after each update: they are still one stored tensor per weight, so the
swap stays O(1). Adding a method is one class here and one line in :data:`AVERAGERS`.

>>> a = averager_from_options(half_life='50ba')
>>> a.kind, a.describe(), a.default_name()
('half_life', 'half_life=50ba', 'ema_50ba')
>>> b = averager_from_options(ema_power=0.5)
>>> b.kind, b.buffers, b.running, b.default_name()
('bema', ('ema', 'theta0'), 'ema', 'bema')
>>> averager_from_options(uniform=True).weight(Step({'ba': 4}, {'ba': 3}, 'ba', 2, 1.0))
(0.25, 0.75)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ema_callbacks.time_strings import Time, TimeUnit

__all__ = [
    "AVERAGERS",
    "Averager",
    "BEMA",
    "Constant",
    "HalfLife",
    "Power",
    "Step",
    "Uniform",
    "averager_from_options",
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


# ---------------------------------------------------------------------------------------------
# Averagers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What an averager sees of a due (non-initialising) update.

    ``now`` and ``last`` map unit strings (``'ba'``, ``'ep'``...) to the progress now and at the
    previous update; ``last`` also holds ``'start_<unit>'``, the progress at the initialising
    copy. ``interval`` is the update interval's unit; ``num_updates`` counts the averaging
    updates before this one; ``bias_product`` is the product of the betas so far (``'debias'``).
    """

    now: Mapping[str, float]
    last: Mapping[str, float]
    interval: str
    num_updates: int
    bias_product: float

    def since_start(self, unit: str) -> float:
        """Progress in ``unit`` since the initialising copy."""
        return max(0.0, self.now[unit] - self.last.get(f"start_{unit}", 0.0))


class Averager:
    """The rule of one average (subclass it for a new method).

    Class attributes: ``kind`` (its name in configs and states), ``options`` (the constructor
    keywords, read back by :meth:`config`), ``buffers`` (extra tensors kept per averaged weight,
    beside the evaluated weights: shaped, sharded, grouped and saved like them) and ``running``
    (the buffer the update lerps into, or None: the evaluated weights are the running average).
    """

    kind: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    buffers: ClassVar[tuple[str, ...]] = ()
    running: ClassVar[str | None] = None

    def units(self) -> frozenset[TimeUnit]:
        """Units the clock must count for this averager (beyond the schedule's own)."""
        return frozenset()

    def smoothing(self, step: Step) -> float:
        """``beta`` of this update: the weight kept on the old average."""
        raise NotImplementedError

    def weight(self, step: Step) -> tuple[float, float]:
        """``(lerp weight, beta)`` of this update: ``average += weight * (theta - average)``."""
        beta = self.smoothing(step)
        return 1.0 - beta, beta

    def committed(self, beta: float, bias_product: float) -> float:
        """The ``bias_product`` after an update with ``beta`` (kept only by ``'debias'``)."""
        return bias_product

    def describe(self) -> str:
        """A short label (``'half_life=50ba'``) for messages."""
        raise NotImplementedError

    def default_name(self) -> str:
        """The profile name (metric prefix) when none is given."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as plain strings and numbers."""
        return {k: _plain(getattr(self, k)) for k in self.options}

    # Tensor steps, for averagers with ``buffers``: ``tensors`` is a list of
    # ``(evaluated, {buffer: tensors}, sources)`` per group of same-device, same-dtype weights.

    def initialise_(
        self, tensors: Sequence[tuple[list[Any], dict[str, list[Any]], list[Any]]]
    ) -> None:
        """After the initialising copy into ``running``: set the other tensors."""

    def finish_(
        self,
        tensors: Sequence[tuple[list[Any], dict[str, list[Any]], list[Any]]],
        step: Step,
    ) -> None:
        """After an update lerped into ``running``: form the evaluated weights."""


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Time) else value


def _warmups(
    warmup: str, warmup_gamma: float, warmup_power: float, alone: str | None = None
) -> tuple[str, float, float]:
    """The warm-up options, checked; ``alone`` names an average that takes none."""
    if not isinstance(warmup, str):
        raise TypeError(f"warmup must be one of {WARMUPS}; got {warmup!r}")
    if warmup not in WARMUPS:
        raise ValueError(f"warmup must be one of {WARMUPS}; got {warmup!r}")
    if warmup != "none" and alone is not None:
        raise ValueError(f"warmup={warmup!r} cannot be combined with {alone}")
    gamma = _number(warmup_gamma, "warmup_gamma")
    if not 0 < gamma < math.inf:
        raise ValueError(f"warmup_gamma must be positive and finite; got {warmup_gamma!r}")
    power = _number(warmup_power, "warmup_power")
    if not 0 < power < math.inf:
        raise ValueError(f"warmup_power must be positive and finite; got {warmup_power!r}")
    return warmup, gamma, power


class _Decay(Averager):
    """An EMA with a per-update ``beta``, taking the warm-ups."""

    def __init__(
        self, warmup: str, warmup_gamma: float, warmup_power: float, alone: str | None = None
    ) -> None:
        self.warmup, self.warmup_gamma, self.warmup_power = _warmups(
            warmup, warmup_gamma, warmup_power, alone
        )

    def _beta(self, step: Step) -> float:
        raise NotImplementedError

    def smoothing(self, step: Step) -> float:
        beta = self._beta(step)
        if self.warmup == "tf":
            beta = tf_dynamic_smoothing(beta, step.num_updates)
        elif self.warmup == "power":
            beta = min(
                beta, power_warmup_smoothing(step.num_updates, self.warmup_gamma, self.warmup_power)
            )
        return beta

    def weight(self, step: Step) -> tuple[float, float]:
        beta = self.smoothing(step)
        if self.warmup == "debias":
            return debiased_weight(beta, step.bias_product)[0], beta
        return 1.0 - beta, beta

    def committed(self, beta: float, bias_product: float) -> float:
        return bias_product * beta if self.warmup == "debias" else bias_product


class HalfLife(_Decay):
    """``beta = 2 ** (-elapsed / half_life)``, ``elapsed`` the progress since the previous update
    in the half-life's unit; ``rampup_ratio`` (EDM2) caps the half-life at that fraction of the
    progress since the start."""

    kind = "half_life"
    options = ("half_life", "rampup_ratio")

    def __init__(
        self,
        half_life: str | Time | float = "1000ba",
        rampup_ratio: float | None = None,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        super().__init__(warmup, warmup_gamma, warmup_power)
        if isinstance(half_life, float):
            if not math.isinf(half_life) or half_life < 0:
                raise ValueError(
                    "half_life as a number must be float('inf') (an EMA that never moves); "
                    f"use a time string like '1000ba' otherwise; got {half_life!r}"
                )
            self.half_life = Time(math.inf, TimeUnit.BATCH)
        else:
            self.half_life = Time.parse(half_life, "half_life")
        self.rampup_ratio: float | None = None
        if rampup_ratio is not None:
            self.rampup_ratio = _number(rampup_ratio, "rampup_ratio")
            if not 0 < self.rampup_ratio < math.inf:
                raise ValueError(f"rampup_ratio must be positive and finite; got {rampup_ratio!r}")

    def units(self) -> frozenset[TimeUnit]:
        return frozenset({self.half_life.unit})

    def _beta(self, step: Step) -> float:
        unit = self.half_life.unit.value
        now = step.now[unit]
        elapsed = max(0.0, now - step.last.get(unit, now))
        half_life = float(self.half_life.value)
        if self.rampup_ratio is not None:
            half_life = min(half_life, step.since_start(unit) * self.rampup_ratio)
        return half_life_to_smoothing(half_life, elapsed)

    def describe(self) -> str:
        return f"half_life={self.half_life}"

    def default_name(self) -> str:
        return f"ema_{self.half_life}"


class Constant(_Decay):
    """A constant ``beta = smoothing`` per update (flax, optax, TF)."""

    kind = "smoothing"
    options = ("smoothing",)

    def __init__(
        self,
        smoothing: float,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        super().__init__(warmup, warmup_gamma, warmup_power)
        value = _number(smoothing, "smoothing")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"smoothing must be between 0 and 1; got {smoothing!r}")
        self.smoothing_value = value

    def _beta(self, step: Step) -> float:
        return self.smoothing_value

    def config(self) -> dict[str, Any]:
        return {"smoothing": self.smoothing_value}

    def describe(self) -> str:
        return f"smoothing={self.smoothing_value:g}"

    def default_name(self) -> str:
        return f"ema_{self.smoothing_value:g}"


class Power(_Decay):
    """EDM2's power-function EMA: ``beta = (1 - elapsed / now) ** (gamma + 1)`` in the update
    interval's unit, ``gamma`` from ``sigma_rel``. It has its own warm-up."""

    kind = "sigma_rel"
    options = ("sigma_rel",)

    def __init__(
        self,
        sigma_rel: float,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        self.sigma_rel = _number(sigma_rel, "sigma_rel")
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        super().__init__(
            warmup,
            warmup_gamma,
            warmup_power,
            alone="sigma_rel: the power-function EMA has its own warm-up",
        )

    def _beta(self, step: Step) -> float:
        now = step.now[step.interval]
        elapsed = now - step.last.get(step.interval, 0.0)
        return power_function_smoothing(now, elapsed, self.gamma)

    def describe(self) -> str:
        return f"sigma_rel={self.sigma_rel:g}"

    def default_name(self) -> str:
        return f"ema_sigma_rel{self.sigma_rel:g}"


_OWN_SCHEDULE = "{}, whose weights have a schedule of their own; leave warmup='none'"


class BEMA(Averager):
    """Bias-corrected EMA (Block & Zhang 2025, "EMA Without the Lag"; TRL's ``BEMACallback``),
    with TRL's hyperparameter names.

    With ``t`` the progress since the initialising copy in the update interval's unit:
    ``beta = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)`` is the weight of
    the new weights, ``ema = (1 - beta) * ema + beta * theta``, and the evaluated weights are
    ``ema + (lag + multiplier * t) ** -bias_power * (theta - theta0)``, ``theta0`` the weights
    at the initialising copy. ``bias_power=0`` pins the correction's factor at 1 (TRL);
    ``bias_power=float('inf')`` turns it off (the plain power EMA). Memory: three copies of the
    averaged weights (the running EMA, ``theta0`` and the evaluated weights), as TRL's.

    >>> b = BEMA()
    >>> b.weight(Step({'ba': 400}, {'ba': 0, 'start_ba': 0}, 'ba', 0, 1.0))[0] == 410 ** -0.5
    True
    """

    kind = "bema"
    options = ("ema_power", "bias_power", "lag", "multiplier", "min_ema_multiplier")
    buffers = ("ema", "theta0")
    running = "ema"
    DEFAULTS: ClassVar[dict[str, float]] = {
        "ema_power": 0.5,
        "bias_power": 0.2,
        "lag": 10.0,
        "multiplier": 1.0,
        "min_ema_multiplier": 0.0,
    }

    def __init__(
        self,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        _warmups(
            warmup, warmup_gamma, warmup_power, alone=_OWN_SCHEDULE.format("BEMA (ema_power, ...)")
        )
        given = {
            "ema_power": ema_power,
            "bias_power": bias_power,
            "lag": lag,
            "multiplier": multiplier,
            "min_ema_multiplier": min_ema_multiplier,
        }
        values = {k: self.DEFAULTS[k] if v is None else _number(v, k) for k, v in given.items()}
        if not 0.0 <= values["ema_power"] < math.inf:
            raise ValueError(f"ema_power must be non-negative and finite; got {ema_power!r}")
        if not values["bias_power"] >= 0.0:
            raise ValueError(
                f"bias_power must be non-negative (float('inf') turns the bias correction off); "
                f"got {bias_power!r}"
            )
        if not 1.0 <= values["lag"] < math.inf:
            raise ValueError(
                "lag must be at least 1 and finite (so that the EMA's weight "
                f"(lag + multiplier*t) ** -ema_power is at most 1); got {lag!r}"
            )
        if not 0.0 <= values["multiplier"] < math.inf:
            raise ValueError(f"multiplier must be non-negative and finite; got {multiplier!r}")
        if not 0.0 <= values["min_ema_multiplier"] <= 1.0:
            raise ValueError(
                f"min_ema_multiplier must be between 0 and 1; got {min_ema_multiplier!r}"
            )
        self.ema_power = values["ema_power"]
        self.bias_power = values["bias_power"]
        self.lag = values["lag"]
        self.multiplier = values["multiplier"]
        self.min_ema_multiplier = values["min_ema_multiplier"]

    def _age(self, step: Step) -> float:
        return self.lag + self.multiplier * step.since_start(step.interval)

    def smoothing(self, step: Step) -> float:
        return 1.0 - max(self._age(step) ** -self.ema_power, self.min_ema_multiplier)

    def weight(self, step: Step) -> tuple[float, float]:
        beta = max(self._age(step) ** -self.ema_power, self.min_ema_multiplier)
        return beta, 1.0 - beta

    def alpha(self, step: Step) -> float:
        """The bias correction's factor ``(lag + multiplier * t) ** -bias_power``."""
        if math.isinf(self.bias_power):
            return 0.0
        return float(self._age(step) ** -self.bias_power)

    def describe(self) -> str:
        return "bema(" + ", ".join(f"{k}={getattr(self, k):g}" for k in self.options) + ")"

    def default_name(self) -> str:
        changed = [k for k in self.options if getattr(self, k) != self.DEFAULTS[k]]
        return "bema" + "".join(f"_{k}{getattr(self, k):g}" for k in changed)

    def initialise_(
        self, tensors: Sequence[tuple[list[Any], dict[str, list[Any]], list[Any]]]
    ) -> None:
        import torch

        for evaluated, bufs, _ in tensors:
            torch._foreach_copy_(bufs["theta0"], bufs["ema"])
            torch._foreach_copy_(evaluated, bufs["ema"])

    def finish_(
        self,
        tensors: Sequence[tuple[list[Any], dict[str, list[Any]], list[Any]]],
        step: Step,
    ) -> None:
        import torch

        alpha = self.alpha(step)
        for evaluated, bufs, sources in tensors:
            # evaluated = ema + alpha * (theta - theta0), in three in-place passes (no temporary
            # but, for weights on another device than the average, one tensor at a time)
            torch._foreach_copy_(evaluated, bufs["ema"])
            if alpha == 0.0 or not evaluated:
                continue
            if sources[0].device == evaluated[0].device:
                torch._foreach_add_(evaluated, sources, alpha=alpha)
            else:
                for e, s in zip(evaluated, sources, strict=True):
                    e.add_(s.to(e.device), alpha=alpha)
            torch._foreach_add_(evaluated, bufs["theta0"], alpha=-alpha)


class Uniform(Averager):
    """The uniform average of stochastic weight averaging (``AveragedModel``'s default,
    Lightning's ``StochasticWeightAveraging``): after ``n`` updates, the mean of the ``n``
    weights seen at them (the initialising copy is the first)."""

    kind = "uniform"
    options = ("uniform",)

    def __init__(
        self,
        uniform: bool = True,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
    ) -> None:
        if uniform is not True:
            raise TypeError(
                f"uniform must be True (or False, meaning not uniform); got {uniform!r}"
            )
        _warmups(warmup, warmup_gamma, warmup_power, alone=_OWN_SCHEDULE.format("uniform=True"))
        self.uniform = True

    def weight(self, step: Step) -> tuple[float, float]:
        n = step.num_updates + 2  # the copy, the updates before, and this one
        return 1.0 / n, 1.0 - 1.0 / n

    def smoothing(self, step: Step) -> float:
        return self.weight(step)[1]

    def describe(self) -> str:
        return "uniform"

    def default_name(self) -> str:
        return "uniform"


#: Averagers by ``kind``; each is selected by its own options (:func:`averager_from_options`).
AVERAGERS: dict[str, type[Averager]] = {
    a.kind: a for a in (HalfLife, Constant, Power, BEMA, Uniform)
}
#: The options that select each averager (one group may be given).
SELECTING: dict[str, tuple[str, ...]] = {
    "half_life": ("half_life",),
    "smoothing": ("smoothing",),
    "sigma_rel": ("sigma_rel",),
    "bema": BEMA.options,
    "uniform": ("uniform",),
}
#: The selecting options, in that order.
SELECTING_OPTIONS = tuple(name for names in SELECTING.values() for name in names)
#: Every averaging option a schedule takes.
AVERAGING_OPTIONS = (
    "half_life",
    "smoothing",
    "sigma_rel",
    *BEMA.options,
    "uniform",
    "warmup",
    "warmup_gamma",
    "warmup_power",
    "rampup_ratio",
)


def averager_from_options(
    half_life: str | Time | float | None = None,
    smoothing: float | None = None,
    sigma_rel: float | None = None,
    ema_power: float | None = None,
    bias_power: float | None = None,
    lag: float | None = None,
    multiplier: float | None = None,
    min_ema_multiplier: float | None = None,
    uniform: bool | None = None,
    warmup: str = "none",
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    rampup_ratio: float | None = None,
) -> Averager:
    """The averager the options select: exactly one of ``half_life``, ``smoothing``,
    ``sigma_rel``, the BEMA options (any of ``ema_power``, ``bias_power``, ``lag``,
    ``multiplier``, ``min_ema_multiplier``) or ``uniform=True``; with none of them,
    ``half_life='1000ba'``.

    >>> averager_from_options(smoothing=0.9, uniform=True)
    Traceback (most recent call last):
    ...
    ValueError: give exactly one of half_life, smoothing, sigma_rel, the BEMA options (ema_power, bias_power, lag, multiplier, min_ema_multiplier) or uniform=True; got smoothing=0.9, uniform=True
    """
    given = locals()
    if uniform is not None and not isinstance(uniform, bool):
        raise TypeError(f"uniform must be True or False; got {uniform!r}")
    values = {name: given[name] for name in SELECTING_OPTIONS}
    values["uniform"] = uniform or None  # False: not uniform
    chosen = [k for k, names in SELECTING.items() if any(values[n] is not None for n in names)]
    if len(chosen) > 1:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items() if v is not None)
        if set(chosen) <= {"half_life", "smoothing", "sigma_rel"}:
            raise ValueError(f"give exactly one of half_life, smoothing or sigma_rel; got {shown}")
        raise ValueError(
            "give exactly one of half_life, smoothing, sigma_rel, the BEMA options ("
            + ", ".join(BEMA.options)
            + f") or uniform=True; got {shown}"
        )
    kind = chosen[0] if chosen else "half_life"
    if rampup_ratio is not None and kind != "half_life":
        raise ValueError("rampup_ratio needs a half_life (it caps the half-life)")
    warmups: dict[str, Any] = {
        "warmup": warmup,
        "warmup_gamma": warmup_gamma,
        "warmup_power": warmup_power,
    }
    if kind == "half_life":
        return HalfLife(
            "1000ba" if half_life is None else half_life, rampup_ratio=rampup_ratio, **warmups
        )
    if kind == "smoothing":
        assert smoothing is not None
        return Constant(smoothing, **warmups)
    if kind == "sigma_rel":
        assert sigma_rel is not None
        return Power(sigma_rel, **warmups)
    if kind == "bema":
        return BEMA(ema_power, bias_power, lag, multiplier, min_ema_multiplier, **warmups)
    return Uniform(uniform, **warmups)  # type: ignore[arg-type]
