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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ema_callbacks.averagers import (
    BEMA,
    SIGMA_REL_MIN,  # noqa: F401 (re-exported: schedule's name before averagers existed)
    WARMUPS,  # noqa: F401
    Averager,
    Step,
    averager_from_options,
    debiased_weight,
    gamma_to_sigma_rel,
    half_life_to_smoothing,
    power_function_smoothing,
    power_warmup_smoothing,
    sigma_rel_to_gamma,
    smoothing_to_half_life,
    tf_dynamic_smoothing,
)
from ema_callbacks.time_strings import Time, TimeUnit

__all__ = [
    "Clock",
    "SCHEDULE_KEYS",
    "Schedule",
    "ScheduleState",
    "debiased_weight",
    "gamma_to_sigma_rel",
    "half_life_to_smoothing",
    "power_function_smoothing",
    "power_warmup_smoothing",
    "schedules_from_options",
    "sigma_rel_to_gamma",
    "smoothing_to_half_life",
    "tf_dynamic_smoothing",
]


#: The schedule options a profile may set (``profiles=[{...}]``), also compared with a saved
#: config when a state is loaded.
SCHEDULE_KEYS = (
    "half_life",
    "smoothing",
    "sigma_rel",
    *BEMA.options,
    "uniform",
    "update_interval",
    "start",
    "warmup",
    "warmup_gamma",
    "warmup_power",
    "rampup_ratio",
)

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
    step: Step | None = None  # what the averager saw (None for the initialising copy)


