"""The plain-loop API: an EMA for users without a trainer.

>>> import torch
>>> from ema_callbacks import EMA
>>> model = torch.nn.Linear(4, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> ema = EMA(model, half_life='50ba')
>>> for _ in range(3):
...     loss = model(torch.randn(8, 4)).pow(2).mean()
...     opt.zero_grad(); loss.backward(); opt.step()
...     _ = ema.step(model)
>>> ema.num_updates                       # step 1 initialised the EMA, steps 2-3 averaged
2
>>> with ema.swapped(model):               # EMA weights in, training weights back after
...     _ = model(torch.randn(2, 4))
>>> sd = ema.state_dict(); ema.load_state_dict(sd)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ema_callbacks.controller import EMAController, _snapshot_folder_option
from ema_callbacks.options import document, forwarded
from ema_callbacks.schedule import Clock
from ema_callbacks.time_strings import Time, TimeUnit

__all__ = [
    "EMA",
]


def _count(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single number; got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return value


class EMA:
    """An exponential moving average of a model's weights, for a hand-written training loop.

    Call :meth:`step` after every optimizer step and :meth:`end_epoch` after every epoch; use
    :meth:`swapped` to evaluate with the EMA weights, or :meth:`functional_call` to evaluate
    them without touching the model.

    The options every entry point shares (the average, its schedule, the tensors averaged,
    the post-hoc snapshots) are documented once, in :mod:`ema_callbacks.options`
    (``docs/options.md``), and listed under Args at import. The average is one of
    ``half_life`` (default ``'1000ba'``), ``smoothing``, ``sigma_rel`` (EDM2), the BEMA
    options or ``uniform=True`` (SWA); a list for one of the first three, or ``profiles``,
    tracks several EMAs at once (the first is the primary one: ``shadow``, ``swapped()``; the
    others by name, ``swapped(profile='ema_1000ba')``). Snapshots need ``snapshot_folder``:
    ``EMA(model, sigma_rel=[0.05, 0.10], snapshot_every='1000ba',
    snapshot_folder='run/ema_snapshots')``.

    Args:
        model: the model being trained.
        steps_per_epoch: steps in one epoch, for fractional epochs (``'0.25ep'``) without
            waiting for :meth:`end_epoch`.
        max_duration: the planned length of the run (``'10ep'``, ``'5000ba'``), needed for
            ``dur`` times.

    >>> ema = EMA(torch.nn.Linear(2, 2), smoothing=0.9, half_life='5ba')
    Traceback (most recent call last):
    ...
    ValueError: give exactly one of half_life, smoothing or sigma_rel; got half_life='5ba', smoothing=0.9
    """

    def __init__(
        self,
        model: nn.Module,
        half_life: str | float | list[str | float] | None = None,
        *,
        smoothing: float | list[float] | None = None,
        sigma_rel: float | list[float] | None = None,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool = False,
        profiles: list[dict[str, Any]] | None = None,
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
        steps_per_epoch: int | None = None,
        max_duration: str | None = None,
        snapshot_every: str | None = None,
        snapshot_folder: str | os.PathLike[str] | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.controller = EMAController.create(**forwarded(locals()))
        if snapshot_every is not None and snapshot_folder is None:
            raise ValueError(
                f"snapshot_every={snapshot_every!r} needs snapshot_folder, the folder the "
                "post-hoc EMA snapshots are written to"
            )
        folder = _snapshot_folder_option(snapshot_folder, snapshot_every)
        self.snapshot_folder = None if folder is None else Path(folder)
        self._snapshot_folder_checked = False
        if steps_per_epoch is not None:
            steps_per_epoch = _count(steps_per_epoch, "steps_per_epoch")
            if steps_per_epoch == 0:
                raise ValueError("steps_per_epoch must be positive; got 0")
        self.steps_per_epoch = steps_per_epoch
        self.max_duration = (
            None if max_duration is None else Time.parse(max_duration, "max_duration")
        )
        if self.max_duration is not None:
            if self.max_duration.unit is TimeUnit.DURATION:
                raise ValueError(
                    f"max_duration must be in 'ba', 'ep', 'sp' or 'tok'; got {max_duration!r}"
                )
            if self.max_duration.value == 0 or self.max_duration.is_infinite:
                raise ValueError(f"max_duration must be positive and finite; got {max_duration!r}")
        if TimeUnit.DURATION in self.controller.units and self.max_duration is None:
            raise ValueError(
                "this EMA uses 'dur' times, which need the planned length of the run: "
                "pass max_duration='10ep' (or '5000ba', ...)"
            )
        self.controller.fit_start(model)
        self._batch = 0
        self._epoch = 0
        self._batch_in_epoch = 0
        self._samples: int | None = None
        self._tokens: int | None = None

    # -- clock ----------------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        """Progress so far, as the schedule sees it."""
        epoch = float(self._epoch)
        if self.steps_per_epoch:
            epoch += min(1.0, self._batch_in_epoch / self.steps_per_epoch)
        clock = Clock(self._batch, epoch, self._samples, self._tokens, None)
        if self.max_duration is not None:
            done = clock.get(self.max_duration.unit)
            if done is not None:
                clock = Clock(
                    clock.batch,
                    clock.epoch,
                    clock.sample,
                    clock.token,
                    min(1.0, float(done) / float(self.max_duration.value)),
                )
        return clock

    def _advance(self, samples: Any, tokens: Any) -> None:
        # Every argument is checked before anything is counted, so a refused call changes
        # nothing.
        counted: dict[str, int] = {}
        for unit, value, attr, arg in (
            (TimeUnit.SAMPLE, samples, "_samples", "samples"),
            (TimeUnit.TOKEN, tokens, "_tokens", "tokens"),
        ):
            current = getattr(self, attr)
            needed = unit in self.controller.units or (
                self.max_duration is not None and self.max_duration.unit is unit
            )
            if value is not None:
                if needed and current is None and self._batch > 0:
                    raise ValueError(f"{arg}= must be passed from the first step() call on")
                counted[attr] = (current or 0) + _count(value, arg)
            elif needed:
                raise ValueError(
                    f"this EMA counts '{unit.value}': pass {arg}= (the number in this "
                    f"step's batch) to every step() call"
                )
        for attr, total in counted.items():
            setattr(self, attr, total)
        self._batch += 1
        self._batch_in_epoch += 1

    # -- events ---------------------------------------------------------------------------

    def step(
        self, model: nn.Module | None = None, *, samples: Any = None, tokens: Any = None
    ) -> bool:
        """One optimizer step is done: update the EMA if due. Returns True if it updated.

        ``samples``/``tokens``: how many this step's batch held (needed when a time is in
        ``sp``/``tok``).
        """
        model = self._model(model)
        self._advance(samples, tokens)
        updated = self.controller.batch_end(model, self.clock)
        self._snapshot()
        return updated

    def end_epoch(self, model: nn.Module | None = None) -> bool:
        """An epoch ended: update the EMA if due (``'1ep'`` intervals). Returns True if it did."""
        model = self._model(model)
        self._epoch += 1
        self._batch_in_epoch = 0
        updated = self.controller.epoch_end(model, self.clock)
        self._snapshot()
        return updated

    def _snapshot(self) -> None:
        if self.snapshot_folder is None:
            return
        if not self._snapshot_folder_checked:
            # At the first step (after any load_state_dict): refuse another run's snapshots.
            self.controller.check_snapshot_folder(self.snapshot_folder)
            self._snapshot_folder_checked = True
        clock = self.clock
        if self.controller.snapshot_due(clock):
            self.controller.write_snapshots(self.snapshot_folder, clock)

    def _model(self, model: nn.Module | None) -> nn.Module:
        weights = self.controller.weights
        assert weights is not None
        if model is None:
            assert weights._bound is not None
            return weights._bound
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        return model

    # -- using the average ----------------------------------------------------------------

    @contextmanager
    def swapped(
        self, model: nn.Module | None = None, profile: str | None = None
    ) -> Iterator[nn.Module]:
        """EMA weights (of ``profile``, default the primary one) in the model for the block;
        training weights back in ``finally``.

        Before the EMA has started (``start``) the model keeps its training weights.

        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, half_life=['10ba', '100ba'])
        >>> ema.profiles
        ['ema_10ba', 'ema_100ba']
        >>> _ = ema.step(model)
        >>> with ema.swapped(model, profile='ema_100ba'):
        ...     out = model(torch.ones(1, 2))
        """
        model = self._model(model)
        with self.controller.ema_weights(model, profile):
            yield model

    @property
    def profiles(self) -> list[str]:
        """The names of the EMAs tracked, primary first."""
        return self.controller.names

    def shadow_of(self, profile: str | None = None) -> dict[str, torch.Tensor]:
        """The EMA tensors of ``profile`` (default the primary one) by normalised name."""
        weights = self.controller.profile(profile).weights
        assert weights is not None
        return weights.state_dict()

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the EMA weights into ``model`` permanently (e.g. before exporting it)."""
        weights = self.controller.weights
        assert weights is not None
        weights.copy_to(self._model(model))

    def fused_step(self, optimizer: torch.optim.Optimizer, *, compile: bool = True) -> Any:
        """A callable doing ``optimizer.step()`` and this EMA's due update in one compiled
        function (the EMA then reads the weights while the optimizer writes them); call it
        instead of ``optimizer.step()`` and :meth:`step`. ``compile=False``: the same, eagerly.
        See :class:`~ema_callbacks.fused.FusedStep` for its limits.

        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = EMA(model, half_life='10ba')
        >>> step = ema.fused_step(opt, compile=False)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> step(), ema.started
        (True, True)
        """
        from ema_callbacks.fused import FusedStep

        return FusedStep(self, optimizer, compile=compile)

    def update_bn(
        self,
        loader: Iterable[Any],
        model: nn.Module | None = None,
        profile: str | None = None,
        *,
        batches: int | None = None,
    ) -> None:
        """Recompute the BatchNorm statistics of the average (of ``profile``, default the
        primary one) from ``loader``, as ``torch.optim.swa_utils.update_bn`` does on a copy of
        the model holding the average, without the copy: the average is swapped in, the
        statistics are reset and averaged over the batches (``momentum=None``) in training
        mode, and kept in the average; the model's training weights, its own statistics and
        its mode are back afterwards. A batch that is a list or tuple feeds its first item;
        ``batches`` stops after that many. Needs ``buffers='average'`` or ``'copy'`` (the
        average must hold the statistics) and a model with BatchNorm layers.

        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> ema = EMA(model, uniform=True)
        >>> _ = ema.step(model)
        >>> ema.update_bn([torch.randn(8, 3) for _ in range(4)], model)
        >>> bool((ema.shadow['1.running_mean'] != model[1].running_mean).any())
        True
        """
        weights = self.controller.profile(profile).weights
        assert weights is not None
        weights.update_bn_(loader, self._model(model), batches=batches)

    def functional_call(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` computed with the (primary) EMA weights; the model is
        untouched. ``ema.controller.profile(name).weights.functional_call`` for another
        profile."""
        weights = self.controller.weights
        assert weights is not None
        return weights.functional_call(model, *args, **kwargs)

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by normalised name (live; do not modify)."""
        weights = self.controller.weights
        assert weights is not None
        return weights.state_dict()

    @property
    def num_updates(self) -> int:
        """Averaging updates since the EMA was initialised."""
        return self.controller.num_updates

    @property
    def num_skipped(self) -> int:
        """Updates skipped by the non-finite guard."""
        return self.controller.num_skipped

    @property
    def smoothing(self) -> float | None:
        """The smoothing (beta) of the last update."""
        return self.controller.smoothing

    @property
    def started(self) -> bool:
        return self.controller.started

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The controller's versioned state plus this loop's progress counters."""
        state = self.controller.state_dict()
        state["clock"] = {
            "batch": self._batch,
            "epoch": self._epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "samples": self._samples,
            "tokens": self._tokens,
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` naming mismatched weights or a
        malformed field."""
        if not isinstance(state, Mapping):
            raise ValueError(f"not an EMA state (expected a mapping); got {type(state).__name__}")
        clock = state.get("clock", {})
        if not isinstance(clock, Mapping):
            raise ValueError(f"the EMA state's 'clock' must be a mapping; got {clock!r}")
        counts: dict[str, int | None] = {}
        for key in ("batch", "epoch", "batch_in_epoch", "samples", "tokens"):
            value = clock.get(key, None if key in ("samples", "tokens") else 0)
            if value is None and key in ("samples", "tokens"):
                counts[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"the EMA state's 'clock.{key}' must be a non-negative integer; got {value!r}"
                )
            counts[key] = value
        self.controller.load_state_dict(state)
        self._snapshot_folder_checked = False
        self._batch = int(counts["batch"] or 0)
        self._epoch = int(counts["epoch"] or 0)
        self._batch_in_epoch = int(counts["batch_in_epoch"] or 0)
        self._samples = counts["samples"]
        self._tokens = counts["tokens"]


document(EMA)
