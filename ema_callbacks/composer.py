"""MosaicML Composer adapter: a drop-in replacement for ``composer.algorithms.EMA``.

``Trainer(..., algorithms=[EMA(half_life='50ba')])``. The adapter only translates: Composer
events become :class:`~ema_callbacks.controller.EMAController` events and
``state.timestamp`` becomes a :class:`~ema_callbacks.schedule.Clock`; the averaging, the
schedule and the swapping live in the core.

=========================================  ==================================================
Composer event                             controller
=========================================  ==================================================
``INIT``                                   a reused algorithm: training weights back, fresh
                                           EMA (as Composer does); snapshot folder resolved
``FIT_START``                              ``fit_start`` (clock checked; a loaded checkpoint,
                                           also one from ``composer.algorithms.EMA``, applied)
``BEFORE_DATALOADER``, ``BATCH_START``     ``train_start``: training weights in
``BATCH_END`` / ``EPOCH_END``              ``batch_end`` / ``epoch_end``: update if due; then
                                           ``write_snapshots`` if ``snapshot_due``
``EVAL_START`` .. ``EVAL_END``             EMA weights in .. out (an exception in between
                                           restores the training weights); with several
                                           EMAs (``eval_all``) training weights in, and a
                                           copy of every metric per profile
``EVAL_AFTER_FORWARD`` (``eval_all``)      each profile's forward on the same batch (O(1)
                                           swap in and out); its metric copies are updated
                                           with its outputs only
``PREDICT_START`` .. ``PREDICT_END``       the same, for ``Trainer.predict`` (the primary
                                           EMA, also with several)
``*_CHECKPOINT`` (only if a                primary EMA into the model slot; the training
``CheckpointSaver`` saves now)             weights go into this algorithm's state
``FIT_END``                                ``fit_end``: ``final_weights`` in the model
=========================================  ==================================================

Several EMAs: ``EMA(half_life=['100ba', '1000ba'])`` logs ``metrics/eval/MulticlassAccuracy``
(the training weights) and ``metrics/eval/ema_100ba/MulticlassAccuracy``,
``metrics/eval/ema_1000ba/MulticlassAccuracy`` from one pass over the evaluation data.

>>> ema = EMA(half_life='50ba', ema_start='10ba')
>>> ema
EMA(half_life='50ba', ema_start='10ba')
>>> EMA(smoothing=0.999).controller.schedule.describe()     # the default half-life gives way
'smoothing=0.999'
>>> EMA(half_life='0ba').controller.schedule.describe()     # follows the model, no crash
'half_life=0ba'
>>> EMA(half_life=['100ba', '1000ba']).controller.names       # several EMAs
['ema_100ba', 'ema_1000ba']
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from composer.callbacks import CheckpointSaver
    from composer.core import Algorithm, Event, State, TimeUnit
    from composer.core import Time as ComposerTime
    from composer.core.precision import get_precision_context
    from composer.devices import DeviceMPS
    from composer.loggers import Logger
    from composer.utils import dist, format_name_with_dist
except ImportError as _err:  # pragma: no cover - exercised only without Composer installed
    raise ImportError(
        'ema_callbacks.composer needs MosaicML Composer: pip install "ema-callbacks[composer]"'
    ) from _err

from ema_callbacks.controller import (
    STATE_FORMAT,
    EMAController,
    _snapshot_folder_option,
    first_batches,
    metric_copy,
    metric_profile,
)
from ema_callbacks.fused import (
    ADAPTER_OPTION,
    NO_FUSED,
    FusedUpdate,
    check_adapter_option,
    replace_step,
)
from ema_callbacks.options import document, forwarded
from ema_callbacks.schedule import Clock, half_life_to_smoothing
from ema_callbacks.time_strings import Time
from ema_callbacks.time_strings import TimeUnit as Unit
from ema_callbacks.weights import expand_aliases, normalize_name, unwrap_model

__all__ = ["EMA"]


class _DefaultHalfLife(str):
    """``'1000ba'``, told apart from an explicit ``half_life='1000ba'`` by identity."""

    __slots__ = ()


_DEFAULT_HALF_LIFE = _DefaultHalfLife("1000ba")

_CHECKPOINT_EVENTS = frozenset(
    {Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT, Event.ITERATION_CHECKPOINT}
)
_TRAIN_EVENTS = frozenset({Event.BEFORE_DATALOADER, Event.BATCH_START})
_ALWAYS = frozenset(
    {
        Event.INIT,
        Event.FIT_START,
        Event.BATCH_END,
        Event.EPOCH_END,
        Event.EVAL_START,
        Event.EVAL_END,
        Event.PREDICT_START,
        Event.PREDICT_END,
        Event.FIT_END,
    }
)
_CLOCK_HINT = (
    "Composer counts 'ba', 'ep', 'sp', 'tok' and 'dur'; tokens need a DataSpec whose "
    "get_num_tokens_in_batch counts them (the default only counts dict batches with "
    "'input_ids')"
)


def _to_cpu(outputs: Any) -> Any:
    """Outputs moved to the CPU as Composer moves them before updating metrics on MPS."""
    if isinstance(outputs, torch.Tensor):
        return outputs.cpu()
    if isinstance(outputs, Mapping):
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
    if isinstance(outputs, Sequence) and not isinstance(outputs, str):
        return [v.cpu() if isinstance(v, torch.Tensor) else v for v in outputs]
    return outputs


def _as_time_text(value: Any) -> Any:
    """A Composer ``Time`` (``Time(50, TimeUnit.BATCH)``, ``Time.from_timestring('1ep')``) as
    the time string it stands for; lists (several EMAs) element by element; anything else
    unchanged, for the core to validate."""
    if isinstance(value, ComposerTime):
        number = value.value
        text = repr(number) if isinstance(number, float) else str(number)
        return f"{text}{value.unit.value}"
    if isinstance(value, (list, tuple)):
        return [_as_time_text(v) for v in value]
    return value


_TIME_OPTIONS = ("half_life", "update_interval", "start", "ema_start")


class _EMAParameters:
    """Composer's ``EMAParameters`` as read from this EMA: ``named_parameters_dict`` and
    ``named_buffers_dict`` of the EMA tensors, keyed as ``state.model.named_parameters()``
    and ``named_buffers()`` name them (the live tensors; do not modify)."""

    def __init__(
        self, parameters: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]
    ) -> None:
        self.named_parameters_dict = parameters
        self.named_buffers_dict = buffers

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.named_parameters_dict.items()

    def named_buffers(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self.named_buffers_dict.items()


def _composer_state_to_names(
    stored: Mapping[str, torch.Tensor], names: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Key Composer's tensors (named by ``state.model.named_parameters()``, wrappers and all)
    by this library's normalised names; raise listing the names Composer's state lacks."""
    wanted = set(names)
    out: dict[str, torch.Tensor] = {}
    for key, value in stored.items():
        candidate = key
        while True:
            name = normalize_name(candidate)
            if name in wanted:
                out.setdefault(name, value)
                break
            if not candidate.startswith("module."):
                break
            candidate = candidate[len("module.") :]
    missing = sorted(wanted - set(out))
    if missing:
        raise ValueError(
            "the composer.algorithms.EMA checkpoint does not hold every weight this EMA tracks: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
        )
    return out


