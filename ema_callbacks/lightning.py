"""Lightning adapter: :class:`EMACallback` for ``lightning.pytorch`` and ``pytorch_lightning``.

``Trainer(callbacks=[EMACallback(half_life='50ba')])``, or from a LightningCLI YAML::

    trainer:
      callbacks:
        - class_path: ema_callbacks.lightning.EMACallback
          init_args: {half_life: 50ba}

The same class is a ``Callback`` of both import styles (``lightning.pytorch`` and the older
``pytorch_lightning``) when both are installed, so users of either write ``EMACallback``.

Several EMAs (*profiles*) at once: ``EMACallback(half_life=['100ba', '1000ba'])``. Each
validation (and test) epoch then measures the training weights under the module's own metric
names and every EMA under prefixed names (``ema_1000ba/val_acc``), in one pass over the data.

Hook map (Lightning hook -> controller event; see ``docs/lightning.md``):

=================================================  =============================================
``on_fit_start``                                   ``fit_start`` (shadow built on the device)
``on_train_start``, ``on_train_batch_start``       ``train_start`` (training weights in)
``on_train_batch_end`` (``global_step`` moved)     ``batch_end`` with the clock; log metrics;
                                                   post-hoc snapshots when due
``on_train_epoch_end``                             ``epoch_end``
``on_{validation,test,predict}_start``             ``eval_start`` (EMA in, once started)
``on_{validation,test}_batch_end`` (several EMAs)  the step again per EMA, metrics prefixed
``on_{validation,test,predict}_end``               ``eval_end``
``on_train_end``                                   ``fit_end`` (``final_weights``)
``on_exception``                                   ``exception`` (training weights in)
``state_dict`` / ``load_state_dict``               controller state + the clock's counters
``on_save_checkpoint``                             ``checkpoint['state_dict']`` holds the EMA
=================================================  =============================================

>>> cb = EMACallback(half_life='50ba')
>>> cb.controller.schedule.describe()
'half_life=50ba'
>>> EMACallback().controller.schedule.describe()      # Composer's default
'half_life=1000ba'
>>> EMACallback(half_life=['100ba', '1000ba']).controller.names
['ema_100ba', 'ema_1000ba']
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ema_callbacks.controller import (
    EMAController,
    _snapshot_folder_option,
    first_batches,
    metric_copy,
)
from ema_callbacks.fused import (
    ADAPTER_OPTION,
    NO_FUSED,
    FusedUpdate,
    check_adapter_option,
    replace_step,
)
from ema_callbacks.options import document, forwarded
from ema_callbacks.schedule import Clock, ScheduleState
from ema_callbacks.time_strings import TimeUnit
from ema_callbacks.weights import normalize_name

_EXTRA = 'pip install "ema-callbacks[lightning]"'
CHECKPOINT_WEIGHTS = ("ema", "training")
CHECKPOINT_KEY = "ema_callbacks"

_bases: list[type] = []
try:
    from lightning.pytorch.callbacks import Callback as _LightningCallback
    from lightning.pytorch.utilities.data import extract_batch_size as _extract_batch_size
    from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature as _takes

    _bases.append(_LightningCallback)
except ImportError:  # pragma: no cover - depends on the environment
    pass
try:
    from pytorch_lightning.callbacks import Callback as _PLCallback

    _bases.append(_PLCallback)
    if len(_bases) == 1:  # pragma: no cover - only pytorch_lightning installed
        from pytorch_lightning.utilities.data import (  # type: ignore[no-redef]
            extract_batch_size as _extract_batch_size,
        )
        from pytorch_lightning.utilities.signature_utils import (  # type: ignore[no-redef]
            is_param_in_hook_signature as _takes,
        )
except ImportError:  # pragma: no cover - depends on the environment
    pass
if not _bases:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ema_callbacks.lightning needs Lightning (lightning.pytorch or pytorch_lightning); "
        f"install it with: {_EXTRA}"
    )
# The oldest Lightning tested (pyproject's lightning>=2.5). pip enforces it for the `lightning`
# package of the extra, not for `pytorch_lightning`: 2.4 replays a batch when it resumes from a
# mid-epoch checkpoint and restores no callback state in validate/test(ckpt_path=...), which
# would evaluate other EMAs than the checkpoint's without a word.
_OLDEST = (2, 5)
for _base in _bases:
    _package = _base.__module__.split(".")[0]
    _version = str(getattr(importlib.import_module(_package), "__version__", ""))
    _found = re.match(r"(\d+)\.(\d+)", _version)
    if _found and (int(_found[1]), int(_found[2])) < _OLDEST:
        raise ImportError(
            f"ema_callbacks.lightning needs Lightning >= {_OLDEST[0]}.{_OLDEST[1]}; "
            f"{_package} {_version} is installed (pip install -U {_package.replace('_', '-')})"
        )

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback as _CallbackBase
else:
    # A Callback of every installed import style: Lightning checks `isinstance(cb, Callback)`
    # against its own package's class, and raises TypeError on the other one's subclasses.
    _CallbackBase = _bases[0] if len(_bases) == 1 else type("_CallbackBase", tuple(_bases), {})

__all__ = [
    "CHECKPOINT_KEY",
    "CHECKPOINT_WEIGHTS",
    "EMACallback",
]


def _resolve_callable(
    spec: str | Callable[[Any], Any] | None, name: str
) -> Callable[[Any], Any] | None:
    """``'package.module.function'`` or ``'package.module:function'`` -> the function."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"{name} must be an import path like 'my_package.data.count_tokens' or a callable; "
            f"got {spec!r} ({type(spec).__name__})"
        )
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr or not sep:
        raise ValueError(
            f"{name} must be an import path like 'my_package.data.count_tokens' "
            f"(module, then the function); got {spec!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{name} must name an importable function; got {spec!r} ({err})") from err
    if not callable(target):
        raise TypeError(f"{name} must name a callable; {spec!r} is a {type(target).__name__}")
    return target  # type: ignore[no-any-return]


