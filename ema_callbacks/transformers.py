"""The Hugging Face ``transformers`` adapter: :class:`EMATrainerCallback`.

``Trainer(..., callbacks=[EMATrainerCallback(half_life='50ba')])`` keeps an exponential moving
average of the model's weights, evaluates with it during training, writes it into every
``checkpoint-N/`` and restores it on ``trainer.train(resume_from_checkpoint=...)``. All EMA
decisions are the :class:`~ema_callbacks.controller.EMAController`'s; this module only
translates the Trainer's hooks into controller events and its counters into a
:class:`~ema_callbacks.schedule.Clock`:

=====================================  =======================================================
Trainer hook                           controller event
=====================================  =======================================================
``on_init_end``                        check the schedules' units against ``TrainingArguments``;
                                       guard ``trainer.train``, wrap ``trainer.evaluate``
``on_train_begin``                     ``fit_start`` (a fresh EMA, or the checkpoint's on resume;
                                       under DeepSpeed ZeRO-3 the EMA of each rank's partitions)
``on_step_begin``, ``on_epoch_begin``  ``train_start`` (training weights in, whatever happened)
``on_step_end``                        ``batch_end`` (not when the optimizer step was skipped),
                                       post-hoc snapshots if due, then ``eval_start`` if
                                       ``control.should_evaluate``
``on_epoch_end``                       ``epoch_end`` (and snapshots), then ``eval_start``
``trainer.evaluate()``                 with several EMAs (``eval_all``): the evaluation loop
                                       once on the training weights and once per profile
                                       (``ema_weights``), metrics ``eval_<profile>_<metric>``
``on_evaluate``                        ``eval_end`` (only after our own ``eval_start``)
``on_save``                            ``state_dict`` -> ``checkpoint-N/ema_state.*`` (ZeRO-3:
                                       ``ema_state-rank{r}-of{w}.*``, one pair per rank)
``on_train_end``                       (best checkpoint's EMA if ``load_best_model_at_end``),
                                       then ``fit_end``
an exception in ``trainer.train()``    ``exception`` (training weights back), then re-raised
=====================================  =======================================================

>>> cb = EMATrainerCallback(half_life='50ba', buffers='copy')
>>> cb.state()['args']['half_life']
'50ba'
>>> EMATrainerCallback(half_life=['100ba', '1000ba']).controller.names
['ema_100ba', 'ema_1000ba']
>>> EMATrainerCallback(half_life='-3ba')
Traceback (most recent call last):
...
ValueError: half_life must not be negative; got '-3ba'
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

try:
    import transformers
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ema_callbacks.transformers needs the Hugging Face transformers library: "
        'pip install "ema-callbacks[transformers]"'
    ) from err

import torch
from torch import nn

from ema_callbacks.controller import (
    EMAController,
    EMAProfile,
    _snapshot_folder_option,
    first_batches,
)
from ema_callbacks.fused import (
    ADAPTER_OPTION,
    NO_FUSED,
    FusedUpdate,
    check_adapter_option,
    replace_step,
)
from ema_callbacks.options import document, forwarded
from ema_callbacks.schedule import Clock
from ema_callbacks.state_files import (
    _paths,
    _shard_files,
    load_ema_state,
    save_ema_state,
)
from ema_callbacks.time_strings import TimeUnit
from ema_callbacks.weights import normalize_name, unwrap_model

__all__ = ["EMATrainerCallback", "load_ema_state", "save_ema_state"]

_TOKENS_HINT = (
    "the Trainer counts tokens only with TrainingArguments(include_num_input_tokens_seen=True) "
    "(or 'all' / 'non_padding'); set it, or give the time in 'ba', 'ep', 'sp' or 'dur'"
)
# A safe file-name component: it names checkpoint-N/{name}_state.* and {name}_snapshots.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_NAME_MAX = 100


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The mutable part of a callback, shared with a copy the Trainer rebuilds from JSON."""

    controller: EMAController
    eval_swap: bool = False  # we swapped the EMA in for an evaluation the Trainer is running
    samples_per_epoch: int | None = None
    steps_per_epoch: int | None = None
    # DeepSpeed ZeRO-3: (rank, world) and the whole parameters' shapes; every rank saves its part
    shard: tuple[int, int] | None = None
    full_shapes: dict[str, list[int]] | None = None
    release_gathered: Any = None  # ZeRO-3: DeepSpeed's empty_partition_cache, or None
    gathered_as: str = "training"  # the weights DeepSpeed's gathered parameters came from
    manual: int = 0  # depth of EMATrainerCallback.ema_weights blocks (no per-profile evaluation)
    # (resume_from_checkpoint,) of the train() call running through our wrapper; None outside
    train_call: tuple[Any] | None = None
    # fused_optimizer: puts the optimizer's own step back
    unfuse: Any = None

    def unfuse_step(self) -> None:
        if self.unfuse is not None:
            self.unfuse()
        self.unfuse = None

    @property
    def evaluates_profiles(self) -> bool:
        """Whether an evaluation covers the training weights and every profile."""
        return self.controller.eval_all and self.controller.eval_with_ema


