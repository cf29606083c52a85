"""The event-driven controller: every EMA decision, once, for every trainer.

Adapters translate their trainer's hooks into these events and its counters into a
:class:`~ema_callbacks.schedule.Clock`:

==================  ===========================================================================
``fit_start``       build (or re-bind) the shadow, load pending state, training weights in
``batch_end``       one optimizer step done: update if due
``epoch_end``       an epoch ended: update if due
``eval_start``      EMA weights in (only once the EMA has started)
``eval_end``        training weights back
``checkpoint_save`` the state to store (:meth:`EMAController.state_dict`)
``checkpoint_load`` restore it (:meth:`EMAController.load_state_dict`)
``fit_end``         leave the EMA (default) or the training weights in the model
``exception``       training weights back, whatever happened
==================  ===========================================================================

Several EMAs (*profiles*) can be tracked at once, e.g. ``half_life=['100ba', '1000ba']``: each
profile has its own schedule and shadow, and the profiles due at the same step are updated in
the same multi-tensor calls (:func:`~ema_callbacks.weights.update_together_`). The first
profile is the *primary* one: the one swapped in for evaluation when only one can be, kept at
the end of training, and exported by default. With several profiles, evaluation covers the
training weights and every profile (``eval_all``): adapters run the trainer's evaluation on the
training weights and once more per profile, with metric names prefixed by the profile name
(``ema_1000ba/accuracy``).

>>> import torch
>>> from ema_callbacks.schedule import Clock, Schedule
>>> model = torch.nn.Linear(2, 2)
>>> ema = EMAController(Schedule(half_life='10ba'))
>>> ema.fit_start(model, Clock(batch=0))
>>> ema.batch_end(model, Clock(batch=1))          # initialises the EMA as a copy
True
>>> ema.started, ema.num_updates
(True, 0)
>>> ema.eval_start(model)
>>> ema.weights_active
'ema'
>>> ema.eval_end(model)
>>> ema.weights_active
'training'
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ema_callbacks import _state
from ema_callbacks._state import STATE_FORMAT, STATE_VERSION
from ema_callbacks.averagers import SELECTING_OPTIONS
from ema_callbacks.posthoc import SnapshotWriter
from ema_callbacks.schedule import (
    SCHEDULE_KEYS,
    Clock,
    Schedule,
    ScheduleState,
    Update,
    schedules_from_options,
)
from ema_callbacks.time_strings import Time, TimeUnit
from ema_callbacks.weights import (
    BUFFER_POLICIES,
    NONFINITE_POLICIES,
    EMAWeights,
    _as_dtype,
    update_together_,
)

__all__ = [
    "EMAController",
    "EMAProfile",
    "FINAL_WEIGHTS",
    "STATE_FORMAT",
    "STATE_VERSION",
    "metric_copy",
    "metric_profile",
    "profile_name",
]

FINAL_WEIGHTS = ("ema", "training")
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _snapshot_folder_option(
    snapshot_folder: str | os.PathLike[str] | None, snapshot_every: object
) -> str | None:
    """The adapters' ``snapshot_folder`` option, checked at construction: a path, and only
    with ``snapshot_every``. Returns it as a string (None stays None)."""
    if snapshot_folder is None:
        return None
    if not isinstance(snapshot_folder, (str, os.PathLike)):
        raise TypeError(f"snapshot_folder must be a folder path or None; got {snapshot_folder!r}")
    folder = os.fspath(snapshot_folder)
    if snapshot_every is None:
        raise ValueError(
            f"snapshot_folder={folder!r} is only used with snapshot_every (the interval of "
            "post-hoc EMA snapshots, e.g. snapshot_every='1000ba')"
        )
    return folder


def _check_device(device: object) -> None:
    """The shadow ``device`` option, checked at construction: a device this machine has.

    CUDA is asked through ``torch.cuda.is_available()`` and ``device_count()``, which do not
    initialise it; other accelerators by allocating an empty tensor there.
    """
    if device is None:
        return
    if not isinstance(device, (str, torch.device)):
        raise TypeError(
            f"device must be a torch device like 'cpu' or 'cuda:0', or None; got {device!r}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(
            f"device must be a torch device like 'cpu' or 'cuda:0'; got {device!r}"
        ) from err
    if dev.type == "cpu":
        return
    if dev.type == "meta":
        raise ValueError(
            f"device must hold real tensors (an EMA on 'meta' has no values); got {device!r}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"device={device!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, NotImplementedError, ValueError) as err:
        raise ValueError(
            f"device={device!r} is not usable here: this torch cannot allocate tensors on "
            f"{dev.type!r}"
        ) from err


def first_batches(loader: Any) -> Any:
    """The batches :meth:`EMAController.refresh_bn` reads from a training loader: for a
    ``DataLoader`` over a map-style dataset, a new single-process loader over the same dataset,
    batch size and collate function, in order (the first batches of the training set, the same
    every time; the training loader's iterator, workers and sampler are left alone); any other
    iterable as it is.

    >>> [b.tolist() for b in first_batches(torch.utils.data.DataLoader(range(5), batch_size=2, shuffle=True))]
    [[0, 1], [2, 3], [4]]
    """
    from torch.utils.data import DataLoader, IterableDataset

    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    batch_size = loader.batch_size
    if batch_size is None:
        batch_size = getattr(loader.batch_sampler, "batch_size", None) or 1
    return DataLoader(
        loader.dataset, batch_size=batch_size, shuffle=False, collate_fn=loader.collate_fn
    )


# The attribute that marks a metric object as an EMA profile's copy (its value: the profile).
_METRIC_PROFILE = "_ema_callbacks_profile"


def metric_copy(metric: Any, profile: str) -> Any:
    """EMA profile ``profile``'s own copy of a trainer's metric object (a torchmetrics
    ``Metric`` or ``MetricCollection``, a Composer metric; anything ``deepcopy`` copies):
    reset, and marked with the profile (:func:`metric_profile`). An adapter evaluating several
    EMAs updates each profile's copies with that profile's outputs, so the training weights'
    metric state stays its own.

    >>> class Total:
    ...     def __init__(self): self.value = 0
    ...     def reset(self): self.value = 0
    >>> metric = Total(); metric.value = 5
    >>> twin = metric_copy(metric, 'ema_fast')
    >>> twin.value, metric_profile(twin), metric_profile(metric)
    (0, 'ema_fast', None)
    """
    twin = copy.deepcopy(metric)
    if callable(getattr(twin, "reset", None)):
        twin.reset()
    setattr(twin, _METRIC_PROFILE, profile)
    return twin


def metric_profile(metric: Any) -> str | None:
    """The profile whose copy (:func:`metric_copy`) ``metric`` is; None for the trainer's own."""
    return getattr(metric, _METRIC_PROFILE, None)


def profile_name(schedule: Schedule) -> str:
    """The default name of a profile, used as its metric prefix.

    >>> profile_name(Schedule(half_life='1000ba')), profile_name(Schedule(smoothing=0.999))
    ('ema_1000ba', 'ema_0.999')
    >>> profile_name(Schedule(sigma_rel=0.05)), profile_name(Schedule(uniform=True))
    ('ema_sigma_rel0.05', 'uniform')
    """
    return schedule.averager.default_name()


@dataclass
class EMAProfile:
    """One EMA tracked by an :class:`EMAController`: its name, schedule, schedule state and
    shadow weights (built at ``fit_start``).

    >>> ctrl = EMAController.create(half_life=['100ba', '1000ba'])
    >>> [p.name for p in ctrl.profiles]
    ['ema_100ba', 'ema_1000ba']
    """

    name: str
    schedule: Schedule
    state: ScheduleState = field(default_factory=ScheduleState)
    weights: EMAWeights | None = None
    pending: dict[str, torch.Tensor] | None = None
    pending_extra: dict[str, dict[str, torch.Tensor]] | None = None
    # the schedule progress the BatchNorm statistics were last recomputed at (update_bn_batches)
    bn_mark: tuple[Any, ...] | None = None

    @property
    def started(self) -> bool:
        return self.state.started


class EMAController:
    """Owns one or more EMA profiles (a :class:`Schedule`, its state and the
    :class:`EMAWeights` each); reacts to events.

    Args:
        schedule: when to update and with which smoothing; a list of schedules tracks one EMA
            per schedule (the first is the primary one).
        names: one name per schedule (default :func:`profile_name`: ``'ema_1000ba'``); names are
            metric prefixes, so letters, digits, ``_``, ``.`` and ``-`` only, and unique.
        include, exclude, trainable_only, buffers, dtype, device, nonfinite, stream: passed to
            :class:`~ema_callbacks.weights.EMAWeights` (validated here, at construction); shared
            by every profile.
        final_weights: which weights the model holds after ``fit_end``: ``'ema'`` (default, the
            primary profile) or ``'training'``.
        eval_with_ema: swap the EMA in for evaluation (default True).
        eval_all: evaluate the training weights and every profile in each evaluation, with the
            profiles' metrics prefixed by their names (default: True with several profiles,
            False with one, which keeps the trainer's metric names for the EMA).
        train_with_ema_weights: after every update, copy the EMA into the training weights
            (Composer's experimental option; the model then trains on the average). One
            profile only.
        snapshot_every: write post-hoc EMA snapshots of every ``sigma_rel`` profile on this
            interval (a time string, ``'1000ba'``); see :mod:`ema_callbacks.posthoc`. Adapters
            write them into the trainer's checkpoint folder.
        snapshot_dtype: floating dtype of the snapshot files (``'float16'``, as EDM2).
        snapshot_keep: keep only the latest this many snapshot times (default: all of them,
            which post-hoc reconstruction wants).
        update_bn_batches: recompute the BatchNorm statistics of each average over this many
            training batches before it is evaluated and at the end of training (the adapters
            call :meth:`activate`, which calls :meth:`refresh_bn`); needs ``buffers='average'`` or ``'copy'``.
    """

    # Over 300 lines on purpose: this is the one object every adapter talks to (events, the
    # evaluation plan via activate/ema_weights, snapshots, state), so each trainer needs only
    # its clock and hook map. What it delegates: the averaging rule (averagers), the schedule
    # and its parsing from options (schedule), the tensors (weights, _update, _sharding), the
    # snapshot files (posthoc.SnapshotWriter), the serialization (_state), the option table
    # (options). Most of its length is validation messages and docstrings with examples.

    _units: frozenset[TimeUnit] | None = None  # see units

    def __init__(
        self,
        schedule: Schedule | Sequence[Schedule],
        *,
        names: Sequence[str] | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        trainable_only: bool = True,
        buffers: str = "average",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        nonfinite: str = "ignore",
        stream: bool = False,
        final_weights: str = "ema",
        eval_with_ema: bool = True,
        eval_all: bool | None = None,
        train_with_ema_weights: bool = False,
        snapshot_every: str | Time | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
        update_bn_batches: int | None = None,
    ) -> None:
        schedules = [schedule] if isinstance(schedule, Schedule) else schedule
        if not isinstance(schedules, (list, tuple)) or not schedules:
            raise TypeError(
                f"schedule must be a Schedule or a non-empty list of them; got {schedule!r}"
            )
        for s in schedules:
            if not isinstance(s, Schedule):
                raise TypeError(f"schedule must be a Schedule; got {type(s).__name__}")
        if names is None:
            names = [profile_name(s) for s in schedules]
        elif isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise TypeError(f"names must be a list of strings; got {names!r}")
        if len(names) != len(schedules):
            raise ValueError(
                f"names must give one name per schedule; got {len(names)} names for "
                f"{len(schedules)} schedules"
            )
        for n in names:
            if not isinstance(n, str) or not _NAME.fullmatch(n):
                raise ValueError(
                    "profile names must be non-empty and use only letters, digits, '_', '.' "
                    f"and '-' (they prefix metric names); got {n!r}"
                )
        dupes = sorted({n for n in names if list(names).count(n) > 1})
        if dupes:
            raise ValueError(
                f"two EMA profiles share the name {dupes[0]!r}; give each profile a 'name' "
                "(profiles=[{'name': 'fast', 'half_life': '100ba'}, ...])"
            )
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers must be one of {BUFFER_POLICIES}; got {buffers!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}")
        if final_weights not in FINAL_WEIGHTS:
            raise ValueError(f"final_weights must be one of {FINAL_WEIGHTS}; got {final_weights!r}")
        for flag, value in (
            ("stream", stream),
            ("trainable_only", trainable_only),
            ("eval_with_ema", eval_with_ema),
            ("train_with_ema_weights", train_with_ema_weights),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False; got {value!r}")
        if eval_all is not None and not isinstance(eval_all, bool):
            raise TypeError(f"eval_all must be True, False or None; got {eval_all!r}")
        if eval_all and not eval_with_ema:
            raise ValueError("eval_all=True evaluates the EMAs, so it needs eval_with_ema=True")
        if train_with_ema_weights and len(schedules) > 1:
            raise ValueError(
                "train_with_ema_weights copies the EMA into the training weights, which needs a "
                f"single EMA; got {len(schedules)} profiles"
            )
        for name, patterns in (("include", include), ("exclude", exclude)):
            if patterns is not None and not (
                isinstance(patterns, str)
                or (
                    isinstance(patterns, (list, tuple))
                    and all(isinstance(p, str) for p in patterns)
                )
            ):
                raise TypeError(
                    f"{name} must be a glob pattern or a list of them; got {patterns!r}"
                )
        _as_dtype(dtype)
        _check_device(device)
        #: The post-hoc snapshots' schedule, files and run id (None without ``snapshot_every``).
        self.snapshots: SnapshotWriter | None = None
        if snapshot_every is None:
            SnapshotWriter.check_options(snapshot_dtype, snapshot_keep)  # checked all the same
        else:
            self.snapshots = SnapshotWriter(snapshot_every, snapshot_dtype, snapshot_keep)
            if not any(s.sigma_rel is not None for s in schedules):
                raise ValueError(
                    f"snapshot_every={str(snapshot_every)!r} writes post-hoc EMA snapshots of "
                    "the sigma_rel profiles, but there is none; track some, e.g. "
                    "sigma_rel=[0.05, 0.10]"
                )
        self.snapshot_dtype = snapshot_dtype
        self.snapshot_keep = snapshot_keep

        if update_bn_batches is not None:
            if (
                isinstance(update_bn_batches, bool)
                or not isinstance(update_bn_batches, int)
                or update_bn_batches < 1
            ):
                raise ValueError(
                    "update_bn_batches must be a positive integer (training batches) or None; "
                    f"got {update_bn_batches!r}"
                )
            if buffers == "ignore":
                raise ValueError(
                    f"update_bn_batches={update_bn_batches} recomputes the BatchNorm statistics "
                    "the average holds, but buffers='ignore' keeps none: use buffers='average' "
                    "or 'copy'"
                )
            if not eval_with_ema and final_weights != "ema":
                raise ValueError(
                    f"update_bn_batches={update_bn_batches} recomputes statistics for the "
                    "average, which is never in the model here (eval_with_ema=False, "
                    "final_weights='training')"
                )
        self.update_bn_batches = update_bn_batches
        # Set by the adapters (update_bn_batches): a function giving the training batches and
        # how the model eats one, or None where there are none (an evaluation without fit).
        self.bn_source: Any = None
        self._bn_warned = False
        self.profiles = [EMAProfile(n, s) for n, s in zip(names, schedules, strict=True)]
        self.weights_kwargs: dict[str, Any] = {
            "include": include,
            "exclude": exclude,
            "trainable_only": trainable_only,
            "buffers": buffers,
            "dtype": dtype,
            "device": device,
            "nonfinite": nonfinite,
            "stream": stream,
        }
        self.final_weights = final_weights
        self.eval_with_ema = eval_with_ema
        self.eval_all = (eval_with_ema and len(self.profiles) > 1) if eval_all is None else eval_all
        self.train_with_ema_weights = train_with_ema_weights
        self._pending_training: dict[str, torch.Tensor] | None = None
        self._loaded_aliases: dict[str, str] = {}
        self._final_swap = False
        self._active: EMAProfile | None = None

    @classmethod
    def create(
        cls,
        half_life: str | float | Sequence[str | float] | None = None,
        smoothing: float | Sequence[float] | None = None,
        sigma_rel: float | Sequence[float] | None = None,
        update_interval: str | None = None,
        start: str = "0ba",
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        rampup_ratio: float | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        trainable_only: bool = True,
        buffers: str = "average",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        nonfinite: str = "ignore",
        stream: bool = False,
        final_weights: str = "ema",
        eval_with_ema: bool = True,
        train_with_ema_weights: bool = False,
        profiles: Sequence[Mapping[str, Any]] | None = None,
        eval_all: bool | None = None,
        snapshot_every: str | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool = False,
        update_bn_batches: int | None = None,
    ) -> EMAController:
        """Build a controller from the plain options every adapter exposes (all validated
        here, at construction).

        The average: ``half_life``, ``smoothing``, ``sigma_rel``, the BEMA options
        (``ema_power``, ``bias_power``, ``lag``, ``multiplier``, ``min_ema_multiplier``) or
        ``uniform=True`` (:mod:`ema_callbacks.averagers`). Several EMAs: a list for one of
        ``half_life``, ``smoothing`` or ``sigma_rel`` (the other schedule options are shared),
        or ``profiles``, a list of mappings that each override the shared schedule options and
        may carry a ``name``.

        >>> EMAController.create(half_life='50ba', buffers='copy').schedule.describe()
        'half_life=50ba'
        >>> EMAController.create(sigma_rel=[0.05, 0.10]).names
        ['ema_sigma_rel0.05', 'ema_sigma_rel0.1']
        >>> EMAController.create(profiles=[{'name': 'fast', 'half_life': '10ba'},
        ...                                {'name': 'slow', 'smoothing': 0.999}]).names
        ['fast', 'slow']
        """
        given = locals()
        schedules, names = schedules_from_options(
            {k: given[k] for k in SELECTING_OPTIONS},
            {k: given[k] for k in SCHEDULE_KEYS if k not in SELECTING_OPTIONS},
            profiles,
        )
        return cls(
            schedules,
            names=names,
            include=include,
            exclude=exclude,
            trainable_only=trainable_only,
            buffers=buffers,
            dtype=dtype,
            device=device,
            nonfinite=nonfinite,
            stream=stream,
            final_weights=final_weights,
            eval_with_ema=eval_with_ema,
            eval_all=eval_all,
            train_with_ema_weights=train_with_ema_weights,
            snapshot_every=snapshot_every,
            snapshot_dtype=snapshot_dtype,
            snapshot_keep=snapshot_keep,
            update_bn_batches=update_bn_batches,
        )

    # -- properties -----------------------------------------------------------------------

    @property
    def primary(self) -> EMAProfile:
        """The first profile: swapped in when only one can be, kept at the end, exported."""
        return self.profiles[0]

    @property
    def schedule(self) -> Schedule:
        """The primary profile's schedule."""
        return self.primary.schedule

    @property
    def state(self) -> ScheduleState:
        """The primary profile's schedule state."""
        return self.primary.state

    @state.setter
    def state(self, value: ScheduleState) -> None:
        self.primary.state = value

    @property
    def weights(self) -> EMAWeights | None:
        """The primary profile's shadow (None before ``fit_start``)."""
        return self.primary.weights

    @property
    def names(self) -> list[str]:
        """The profile names, primary first."""
        return [p.name for p in self.profiles]

    def profile(self, name: str | None = None) -> EMAProfile:
        """The profile called ``name`` (the primary one for None)."""
        if name is None:
            return self.primary
        for p in self.profiles:
            if p.name == name:
                return p
        raise KeyError(f"no EMA profile named {name!r}; the profiles are {self.names}")

    @property
    def units(self) -> frozenset[TimeUnit]:
        """Every unit the clock must count, for every profile and the snapshot interval."""
        if self._units is None:  # fixed at construction; asked on every step
            units = frozenset().union(*(p.schedule.units for p in self.profiles))
            if self.snapshot_schedule is not None:
                units |= self.snapshot_schedule.units
            self._units = units
        return self._units

    @property
    def started(self) -> bool:
        """Whether the (primary) EMA has been initialised (only then is it ever swapped in)."""
        return self.state.started

    @property
    def num_updates(self) -> int:
        return self.state.num_updates

    @property
    def num_skipped(self) -> int:
        return self.state.num_skipped

    @property
    def smoothing(self) -> float | None:
        """The smoothing (beta) of the primary profile's last update."""
        return self.state.smoothing

    @property
    def weights_active(self) -> str:
        """``'ema'`` while EMA weights (of any profile) are in the model, ``'training'``
        otherwise."""
        return "ema" if self.active_profile is not None else "training"

    @property
    def aliases(self) -> dict[str, str]:
        """``{other name: tracked name}`` of the model's tied tensors (every profile tracks the
        same tensors); before the shadows exist, those of the last loaded state."""
        if self.weights is not None:
            return self.weights.aliases
        return dict(self._loaded_aliases)

    @property
    def active_profile(self) -> str | None:
        """The name of the profile whose weights are in the model, or None."""
        for p in self.profiles:
            if p.weights is not None and p.weights.is_swapped:
                return p.name
        return None

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging: updates, skipped updates, last smoothing (the primary
        profile's unprefixed, the others' prefixed with their names)."""
        out: dict[str, float] = {}
        for i, p in enumerate(self.profiles):
            prefix = "" if i == 0 else f"{p.name}/"
            out[f"{prefix}num_updates"] = float(p.state.num_updates)
            out[f"{prefix}num_skipped"] = float(p.state.num_skipped)
            if p.state.smoothing is not None:
                out[f"{prefix}smoothing"] = float(p.state.smoothing)
        return out

    def check_clock(self, clock: Clock, hint: str = "") -> None:
        """Raise ``ValueError`` if ``clock`` lacks a unit a schedule needs."""
        for unit in sorted(self.units, key=lambda u: u.value):
            if clock.get(unit) is None:
                what = {
                    TimeUnit.SAMPLE: "samples",
                    TimeUnit.TOKEN: "tokens",
                    TimeUnit.DURATION: "the planned length of the run",
                    TimeUnit.EPOCH: "epochs",
                    TimeUnit.BATCH: "optimizer steps",
                }[unit]
                s = next(
                    (p.schedule for p in self.profiles if unit in p.schedule.units),
                    self.snapshot_schedule or self.schedule,
                )
                raise ValueError(
                    f"the EMA schedule ({s.describe()}, update_interval="
                    f"'{s.update_interval}', start='{s.start}') uses "
                    f"'{unit.value}' but {what} are not counted here"
                    + (f"; {hint}" if hint else "")
                )

    # -- events ---------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> EMAWeights:
        """Build the shadows from ``model`` (or re-bind them), applying any loaded state.
        Returns the primary profile's weights."""
        for p in self.profiles:
            if p.weights is None:
                averager = p.schedule.averager
                p.weights = EMAWeights(
                    model, **self.weights_kwargs, extra=averager.buffers, running=averager.running
                )
            elif not p.weights.is_swapped:
                p.weights.bind(model)
            if p.pending is not None:
                p.weights.load_state_dict(p.pending)
                p.pending = None
            if p.pending_extra is not None:
                p.weights.load_extra_state_dict(p.pending_extra)
                p.pending_extra = None
            if self.update_bn_batches is not None:
                self._check_bn(p.weights)
        if self._pending_training is not None:
            self._swap_out_all()
            assert self.primary.weights is not None
            self.primary.weights.load_training_(self._pending_training)
            self._pending_training = None
        assert self.primary.weights is not None
        return self.primary.weights

    def _check_bn(self, weights: EMAWeights) -> None:
        """``update_bn_batches`` needs BatchNorm statistics the average holds, unsharded."""
        from torch.nn.modules.batchnorm import _BatchNorm

        model = weights.bound_model
        assert model is not None
        if not any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules()):
            raise ValueError(
                f"update_bn_batches={self.update_bn_batches} recomputes BatchNorm statistics, but "
                "the model has no BatchNorm layer that tracks them; leave it unset"
            )
        if weights.is_sharded or any(
            getattr(p, "ds_tensor", None) is not None for p in model.parameters()
        ):
            raise ValueError(
                f"update_bn_batches={self.update_bn_batches} is not supported with sharded "
                "weights (FSDP2, DeepSpeed ZeRO-3): the recomputation runs forwards on the "
                "average outside the training step; leave it unset"
            )

    def _swap_out_all(self) -> None:
        for p in self.profiles:
            if p.weights is not None and p.weights._swapped:  # (swap_out's no_grad costs)
                p.weights.swap_out()

    def fit_start(self, model: nn.Module, clock: Clock | None = None, hint: str = "") -> None:
        if clock is not None:
            self.check_clock(clock, hint)
        self._swap_out_all()
        self._final_swap = False
        self.setup(model)

    def batch_end(self, model: nn.Module, clock: Clock) -> bool:
        """One optimizer step done. Returns True if an EMA was updated."""
        return self._maybe_update(model, clock)

    def epoch_end(self, model: nn.Module, clock: Clock) -> bool:
        """An epoch ended. Returns True if an EMA was updated."""
        return self._maybe_update(model, clock)

    def _maybe_update(self, model: nn.Module, clock: Clock) -> bool:
        due = self.prepare_update(model, clock)
        if not due:
            return False
        weights = [p.weights for p, _ in due if p.weights is not None]
        if not update_together_(weights, [u.weight for _, u in due], model):
            for p, _ in due:
                p.schedule.skip(p.state)
            warnings.warn(
                "EMA update skipped: the model's weights hold NaN or Inf "
                f"({self.state.num_skipped} skipped so far); the EMA keeps its last finite value",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        self.finish_update(model, clock, due)
        return True

    def prepare_update(self, model: nn.Module, clock: Clock) -> list[tuple[EMAProfile, Update]]:
        """The updates due at ``clock`` (each profile's, in order), with the shadows built and
        every EMA swapped out so they can be applied; empty when none is due. The tensors are
        then updated (:func:`~ema_callbacks.weights.update_together_`, or the fused optimizer
        step) and :meth:`finish_update` records them."""
        due: list[tuple[EMAProfile, Update]] = []
        for p in self.profiles:
            u = p.schedule.due(clock, p.state)
            if u is not None:
                due.append((p, u))
        if not due:
            return due
        if any(p.weights is None for p, _ in due):
            self.setup(model)
        self._swap_out_all()
        return due

    def finish_update(
        self, model: nn.Module, clock: Clock, due: list[tuple[EMAProfile, Update]]
    ) -> None:
        """After the tensors of :meth:`prepare_update`'s updates were lerped: the evaluated
        weights of averages that form them (BEMA), the schedules' progress, and
        ``train_with_ema_weights``."""
        for p, u in due:
            averager = p.schedule.averager
            if averager.buffers:  # the evaluated weights are formed from the running average
                assert p.weights is not None
                groups = p.weights.averaged_groups()
                if u.initialise:
                    averager.initialise_(groups)
                else:
                    assert u.step is not None
                    averager.finish_(groups, u.step)
            p.schedule.commit(clock, p.state, u)
        first, update = due[0]
        if self.train_with_ema_weights and not update.initialise:
            assert first.weights is not None
            first.weights.copy_to(model)

    def eval_start(self, model: nn.Module) -> None:
        """The trainer's evaluation begins: the primary EMA in, unless ``eval_all`` (then the
        trainer evaluates the training weights and the adapter each profile with
        :meth:`ema_weights`)."""
        if self.eval_with_ema and not self.eval_all and self.started:
            self.activate(model, self.primary.name)

    def eval_end(self, model: nn.Module | None = None) -> None:
        if not self._final_swap:
            self._swap_out_all()

    def train_start(self, model: nn.Module | None = None) -> None:
        """Training weights in (a training step is about to run)."""
        self._final_swap = False
        self._swap_out_all()

    def fit_end(self, model: nn.Module) -> None:
        if self.weights is None:
            return
        self._swap_out_all()
        if self.final_weights == "ema" and self.started:
            self.activate(model, self.primary.name)
            self._final_swap = True

    def exception(self, model: nn.Module | None = None) -> None:
        """Training weights back in, whatever state the run was in."""
        self._final_swap = False
        self._swap_out_all()

    def activate(
        self, model: nn.Module | None, profile: str | None, *, refresh_bn: bool = True
    ) -> None:
        """The weights of ``profile`` in ``model``, every other profile's out; ``None``, or a
        profile that has not started, means the training weights. With
        ``update_bn_batches``, the profile's BatchNorm statistics are recomputed first (when it
        changed since they last were; ``refresh_bn=False`` skips that, for swaps that are not
        evaluations, such as a checkpoint's model slot). The one way the adapters put weights
        in.

        >>> model = torch.nn.Linear(1, 1)
        >>> ctrl = EMAController.create(half_life=['2ba', '20ba'])
        >>> ctrl.fit_start(model, Clock(batch=0))
        >>> _ = ctrl.batch_end(model, Clock(batch=1))
        >>> ctrl.activate(model, 'ema_20ba'); ctrl.active_profile
        'ema_20ba'
        >>> ctrl.activate(model, None); ctrl.active_profile is None
        True
        """
        target = None if profile is None else self.profile(profile)
        if self.active_profile == (None if target is None else target.name) and (
            target is None or target.started
        ):
            return
        self._swap_out_all()
        if target is None or not target.started:
            return
        if target.weights is None:
            assert model is not None
            self.setup(model)
        assert target.weights is not None
        if refresh_bn:
            self.refresh_bn(target, model)
        target.weights.swap_in(model)

    def refresh_bn(self, profile: EMAProfile, model: nn.Module | None = None) -> bool:
        """Recompute ``profile``'s BatchNorm statistics from :attr:`bn_source` if
        ``update_bn_batches`` is set and the average moved since they last were; returns
        whether it did. The global RNG state is kept (the training run does not change)."""
        if self.update_bn_batches is None or not profile.started or profile.weights is None:
            return False
        mark = (profile.state.num_updates, tuple(sorted(profile.state.last.items())))
        if profile.bn_mark == mark:
            return False
        source = self.bn_source() if self.bn_source is not None else None
        if source is None:
            if not self._bn_warned:
                warnings.warn(
                    f"update_bn_batches={self.update_bn_batches}: no training batches here (an "
                    "evaluation outside training), so the averages keep the BatchNorm "
                    "statistics they hold",
                    UserWarning,
                    stacklevel=3,
                )
                self._bn_warned = True
            return False
        loader, forward = source
        devices = sorted(
            {t.device.index or 0 for t in profile.weights.shadow.values() if t.is_cuda}
        )
        with torch.random.fork_rng(devices=devices):  # update_bn_ swaps in (and back) itself
            profile.weights.update_bn_(
                loader, model, batches=self.update_bn_batches, forward=forward
            )
        profile.bn_mark = mark
        return True

    @contextmanager
    def ema_weights(self, model: nn.Module, profile: str | None = None) -> Iterator[None]:
        """The EMA weights of ``profile`` (default the primary one) in for the block, if it has
        started; the previous weights back afterwards, whatever happens.

        >>> model = torch.nn.Linear(1, 1)
        >>> ctrl = EMAController.create(half_life=['2ba', '20ba'])
        >>> ctrl.fit_start(model, Clock(batch=0))
        >>> _ = ctrl.batch_end(model, Clock(batch=1))
        >>> with ctrl.ema_weights(model, 'ema_20ba'):
        ...     ctrl.active_profile
        'ema_20ba'
        >>> ctrl.active_profile is None
        True
        """
        target = self.profile(profile)
        if target.weights is None:
            self.setup(model)
        assert target.weights is not None
        was = self.active_profile
        if was != target.name:
            self.activate(model, target.name)
        try:
            yield
        finally:
            if was != target.name:
                target.weights.swap_out()
                if was is not None:
                    previous = self.profile(was).weights
                    assert previous is not None
                    previous.swap_in(model)

    # -- post-hoc snapshots ---------------------------------------------------------------

    @property
    def snapshot_schedule(self) -> Schedule | None:
        """When post-hoc snapshots are written (``snapshot_every``), or None."""
        return None if self.snapshots is None else self.snapshots.schedule

    @property
    def snapshot_run(self) -> str | None:
        """The id this run writes into its snapshots' metadata (saved in :meth:`state_dict`,
        so a resumed run is the same run), or None without snapshots."""
        return None if self.snapshots is None else self.snapshots.run

    def snapshot_due(self, clock: Clock) -> bool:
        """Whether a post-hoc snapshot is due at ``clock`` (``snapshot_every`` crossed and
        some ``sigma_rel`` profile started)."""
        return self.snapshots is not None and self.snapshots.due(self.profiles, clock)

    def write_snapshots(
        self, folder: str | Path, clock: Clock, *, write: bool = True
    ) -> list[Path]:
        """Write a snapshot of every started ``sigma_rel`` profile into ``folder`` and record
        the snapshot time (:meth:`SnapshotWriter.write <ema_callbacks.posthoc.SnapshotWriter.write>`:
        sharded EMAs are gathered, a collective every rank calls; ranks with ``write=True``
        write). Returns the paths written."""
        assert self.snapshots is not None, "snapshot_every is not set"
        return self.snapshots.write(self.profiles, folder, clock, write=write)

    def check_snapshot_folder(self, folder: str | Path) -> None:
        """Refuse (``ValueError`` naming the folder and a file) a snapshot folder that holds
        snapshots written by another run: their names would collide with this run's,
        ``snapshot_keep`` could not tell them apart and a post-hoc reconstruction would mix two
        runs. A resumed run is the same run (its id is in :meth:`state_dict`). The adapters
        call this when training starts (after a resume is loaded); :meth:`write_snapshots`
        calls it before its first write into a folder.

        >>> import tempfile, torch
        >>> from ema_callbacks.posthoc import save_snapshot
        >>> folder = tempfile.mkdtemp()
        >>> ctrl = EMAController.create(sigma_rel=0.1, snapshot_every='1ba')
        >>> ctrl.check_snapshot_folder(folder)  # empty: fine
        >>> _ = save_snapshot(folder + '/ema-10ba-sigma_rel0.1.safetensors', {'w': torch.ones(1)},
        ...                   time=10, sigma_rel=0.1, run='0123abcd')
        >>> EMAController.create(sigma_rel=0.1, snapshot_every='1ba').check_snapshot_folder(folder)
        Traceback (most recent call last):
        ...
        ValueError: snapshot folder '...' holds 1 post-hoc EMA snapshot(s) of another run (e.g. ema-10ba-sigma_rel0.1.safetensors, written by run 0123abcd; this run is ...); their names would collide and snapshot_keep and a reconstruction would mix the runs: give this run its own snapshot_folder, or move those files away
        """
        if self.snapshots is not None:
            self.snapshots.check_folder(folder)

    # -- state ----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        weights = {
            k: (str(v) if k in ("dtype", "device") and v is not None else v)
            for k, v in self.weights_kwargs.items()
        }
        out: dict[str, Any] = {"schedule": self.schedule.config(), "weights": weights}
        if len(self.profiles) > 1:
            out["profiles"] = [{"name": p.name, **p.schedule.config()} for p in self.profiles]
        if self.snapshot_schedule is not None:
            out["snapshot_every"] = str(self.snapshot_schedule.update_interval)
        return out

    def state_dict(self, training: bool | None = None) -> dict[str, Any]:
        """Versioned and name-keyed: ``{format, version, config, schedule, shadow,
        weights_active}`` for the primary profile, ``profiles`` (``{name: {schedule, shadow}}``)
        for the others, ``snapshot`` (the post-hoc snapshot clock), ``aliases`` (``{other
        name: tracked name}`` for tied tensors, which are stored once; absent when there are
        none), plus ``training`` (the
        training weights) when ``training`` is True, or when it is None and an EMA is swapped
        in (then the model holds an EMA, so a checkpoint of the model alone would lose the
        training weights).

        Tensors are clones, so the result is safe to keep while training goes on.
        """
        return _state.state_dict(self, training)

    def reset(self) -> None:
        """Forget the schedules' progress and any state waiting to be applied (a new run);
        the next due update initialises the EMAs afresh."""
        for p in self.profiles:
            p.state = ScheduleState()
            p.pending = None
        if self.snapshots is not None:
            self.snapshots.restart()
        self._pending_training = None

    def load_averaged(
        self,
        shadow: Mapping[str, torch.Tensor],
        state: ScheduleState,
        training: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Adopt an average kept by another library (Composer's or Lightning's EMA) as the
        primary profile: its tensors by normalised name, the schedule state it implies, and the
        training weights when the model currently holds the average. Names are checked at
        ``setup``.
        """
        loaded: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "schedule": state.to_dict(),
            "shadow": dict(shadow),
        }
        if training is not None:
            loaded["training"] = dict(training)
        self.load_state_dict(loaded)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`. Before the shadows exist the tensors are kept and
        applied at ``fit_start``/``setup``; names are checked then. The saved profiles must be
        this controller's; a state with one profile (from a single-EMA run or another library)
        loads into the primary profile, and the other profiles start afresh (with a warning).

        A state saved with other schedule options (another half-life, smoothing, unit,
        interval, start or warm-up) loads, and the constructor's options win: the saved EMA
        weights and progress carry on under them, with a ``UserWarning`` naming each option
        that differs, saved and now.

        >>> import warnings
        >>> saved = EMAController.create(half_life='10ba').state_dict()
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter('always')
        ...     EMAController.create(half_life='20ba').load_state_dict(saved)
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        the EMA state being loaded was saved with another schedule (half_life: saved '10ba', now '20ba'): ...
        """
        _state.load_state_dict(self, state)