def _as_typed(value: Any) -> str:
    """``value`` quoted as the user typed it (a string as is, a :class:`Time` as its string)."""
    return repr(value) if isinstance(value, str) else repr(str(value))


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
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool | None = None,
        names: Mapping[str, str] | None = None,
    ) -> None:
        label = dict(names or {})
        interval_name = label.get("update_interval", "update_interval")
        start_name = label.get("start", "start")
        self.averager: Averager = averager_from_options(
            half_life=half_life,
            smoothing=smoothing,
            sigma_rel=sigma_rel,
            ema_power=ema_power,
            bias_power=bias_power,
            lag=lag,
            multiplier=multiplier,
            min_ema_multiplier=min_ema_multiplier,
            uniform=uniform,
            warmup=warmup,
            warmup_gamma=warmup_gamma,
            warmup_power=warmup_power,
            rampup_ratio=rampup_ratio,
        )
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

    # -- the averager's options, as attributes (None where the averager has no such option) --

    @property
    def kind(self) -> str:
        """The averager's kind: ``'half_life'``, ``'smoothing'``, ``'sigma_rel'``, ``'bema'`` or
        ``'uniform'``."""
        return self.averager.kind

    @property
    def half_life(self) -> Time | None:
        return getattr(self.averager, "half_life", None)

    @property
    def smoothing(self) -> float | None:
        return getattr(self.averager, "smoothing_value", None)

    @property
    def sigma_rel(self) -> float | None:
        return getattr(self.averager, "sigma_rel", None)

    @property
    def gamma(self) -> float | None:
        return getattr(self.averager, "gamma", None)

    @property
    def warmup(self) -> str:
        return getattr(self.averager, "warmup", "none")

    @property
    def warmup_gamma(self) -> float:
        return getattr(self.averager, "warmup_gamma", 1.0)

    @property
    def warmup_power(self) -> float:
        return getattr(self.averager, "warmup_power", 2 / 3)

    @property
    def rampup_ratio(self) -> float | None:
        return getattr(self.averager, "rampup_ratio", None)

    # -- introspection --------------------------------------------------------------------

    @property
    def units(self) -> set[TimeUnit]:
        """Every unit the clock must count for this schedule."""
        return set(self._units)

    @functools.cached_property
    def _units(self) -> frozenset[TimeUnit]:
        return frozenset({self.update_interval.unit, self.start.unit}) | self.averager.units()

    def describe(self) -> str:
        """A short human label (``'half_life=50ba'``), used in metric names and messages."""
        return self.averager.describe()

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this schedule (plain strings and numbers); the averaging
        options of another averager are absent."""
        out: dict[str, Any] = {
            "half_life": None if self.half_life is None else str(self.half_life),
            "smoothing": self.smoothing,
            "sigma_rel": self.sigma_rel,
        }
        out.update(self.averager.config())
        out.update(
            {
                "update_interval": str(self.update_interval),
                "start": str(self.start),
                "warmup": self.warmup,
                "warmup_gamma": self.warmup_gamma,
                "warmup_power": self.warmup_power,
                "rampup_ratio": self.rampup_ratio,
            }
        )
        return out

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
        step = self.step_at(clock, state)
        weight, beta = self.averager.weight(step)
        return Update(weight=weight, smoothing=beta, initialise=False, step=step)

    def step_at(self, clock: Clock, state: ScheduleState) -> Step:
        """What the averager sees of an update at ``clock`` after ``state``."""
        return Step(
            now=clock.as_dict(),
            last=state.last,
            interval=self.update_interval.unit.value,
            num_updates=state.num_updates,
            bias_product=state.bias_product,
        )

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
            state.bias_product = self.averager.committed(update.smoothing, state.bias_product)
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


def schedules_from_options(
    averaging: Mapping[str, Any],
    shared: Mapping[str, Any],
    profiles: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[Schedule], list[str] | None]:
    """The schedules of one or several EMAs, from the plain options every entry point takes,
    and their names where ``profiles`` gives them (None: each schedule's default name).

    ``averaging`` holds the averaging options (``half_life``, ``smoothing``, ``sigma_rel``, the
    BEMA options, ``uniform``; None or False when not given), ``shared`` the other schedule
    options. Several EMAs: a list for one of ``half_life``, ``smoothing`` or ``sigma_rel``
    (the shared options apply to each), or ``profiles``, a list of mappings that each override
    the shared options (:data:`SCHEDULE_KEYS`) and may carry a ``name``. A pure function: every
    rule is checked here and broken ones raise ``ValueError`` / ``TypeError`` naming the option.

    >>> schedules, names = schedules_from_options({'half_life': ['10ba', '100ba']}, {'start': '5ba'})
    >>> [s.describe() for s in schedules], [str(s.start) for s in schedules], names
    (['half_life=10ba', 'half_life=100ba'], ['5ba', '5ba'], None)
    >>> schedules_from_options({'half_life': '10ba'}, {}, [{'name': 'fast', 'smoothing': 0.9}])
    Traceback (most recent call last):
    ...
    ValueError: give either profiles or the averaging options (half_life, smoothing, sigma_rel, the BEMA options, uniform), not both; got profiles and half_life='10ba'
    """
    uniform = averaging.get("uniform")
    if uniform is not None and not isinstance(uniform, bool):
        raise TypeError(f"uniform must be True or False; got {uniform!r}")
    averaging = {**averaging, "uniform": uniform or None}  # False: not uniform
    lists = {
        k: v
        for k, v in averaging.items()
        if isinstance(v, (list, tuple)) and k in ("half_life", "smoothing", "sigma_rel")
    }
    names: list[str] | None = None
    if profiles is not None:
        given = {k: v for k, v in averaging.items() if v is not None}
        if given:
            raise ValueError(
                "give either profiles or the averaging options (half_life, smoothing, "
                "sigma_rel, the BEMA options, uniform), not both; got "
                f"profiles and {', '.join(f'{k}={v!r}' for k, v in given.items())}"
            )
        if isinstance(profiles, (str, Mapping)) or not isinstance(profiles, (list, tuple)):
            raise TypeError(f"profiles must be a list of mappings; got {profiles!r}")
        if not profiles:
            raise ValueError("profiles must not be empty")
        schedules, names = [], []
        for i, item in enumerate(profiles):
            if not isinstance(item, Mapping):
                raise TypeError(f"profiles[{i}] must be a mapping; got {item!r}")
            unknown = sorted(set(item) - {"name", *SCHEDULE_KEYS})
            if unknown:
                raise ValueError(
                    f"profiles[{i}] has unknown keys {unknown}; allowed: name, "
                    + ", ".join(SCHEDULE_KEYS)
                )
            options = {**shared, **{k: v for k, v in item.items() if k != "name"}}
            if options.get("update_interval") is None:
                options.pop("update_interval", None)
            schedule = Schedule(**options)
            schedules.append(schedule)
            names.append(item.get("name", schedule.averager.default_name()))
    elif lists:
        if len(lists) > 1:
            raise ValueError(
                "only one of half_life, smoothing and sigma_rel may be a list (one EMA per "
                f"element); got lists for {sorted(lists)}; use profiles=[...] to mix them"
            )
        ((key, values),) = lists.items()
        if not values:
            raise ValueError(f"{key} must not be an empty list")
        others = {k: v for k, v in averaging.items() if k != key and v is not None}
        if others:
            raise ValueError(
                f"give exactly one of half_life, smoothing or sigma_rel; got {key}={values!r} "
                f"and {', '.join(f'{k}={v!r}' for k, v in others.items())}"
            )
        schedules = [Schedule(**{key: v}, **shared) for v in values]
        default_names = [sch.averager.default_name() for sch in schedules]
        twice = sorted({n for n in default_names if default_names.count(n) > 1})
        if twice:
            raise ValueError(
                f"{key}={values!r}: two EMAs share the name {twice[0]!r} (a repeated "
                "value, or values that print alike); give each a name with "
                f"profiles=[{{'name': 'a', {key!r}: ...}}, ...]"
            )
    else:
        schedules = [Schedule(**averaging, **shared)]  # type: ignore[arg-type]
    return schedules, names
