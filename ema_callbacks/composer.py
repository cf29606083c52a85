"""MosaicML Composer adapter: a drop-in replacement for ``composer.algorithms.EMA``.

``Trainer(..., algorithms=[EMA(half_life='50ba')])``. The adapter only translates: Composer
events become :class:`~ema_callbacks.controller.EMAController` events and
``state.timestamp`` becomes a :class:`~ema_callbacks.schedule.Clock`; the averaging, the
schedule and the swapping live in the core.

=========================================  ==================================================
Composer event                             controller
=========================================  ==================================================
``INIT``                                   a reused algorithm: training weights back, fresh
                                           EMA (as Composer does)
``FIT_START``                              ``fit_start`` (clock checked; a loaded checkpoint,
                                           also one from ``composer.algorithms.EMA``, applied)
``BEFORE_DATALOADER``, ``BATCH_START``     ``train_start``: training weights in
``BATCH_END`` / ``EPOCH_END``              ``batch_end`` / ``epoch_end``: update if due
``EVAL_START`` .. ``EVAL_END``             EMA weights in .. out (an exception in between
                                           restores the training weights)
``PREDICT_START`` .. ``PREDICT_END``       the same, for ``Trainer.predict``
``*_CHECKPOINT`` (only if a                EMA weights into the model slot; the training
``CheckpointSaver`` saves now)             weights go into this algorithm's state
``FIT_END``                                ``fit_end``: ``final_weights`` in the model
=========================================  ==================================================

>>> ema = EMA(half_life='50ba', ema_start='10ba')
>>> ema
EMA(half_life='50ba', ema_start='10ba')
>>> EMA(smoothing=0.999).controller.schedule.describe()     # the default half-life gives way
'smoothing=0.999'
>>> EMA(half_life='0ba').controller.schedule.describe()     # follows the model, no crash
'half_life=0ba'
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

try:
    from composer.callbacks import CheckpointSaver
    from composer.core import Algorithm, Event, State, TimeUnit
    from composer.loggers import Logger
except ImportError as _err:  # pragma: no cover - exercised only without Composer installed
    raise ImportError(
        'ema_callbacks.composer needs MosaicML Composer: pip install "ema-callbacks[composer]"'
    ) from _err

from ema_callbacks.controller import STATE_FORMAT, EMAController
from ema_callbacks.schedule import Clock
from ema_callbacks.time_strings import Time
from ema_callbacks.weights import normalize_name, unwrap_model

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
    library's options. Evaluation (and ``Trainer.predict``) runs on the EMA weights, training
    on the training weights; checkpoints written by a ``CheckpointSaver`` hold the EMA weights
    in their model slot and the training weights in this algorithm's state.

    Args:
        half_life: time string in ``ba``, ``ep`` (fractions allowed), ``sp``, ``tok`` or
            ``dur``; the smoothing per update comes from the progress actually made since the
            previous update, ``2 ** (-elapsed / half_life)``. ``'0ba'``: the EMA follows the
            model; ``'infba'``: it never moves. Default ``'1000ba'``; it gives way when
            ``smoothing`` or ``sigma_rel`` is given (Composer raises instead), but an explicit
            ``half_life`` together with ``smoothing`` is an error.
        smoothing: a constant decay per update (``0.999``) instead of a half-life.
        ema_start: progress before which the EMA is not started (not averaged, not used for
            evaluation); it starts as a copy of the weights. Any unit. Default ``'0.0dur'``.
        update_interval: how often to update; default every batch, or every epoch for an
            ``ep`` half-life (Composer's default). Any unit; it need not match the half-life's.
        train_with_ema_weights: after every update, copy the EMA into the training weights
            (the model trains on the average).
        sigma_rel: EDM2's power-function EMA with this relative width, instead of a half-life.
        warmup, warmup_gamma, warmup_power, rampup_ratio: warm-ups, see
            :class:`~ema_callbacks.schedule.Schedule` (all off by default).
        include, exclude, trainable_only, buffers, dtype, device, nonfinite: which tensors
            and how, see :class:`~ema_callbacks.weights.EMAWeights` (default: trainable
            parameters and averaged buffers, a float32 shadow for bf16/fp16 weights, updates
            from NaN/Inf weights skipped).
        final_weights: ``'ema'`` (default) or ``'training'``: what the model holds after
            ``fit``.
        eval_with_ema: evaluate and predict with the EMA weights (default True).

    Bad arguments raise ``ValueError``/``TypeError`` here, naming the parameter:

    >>> EMA(half_life='1000ba', smoothing=0.99)
    Traceback (most recent call last):
    ...
    ValueError: give either half_life or smoothing, not both; got half_life='1000ba', smoothing=0.99 (EMA(smoothing=0.99) alone uses the smoothing)
    >>> EMA(ema_start='-1ba')
    Traceback (most recent call last):
    ...
    ValueError: ema_start must not be negative; got '-1ba'

    In a trainer (the tests run this for real)::

    >>> from composer import Trainer                                # doctest: +SKIP
    >>> trainer = Trainer(model=model, train_dataloader=train_dl, eval_dataloader=eval_dl,
    ...                   max_duration='1ep', algorithms=[EMA(half_life='50ba')])  # doctest: +SKIP
    >>> trainer.fit()                                               # doctest: +SKIP
    """

    def __init__(
        self,
        half_life: str | float | None = _DEFAULT_HALF_LIFE,
        smoothing: float | None = None,
        ema_start: str = "0.0dur",
        update_interval: str | None = None,
        train_with_ema_weights: bool = False,
        *,
        sigma_rel: float | None = None,
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
        final_weights: str = "ema",
        eval_with_ema: bool = True,
    ) -> None:
        explicit_half_life = half_life is not _DEFAULT_HALF_LIFE
        if half_life is not None and not explicit_half_life:
            half_life = str(half_life)
        if smoothing is not None or sigma_rel is not None:
            if explicit_half_life and half_life is not None:
                other = "smoothing" if smoothing is not None else "sigma_rel"
                value = smoothing if smoothing is not None else sigma_rel
                raise ValueError(
                    f"give either half_life or {other}, not both; got half_life={half_life!r}, "
                    f"{other}={value!r} (EMA({other}={value!r}) alone uses the {other})"
                )
            half_life = None
        elif half_life is None:
            raise ValueError(
                "half_life is None but neither smoothing nor sigma_rel is given: pass a "
                "half_life like '1000ba' or a smoothing like 0.999"
            )
        if not isinstance(ema_start, Time):
            Time.parse(ema_start, "ema_start")  # validated here so the message names it
        self._options: dict[str, Any] = {
            "half_life": half_life,
            "smoothing": smoothing,
            "sigma_rel": sigma_rel,
            "update_interval": update_interval,
            "start": ema_start,
            "warmup": warmup,
            "warmup_gamma": warmup_gamma,
            "warmup_power": warmup_power,
            "rampup_ratio": rampup_ratio,
            "include": include,
            "exclude": exclude,
            "trainable_only": trainable_only,
            "buffers": buffers,
            "dtype": dtype,
            "device": device,
            "nonfinite": nonfinite,
            "final_weights": final_weights,
            "eval_with_ema": eval_with_ema,
            "train_with_ema_weights": train_with_ema_weights,
        }
        self.controller = EMAController.create(**self._options)
        self._shown = {
            "half_life": half_life if explicit_half_life else None,
            "smoothing": smoothing,
            "ema_start": None if ema_start == "0.0dur" else ema_start,
            "update_interval": update_interval,
            "train_with_ema_weights": train_with_ema_weights or None,
            "sigma_rel": sigma_rel,
        }
        self._composer_state: dict[str, Any] | None = None
        self._pinned = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._shown.items() if v is not None)
        return f"EMA({args})"

    # -- clock ------------------------------------------------------------------------------

    @staticmethod
    def _clock(state: State) -> Clock:
        """Composer's progress as a :class:`Clock`: optimizer steps, epochs (fractional while
        the epoch length is known), samples, tokens and the fraction of ``max_duration`` done
        (fractional epochs too when ``max_duration`` is in epochs)."""
        ts = state.timestamp
        epoch = float(ts.epoch.value)
        length = state.dataloader_len
        if length is not None and int(length) > 0:
            epoch += min(1.0, int(ts.batch_in_epoch) / int(length))
        duration: float | None = None
        max_duration = state.max_duration
        if max_duration is not None and float(max_duration.value) > 0:
            if max_duration.unit == TimeUnit.EPOCH:
                duration = epoch / float(max_duration.value)
            else:
                elapsed = state.get_elapsed_duration()
                duration = None if elapsed is None else float(elapsed.value)
        return Clock(
            batch=int(ts.batch.value),
            epoch=epoch,
            sample=int(ts.sample.value),
            token=int(ts.token.value),
            duration=duration,
        )

    # -- events -----------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event in _ALWAYS:
            return True
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

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model = state.model
        controller = self.controller
        if event in _TRAIN_EVENTS:
            self._pinned = False
            controller.train_start(model)
        elif event == Event.BATCH_END:
            if controller.batch_end(model, self._checked_clock(state)):
                self._pinned = False
        elif event == Event.EPOCH_END:
            if controller.epoch_end(model, self._checked_clock(state)):
                self._pinned = False
            logger.log_metrics({f"ema/{k}": v for k, v in controller.metrics().items()})
        elif event in (Event.EVAL_START, Event.PREDICT_START):
            self._resolve(state)
            controller.eval_start(model)
            self._guard(model)
        elif event in (Event.EVAL_END, Event.PREDICT_END):
            self._unguard(model)
            controller.eval_end(model)
            if self._pinned and controller.weights is not None:
                controller.weights.swap_in(model)
        elif event in _CHECKPOINT_EVENTS:
            if controller.weights is not None:
                controller.weights.swap_in(model)
        elif event == Event.FIT_START:
            self._pinned = False
            self._resolve(state)
            controller.fit_start(model, self._clock(state), hint=_CLOCK_HINT)
        elif event == Event.FIT_END:
            controller.fit_end(model)
        elif event == Event.INIT:
            # A reused algorithm instance: hand the old model its training weights back and
            # start afresh, as composer.algorithms.EMA does at INIT.
            controller.exception()
            self.controller = EMAController.create(**self._options)
            self._composer_state = None

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

    # -- exceptions -------------------------------------------------------------------------

    def _guard(self, model: nn.Module) -> None:
        """Composer has no exception event, but it leaves evaluation and prediction through
        ``model_eval_mode``, whose ``finally`` calls ``model.train(mode)``. While the EMA is in
        for evaluation, that call made with an exception in flight means evaluation failed:
        training weights back (the controller's ``exception`` event)."""
        if self.controller.weights_active != "ema" or "train" in model.__dict__:
            return

        def train(mode: bool = True) -> nn.Module:
            if sys.exc_info()[1] is not None:
                self._unguard(model)
                self._pinned = False
                self.controller.exception(model)
            return type(model).train(model, mode)

        train._ema_guard = True  # type: ignore[attr-defined]
        model.__dict__["train"] = train

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

    def get_ema_model(self, model: nn.Module) -> nn.Module:
        """``model`` holding the EMA weights (Composer's method, without its errors).

        The trained model itself gets them by an O(1) swap, kept until training resumes (or
        :meth:`get_training_model`); any other model with the same weight names gets a copy.
        Before the EMA has started the weights are the training weights.

        >>> import torch
        >>> ema = EMA(half_life='1ba')
        >>> model = torch.nn.Linear(2, 1)
        >>> ema.get_ema_model(model) is model
        True
        """
        controller = self.controller
        if controller.weights is None:
            controller.setup(model)
        assert controller.weights is not None
        if self._bound(model):
            if controller.started:
                controller.weights.swap_in()
                self._pinned = True
            return model
        if controller.started:
            self._copy_into(model, controller.weights.state_dict())
        else:
            self._copy_into(model, controller.weights.training_state_dict())
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
        self._pinned = False
        if controller.weights is None:
            controller.setup(model)
        assert controller.weights is not None
        if self._bound(model):
            controller.train_start(model)  # also ends fit_end's final EMA swap
        else:
            self._copy_into(model, controller.weights.training_state_dict())
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