@dataclass
class _EvalGuard:
    """Per-Trainer state of the evaluation wrappers."""

    evaluating: int = 0  # depth of trainer.evaluate() calls
    expanding: bool = False  # inside the per-profile expansion of an evaluation loop
    loops: int = 0  # evaluation loops run inside trainer.evaluate() so far


def _sync_gathered(run: _Run, force: bool = False) -> None:
    """Under DeepSpeed ZeRO-3 a forward gathers whole parameters from the partitions, and
    DeepSpeed keeps some of them gathered afterwards (persistent parameters, always; others
    until its trace says they are done, e.g. after a forward without backward). A swap writes
    the partitions only, so when the weights in the model changed (EMA <-> training) the
    gathered copies are released here, with DeepSpeed's ``empty_partition_cache`` (local, no
    communication): the next forward gathers the weights now in the partitions."""
    active = run.controller.weights_active
    if run.release_gathered is not None and (force or active != run.gathered_as):
        run.release_gathered()
    run.gathered_as = active


def _zero3_layout(model: nn.Module) -> tuple[tuple[int, int], dict[str, list[int]]] | None:
    """``((rank, world), {name: full shape})`` when the model's parameters are DeepSpeed ZeRO-3
    partitions (``param.ds_tensor``), None otherwise."""
    params = {
        normalize_name(n): p
        for n, p in unwrap_model(model).named_parameters()
        if getattr(p, "ds_tensor", None) is not None
    }
    if not params:
        return None
    import torch.distributed as dist

    world = dist.get_world_size()
    groups = {dist.get_world_size(getattr(p, "ds_process_group", None)) for p in params.values()}
    if groups != {world}:
        raise ValueError(
            f"DeepSpeed ZeRO-3 partitions the parameters over groups of {sorted(groups)} ranks, "
            f"not over all {world} (MiCS or hierarchical partitioning): EMATrainerCallback "
            "supports ZeRO-3 partitioned over the whole world only"
        )
    shapes = {n: [int(d) for d in p.ds_shape] for n, p in params.items()}  # type: ignore[attr-defined]
    return (dist.get_rank(), world), shapes


def _layout_error(what: str) -> RuntimeError:
    """The error for a ``Trainer`` this adapter does not know how to hook: it names the
    installed transformers version, since every such assumption is tested per version."""
    return RuntimeError(
        f"EMATrainerCallback cannot hook this Trainer (transformers {transformers.__version__}): "
        f"{what}. The adapter is tested with transformers 4.47 to 5.x; please report the "
        "Trainer class and version"
    )


def _find_trainer(callback: Any, hook: str, depth: int = 12) -> tuple[Any, dict[str, Any]]:
    """The ``Trainer`` whose callback handler runs ``callback.<hook>``, and the locals of its
    frame. The Trainer passes itself to no callback and has no public way to find it, so this
    walks up the calling frames to the first ``transformers.Trainer`` (subclasses included)
    whose ``callback_handler.callbacks`` holds this very callback; a RuntimeError naming the
    transformers version if there is none (a hook called by hand, or a Trainer that no longer
    calls its callbacks from its own methods), rather than an EMA that is never evaluated.
    """
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, transformers.Trainer):
            handler = getattr(owner, "callback_handler", None)
            if any(c is callback for c in getattr(handler, "callbacks", ())):
                return owner, dict(frame.f_locals)
        frame = frame.f_back  # type: ignore[assignment]
    raise _layout_error(
        f"{hook} was not called by a transformers.Trainer holding this callback (the Trainer "
        "is found on the call stack: it passes itself to no callback); give the callback to "
        "Trainer(callbacks=[...]) or trainer.add_callback(...) instead of calling its hooks"
    )


def _resume_path(value: Any, output_dir: str) -> str | None:
    """The checkpoint folder ``Trainer.train(resume_from_checkpoint=value)`` resumes from, as
    the Trainer documents it: a path, ``True`` for the last checkpoint in ``output_dir``."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if value is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir)
    return None


def _json_list(value: Any) -> Any:
    """A tuple as a list (JSON has no tuples); anything else unchanged."""
    return list(value) if isinstance(value, tuple) else value


def _json_time(value: Any) -> Any:
    """A half-life as JSON: infinity (which JSON lacks) as ``'infba'``, tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_json_time(v) for v in value]
    if isinstance(value, float) and math.isinf(value) and value > 0:
        return "infba"
    return value


_PREPARATION = "_model_preparation_time"


@contextmanager
def _training_weights_in(runs: list[_Run]) -> Iterator[None]:
    """The training weights in the model for the block (an EMA left in by ``final_weights``
    is swapped out), the previous weights back afterwards, whatever happens."""
    held: list[tuple[_Run, str]] = []
    try:
        for run in reversed(runs):
            active = run.controller.active_profile
            if active is not None:
                run.controller.activate(None, None)
                held.append((run, active))
                _sync_gathered(run)
        yield
    finally:
        for run, active in reversed(held):
            run.controller.activate(None, active)
            _sync_gathered(run)