def _count(value: Any, name: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must return a non-negative integer; got {value!r}")
    return value


def _metric_types() -> tuple[type, ...]:
    """torchmetrics' ``Metric`` and ``MetricCollection`` (a Lightning dependency)."""
    try:
        from torchmetrics import Metric, MetricCollection
    except ImportError:  # pragma: no cover - torchmetrics comes with Lightning
        return ()
    return (Metric, MetricCollection)


_Slot = tuple[nn.Module, str, nn.Module]


def _find_metric_slots(module: nn.Module) -> list[_Slot]:
    """``(parent, attribute, metric)`` for every outermost torchmetrics ``Metric`` or
    ``MetricCollection`` registered under ``module`` (a collection is copied whole: its compute
    groups share state between members)."""
    types = _metric_types()
    slots: list[_Slot] = []
    if not types:  # pragma: no cover - torchmetrics comes with Lightning
        return slots
    seen: set[int] = set()

    def visit(parent: nn.Module) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for name, child in parent._modules.items():
            if child is None:
                continue
            if isinstance(child, types):
                slots.append((parent, name, child))
            else:
                visit(child)

    visit(module)
    return slots


@contextmanager
def _metrics_replaced(
    pl_module: Any, slots: list[_Slot], copies: Mapping[int, nn.Module]
) -> Iterator[None]:
    """The metric objects in ``slots`` replaced by ``copies`` (by the original's id) for the
    block; the originals back afterwards, whatever happens."""
    if not slots:
        yield
        return
    # LightningModule.log finds a logged Metric's attribute name through this id cache.
    cache = getattr(pl_module, "_metric_attributes", None)
    try:
        for parent, name, metric in slots:
            parent._modules[name] = copies[id(metric)]
        pl_module._metric_attributes = None
        yield
    finally:
        for parent, name, metric in slots:
            parent._modules[name] = metric
        pl_module._metric_attributes = cache


_MISSING = object()


def _default_checkpoint_dir(trainer: Any) -> str | None:
    """The folder a ``ModelCheckpoint()`` without ``dirpath`` would save into."""
    root = getattr(trainer, "default_root_dir", None)
    loggers = list(getattr(trainer, "loggers", []) or [])
    if loggers:
        logger = loggers[0]
        save_dir = logger.save_dir or root
        if save_dir is None:
            return None
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(str(save_dir), str(logger.name), version, "checkpoints")
    return None if root is None else os.path.join(str(root), "checkpoints")


@contextmanager
def _logging_as(pl_module: Any, prefix: str, fx_name: str) -> Iterator[None]:
    """``self.log``/``self.log_dict`` of ``pl_module`` log ``'{prefix}/{name}'`` for the block,
    as if from hook ``fx_name`` (same defaults, same result entries as the user's step)."""
    original = pl_module.log
    shadowed = pl_module.__dict__.get("log", _MISSING)
    fx = getattr(pl_module, "_current_fx_name", None)

    def log(*args: Any, **kwargs: Any) -> Any:
        if "name" in kwargs:
            kwargs["name"] = f"{prefix}/{kwargs['name']}"
        elif args:
            args = (f"{prefix}/{args[0]}", *args[1:])
        return original(*args, **kwargs)

    try:
        pl_module.__dict__["log"] = log
        pl_module._current_fx_name = fx_name
        yield
    finally:
        pl_module._current_fx_name = fx
        if shadowed is _MISSING:
            pl_module.__dict__.pop("log", None)
        else:
            pl_module.__dict__["log"] = shadowed


def _bn_source(trainer: Trainer, pl_module: LightningModule) -> tuple[Any, Any] | None:
    """The training batches (``update_bn_batches``) and how the module eats one: its
    ``forward`` on the batch moved to its device (the first item of a list or tuple batch)."""
    loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        return None

    def forward(module: Any, batch: Any) -> Any:
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        return module(batch[0] if isinstance(batch, (list, tuple)) else batch)

    return first_batches(loader), forward


class EMACallback(_CallbackBase):
    """An exponential moving average of the LightningModule's weights, as a Lightning callback.

    The EMA weights are in the model during validation, test and predict (including the
    sanity check, and ``trainer.validate/test/predict`` after ``fit``) once the EMA has started;
    every training step runs on the training weights. Checkpoints hold the EMA in
    ``checkpoint['state_dict']`` (``checkpoint_weights='ema'``), the training weights and the
    schedule in the callback state, and say which is which in ``checkpoint['ema_callbacks']``;
    resuming continues from the training weights, bit-identically.

    Several EMAs (*profiles*): a list for one of ``half_life``, ``smoothing`` or ``sigma_rel``
    (``half_life=['100ba', '1000ba']``), or ``profiles``. Each validation and test epoch then
    runs the module's ``validation_step``/``test_step`` on the training weights, as usual, and
    once more per profile on that profile's EMA (swapped in, O(1)), in the same pass over the
    data: what the step logs with ``self.log``/``self.log_dict`` is logged again as
    ``'{profile}/{name}'`` (``'ema_1000ba/val_loss'``) with the same ``on_step``/``on_epoch``/
    ``reduce_fx``/``batch_size``, so ``ModelCheckpoint(monitor='ema_1000ba/val_loss')`` and every
    logger see it. torchmetrics ``Metric``/``MetricCollection`` attributes of the module get
    one copy per profile for those runs, so the training weights' metric state stays its own.
    ``predict`` uses the primary (first) profile; ``checkpoint['state_dict']`` holds the
    primary profile's EMA, and the callback state every profile's.

    Time units: ``ba`` counts optimizer steps (``trainer.global_step``: one per
    ``accumulate_grad_batches`` batches); ``ep`` is fractional (batches done over
    ``trainer.num_training_batches``); ``sp`` sums batch sizes (``batch_size_fn``, default
    Lightning's ``extract_batch_size``: the length of the first tensor in the batch) over all
    ranks; ``tok`` sums ``tokens_fn(batch)`` over all ranks; ``dur`` is ``global_step`` over
    ``trainer.estimated_stepping_batches``.

    The options every entry point shares (the average, its schedule, the tensors averaged,
    evaluation, the post-hoc snapshots) are documented once, in :mod:`ema_callbacks.options`
    (``docs/options.md``), and listed under Args at import; the Lightning-only ones follow.

    Args:
        checkpoint_weights: what ``checkpoint['state_dict']`` holds: ``'ema'`` (default, so
            ``Model.load_from_checkpoint`` gives the EMA model, as Lightning's own EMA does) or
            ``'training'``. Before the EMA has started it holds the training weights.
        batch_size_fn: import path (``'pkg.module.fn'``) or callable ``fn(batch) -> int`` giving
            the samples in a batch, for ``sp`` times.
        tokens_fn: import path or callable ``fn(batch) -> int`` giving the tokens in a batch;
            required for ``tok`` times (Lightning does not count tokens).
        log_metrics: log ``ema/smoothing``, ``ema/num_updates`` and ``ema/num_skipped`` to the
            Trainer's loggers at the optimizer steps they write (``log_every_n_steps``).

    >>> cb = EMACallback(profiles=[{'name': 'fast', 'half_life': '100ba'},
    ...                            {'name': 'slow', 'half_life': '1000ba'}])
    >>> cb.controller.names, cb.controller.eval_all
    (['fast', 'slow'], True)
    >>> EMACallback(sigma_rel=[0.05, 0.1], snapshot_every='500ba').controller.names
    ['ema_sigma_rel0.05', 'ema_sigma_rel0.1']
    >>> EMACallback(half_life='-3ba')
    Traceback (most recent call last):
    ...
    ValueError: half_life must not be negative; got '-3ba'
    >>> EMACallback(half_life='2000tok')
    Traceback (most recent call last):
    ...
    ValueError: half_life='2000tok' counts tokens, which Lightning does not count: pass tokens_fn='my_package.data.count_tokens' (a function batch -> number of tokens)
    >>> EMACallback(half_life=['50ba', '2000tok'])
    Traceback (most recent call last):
    ...
    ValueError: half_life='2000tok' (EMA profile 'ema_2000tok') counts tokens, which Lightning does not count: pass tokens_fn='my_package.data.count_tokens' (a function batch -> number of tokens)
    """

    # Over 300 lines: one method per Lightning hook it uses (the hook map of docs/lightning.md),
    # plus the per-profile metric copies; the EMA logic itself is the controller's.

    def __init__(
        self,
        half_life: str | float | list[str | float] | None = None,
        smoothing: float | list[float] | None = None,
        sigma_rel: float | list[float] | None = None,
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
        dtype: str | None = None,
        device: str | None = None,
        nonfinite: str = "ignore",
        stream: bool = False,
        fused_optimizer: bool = False,
        final_weights: str = "ema",
        eval_with_ema: bool = True,
        train_with_ema_weights: bool = False,
        checkpoint_weights: str = "ema",
        batch_size_fn: str | Callable[[Any], int] | None = None,
        tokens_fn: str | Callable[[Any], int] | None = None,
        log_metrics: bool = True,
        profiles: list[dict[str, Any]] | None = None,
        eval_all: bool | None = None,
        snapshot_every: str | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
        snapshot_folder: str | None = None,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool = False,
        update_bn_batches: int | None = None,
    ) -> None:
        super().__init__()
        self.controller = EMAController.create(**forwarded(locals()))
        folder = _snapshot_folder_option(snapshot_folder, snapshot_every)
        if folder is not None and "://" in folder:
            raise ValueError(f"snapshot_folder must be a local folder; got {folder!r}")
        self.snapshot_folder = folder
        self._snapshot_dir: str | None = None
        if checkpoint_weights not in CHECKPOINT_WEIGHTS:
            raise ValueError(
                f"checkpoint_weights must be one of {CHECKPOINT_WEIGHTS}; got {checkpoint_weights!r}"
            )
        if not isinstance(log_metrics, bool):
            raise TypeError(f"log_metrics must be True or False; got {log_metrics!r}")
        self.fused_optimizer = check_adapter_option(self.controller, fused_optimizer)
        #: graphs compiled by the fused optimizer step in the last fit (``fused_optimizer``)
        self.fused_compilations = 0
        self._unfuse: Callable[[], None] | None = None
        self._fused_clock: Clock | None = None
        self._batch_idx = 0
        self.checkpoint_weights = checkpoint_weights
        self.log_metrics = log_metrics
        self.batch_size_fn = (
            _resolve_callable(batch_size_fn, "batch_size_fn") or _extract_batch_size
        )
        self.tokens_fn = _resolve_callable(tokens_fn, "tokens_fn")
        units = self.controller.units
        if TimeUnit.TOKEN in units and self.tokens_fn is None:
            raise ValueError(
                f"{self._token_culprit()} counts tokens, which Lightning does not count: pass "
                "tokens_fn='my_package.data.count_tokens' (a function batch -> number of tokens)"
            )
        self._count_samples = TimeUnit.SAMPLE in units
        self._count_tokens = TimeUnit.TOKEN in units
        self._stage: str | None = None
        self._reset_clock()
        self._total_steps: float | None = None
        self._imported: dict[str, Any] | None = None
        # Per-profile copies of the module's torchmetrics objects, for one evaluation epoch.
        self._metric_slots: list[_Slot] | None = None
        self._metric_copies: dict[str, dict[int, nn.Module]] = {}
        self._predict_swap: ExitStack | None = None

    def _token_culprit(self) -> str:
        """The option that counts tokens, for the error message."""
        several = len(self.controller.profiles) > 1
        for p in self.controller.profiles:
            s = p.schedule
            for n, t in (
                ("half_life", s.half_life),
                ("update_interval", s.update_interval),
                ("start", s.start),
            ):
                if t is not None and t.unit is TimeUnit.TOKEN:
                    return f"{n}='{t}'" + (f" (EMA profile {p.name!r})" if several else "")
        snapshots = self.controller.snapshot_schedule
        if snapshots is not None and snapshots.update_interval.unit is TimeUnit.TOKEN:
            return f"snapshot_every='{snapshots.update_interval}'"
        return "the EMA schedule"  # pragma: no cover - units come from the options above

    # -- clock ----------------------------------------------------------------------------

    def _reset_clock(self) -> None:
        self._samples = 0
        self._tokens = 0
        self._pending = [0, 0]  # samples, tokens in micro-batches since the last optimizer step
        self._last_step = 0

    def _clock(self, trainer: Trainer, epoch: float, step: int | None = None) -> Clock:
        step = trainer.global_step if step is None else step
        duration = None
        if self._total_steps is not None:
            duration = min(1.0, step / self._total_steps)
        return Clock(
            batch=step,
            epoch=epoch,
            sample=self._samples if self._count_samples else None,
            token=self._tokens if self._count_tokens else None,
            duration=duration,
        )

    def _count(self, batch: Any) -> None:
        if self._count_samples:
            self._pending[0] += _count(self.batch_size_fn(batch), "batch_size_fn")
        if self._count_tokens:
            assert self.tokens_fn is not None
            self._pending[1] += _count(self.tokens_fn(batch), "tokens_fn")

    def _flush_counts(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add the micro-batches' samples/tokens, summed over all ranks (one small all-reduce
        per optimizer step, only for ``sp``/``tok`` schedules) so every rank's EMA agrees."""
        samples, tokens = self._pending
        self._pending = [0, 0]
        if trainer.world_size > 1:
            total = trainer.strategy.reduce(
                torch.tensor([samples, tokens], dtype=torch.int64, device=pl_module.device),
                reduce_op="sum",
            )
            samples, tokens = (int(v) for v in total.tolist())
        self._samples += samples
        self._tokens += tokens

    # -- fit ------------------------------------------------------------------------------

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remember the stage. A ``fit`` from step 0 starts a new EMA (a checkpoint, loaded
        after this hook, restores the old one); a further ``fit`` on the same Trainer goes on."""
        self._stage = stage
        if stage == "fit" and trainer.global_step == 0:
            self._reset_clock()
            self._imported = None
            self.controller.reset()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fit_start``: build (or re-bind) the shadow on the model's device; check units."""
        self._total_steps = None
        if TimeUnit.DURATION in self.controller.units:
            total = trainer.estimated_stepping_batches
            if total and math.isfinite(total):
                self._total_steps = float(total)
        self.controller.fit_start(
            pl_module,
            self._clock(trainer, 0.0),
            hint="'dur' needs a finite run: set Trainer(max_steps=...) or max_epochs",
        )
        if self._imported is not None:
            self._load_imported()
        if self.controller.update_bn_batches is not None:
            self.controller.bn_source = lambda: _bn_source(trainer, pl_module)
        self._snapshot_dir = None
        if self.controller.snapshot_schedule is not None:
            self._snapshot_dir = self._resolve_snapshot_folder(trainer)
        if self.fused_optimizer:
            self._fuse(trainer, pl_module)

    def _resolve_snapshot_folder(self, trainer: Trainer) -> str:
        """``snapshot_folder``, or ``ema_snapshots`` in the ``ModelCheckpoint``'s folder (the
        folder one would use by default without one), as rank 0 sees it."""
        folder = self.snapshot_folder
        if folder is None:
            ckpt = trainer.checkpoint_callback
            base = getattr(ckpt, "dirpath", None) if ckpt is not None else None
            if base is None:
                base = _default_checkpoint_dir(trainer)
            if base is not None:
                folder = os.path.join(str(base), "ema_snapshots")
        if folder is not None and trainer.world_size > 1:
            folder = trainer.strategy.broadcast(folder)
        if folder is None or "://" in str(folder):
            assert self.controller.snapshot_schedule is not None
            where = "no checkpoint folder" if folder is None else f"{folder!r}, not a local folder"
            raise ValueError(
                f"snapshot_every={str(self.controller.snapshot_schedule.update_interval)!r} writes "
                f"post-hoc EMA snapshots next to the checkpoints, but the Trainer has {where}; "
                "pass snapshot_folder='path/to/ema_snapshots'"
            )
        return str(folder)

    def _maybe_snapshot(self, trainer: Trainer, clock: Clock) -> None:
        """Post-hoc snapshots when due (every rank: a sharded EMA is gathered; rank 0 writes)."""
        if self._snapshot_dir is None or not self.controller.snapshot_due(clock):
            return
        self.controller.write_snapshots(self._snapshot_dir, clock, write=trainer.is_global_zero)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training weights in; optimizer steps are counted from here (after a resume too)."""
        self.controller.train_start(pl_module)
        self._last_step = trainer.global_step
        if self._snapshot_dir is not None and trainer.is_global_zero:
            # After a resume is restored: a resumed run may add to its own snapshots.
            self.controller.check_snapshot_folder(self._snapshot_dir)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Every training step runs on the training weights."""
        self.controller.train_start(pl_module)
        if self._unfuse is not None:  # counted before the step, which updates the EMA
            self._batch_idx = batch_idx
            self._count(batch)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``batch_end`` once per optimizer step (not per micro-batch); with
        ``fused_optimizer`` the step did the update and this writes snapshots and metrics."""
        if self._unfuse is None:
            self._count(batch)
        step = trainer.global_step
        if step <= self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        clock, self._fused_clock = self._fused_clock, None
        if clock is None:  # the separate update (or a step the fused one did not run)
            if self._count_samples or self._count_tokens:
                self._flush_counts(trainer, pl_module)
            clock = self._clock(trainer, self._epoch_at(trainer, batch_idx))
            if self._unfuse is None:
                self.controller.batch_end(pl_module, clock)
        self._maybe_snapshot(trainer, clock)
        if self.log_metrics and self._logging_step(trainer):
            pl_module.log_dict(
                {f"ema/{k}": v for k, v in self.controller.metrics().items()},
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    @staticmethod
    def _epoch_at(trainer: Trainer, batch_idx: int) -> float:
        """The fractional epoch once batch ``batch_idx`` of this epoch is done."""
        epoch = float(trainer.current_epoch)
        per_epoch = trainer.num_training_batches
        if per_epoch and math.isfinite(per_epoch):
            epoch += min(1.0, (batch_idx + 1) / per_epoch)
        return epoch

    # -- fused optimizer step -------------------------------------------------------------

    def _fuse(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fused_optimizer=True``: the optimizer's ``step`` (which Lightning's precision
        plugin calls with the training-step closure) runs the closure, then one compiled
        function doing the step and the updates due once it is done."""
        self._unfuse_step()
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{ADAPTER_OPTION} needs automatic optimization (one optimizer, stepped by "
                "Lightning): with manual optimization the LightningModule steps its optimizers "
                f"itself; {NO_FUSED}"
            )
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise ValueError(
                f"{ADAPTER_OPTION}: DeepSpeed steps its own optimizer inside engine.step() "
                "(Lightning never calls optimizer.step() under it), which a compiled function "
                f"cannot wrap; {NO_FUSED}"
            )
        fused = FusedUpdate(
            self.controller, trainer.optimizers[0], option=ADAPTER_OPTION, instead=NO_FUSED
        )

        def run() -> None:
            # Lightning counts the step (global_step) once it returns: the clock the separate
            # update would see at this batch's end.
            if self._count_samples or self._count_tokens:
                self._flush_counts(trainer, pl_module)
            clock = self._clock(
                trainer, self._epoch_at(trainer, self._batch_idx), trainer.global_step + 1
            )
            fused(pl_module, clock)
            self._fused_clock = clock
            self.fused_compilations = fused.compilations

        self._unfuse = replace_step(trainer.optimizers[0], run)

    def _unfuse_step(self) -> None:
        if self._unfuse is not None:
            self._unfuse()
        self._unfuse = None
        self._fused_clock = None

    @staticmethod
    def _logging_step(trainer: Trainer) -> bool:
        """Whether the Trainer writes this step's metrics to its loggers (``log_every_n_steps``):
        ``LightningModule.log`` costs ~0.5 ms a call, too much to pay at every step for nothing."""
        every = int(getattr(trainer, "log_every_n_steps", 50))  # set by the Trainer, untyped
        if not trainer.loggers or not every:
            return False
        return trainer.global_step % every == 0 or trainer.should_stop

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``epoch_end`` (updates with an ``ep`` interval when the epoch length is unknown)."""
        clock = self._clock(trainer, float(trainer.current_epoch + 1))
        self.controller.epoch_end(pl_module, clock)
        self._maybe_snapshot(trainer, clock)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """``fit_end``: leave the EMA (``final_weights='ema'``) or the training weights in; the
        optimizer's own ``step`` back."""
        self._unfuse_step()
        self.controller.fit_end(pl_module)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Training weights back in, whatever happened; the optimizer's own ``step`` back."""
        self._unfuse_step()
        self._close_predict_swap()
        self.controller.exception(pl_module)

    # -- evaluation -----------------------------------------------------------------------

    @property
    def _evaluates_profiles(self) -> bool:
        """Whether each evaluation covers the training weights and every profile."""
        return self.controller.eval_all and self.controller.eval_with_ema

    def _begin_evaluation(self, pl_module: LightningModule, step_name: str) -> None:
        self._metric_slots = None
        self._metric_copies = {}
        if self._evaluates_profiles:
            if _takes(getattr(pl_module, step_name), "dataloader_iter", explicit=True):
                raise ValueError(
                    f"evaluating several EMAs runs {step_name} again on each batch with each "
                    f"EMA, which a {step_name}(dataloader_iter) cannot do; take (batch, batch_idx) "
                    "or pass eval_all=False (then only the primary EMA is evaluated)"
                )
            self._apply_loaded(pl_module)
        self.controller.eval_start(pl_module)

    def _apply_loaded(self, pl_module: LightningModule) -> None:
        """Build the shadows now from a checkpoint's EMAs loaded outside ``fit``: before the
        trainer's own pass, and outside ``inference_mode`` (``validate``/``test`` run in it;
        the shadows may be updated by a later ``fit``)."""
        if any(p.pending is not None for p in self.controller.profiles):
            with torch.inference_mode(False):
                self.controller.setup(pl_module)

    def _end_evaluation(self, pl_module: LightningModule) -> None:
        self._metric_slots = None
        self._metric_copies = {}
        self.controller.eval_end(pl_module)

    def _evaluate_profiles(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step_name: str,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int | None,
    ) -> None:
        """Run ``step_name`` on ``batch`` once per profile, with that profile's EMA in (O(1)
        swap), its own copies of the module's torchmetrics objects, and everything the step
        logs renamed ``'{profile}/{name}'``. Grad stays off; the previous weights, metrics and
        ``log`` are back afterwards, whatever happens."""
        if not self._evaluates_profiles:
            return
        # Every profile, in every stage: one that has not started is the training weights (as
        # with one EMA; activate puts those in), so its metrics exist from the first evaluation
        # on, as the Composer and transformers adapters report it too.
        profiles = self.controller.profiles
        args: list[Any] = [batch]
        if _takes(getattr(pl_module, step_name), "batch_idx", min_args=2):
            args.append(batch_idx)
        if dataloader_idx is not None:
            args.append(dataloader_idx)
        run = getattr(trainer.strategy, step_name)  # precision context, DDP redirection
        if self._metric_slots is None:
            self._metric_slots = _find_metric_slots(pl_module)
        slots = self._metric_slots
        for p in profiles:
            copies = self._metric_copies.get(p.name)
            if copies is None:
                copies = self._metric_copies[p.name] = {}
                for _, _, metric in slots:
                    if id(metric) not in copies:
                        copies[id(metric)] = metric_copy(metric, p.name)
            with ExitStack() as stack:
                stack.enter_context(self.controller.ema_weights(pl_module, p.name))
                stack.enter_context(_metrics_replaced(pl_module, slots, copies))
                stack.enter_context(_logging_as(pl_module, p.name, step_name))
                stack.enter_context(torch.no_grad())
                run(*args)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """EMA weights in (sanity check included), once the EMA has started; with several EMAs
        the training weights stay in (each EMA is run in ``on_validation_batch_end``)."""
        self._begin_evaluation(pl_module, "validation_step")

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int | None = None,
    ) -> None:
        """Several EMAs: ``validation_step`` again on each EMA, its metrics prefixed."""
        self._evaluate_profiles(
            trainer, pl_module, "validation_step", batch, batch_idx, dataloader_idx
        )

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Training weights back (unless ``fit`` ended with ``final_weights='ema'``)."""
        self._end_evaluation(pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """EMA weights in for ``trainer.test`` (several EMAs: as for validation)."""
        self._begin_evaluation(pl_module, "test_step")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int | None = None,
    ) -> None:
        """Several EMAs: ``test_step`` again on each EMA, its metrics prefixed."""
        self._evaluate_profiles(trainer, pl_module, "test_step", batch, batch_idx, dataloader_idx)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Previous weights back."""
        self._end_evaluation(pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """EMA weights in for ``trainer.predict`` (the primary one with several EMAs)."""
        if self._evaluates_profiles:
            self._apply_loaded(pl_module)
            if self.controller.primary.started:
                self._predict_swap = ExitStack()
                self._predict_swap.enter_context(self.controller.ema_weights(pl_module))
        else:
            self.controller.eval_start(pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Previous weights back."""
        self._close_predict_swap()
        self.controller.eval_end(pl_module)

    def _close_predict_swap(self) -> None:
        if self._predict_swap is not None:
            swap, self._predict_swap = self._predict_swap, None
            swap.close()

    # -- checkpoints ----------------------------------------------------------------------

    def _holds(self) -> str:
        """Which weights ``checkpoint['state_dict']`` holds."""
        return "ema" if self.checkpoint_weights == "ema" and self.controller.started else "training"

    def state_dict(self) -> dict[str, Any]:
        """The controller's state (training weights included when the model slot holds the
        EMA) plus the clock's counters."""
        holds = self._holds()
        state = self.controller.state_dict(
            training=holds == "ema" or self.controller.weights_active == "ema"
        )
        state["state_dict_holds"] = holds
        state["clock"] = {
            "samples": self._samples,
            "tokens": self._tokens,
            "pending": list(self._pending),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when resuming ``fit``. Outside ``fit`` (``validate``,
        ``test`` from a checkpoint) the model keeps the checkpoint's ``state_dict``; with
        several EMAs evaluated, the checkpoint's EMAs are loaded for the prefixed metrics."""
        if self._stage not in (None, "fit"):
            if self._evaluates_profiles:
                self.controller.load_state_dict(
                    {k: v for k, v in state_dict.items() if k != "training"}
                )
            return
        self.controller.load_state_dict(state_dict)
        clock = dict(state_dict.get("clock", {}))
        self._samples = int(clock.get("samples", 0))
        self._tokens = int(clock.get("tokens", 0))
        self._pending = [int(v) for v in clock.get("pending", [0, 0])]

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Put the EMA (or training) weights in ``checkpoint['state_dict']`` and say which,
        under every name the module has for them (tied weights included).

        The tensors are the ones already in the callback state, so ``torch.save`` stores them
        once."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        holds = state["state_dict_holds"]
        source: Mapping[str, torch.Tensor] | None = (
            state["shadow"] if holds == "ema" else state.get("training")
        )
        if source:
            # Tied tensors (``head.weight = emb.weight``) are stored once, under their first
            # name: every other name of theirs gets the same tensor.
            aliases = state.get("aliases") or {}
            checkpoint["state_dict"] = {
                key: source.get(aliases.get(name, name), value)
                for key, value in checkpoint["state_dict"].items()
                for name in (normalize_name(key),)
            }
        checkpoint[CHECKPOINT_KEY] = {"state_dict_holds": holds, "callback": self.state_key}
        if len(self.controller.profiles) > 1:
            # Several EMAs: state_dict holds the primary one; the others are in the state.
            checkpoint[CHECKPOINT_KEY]["profile"] = self.controller.primary.name

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Start from a checkpoint of Lightning's ``EMAWeightAveraging``: its ``state_dict``
        is the average (the EMA), ``current_model_state`` the training weights."""
        if self._stage not in (None, "fit"):
            return
        if self.state_key in checkpoint.get("callbacks", {}):
            return  # ours: load_state_dict does the work
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            pl_module.load_state_dict(checkpoint["current_model_state"])
            n_averaged = checkpoint["averaging_state"].get("n_averaged", 1)
            self._imported = {
                "shadow": {normalize_name(k): v for k, v in checkpoint["state_dict"].items()},
                "num_updates": max(0, int(n_averaged) - 1),
                "global_step": int(checkpoint.get("global_step", 0)),
            }

    def _load_imported(self) -> None:
        assert self._imported is not None and self.controller.weights is not None
        imported, self._imported = self._imported, None
        shadow = imported["shadow"]
        missing = [n for n in self.controller.weights.names if n not in shadow]
        if missing:
            raise ValueError(
                f"the EMAWeightAveraging checkpoint lacks weights this EMA tracks: {missing[:10]}"
            )
        self.controller.load_averaged(
            {n: shadow[n] for n in self.controller.weights.names},
            ScheduleState(
                started=True,
                num_updates=imported["num_updates"],
                last={"ba": float(imported["global_step"])},
            ),
        )


document(
    EMACallback,
    notes={
        "snapshot_folder": "Default ``<ModelCheckpoint dirpath>/ema_snapshots`` (or "
        "``ema_snapshots`` in the folder a ``ModelCheckpoint`` would use by default).",
        "update_bn_batches": "The module's ``forward`` runs on the first item of each "
        "training batch (the batch itself when it is not a list or tuple).",
    },
)