class EMA(Algorithm):  # type: ignore[misc]
    """Exponential moving average of the model's weights, as a Composer ``Algorithm``.

    Same arguments, defaults and meaning as ``composer.algorithms.EMA`` first, then this
    library's options, which every entry point shares: documented once, in
    :mod:`ema_callbacks.options` (``docs/options.md``), and listed under Args at import. Evaluation (and ``Trainer.predict``) runs on the EMA weights, training
    on the training weights; checkpoints written by a ``CheckpointSaver`` hold the EMA weights
    in their model slot and the training weights in this algorithm's state.

    Args:
        half_life: time string in ``ba``, ``ep`` (fractions allowed), ``sp``, ``tok`` or
            ``dur``; the smoothing per update comes from the progress actually made since the
            previous update, ``2 ** (-elapsed / half_life)``. ``'0ba'``: the EMA follows the
            model; ``'infba'``: it never moves. Default ``'1000ba'``; it gives way when
            another average (``smoothing``, ``sigma_rel``, the BEMA options, ``uniform``) or
            ``profiles`` is given (Composer raises instead),
            but an explicit ``half_life`` together with ``smoothing`` is an error. A list
            (``['100ba', '1000ba']``) tracks one EMA per element.
        smoothing: a constant decay per update (``0.999``) instead of a half-life; or a list.
        ema_start: progress before which the EMA is not started (not averaged, not used for
            evaluation); it starts as a copy of the weights. Any unit. Default ``'0.0dur'``.
        update_interval: how often to update; default every batch, or every epoch for an
            ``ep`` half-life (Composer's default). Any unit; it need not match the half-life's.
        train_with_ema_weights: after every update, copy the EMA into the training weights
            (the model trains on the average). One EMA only.

    Bad arguments raise ``ValueError``/``TypeError`` here, naming the parameter:

    >>> EMA(half_life='1000ba', smoothing=0.99)
    Traceback (most recent call last):
    ...
    ValueError: give either half_life or smoothing, not both; got half_life='1000ba', smoothing=0.99 (EMA(smoothing=0.99) alone uses the smoothing)
    >>> EMA(ema_start='-1ba')
    Traceback (most recent call last):
    ...
    ValueError: ema_start must not be negative; got '-1ba'

    Several EMAs, named after their schedules or by ``profiles``:

    >>> EMA(half_life=['100ba', '1000ba'])
    EMA(half_life=['100ba', '1000ba'])
    >>> EMA(profiles=[{'name': 'fast', 'half_life': '10ba'},
    ...               {'name': 'edm', 'sigma_rel': 0.05}]).controller.names
    ['fast', 'edm']

    In a trainer (the tests run this for real)::

    >>> from composer import Trainer                                # doctest: +SKIP
    >>> trainer = Trainer(model=model, train_dataloader=train_dl, eval_dataloader=eval_dl,
    ...                   max_duration='1ep', algorithms=[EMA(half_life='50ba')])  # doctest: +SKIP
    >>> trainer.fit()                                               # doctest: +SKIP
    """

    # Over 300 lines: Composer's drop-in surface (its attributes and state layout) and one
    # branch per Composer event (docs/composer.md); the EMA logic itself is the controller's.

    def __init__(
        self,
        half_life: str | float | Sequence[str | float] | None = _DEFAULT_HALF_LIFE,
        smoothing: float | Sequence[float] | None = None,
        ema_start: str = "0.0dur",
        update_interval: str | None = None,
        train_with_ema_weights: bool = False,
        *,
        sigma_rel: float | Sequence[float] | None = None,
        warmup: str = "none",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        rampup_ratio: float | None = None,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        trainable_only: bool = True,
        buffers: str = "average",
        dtype: str | None = None,
        device: str | None = None,
        nonfinite: str = "ignore",
        stream: bool = False,
        fused_optimizer: bool = False,
        final_weights: str = "ema",
        eval_with_ema: bool = True,
        profiles: Sequence[Mapping[str, Any]] | None = None,
        eval_all: bool | None = None,
        snapshot_every: str | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
        snapshot_folder: str | os.PathLike[str] | None = None,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool = False,
        update_bn_batches: int | None = None,
    ) -> None:
        explicit_half_life = half_life is not _DEFAULT_HALF_LIFE
        # Composer Time objects stand for their time strings (Composer's own EMA takes only
        # strings; its attributes hold Time objects, see the properties below).
        half_life = _as_time_text(half_life)
        ema_start = _as_time_text(ema_start)
        update_interval = _as_time_text(update_interval)
        snapshot_every = _as_time_text(snapshot_every)
        if isinstance(profiles, (list, tuple)):
            profiles = [
                {k: _as_time_text(v) if k in _TIME_OPTIONS else v for k, v in p.items()}
                if isinstance(p, Mapping)
                else p
                for p in profiles
            ]
        if half_life is not None and not explicit_half_life:
            half_life = str(half_life)
        if profiles is not None:
            if not explicit_half_life:
                half_life = None  # the default gives way; an explicit one is the core's error
        elif others := {
            k: v
            for k, v in (
                ("smoothing", smoothing),
                ("sigma_rel", sigma_rel),
                ("ema_power", ema_power),
                ("bias_power", bias_power),
                ("lag", lag),
                ("multiplier", multiplier),
                ("min_ema_multiplier", min_ema_multiplier),
                ("uniform", uniform or None),
            )
            if v is not None
        }:
            if explicit_half_life and half_life is not None:
                other, value = next(iter(others.items()))
                raise ValueError(
                    f"give either half_life or {other}, not both; got half_life={half_life!r}, "
                    f"{other}={value!r} (EMA({other}={value!r}) alone uses the {other})"
                )
            half_life = None
        elif half_life is None:
            raise ValueError(
                "half_life is None but no other average (smoothing, sigma_rel, the BEMA options "
                "or uniform) is given: pass a half_life like '1000ba' or a smoothing like 0.999"
            )
        # Validated here so the message names ema_start (the core knows it as start).
        if Time.parse(ema_start, "ema_start").is_infinite:
            raise ValueError(f"ema_start must be finite; got {ema_start!r}")
        folder = _snapshot_folder_option(snapshot_folder, snapshot_every)
        # Composer's names and converted values, then every shared option as given.
        self._options: dict[str, Any] = {
            **forwarded(locals()),
            "half_life": half_life,
            "start": ema_start,
            "update_interval": update_interval,
            "profiles": profiles,
            "snapshot_every": snapshot_every,
        }
        self.controller = EMAController.create(**self._options)
        self._snapshot_folder = folder
        self.fused_optimizer = check_adapter_option(self.controller, fused_optimizer)
        counted = {Unit.SAMPLE, Unit.TOKEN}
        if fused_optimizer and any(counted & p.schedule.units for p in self.controller.profiles):
            raise ValueError(
                f"{ADAPTER_OPTION} updates inside optimizer.step(), before Composer counts the "
                "batch's samples and tokens (summed over the ranks after the step), so the "
                f"schedule's 'sp'/'tok' times are not known there: give them in 'ba' or 'ep', or "
                f"{NO_FUSED}"
            )
        #: graphs compiled by the fused optimizer step so far (``fused_optimizer``)
        self.fused_compilations = 0
        self._unfuse: Any = None
        self._shown = {
            "half_life": half_life if explicit_half_life else None,
            "smoothing": smoothing,
            "ema_start": None if ema_start == "0.0dur" else ema_start,
            "update_interval": update_interval,
            "train_with_ema_weights": train_with_ema_weights or None,
            "sigma_rel": sigma_rel,
            "profiles": profiles,
            "eval_all": eval_all,
            "snapshot_every": snapshot_every,
            "snapshot_dtype": None if snapshot_dtype == "float16" else snapshot_dtype,
            "snapshot_keep": snapshot_keep,
            "snapshot_folder": self._snapshot_folder,
            "fused_optimizer": fused_optimizer or None,
        }
        self._composer_state: dict[str, Any] | None = None
        self._pinned: str | None = None  # the profile get_ema_model put in, kept across evals
        self._held: str | None = None  # the profile in the model when an eval_all eval began
        self._evaluating_all = False  # an eval_all evaluation is running
        self._outputs: dict[str, Any] = {}  # each profile's outputs for the current batch
        self._routed: nn.Module | None = None  # the model whose update_metric is routed
        self._snapshot_dir: Path | None = None
        self._guarded: list[Any] = []  # callbacks whose run_event guards a checkpoint event

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._shown.items() if v is not None)
        return f"EMA({args})"

    # -- composer.algorithms.EMA's public attributes (read-only) ----------------------------

    @property
    def half_life(self) -> ComposerTime | None:
        """The primary EMA's half-life as a Composer ``Time`` (None with ``smoothing`` or
        ``sigma_rel``; Composer's attribute is missing then).

        >>> EMA(half_life='50ba').half_life
        Time(50, TimeUnit.BATCH)
        """
        half_life = self.controller.schedule.half_life
        return None if half_life is None else ComposerTime.from_timestring(str(half_life))

    @property
    def smoothing(self) -> float | None:
        """Composer's per-update smoothing: ``smoothing``, or ``2 ** (-update_interval /
        half_life)`` when both are in the same unit (then every update at a fixed interval uses
        exactly it; the smoothing of each update comes from the progress actually elapsed);
        None where no constant exists (``sigma_rel``, or units that differ).

        >>> EMA(half_life='10ba').smoothing == 2 ** (-1 / 10)
        True
        """
        schedule = self.controller.schedule
        if schedule.smoothing is not None:
            return schedule.smoothing
        half_life, interval = schedule.half_life, schedule.update_interval
        if half_life is None or half_life.unit is not interval.unit:
            return None
        return half_life_to_smoothing(float(half_life.value), float(interval.value))

    @property
    def ema_start(self) -> ComposerTime:
        """When the (primary) EMA starts, as a Composer ``Time``.

        >>> EMA(ema_start='10ba').ema_start
        Time(10, TimeUnit.BATCH)
        """
        return ComposerTime.from_timestring(str(self.controller.schedule.start))

    @property
    def update_interval(self) -> ComposerTime:
        """How often the (primary) EMA updates, as a Composer ``Time``.

        >>> EMA(half_life='2ep').update_interval
        Time(1, TimeUnit.EPOCH)
        """
        return ComposerTime.from_timestring(str(self.controller.schedule.update_interval))

    @property
    def ema_started(self) -> bool:
        """Whether the (primary) EMA has started (Composer's ``ema_started``)."""
        return self.controller.started

    @property
    def ema_weights_active(self) -> bool:
        """Whether the model holds EMA weights now (Composer's ``ema_weights_active``)."""
        return self.controller.weights_active == "ema"

    @property
    def ema_model(self) -> _EMAParameters | None:
        """The (primary) EMA as Composer's ``EMAParameters``: ``named_parameters_dict`` and
        ``named_buffers_dict`` keyed by the trained model's names; None before the EMA has
        started. Unlike Composer's, it holds the EMA weights also while they are swapped
        into the model (Composer's then holds the training weights).

        >>> EMA(half_life='5ba').ema_model is None
        True
        """
        weights = self.controller.weights
        if weights is None or not self.controller.started:
            return None
        shadow = weights.state_dict()
        parameters: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        for entry in weights._entries:
            (parameters if entry.is_param else buffers)[entry.model_name] = shadow[entry.name]
        return _EMAParameters(parameters, buffers)

    # -- clock ------------------------------------------------------------------------------

    @staticmethod
    def _clock(state: State, ahead: int = 0) -> Clock:
        """Composer's progress as a :class:`Clock`: optimizer steps, epochs (fractional while
        the epoch length is known), samples, tokens and the fraction of ``max_duration`` done
        (fractional epochs too when ``max_duration`` is in epochs). ``ahead=1``: as it will be
        once this batch is done (during its optimizer step, for ``fused_optimizer``), its
        samples and tokens not counted yet."""
        ts = state.timestamp
        batch = int(ts.batch.value) + ahead
        epoch = float(ts.epoch.value)
        length = state.dataloader_len
        if length is not None and int(length) > 0:
            epoch += min(1.0, (int(ts.batch_in_epoch) + ahead) / int(length))
        duration: float | None = None
        max_duration = state.max_duration
        if max_duration is not None and float(max_duration.value) > 0:
            if max_duration.unit == TimeUnit.EPOCH:
                duration = epoch / float(max_duration.value)
            elif max_duration.unit == TimeUnit.BATCH:
                duration = batch / max_duration.value  # as Composer's Time divides
            else:
                elapsed = state.get_elapsed_duration()
                duration = None if elapsed is None else float(elapsed.value)
        return Clock(
            batch=batch,
            epoch=epoch,
            sample=int(ts.sample.value),
            token=int(ts.token.value),
            duration=duration,
        )

    # -- events -----------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event in _ALWAYS:
            return True
        if event == Event.EVAL_AFTER_FORWARD:
            return self._evaluating_all
        if event in _TRAIN_EVENTS:
            return self.controller.weights_active == "ema"
        if event in _CHECKPOINT_EVENTS:
            return self.controller.started and self._saving_now(event, state)
        return False

    @staticmethod
    def _saving_now(event: Event, state: State) -> bool:
        """Whether a ``CheckpointSaver`` writes a checkpoint at this event (its own test)."""
        for callback in state.callbacks:
            if isinstance(callback, CheckpointSaver) and callable(callback.save_interval):
                last = getattr(callback, "last_checkpoint_batch", None)
                if callback.save_interval(state, event) and last != state.timestamp.batch:
                    return True
        return False

    @property
    def _eval_all(self) -> bool:
        """Whether evaluations cover the training weights and every profile."""
        return self.controller.eval_all and self.controller.eval_with_ema

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = state.model
        controller = self.controller
        if self._guarded and event not in _CHECKPOINT_EVENTS:
            self._unguard_checkpoint()
        if event == Event.EVAL_AFTER_FORWARD:
            self._forward_profiles(state)
        elif event in _TRAIN_EVENTS:
            self._pinned = None
            controller.train_start(model)
        elif event == Event.BATCH_END:
            clock = self._checked_clock(state)
            # (with fused_optimizer the optimizer's step did the update)
            if self._unfuse is None and controller.batch_end(model, clock):
                self._pinned = None
            self._maybe_snapshot(state, clock)
        elif event == Event.EPOCH_END:
            clock = self._checked_clock(state)
            if controller.epoch_end(model, clock):
                self._pinned = None
            self._maybe_snapshot(state, clock)
            logger.log_metrics({f"ema/{k}": v for k, v in controller.metrics().items()})
        elif event == Event.EVAL_START and self._eval_all:
            self._resolve(state)
            self._add_profile_metrics(state)
            self._held = controller.active_profile
            controller.train_start(model)  # the trainer's own metrics: the training weights
            self._route(state)
            self._evaluating_all = True
            self._guard(model)
        elif event in (Event.EVAL_START, Event.PREDICT_START):
            self._resolve(state)
            controller.eval_start(model)
            if self._eval_all and controller.started and controller.active_profile is None:
                self._swap_in(model, controller.primary.name)  # predict: the primary EMA
            self._guard(model)
        elif event in (Event.EVAL_END, Event.PREDICT_END):
            self._end_eval(model)
            controller.eval_end(model)
            back = self._held if self._held is not None else self._pinned
            self._held = None
            if back is not None:
                self._swap_in(model, back)
        elif event in _CHECKPOINT_EVENTS:
            # the checkpoint's model slot: the EMA as it is (a BatchNorm recomputation here
            # would make the average depend on when checkpoints are written)
            self._swap_in(model, controller.primary.name, refresh_bn=False)
            self._guard_checkpoint(state)
        elif event == Event.FIT_START:
            self._pinned = None
            self._resolve(state)
            controller.fit_start(model, self._clock(state), hint=_CLOCK_HINT)
            if controller.update_bn_batches is not None:
                controller.bn_source = lambda: self._bn_source(state)
            if controller.snapshot_schedule is not None and self._snapshot_dir is None:
                self._snapshot_dir = self._resolve_snapshot_dir(state)
            if self._snapshot_dir is not None and dist.get_global_rank() == 0:
                # After any checkpoint load: a resumed run may add to its own snapshots.
                controller.check_snapshot_folder(self._snapshot_dir)
            self._unfuse_step()
            if self.fused_optimizer:
                self._fuse(state)
        elif event == Event.FIT_END:
            self._unfuse_step()
            controller.fit_end(model)
        elif event == Event.INIT:
            # A reused algorithm instance: hand the old model its training weights back and
            # start afresh, as composer.algorithms.EMA does at INIT.
            self._end_eval(None)
            self._unfuse_step()
            controller.exception()
            self.controller = EMAController.create(**self._options)
            self._composer_state = None
            self._pinned = self._held = None
            self._snapshot_dir = None
            if self.controller.snapshot_schedule is not None:
                self._snapshot_dir = self._resolve_snapshot_dir(state)

    # -- fused optimizer step ---------------------------------------------------------------

    def _fuse(self, state: State) -> None:
        """``fused_optimizer=True``: the optimizer's ``step`` (which the Trainer calls with its
        micro-batches' closure, or after them) runs one compiled function doing the step and
        the updates due at the clock ``BATCH_END`` will see."""
        max_duration = state.max_duration
        if (
            Unit.DURATION in self.controller.units
            and max_duration is not None
            and max_duration.unit in (TimeUnit.SAMPLE, TimeUnit.TOKEN)
        ):
            raise ValueError(
                f"{ADAPTER_OPTION}: the schedule's 'dur' times are fractions of max_duration="
                f"'{max_duration}', counted in samples or tokens after the optimizer step; give "
                f"max_duration in 'ba' or 'ep', or {NO_FUSED}"
            )
        optimizer = state.optimizers[0]  # (Composer's Trainer takes exactly one)
        fused = FusedUpdate(self.controller, optimizer, option=ADAPTER_OPTION, instead=NO_FUSED)

        def step() -> None:
            if fused(state.model, self._clock(state, ahead=1)):
                self._pinned = None
            self.fused_compilations = fused.compilations

        self._unfuse = replace_step(optimizer, step)

    def _unfuse_step(self) -> None:
        if self._unfuse is not None:
            self._unfuse()
        self._unfuse = None

    def _checked_clock(self, state: State) -> Clock:
        clock = self._clock(state)
        if (
            clock.token == 0
            and clock.batch > 0
            and any(u.value == "tok" for u in self.controller.units)
        ):
            raise ValueError(
                "the EMA schedule counts tokens ('tok') but Composer counted none; " + _CLOCK_HINT
            )
        return clock

    def _swap_in(self, model: nn.Module, name: str, refresh_bn: bool = True) -> None:
        """Profile ``name`` in (if it has started), any other profile out."""
        self.controller.activate(model, name, refresh_bn=refresh_bn)

    @staticmethod
    def _bn_source(state: State) -> tuple[Any, Any] | None:
        """The training batches and Composer's way to feed one (``update_bn_batches``)."""
        loader = state.train_dataloader
        if loader is None:
            return None
        return first_batches(loader), lambda m, batch: m(state.device.batch_to_device(batch))

    # -- several EMAs in one evaluation -----------------------------------------------------

    @staticmethod
    def _composer_model(model: nn.Module) -> nn.Module:
        """The ``ComposerModel`` whose ``eval_forward``/``update_metric`` the trainer calls
        (``state.model`` less a ``DistributedDataParallel`` wrapper)."""
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.module
        return model

    def _add_profile_metrics(self, state: State) -> None:
        """A copy of every metric of the evaluator being run, per profile, named
        ``<profile>/<metric>``, in the dict the trainer's loop updates, computes and logs."""
        metrics = state.eval_metrics.get(state.dataloader_label)
        if metrics is None:
            return
        names = self.controller.names
        for key in [k for k, m in metrics.items() if metric_profile(m) not in (None, *names)]:
            del metrics[key]  # a copy made for profiles this algorithm no longer has
        raw = {k: m for k, m in metrics.items() if metric_profile(m) is None}
        for name in names:
            for key, metric in raw.items():
                copy_key = f"{name}/{key}"
                existing = metrics.get(copy_key)
                if existing is not None:
                    if metric_profile(existing) != name:
                        raise ValueError(
                            f"the evaluator {state.dataloader_label!r} already has a metric named "
                            f"{copy_key!r}, the name of EMA profile {name!r}'s copy of {key!r}; "
                            "rename the metric or the profile (profiles=[{'name': ...}])"
                        )
                    continue
                metrics[copy_key] = metric_copy(metric, name)

    def _route(self, state: State) -> None:
        """Make the model's ``update_metric`` hand each profile's metric copies that profile's
        outputs (the trainer calls it with the training weights' outputs for every metric)."""
        target = self._composer_model(state.model)
        previous = target.__dict__.get("update_metric")
        if previous is not None and getattr(previous, "_ema_route", False):
            self._routed = target
            return
        original: Any = target.update_metric

        def update_metric(batch: Any, outputs: Any, metric: Any) -> Any:
            name = metric_profile(metric)
            if name is not None:
                if name not in self._outputs:
                    raise RuntimeError(
                        f"no outputs of EMA profile {name!r} for this batch: update_metric was "
                        "called outside the trainer's evaluation loop"
                    )
                outputs = self._outputs[name]
            return original(batch, outputs, metric)

        update_metric._ema_route = True  # type: ignore[attr-defined]
        update_metric._ema_previous = previous  # type: ignore[attr-defined]
        target.__dict__["update_metric"] = update_metric
        self._routed = target

    def _end_eval(self, model: nn.Module | None) -> None:
        """Remove what an evaluation installed (guard, routing, outputs)."""
        if model is not None:
            self._unguard(model)
        routed, self._routed = self._routed, None
        if routed is not None:
            hook = routed.__dict__.get("update_metric")
            if hook is not None and getattr(hook, "_ema_route", False):
                del routed.__dict__["update_metric"]
                if hook._ema_previous is not None:  # the model's own instance attribute
                    routed.__dict__["update_metric"] = hook._ema_previous
        self._evaluating_all = False
        self._outputs = {}

    def _forward_profiles(self, state: State) -> None:
        """Each profile's outputs for the batch the trainer just ran forward on with the
        training weights: the profile's EMA swapped in (O(1)) and back out around its
        ``eval_forward``, in the trainer's evaluation precision. A profile that has not started
        holds the training weights, so it shares the trainer's outputs."""
        controller = self.controller
        model = state.model
        forward: Any = self._composer_model(model).eval_forward
        outputs: dict[str, Any] = {}
        for p in controller.profiles:
            if p.started:
                with (
                    controller.ema_weights(model, p.name),
                    get_precision_context(
                        state.precision, state.precision_config, fp8_autocast_enabled=False
                    ),
                ):
                    out = forward(state.batch)
            else:
                out = state.outputs
            # Composer hands metrics CPU outputs on MPS (see Trainer._eval_loop).
            outputs[p.name] = _to_cpu(out) if isinstance(state.device, DeviceMPS) else out
        self._outputs = outputs

    # -- post-hoc snapshots -----------------------------------------------------------------

    def _resolve_snapshot_dir(self, state: State) -> Path:
        """``snapshot_folder``, or ``<the CheckpointSaver's folder>/ema_snapshots``."""
        if self._snapshot_folder is not None:
            return Path(format_name_with_dist(self._snapshot_folder, state.run_name))
        every = str(self.controller.snapshot_schedule.update_interval)  # type: ignore[union-attr]
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        if saver is None:
            raise ValueError(
                f"EMA(snapshot_every={every!r}) writes post-hoc EMA snapshots into "
                "<save_folder>/ema_snapshots, but this Trainer has no save_folder; pass "
                "save_folder to the Trainer or snapshot_folder to EMA"
            )
        if getattr(saver, "remote_uploader", None) is not None:
            raise ValueError(
                f"EMA(snapshot_every={every!r}): the Trainer's save_folder is remote and the "
                "snapshots are not uploaded; pass a local snapshot_folder to EMA"
            )
        return Path(format_name_with_dist(saver.folder, state.run_name)) / "ema_snapshots"

    def _maybe_snapshot(self, state: State, clock: Clock) -> None:
        controller = self.controller
        if controller.snapshot_schedule is None or not controller.snapshot_due(clock):
            return
        if self._snapshot_dir is None:
            self._snapshot_dir = self._resolve_snapshot_dir(state)
        # Every rank calls it (sharded EMAs are gathered); global rank 0 writes.
        controller.write_snapshots(self._snapshot_dir, clock, write=dist.get_global_rank() == 0)

    # -- exceptions -------------------------------------------------------------------------

    def _guard(self, model: nn.Module) -> None:
        """Composer has no exception event, but it leaves evaluation and prediction through
        ``model_eval_mode``, whose ``finally`` calls ``model.train(mode)``. While the EMA is in
        for evaluation (or several EMAs are being evaluated), that call made with an exception
        in flight means evaluation failed: training weights back (the controller's
        ``exception`` event) and the evaluation's hooks removed."""
        if (
            self.controller.weights_active != "ema" and not self._evaluating_all
        ) or "train" in model.__dict__:
            return

        def train(mode: bool = True) -> nn.Module:
            if sys.exc_info()[1] is not None:
                self._end_eval(model)
                self._pinned = self._held = None
                self.controller.exception(model)
            return type(model).train(model, mode)

        train._ema_guard = True  # type: ignore[attr-defined]
        model.__dict__["train"] = train

    def _guard_checkpoint(self, state: State) -> None:
        """While the EMA is in the model slot for a checkpoint, a guard on every callback's
        ``run_event`` (an instance attribute, as for ``model.train``): an exception raised by
        a callback at the checkpoint event (the ``CheckpointSaver`` writing, say) puts the
        training weights back before it leaves the trainer. Removed at the next event this
        algorithm sees."""
        for callback in state.callbacks:
            if "run_event" in callback.__dict__:
                continue
            original = callback.run_event

            def run_event(
                event: Event, st: State, logger: Logger, _original: Any = original
            ) -> Any:
                try:
                    return _original(event, st, logger)
                except BaseException:
                    if event in _CHECKPOINT_EVENTS:
                        self._unguard_checkpoint()
                        self._pinned = self._held = None
                        self.controller.exception(st.model)
                    raise

            run_event._ema_guard = True  # type: ignore[attr-defined]
            callback.__dict__["run_event"] = run_event
            self._guarded.append(callback)

    def _unguard_checkpoint(self) -> None:
        guarded, self._guarded = self._guarded, []
        for callback in guarded:
            hook = callback.__dict__.get("run_event")
            if hook is not None and getattr(hook, "_ema_guard", False):
                del callback.__dict__["run_event"]

    @staticmethod
    def _unguard(model: nn.Module) -> None:
        train = model.__dict__.get("train")
        if train is not None and getattr(train, "_ema_guard", False):
            del model.__dict__["train"]

    # -- using the EMA ----------------------------------------------------------------------

    def _bound(self, model: nn.Module) -> bool:
        weights = self.controller.weights
        return (
            weights is not None
            and weights.bound_model is not None
            and (unwrap_model(weights.bound_model) is unwrap_model(model))
        )

    def get_ema_model(self, model: nn.Module, profile: str | None = None) -> nn.Module:
        """``model`` holding the EMA weights (Composer's method, without its errors): those of
        ``profile`` (a name from ``controller.names``; default the primary EMA).

        The trained model itself gets them by an O(1) swap, kept until training resumes (or
        :meth:`get_training_model`), also across ``trainer.eval()`` and ``trainer.predict()``;
        any other model with the same weight names gets a copy. Before the EMA has started
        the weights are the training weights.

        >>> import torch
        >>> ema = EMA(half_life='1ba')
        >>> model = torch.nn.Linear(2, 1)
        >>> ema.get_ema_model(model) is model
        True
        >>> EMA(half_life=['1ba', '9ba']).get_ema_model(model, 'ema_9ba') is model
        True
        """
        controller = self.controller
        target = controller.profile(profile)
        if target.weights is None:
            controller.setup(model)
        assert target.weights is not None
        if self._bound(model):
            if target.started:
                self._swap_in(model, target.name)
                self._pinned = target.name
            return model
        if target.started:
            self._copy_into(model, target.weights.state_dict(aliases=True))
        else:
            training = target.weights.training_state_dict()
            self._copy_into(model, expand_aliases(training, target.weights.aliases))
        return model

    def get_training_model(self, model: nn.Module) -> nn.Module:
        """``model`` holding the training weights (Composer's method, without its errors).

        >>> import torch
        >>> ema = EMA(half_life='1ba')
        >>> model = torch.nn.Linear(2, 1)
        >>> ema.get_training_model(model) is model
        True
        """
        controller = self.controller
        self._pinned = None
        if controller.weights is None:
            controller.setup(model)
        assert controller.weights is not None
        if self._bound(model):
            controller.train_start(model)  # also ends fit_end's final EMA swap
        else:
            training = controller.weights.training_state_dict()
            self._copy_into(model, expand_aliases(training, controller.weights.aliases))
        return model

    @staticmethod
    def _copy_into(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
        root = unwrap_model(model)
        state = {
            k: tensors[normalize_name(k)] for k in root.state_dict() if normalize_name(k) in tensors
        }
        missing = sorted(set(tensors) - {normalize_name(k) for k in state})
        if missing:
            raise ValueError(f"the model lacks weights the EMA holds: {missing[:10]}")
        root.load_state_dict(state, strict=False)

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Composer's ``{'repr': ...}`` plus the controller's versioned state; it holds the
        training weights whenever the model holds the EMA (e.g. at checkpoint events).

        >>> state = EMA(half_life='5ba').state_dict()
        >>> state['repr'], state['format'], state['weights_active']
        ("EMA(half_life='5ba')", 'ema_callbacks', 'training')
        """
        if self._composer_state is not None:  # loaded from composer.algorithms.EMA, not applied yet
            return dict(self._composer_state)
        state = super().state_dict()
        state.update(self.controller.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        """Load this algorithm's state or one written by ``composer.algorithms.EMA``
        (``{ema_model: {named_parameters_dict, named_buffers_dict}, ema_weights_active,
        ema_started}``, converted when the model is at hand, at ``FIT_START``/``EVAL_START``).

        >>> ema = EMA(half_life='5ba')
        >>> ema.load_state_dict(EMA(half_life='5ba').state_dict())
        >>> ema.load_state_dict({'ema_model': {}, 'ema_started': False})   # Composer's format
        >>> ema.load_state_dict({'step': 3})
        Traceback (most recent call last):
        ...
        ValueError: not an EMA state from ema_callbacks or composer.algorithms.EMA (>= 0.13); got keys ['step']
        """
        if isinstance(state, Mapping) and state.get("format") == STATE_FORMAT:
            self._composer_state = None
            self.controller.load_state_dict(state)
        elif isinstance(state, Mapping) and isinstance(state.get("ema_model"), Mapping):
            self._composer_state = dict(state)
        else:
            keys = sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(
                "not an EMA state from ema_callbacks or composer.algorithms.EMA (>= 0.13); "
                f"got keys {keys}"
            )

    def _resolve(self, state: State) -> None:
        """Apply loaded state now that the model is at hand."""
        controller = self.controller
        if self._composer_state is not None:
            self._load_composer_state(state)
        elif controller.weights is None and controller.started:
            controller.setup(state.model)

    def _load_composer_state(self, state: State) -> None:
        loaded, self._composer_state = self._composer_state, None
        assert loaded is not None
        if not loaded.get("ema_started", False):
            return  # Composer's storage holds the INIT-time copy: nothing averaged yet
        weights = self.controller.setup(state.model)
        ema_model = loaded["ema_model"]
        stored = {
            **dict(ema_model.get("named_buffers_dict", {})),
            **dict(ema_model.get("named_parameters_dict", {})),
        }
        stored = _composer_state_to_names(stored, weights.names)
        if loaded.get("ema_weights_active", False):
            # The model slot held the EMA (it is in the model now); Composer's storage holds
            # the training weights.
            shadow = {k: v.detach().clone() for k, v in weights.training_state_dict().items()}
            training: dict[str, torch.Tensor] | None = stored
        else:
            shadow, training = stored, None
        # Composer does not store when it last updated: it updates on every interval multiple.
        resumed = self.controller.schedule.resumed_state(self._clock(state))
        self.controller.load_averaged(shadow, resumed, training)


document(
    EMA,
    skip=("half_life", "smoothing", "update_interval", "train_with_ema_weights"),
    notes={
        "snapshot_folder": "Composer's ``{run_name}`` and ``{rank}`` are allowed; default "
        "``<the trainer's save_folder>/ema_snapshots``.",
        "update_bn_batches": "Each training batch goes through the ``ComposerModel`` "
        "(``model(batch)``) as in training.",
        "eval_all": "The trainer's metrics (``metrics/eval/Accuracy``) are then the training "
        "weights'; each EMA gets a copy of every metric named ``<profile>/<metric>`` in "
        "``state.eval_metrics[label]``, logged as ``metrics/<label>/<profile>/<metric>`` and "
        "usable by callbacks such as ``EarlyStopper(monitor='ema_1000ba/Accuracy', "
        "dataloader_label='eval')``. One pass over the data: every batch goes through the "
        "model once per EMA.",
    },
)