def _profile_metrics(
    trainer: Any,
    run: _Run,
    profile: EMAProfile,
    loop: Any,
    bound: inspect.BoundArguments,
    prefix: str,
    raw: Mapping[str, Any],
) -> dict[str, Any]:
    """The metrics of one profile, ``{prefix}_{profile}_{metric}``: the Trainer's evaluation
    loop run once with that profile's EMA swapped in (O(1)), the training weights back after,
    whatever happens. A profile that has not started is never swapped in: its weights are the
    training weights just evaluated, so their metrics are copied instead of computed again."""
    renamed = f"{prefix}_{profile.name}"
    if not profile.started or profile.weights is None:
        return {
            renamed + key[len(prefix) :]: value
            for key, value in raw.items()
            if key.startswith(prefix + "_") and not key.endswith(_PREPARATION)
        }
    bound.arguments["metric_key_prefix"] = renamed
    model = profile.weights.bound_model or trainer.model
    try:
        with run.controller.ema_weights(model, profile.name):
            _sync_gathered(run)
            output = loop(*bound.args, **bound.kwargs)
    finally:
        bound.arguments["metric_key_prefix"] = prefix
        _sync_gathered(run)
    return {k: v for k, v in output.metrics.items() if not k.endswith(_PREPARATION)}


def _check_evaluation_layout(trainer: Any) -> None:
    """Refuse, at setup, a Trainer whose evaluation the per-profile expansion cannot hook:
    ``trainer.evaluate()`` must run ``trainer.evaluation_loop(..., metric_key_prefix=...)``
    (transformers 4.47 to 5.x do, except 4.x with ``use_legacy_prediction_loop``)."""
    if "metric_key_prefix" not in inspect.signature(trainer.evaluation_loop).parameters:
        raise _layout_error(
            f"{type(trainer).__name__}.evaluation_loop takes no metric_key_prefix, so the "
            "metrics of each EMA profile cannot be named; with several EMAs pass "
            "eval_all=False (only the primary EMA is evaluated)"
        )
    if getattr(trainer.args, "use_legacy_prediction_loop", False):
        raise _layout_error(
            "TrainingArguments(use_legacy_prediction_loop=True) evaluates with prediction_loop, "
            "which the per-profile evaluation does not hook; unset it, or pass eval_all=False"
        )


def _expanding_runs(runs: Mapping[str, _Run]) -> list[_Run]:
    """The runs whose evaluations cover every profile now (none inside ``ema_weights``)."""
    if any(run.manual for run in runs.values()):
        return []
    return [run for run in runs.values() if run.evaluates_profiles]


