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

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ema_callbacks.schedule import Clock, Schedule, ScheduleState
from ema_callbacks.time_strings import TimeUnit
from ema_callbacks.weights import BUFFER_POLICIES, NONFINITE_POLICIES, EMAWeights, _as_dtype

__all__ = [
    "EMAController",
    "FINAL_WEIGHTS",
    "STATE_FORMAT",
    "STATE_VERSION",
]

STATE_FORMAT = "ema_callbacks"
STATE_VERSION = 1
FINAL_WEIGHTS = ("ema", "training")


class EMAController:
    """Owns a :class:`Schedule`, its state and the :class:`EMAWeights`; reacts to events.

    Args:
        schedule: when to update and with which smoothing.
        include, exclude, trainable_only, buffers, dtype, device, nonfinite, stream: passed to
            :class:`~ema_callbacks.weights.EMAWeights` (validated here, at construction).
        final_weights: which weights the model holds after ``fit_end``: ``'ema'`` (default)
            or ``'training'``.
        eval_with_ema: swap the EMA in for evaluation (default True).
        train_with_ema_weights: after every update, copy the EMA into the training weights
            (Composer's experimental option; the model then trains on the average).
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
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
    ) -> None:
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a Schedule; got {type(schedule).__name__}")
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
        if device is not None:
            try:
                torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"device must be a torch device like 'cpu' or 'cuda:0'; got {device!r}"
                ) from err

        self.schedule = schedule
        self.state = ScheduleState()
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
        self.train_with_ema_weights = train_with_ema_weights
        self.weights: EMAWeights | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        self._pending_training: dict[str, torch.Tensor] | None = None
        self._final_swap = False

    @classmethod
    def create(
        cls,
        half_life: str | float | None = None,
        smoothing: float | None = None,
        sigma_rel: float | None = None,
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
    ) -> EMAController:
        """Build a controller from the plain options every adapter exposes (all validated
        here, at construction).

        >>> EMAController.create(half_life='50ba', buffers='copy').schedule.describe()
        'half_life=50ba'
        """
        schedule = Schedule(
            half_life=half_life,
            smoothing=smoothing,
            sigma_rel=sigma_rel,
            update_interval=update_interval,
            start=start,
            warmup=warmup,
            warmup_gamma=warmup_gamma,
            warmup_power=warmup_power,
            rampup_ratio=rampup_ratio,
        )
        return cls(
            schedule,
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
            train_with_ema_weights=train_with_ema_weights,
        )

    # -- properties -----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the EMA has been initialised (only then is it ever swapped in)."""
        return self.state.started

    @property
    def num_updates(self) -> int:
        return self.state.num_updates

    @property
    def num_skipped(self) -> int:
        return self.state.num_skipped

    @property
    def smoothing(self) -> float | None:
        """The smoothing (beta) of the last update."""
        return self.state.smoothing

    @property
    def weights_active(self) -> str:
        """``'ema'`` while the EMA weights are in the model, ``'training'`` otherwise."""
        return "ema" if self.weights is not None and self.weights.is_swapped else "training"

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging: updates, skipped updates, last smoothing."""
        out = {"num_updates": float(self.num_updates), "num_skipped": float(self.num_skipped)}
        if self.smoothing is not None:
            out["smoothing"] = float(self.smoothing)
        return out

    def check_clock(self, clock: Clock, hint: str = "") -> None:
        """Raise ``ValueError`` if ``clock`` lacks a unit the schedule needs."""
        for unit in sorted(self.schedule.units, key=lambda u: u.value):
            if clock.get(unit) is None:
                what = {
                    TimeUnit.SAMPLE: "samples",
                    TimeUnit.TOKEN: "tokens",
                    TimeUnit.DURATION: "the planned length of the run",
                    TimeUnit.EPOCH: "epochs",
                    TimeUnit.BATCH: "optimizer steps",
                }[unit]
                raise ValueError(
                    f"the EMA schedule ({self.schedule.describe()}, update_interval="
                    f"'{self.schedule.update_interval}', start='{self.schedule.start}') uses "
                    f"'{unit.value}' but {what} are not counted here"
                    + (f"; {hint}" if hint else "")
                )

    # -- events ---------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> EMAWeights:
        """Build the shadow from ``model`` (or re-bind it), applying any loaded state."""
        if self.weights is None:
            self.weights = EMAWeights(model, **self.weights_kwargs)
        elif not self.weights.is_swapped:
            self.weights.bind(model)
        if self._pending is not None:
            self.weights.load_state_dict(self._pending)
            self._pending = None
        if self._pending_training is not None:
            self.weights.load_training_(self._pending_training)
            self._pending_training = None
        return self.weights

    def fit_start(self, model: nn.Module, clock: Clock | None = None, hint: str = "") -> None:
        if clock is not None:
            self.check_clock(clock, hint)
        if self.weights is not None and self.weights.is_swapped:
            self.weights.swap_out()
        self._final_swap = False
        self.setup(model)

    def batch_end(self, model: nn.Module, clock: Clock) -> bool:
        """One optimizer step done. Returns True if the EMA was updated."""
        return self._maybe_update(model, clock)

    def epoch_end(self, model: nn.Module, clock: Clock) -> bool:
        """An epoch ended. Returns True if the EMA was updated."""
        return self._maybe_update(model, clock)

    def _maybe_update(self, model: nn.Module, clock: Clock) -> bool:
        update = self.schedule.due(clock, self.state)
        if update is None:
            return False
        weights = self.setup(model) if self.weights is None else self.weights
        if weights.is_swapped:
            weights.swap_out()
        if not weights.update_(update.weight, model):
            self.schedule.skip(self.state)
            warnings.warn(
                "EMA update skipped: the model's weights hold NaN or Inf "
                f"({self.state.num_skipped} skipped so far); the EMA keeps its last finite value",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        self.schedule.commit(clock, self.state, update)
        if self.train_with_ema_weights and not update.initialise:
            weights.copy_to(model)
        return True

    def eval_start(self, model: nn.Module) -> None:
        if self.eval_with_ema and self.started and self.weights is not None:
            self.weights.swap_in(model)

    def eval_end(self, model: nn.Module | None = None) -> None:
        if self.weights is not None and not self._final_swap:
            self.weights.swap_out()

    def train_start(self, model: nn.Module | None = None) -> None:
        """Training weights in (a training step is about to run)."""
        self._final_swap = False
        if self.weights is not None:
            self.weights.swap_out()

    def fit_end(self, model: nn.Module) -> None:
        if self.weights is None:
            return
        if self.final_weights == "ema" and self.started:
            self.weights.swap_in(model)
            self._final_swap = True
        else:
            self.weights.swap_out()

    def exception(self, model: nn.Module | None = None) -> None:
        """Training weights back in, whatever state the run was in."""
        self._final_swap = False
        if self.weights is not None:
            self.weights.swap_out()

    @contextmanager
    def ema_weights(self, model: nn.Module) -> Iterator[None]:
        """EMA weights in for the block (if started), previous weights back afterwards."""
        weights = self.setup(model) if self.weights is None else self.weights
        was = weights.is_swapped
        if self.started:
            weights.swap_in(model)
        try:
            yield
        finally:
            if not was:
                weights.swap_out()

    # -- state ----------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        weights = {
            k: (str(v) if k in ("dtype", "device") and v is not None else v)
            for k, v in self.weights_kwargs.items()
        }
        return {"schedule": self.schedule.config(), "weights": weights}

    def state_dict(self, training: bool | None = None) -> dict[str, Any]:
        """Versioned and name-keyed: ``{format, version, config, schedule, shadow,
        weights_active}``, plus ``training`` (the training weights) when ``training`` is True,
        or when it is None and the EMA is swapped in (then the model holds the EMA, so a
        checkpoint of the model alone would lose the training weights).

        Tensors are clones, so the result is safe to keep while training goes on.
        """
        shadow: dict[str, torch.Tensor] = {}
        if self.weights is not None:
            shadow = {k: v.detach().clone() for k, v in self.weights.state_dict().items()}
        elif self._pending is not None:
            shadow = dict(self._pending)
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config(),
            "schedule": self.state.to_dict(),
            "shadow": shadow,
            "weights_active": self.weights_active,
        }
        if training is None:
            training = self.weights_active == "ema"
        if training and self.weights is not None:
            state["training"] = {
                k: v.detach().clone() for k, v in self.weights.training_state_dict().items()
            }
        return state

    def reset(self) -> None:
        """Forget the schedule's progress and any state waiting to be applied (a new run);
        the next due update initialises the EMA afresh."""
        self.state = ScheduleState()
        self._pending = None
        self._pending_training = None

    def load_averaged(
        self,
        shadow: Mapping[str, torch.Tensor],
        state: ScheduleState,
        training: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Adopt an average kept by another library (Composer's or Lightning's EMA): its
        tensors by normalised name, the schedule state it implies, and the training weights
        when the model currently holds the average. Names are checked at ``setup``.
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
        """Restore from :meth:`state_dict`. Before the shadow exists the tensors are kept and
        applied at ``fit_start``/``setup``; names are checked then."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                "not an ema_callbacks EMA state (expected a mapping with format="
                f"{STATE_FORMAT!r}); got keys {sorted(state)[:8] if isinstance(state, Mapping) else type(state).__name__}"
            )
        version = int(state.get("version", 0))
        if version > STATE_VERSION:
            raise ValueError(
                f"EMA state version {version} is newer than this ema_callbacks understands "
                f"({STATE_VERSION}); upgrade ema-callbacks"
            )
        self.state = ScheduleState.from_dict(state.get("schedule", {}))
        shadow = dict(state.get("shadow", {}))
        training = state.get("training")
        if self.weights is not None:
            was = self.weights.is_swapped
            if was:
                self.weights.swap_out()
            self.weights.load_state_dict(shadow)
            if training is not None:
                # The model slot of this checkpoint held EMA weights: put training weights back.
                self.weights.load_training_(training)
            elif was:
                self.weights.swap_in()
        else:
            # A state saved before the shadow existed has no tensors: nothing to apply later.
            self._pending = shadow or None
            self._pending_training = None if training is None else dict(training)