def _wrap_evaluation(trainer: Any, runs: Mapping[str, _Run]) -> None:
    """Wrap this Trainer instance's ``evaluate`` and ``evaluation_loop`` (the instance
    attributes; the class is untouched), once per Trainer. The Trainer has no hook between
    its evaluation loop and the metrics it logs, so the loop is wrapped; a test per supported
    transformers version proves the layout (``tests/transformers/test_hf_layout.py``).

    Inside ``trainer.evaluate()`` (during training or called by hand), when an EMA callback
    evaluates several EMAs (``eval_all``), the evaluation loop runs on the training weights
    (metrics under the Trainer's names) and then once per profile with its EMA swapped in
    (``{prefix}_{profile}_{metric}``); all the metrics go into the one result that
    ``evaluate`` logs, passes to ``on_evaluate`` and returns. ``predict`` is not affected, nor
    is an evaluation inside :meth:`EMATrainerCallback.ema_weights` (it evaluates what the
    block put in). An ``evaluate`` that ran no ``evaluation_loop`` (a subclass's own) raises
    a RuntimeError instead of returning metrics without the profiles'. An exception inside
    ``evaluate`` puts the training weights back before it propagates.
    """
    if "_ema_callbacks_eval" in vars(trainer):
        return
    guard = _EvalGuard()
    trainer._ema_callbacks_eval = guard
    evaluate, loop = trainer.evaluate, trainer.evaluation_loop
    signature = inspect.signature(loop)

    @functools.wraps(evaluate)
    def evaluate_all(*args: Any, **kwargs: Any) -> Any:
        guard.evaluating += 1
        loops = guard.loops
        try:
            result = evaluate(*args, **kwargs)
        except BaseException:
            for run in runs.values():
                if run.eval_swap:  # the EMA swapped in for this evaluation: training weights back
                    run.eval_swap = False
                    run.controller.exception()
                    _sync_gathered(run)
            raise
        finally:
            guard.evaluating -= 1
        if guard.loops == loops and _expanding_runs(runs):
            raise _layout_error(
                f"{type(trainer).__name__}.evaluate() ran no evaluation_loop, so no EMA "
                "profile was evaluated; with several EMAs on such a Trainer pass eval_all=False"
            )
        return result

    @functools.wraps(loop)
    def evaluation_loop(*args: Any, **kwargs: Any) -> Any:
        if guard.evaluating:
            guard.loops += 1
        chosen = _expanding_runs(runs)
        if not guard.evaluating or guard.expanding or not chosen:
            return loop(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        prefix = str(bound.arguments["metric_key_prefix"])
        guard.expanding = True
        try:
            with _training_weights_in(chosen):
                output = loop(*bound.args, **bound.kwargs)
                raw = dict(output.metrics)
                for run in chosen:
                    for profile in run.controller.profiles:
                        output.metrics.update(
                            _profile_metrics(trainer, run, profile, loop, bound, prefix, raw)
                        )
        finally:
            guard.expanding = False
        return output

    trainer.evaluate = evaluate_all
    trainer.evaluation_loop = evaluation_loop


def _hf_forward(model: nn.Module, batch: Any) -> Any:
    """The model on a batch as the Trainer feeds it: ``model(**batch)``, on the model's
    device (``update_bn_batches``)."""
    device = next((p.device for p in model.parameters()), None)
    if isinstance(batch, Mapping):
        return model(
            **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        )
    return model(batch.to(device) if isinstance(batch, torch.Tensor) else batch)


def _metric_profile(metric: str | None, names: list[str]) -> str | None:
    """The profile whose metric ``metric`` (``metric_for_best_model``) is: ``eval_<profile>_x``
    or, with several evaluation datasets, ``eval_<dataset>_<profile>_x``; None for a metric
    of the training weights. The longest matching name wins.

    >>> _metric_profile('ema_1000ba_accuracy', ['ema_100ba', 'ema_1000ba'])
    'ema_1000ba'
    >>> _metric_profile('eval_loss', ['ema_100ba']) is None
    True
    """
    if not metric:
        return None
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    found = [n for n in names if key.startswith(f"eval_{n}_") or f"_{n}_" in key]
    return max(found, key=len) if found else None


class EMATrainerCallback(TrainerCallback, ExportableState):
    """An EMA of the model's weights for the Hugging Face ``Trainer``.

    Time strings count the Trainer's progress: ``ba`` = optimizer steps (``state.global_step``,
    once per accumulated step), ``ep`` = ``state.epoch`` (fractional), ``sp`` = samples
    (exact for datasets with a length; ``global_step * total batch size`` otherwise), ``tok`` =
    ``state.num_input_tokens_seen`` (needs ``include_num_input_tokens_seen``), ``dur`` =
    ``global_step / max_steps``. Optimizer steps the Trainer skipped (fp16 overflow) do not update.

    During training the EMA weights are in the model for every evaluation the Trainer runs and
    the training weights are back before the next step; checkpoints hold the *training* weights
    in the model files (so resume is exact) and the EMA in ``checkpoint-N/{name}_state.*``.
    After ``train()`` the model holds ``final_weights`` (default the EMA, so
    ``trainer.save_model()`` writes it). Use :meth:`ema_weights` to evaluate with the EMA
    yourself.

    Several EMAs (*profiles*): a list for one of ``half_life``, ``smoothing`` or ``sigma_rel``,
    or ``profiles``. Then every evaluation (``eval_all``) covers the training weights, under the
    Trainer's metric names (``eval_loss``), and each profile, as ``eval_<profile>_<metric>``
    (``eval_ema_1000ba_loss``), in one metrics dict; ``metric_for_best_model`` can name either.
    The first profile is the primary one: kept after ``train()``, and the one
    ``load_ema_state(...)['shadow']`` and ``ema-callbacks export`` read.

    The options every entry point shares (the average, its schedule, the tensors averaged,
    evaluation, the post-hoc snapshots) are documented once, in :mod:`ema_callbacks.options`
    (``docs/options.md``), and listed under Args at import; the transformers-only one first.

    Args:
        name: file prefix in checkpoints (two callbacks need two names).

    All arguments are plain JSON values (lists and mappings included, as ``trainer_state.json``
    stores them) and are validated here.

    >>> EMATrainerCallback(half_life='1ep', final_weights='training').controller.schedule.describe()
    'half_life=1ep'
    >>> cb = EMATrainerCallback(profiles=[{'name': 'fast', 'half_life': '10ba'},
    ...                                   {'name': 'slow', 'smoothing': 0.999}])
    >>> cb.controller.names, cb.controller.eval_all
    (['fast', 'slow'], True)
    >>> EMATrainerCallback(name='a/b')
    Traceback (most recent call last):
    ...
    ValueError: name must be a file-name component of at most 100 letters, digits, '_', '.' or '-', not starting with '.' or '-' (it names checkpoint files); got 'a/b'

    A full run (the tests run this for real)::

    >>> trainer = Trainer(model, args, train_dataset=data,            # doctest: +SKIP
    ...                   callbacks=[EMATrainerCallback(half_life=['50ba', '500ba'])])
    >>> trainer.train()                                               # doctest: +SKIP
    >>> trainer.evaluate()['eval_ema_500ba_loss']                     # doctest: +SKIP
    >>> trainer.save_model('ema-model')                               # doctest: +SKIP
    """

    # Over 300 lines: one method per Trainer event, the checkpoint files, resume and the
    # several-profile evaluation (docs/transformers.md); the EMA logic is the controller's.

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
        final_weights: str = "ema",
        eval_with_ema: bool = True,
        train_with_ema_weights: bool = False,
        name: str = "ema",
        profiles: list[dict[str, Any]] | None = None,
        eval_all: bool | None = None,
        snapshot_every: str | None = None,
        snapshot_dtype: str = "float16",
        snapshot_keep: int | None = None,
        snapshot_folder: str | None = None,
        stream: bool = False,
        fused_optimizer: bool = False,
        ema_power: float | None = None,
        bias_power: float | None = None,
        lag: float | None = None,
        multiplier: float | None = None,
        min_ema_multiplier: float | None = None,
        uniform: bool = False,
        update_bn_batches: int | None = None,
    ) -> None:
        for arg, value in (("dtype", dtype), ("device", device)):
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"{arg} must be a string like 'float32' / 'cpu' or None; got {value!r}"
                )
        if not isinstance(name, str):
            raise TypeError(f"name must be a string like 'ema'; got {name!r}")
        if not _NAME.fullmatch(name) or len(name) > _NAME_MAX:
            raise ValueError(
                "name must be a file-name component of at most "
                f"{_NAME_MAX} letters, digits, '_', '.' or '-', not starting with '.' or '-' "
                f"(it names checkpoint files); got {name!r}"
            )
        if snapshot_every is not None and not isinstance(snapshot_every, str):
            raise TypeError(
                f"snapshot_every must be a time string like '1000ba' or None; got {snapshot_every!r}"
            )
        snapshot_folder = _snapshot_folder_option(snapshot_folder, snapshot_every)
        if isinstance(profiles, (list, tuple)) and all(isinstance(p, Mapping) for p in profiles):
            profiles = [
                {k: _json_time(v) if k == "half_life" else _json_list(v) for k, v in p.items()}
                for p in profiles
            ]
        # Every shared option, as given, in the JSON forms trainer_state.json keeps.
        self._options: dict[str, Any] = {
            **forwarded(locals()),
            "half_life": _json_time(half_life),
            "smoothing": _json_list(smoothing),
            "sigma_rel": _json_list(sigma_rel),
            "include": _json_list(include),
            "exclude": _json_list(exclude),
            "profiles": profiles,
        }
        self.name = name
        self.snapshot_folder = snapshot_folder
        self._run = _Run(EMAController.create(**self._options))  # validates everything
        self.fused_optimizer = check_adapter_option(self.controller, fused_optimizer)
        if fused_optimizer and any(
            TimeUnit.EPOCH in p.schedule.units for p in self.controller.profiles
        ):
            raise ValueError(
                f"{ADAPTER_OPTION} updates inside optimizer.step(), before the Trainer sets "
                "state.epoch, so the schedule's 'ep' times are not known there: give them in "
                "'ba' (optimizer steps per epoch: len(train_dataloader) / "
                f"gradient_accumulation_steps) or {NO_FUSED}"
            )
        #: graphs compiled by the fused optimizer step so far (``fused_optimizer``)
        self.fused_compilations = 0

    # -- JSON state (trainer_state.json) ---------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The constructor arguments (JSON), as the Trainer stores them in ``trainer_state.json``.
        The tensors live in ``checkpoint-N/{name}_state.*`` instead.

        >>> EMATrainerCallback(half_life='2ep').state()['args']['half_life']
        '2ep'
        >>> EMATrainerCallback(half_life=('10ba', float('inf'))).state()['args']['half_life']
        ['10ba', 'infba']
        """
        return {
            "args": {
                **self._options,
                "name": self.name,
                "snapshot_folder": self.snapshot_folder,
                "fused_optimizer": self.fused_optimizer,
            },
            "attributes": {},
        }

    @property
    def controller(self) -> EMAController:
        """The controller holding the EMAs: ``controller.weights.state_dict()`` is the primary
        shadow, ``controller.profile(name).weights`` each profile's.

        >>> EMATrainerCallback(sigma_rel=[0.05, 0.1]).controller.names
        ['ema_sigma_rel0.05', 'ema_sigma_rel0.1']
        """
        return self._run.controller

    # -- translation helpers ---------------------------------------------------------------

    def _clock(self, args: Any, state: Any, step: int | None = None) -> Clock:
        step = int(state.global_step) if step is None else step
        total_batch = int(state.train_batch_size or args.per_device_train_batch_size)
        total_batch *= int(args.gradient_accumulation_steps) * int(args.world_size)
        run = self._run
        if run.samples_per_epoch and run.steps_per_epoch:
            epochs, in_epoch = divmod(step, run.steps_per_epoch)
            samples = epochs * run.samples_per_epoch + min(
                run.samples_per_epoch, in_epoch * total_batch
            )
        else:
            samples = step * total_batch
        counts_tokens = args.include_num_input_tokens_seen not in ("no", False, None)
        return Clock(
            batch=step,
            epoch=float(state.epoch or 0.0),
            sample=samples,
            token=int(state.num_input_tokens_seen) if counts_tokens else None,
            duration=min(1.0, step / state.max_steps) if state.max_steps else None,
        )

    def _attach(self, trainer: Any) -> None:
        """Register this callback's run on ``trainer`` and guard ``trainer.train``.

        A callback the Trainer rebuilds from ``trainer_state.json``
        (``restore_callback_states_from_checkpoint``) finds the run of the one it replaced
        here and joins it, so the callback object you hold keeps seeing the EMA.

        The Trainer has no exception hook: its ``train`` (this instance's attribute, not the
        class's) is wrapped so that training weights are in the model before a run loads a
        checkpoint and after any exception, which is then re-raised. Its ``evaluate`` and
        ``evaluation_loop`` are wrapped once per Trainer (:func:`_wrap_evaluation`) to
        evaluate every profile; a Trainer whose evaluation that cannot hook is refused here.
        The wrapped ``train`` also records its ``resume_from_checkpoint`` (the documented
        argument) for :meth:`on_train_begin`.
        """
        runs = vars(trainer).setdefault("_ema_callbacks_runs", {})
        if self._run.evaluates_profiles:
            _check_evaluation_layout(trainer)
        _wrap_evaluation(trainer, runs)
        run = runs.get(self.name)
        if run is not None:
            if run is not self._run:
                self._run = run
            return
        if self._run.evaluates_profiles:
            for other in runs.values():
                shared = sorted(set(other.controller.names) & set(self.controller.names))
                if other.evaluates_profiles and shared:
                    raise ValueError(
                        f"two EMA callbacks on this Trainer evaluate profiles named {shared}: "
                        "their metrics would overwrite each other; name the profiles apart "
                        "(profiles=[{'name': 'fast', 'half_life': '100ba'}, ...])"
                    )
        runs[self.name] = run = self._run
        original = trainer.train
        signature = inspect.signature(original)

        @functools.wraps(original)
        def train(*args: Any, **kwargs: Any) -> Any:
            run.eval_swap = False
            run.controller.exception()
            _sync_gathered(run)
            try:
                resume = signature.bind(*args, **kwargs).arguments.get("resume_from_checkpoint")
            except TypeError:
                resume = None  # the Trainer raises its own error for bad arguments
            run.train_call = (resume,)
            try:
                return original(*args, **kwargs)
            except BaseException:
                run.eval_swap = False
                run.unfuse_step()
                run.controller.exception()
                _sync_gathered(run)
                raise
            finally:
                run.train_call = None

        trainer.train = train

    def _eval_start(self, control: Any, model: nn.Module) -> None:
        if control.should_evaluate:
            self.controller.eval_start(model)
            self._run.eval_swap = self.controller.weights_active == "ema"
            _sync_gathered(self._run)

    def _load(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The EMA state in checkpoint folder ``path``: under ZeRO-3 this rank's own file (or a
        full state, whose partitions each rank then takes), otherwise the single file."""
        shard = self._run.shard
        if shard is None:
            return load_ema_state(path, self.name)
        try:
            return load_ema_state(path, self.name, shard)
        except FileNotFoundError:
            if os.path.isfile(_paths(path, self.name)[1]):
                return load_ema_state(path, self.name)  # a full EMA: sliced per rank on load
            other = sorted(w for w in _shard_files(path, self.name) if w != shard[1])
            if other:
                raise ValueError(
                    f"the EMA state in {os.fspath(path)!r} was written by {other[0]} ZeRO-3 ranks "
                    f"and this run has {shard[1]}: the EMA partitions do not fit. Resume with "
                    f"{other[0]} processes, or export the full EMA first: "
                    "ema_callbacks.transformers.save_ema_state(load_ema_state(path), path) "
                    f"writes {self.name}_state.* (reassembled from the rank files), which any "
                    "world size can load"
                ) from None
            raise

    def _resume(self, args: Any, state: Any, resume_path: Any) -> None:
        path = _resume_path(resume_path, args.output_dir)
        if path is None:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        try:
            self.controller.load_state_dict(self._load(path))
        except FileNotFoundError as err:
            if type(self).__name__ in (state.stateful_callbacks or {}):
                raise FileNotFoundError(
                    f"resuming from {os.fspath(path)!r}, which was written with an EMA callback, "
                    f"but its EMA state is missing: {err}"
                ) from err
            warnings.warn(
                f"resuming from {os.fspath(path)!r}, which holds no EMA state: the EMA starts "
                "afresh from the resumed weights",
                UserWarning,
                stacklevel=2,
            )

    # -- hooks -----------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._attach(_find_trainer(self, "on_init_end")[0])
        clock = self._clock(args, state)
        # 'dur' is known from on_train_begin on (max_steps); check the rest now.
        self.controller.check_clock(
            Clock(clock.batch, clock.epoch, clock.sample, clock.token, 0.0), _TOKENS_HINT
        )

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        assert model is not None
        trainer, frame = _find_trainer(self, "on_train_begin")
        self._attach(trainer)
        run = self._run
        # The checkpoint: train()'s own argument, recorded by the wrapper; for a train() that
        # started before this callback was added (trainer.add_callback), the training loop's
        # local of that name (the loop's layout is tested per transformers version).
        resume = run.train_call[0] if run.train_call else frame.get("resume_from_checkpoint")
        run.controller.exception()  # a previous train() may have left its EMA in
        _sync_gathered(run)
        run.controller = EMAController.create(**self._options)
        if run.controller.update_bn_batches is not None and train_dataloader is not None:
            run.controller.bn_source = lambda: (first_batches(train_dataloader), _hf_forward)
        run.eval_swap = False
        run.samples_per_epoch = run.steps_per_epoch = None
        try:
            batches = len(train_dataloader)
            run.samples_per_epoch = len(train_dataloader.dataset)
            accum = int(args.gradient_accumulation_steps)
            run.steps_per_epoch = max(batches // accum + int(batches % accum > 0), 1)
        except (TypeError, AttributeError, NotImplementedError):
            pass  # no length: samples = global_step * total batch size
        layout = _zero3_layout(model)
        run.shard, run.full_shapes = (None, None) if layout is None else layout
        engine = getattr(trainer, "model_wrapped", None)
        run.release_gathered = (
            None if layout is None else getattr(engine, "empty_partition_cache", None)
        )
        if layout is not None and run.release_gathered is None:
            raise ValueError(
                "the model's parameters are DeepSpeed ZeRO-3 partitions, but the Trainer holds "
                "no DeepSpeed engine (trainer.model_wrapped.empty_partition_cache) to release "
                "the gathered weights after an EMA swap; train with the Trainer's own DeepSpeed "
                "integration (TrainingArguments(deepspeed=...))"
            )
        if state.global_step > 0:
            self._resume(args, state, resume)
        run.controller.fit_start(model, self._clock(args, state), _TOKENS_HINT)
        _sync_gathered(run, force=True)  # a resume may have written training partitions
        if run.controller.snapshot_schedule is not None and self._writes_snapshots(state):
            # After the resume: a resumed run may add to its own snapshots.
            run.controller.check_snapshot_folder(self._snapshot_folder_for(args))
        run.unfuse_step()
        if self.fused_optimizer:
            self._fuse(trainer, args, state, model, kwargs.get("optimizer"))

    def _fuse(self, trainer: Any, args: Any, state: Any, model: nn.Module, optimizer: Any) -> None:
        """``fused_optimizer=True``: the torch optimizer inside the Trainer's (accelerate's)
        wrapper steps through one compiled function doing the step and the updates due once it
        is done (the clock :meth:`on_step_end` will see: ``global_step + 1``)."""
        if getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                f"{ADAPTER_OPTION}: DeepSpeed steps its own optimizer inside engine.step(), "
                f"which a compiled function cannot wrap; {NO_FUSED}"
            )
        while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"{ADAPTER_OPTION} needs the Trainer's optimizer to be a torch.optim.Optimizer; "
                f"got {type(optimizer).__name__}: {NO_FUSED}"
            )
        run = self._run
        fused = FusedUpdate(run.controller, optimizer, option=ADAPTER_OPTION, instead=NO_FUSED)

        def step() -> None:
            fused(model, self._clock(args, state, int(state.global_step) + 1))
            self.fused_compilations = fused.compilations

        run.unfuse = replace_step(optimizer, step)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.eval_swap = False
        self.controller.train_start()
        _sync_gathered(self._run)

    on_epoch_begin = on_step_begin

    def on_step_end(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        assert model is not None
        clock = self._clock(args, state)
        run = self._run
        # (with fused_optimizer the optimizer's step did the update, unless it was skipped)
        if run.unfuse is None and not getattr(optimizer, "step_was_skipped", False):
            self.controller.batch_end(model, clock)
        self._snapshot(args, state, clock)
        self._eval_start(control, model)

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        assert model is not None
        self.controller.train_start()
        _sync_gathered(self._run)
        clock = self._clock(args, state)
        self.controller.epoch_end(model, clock)
        self._snapshot(args, state, clock)
        self._eval_start(control, model)

    def _snapshot(self, args: Any, state: Any, clock: Clock) -> None:
        """Post-hoc snapshots of the ``sigma_rel`` profiles when ``snapshot_every`` is due (every
        rank calls this, sharded EMAs are gathered; the main process writes)."""
        if self.controller.snapshot_due(clock):
            folder = self._snapshot_folder_for(args)
            self.controller.write_snapshots(folder, clock, write=self._writes_snapshots(state))

    def _writes_snapshots(self, state: Any) -> bool:
        """The one process that writes snapshots: the main process, or under ZeRO-3 the
        DeepSpeed rank 0 (on CPU DeepSpeed the Trainer may see every process as the main one)."""
        shard = self._run.shard
        return bool(state.is_world_process_zero) if shard is None else shard[0] == 0

    def _snapshot_folder_for(self, args: Any) -> str:
        return self.snapshot_folder or os.path.join(args.output_dir, f"{self.name}_snapshots")

    def on_evaluate(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if self._run.eval_swap:
            self._run.eval_swap = False
            self.controller.eval_end(model)
            _sync_gathered(self._run)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # ZeRO-3: every rank holds a different part of the EMA, so every rank writes its own.
        shard = self._run.shard
        if shard is None and not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"the Trainer's checkpoint folder {folder!r} does not exist; the EMA state "
                "is written into output_dir/checkpoint-<global_step>"
            )
        # training=None: the training weights are added only if the EMA is in the model.
        save_ema_state(
            self.controller.state_dict(), folder, self.name, shard, self._run.full_shapes
        )

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        assert model is not None
        self._run.eval_swap = False
        self._run.unfuse_step()
        controller = self.controller
        controller.train_start()
        best = args.load_best_model_at_end and state.best_model_checkpoint
        if best:
            # The Trainer just loaded the best checkpoint's (training) weights; its metric was
            # measured on the weights evaluated then: that checkpoint's EMA (one profile, or
            # the profile the metric names) or its training weights (a raw metric).
            controller.load_state_dict(self._load(state.best_model_checkpoint))
            controller.setup(model)
        controller.fit_end(model)
        if best and self._run.evaluates_profiles and controller.final_weights == "ema":
            chosen = _metric_profile(args.metric_for_best_model, controller.names)
            profile = None if chosen is None else controller.profile(chosen)
            if profile is None or not profile.started or profile.weights is None:
                controller.train_start()  # the metric was the training weights'
            elif profile is not controller.primary:
                controller.activate(model, profile.name)
        _sync_gathered(self._run, force=True)  # the Trainer may have loaded the best weights

    # -- using the EMA ---------------------------------------------------------------------

    @contextmanager
    def ema_weights(self, model: nn.Module, profile: str | None = None) -> Iterator[nn.Module]:
        """The EMA weights of ``profile`` (default the primary one) in ``model`` for the block,
        the previous weights back in ``finally``; for ``trainer.evaluate()`` /
        ``trainer.predict()`` of one EMA under the Trainer's own metric names::

            with callback.ema_weights(trainer.model, 'ema_1000ba'):
                metrics = trainer.evaluate()     # one evaluation, of that profile only

        Before that EMA has started the model keeps its weights.

        >>> cb = EMATrainerCallback(half_life='2ba')
        >>> m = torch.nn.Linear(1, 1)
        >>> with cb.ema_weights(m) as same:
        ...     same is m
        True
        >>> with cb.ema_weights(m, 'nope'):
        ...     pass
        Traceback (most recent call last):
        ...
        KeyError: "no EMA profile named 'nope'; the profiles are ['ema_2ba']"
        """
        self.controller.profile(profile)  # a KeyError for an unknown name, before any swap
        self._run.manual += 1
        try:
            with self.controller.ema_weights(model, profile):
                _sync_gathered(self._run)
                yield model
        finally:
            self._run.manual -= 1
            _sync_gathered(self._run)

    def save_ema_model(
        self, trainer: Any, output_dir: str | os.PathLike[str], profile: str | None = None
    ) -> str:
        """Save the EMA of ``profile`` (default the primary one) as a ``save_pretrained``
        folder, through ``trainer.save_model``: the config, the weights with tied weights tied,
        and the tokenizer or processor the Trainer holds. ``from_pretrained(output_dir)`` then
        loads the EMA, ready for ``push_to_hub``. The model holds its previous weights again
        afterwards, also when the save fails. Call it on every process in a distributed run
        (the Trainer gathers and writes on the main one). Returns ``output_dir``.

        Use it after ``trainer.train()`` with ``final_weights='training'``, or for another
        profile than the one left in the model; with the default ``final_weights='ema'``
        a plain ``trainer.save_model()`` already writes the EMA.

        Refused (``ValueError``): an EMA that has not started (the folder would hold the
        training weights under the EMA's name) and an ``output_dir`` that is one of the
        Trainer's checkpoint folders (its weights are the ones a resume needs).

        >>> cb = EMATrainerCallback(half_life='2ba')
        >>> cb.save_ema_model(None, 'ema_model')  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: save_ema_model: the EMA 'ema_2ba' has not started (no update yet)...
        """
        chosen = self.controller.profile(profile)
        if not chosen.started or chosen.weights is None:
            raise ValueError(
                f"save_ema_model: the EMA {chosen.name!r} has not started (no update yet), so "
                "there are no EMA weights to save; train first (or lower ema_start)"
            )
        folder = os.fspath(output_dir)
        if re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.normpath(folder))) and (
            os.path.isfile(os.path.join(folder, "trainer_state.json"))
        ):
            raise ValueError(
                f"save_ema_model: output_dir={folder!r} is a Trainer checkpoint folder; writing "
                "the EMA there would replace the training weights a resume needs: choose "
                "another folder"
            )
        model = getattr(trainer, "model", None)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"save_ema_model: trainer must be the transformers Trainer that trained with "
                f"this callback; got {type(trainer).__name__}"
            )
        with self.ema_weights(model, chosen.name):
            trainer.save_model(folder)
        return folder


document(
    EMATrainerCallback,
    notes={
        "snapshot_folder": "Default ``<output_dir>/{name}_snapshots``, i.e. ``ema_snapshots``: "
        "outside the checkpoint folders, so ``save_total_limit`` does not rotate them.",
        "update_bn_batches": "Each training batch (a mapping) goes through the model as "
        "``model(**batch)``, moved to the model's device, as the Trainer feeds it.",
    },
)
