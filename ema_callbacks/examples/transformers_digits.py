"""transformers digits example: a tiny ``PreTrainedModel`` MLP, datasets, metrics and the demo.

Importable by ``class_path`` from a YAML config (the bundled ``transformers_digits``)::

    model:
      class_path: ema_callbacks.examples.transformers_digits.DigitsMLP
      init_args:
        config:
          class_path: ema_callbacks.examples.transformers_digits.DigitsMLPConfig
          init_args: {hidden_size: 128}
    train_dataset:
      class_path: ema_callbacks.examples.transformers_digits.DigitsDataset
      init_args: {split: train}
    compute_metrics: ema_callbacks.examples.transformers_digits.compute_metrics

>>> model = DigitsMLP(DigitsMLPConfig(hidden_size=16))
>>> batch = DigitsDataset('val')[:4]
>>> out = model(**batch)
>>> tuple(out.logits.shape), out.loss.ndim
((4, 10), 0)
"""

# No `from __future__ import annotations`: jsonargparse (transformers 5.23, jsonargparse 4.53)
# cannot resolve postponed annotations of a PretrainedConfig subclass, and would leave
# DigitsMLPConfig's arguments unchecked in a run config.

import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback
    from transformers.modeling_outputs import SequenceClassifierOutput
except ImportError as _err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "ema_callbacks.examples.transformers_digits needs the Hugging Face transformers "
        'library: pip install "ema-callbacks[transformers,demo]"'
    ) from _err

from ema_callbacks.demo import digits_tensors
from ema_callbacks.examples import (
    DEMO_BATCH_SIZE,
    DEMO_LR,
    DEMO_MOMENTUM,
    ProgressFn,
    _evaluate_raw_and_ema,
    _row,
    digits_mlp,
    quiet,
)
from ema_callbacks.transformers import EMATrainerCallback

__all__ = [
    "DigitsDataset",
    "DigitsMLP",
    "DigitsMLPConfig",
    "compute_metrics",
    "run_digits_demo",
]


class DigitsMLPConfig(PretrainedConfig):  # type: ignore[misc]
    """Configuration of :class:`DigitsMLP`.

    >>> DigitsMLPConfig(hidden_size=32).hidden_size
    32
    """

    model_type = "ema-callbacks-digits-mlp"

    def __init__(self, hidden_size: int = 128, dropout: float = 0.1, **kwargs: Any) -> None:
        self.hidden_size = int(hidden_size)
        self.dropout = float(dropout)
        kwargs.setdefault("num_labels", 10)
        super().__init__(**kwargs)


class DigitsMLP(PreTrainedModel):  # type: ignore[misc]
    """An MLP on 8x8 digits: ``forward(pixel_values, labels=None)`` returns a
    ``SequenceClassifierOutput`` with ``logits`` and, given labels, the cross-entropy ``loss``.

    PyTorch's default initialisation is kept (the same model as the other trainers' demos).

    >>> model = DigitsMLP(DigitsMLPConfig(hidden_size=8))
    >>> model(torch.zeros(2, 64)).logits.shape
    torch.Size([2, 10])
    """

    config_class = DigitsMLPConfig
    base_model_prefix = "digits"
    main_input_name = "pixel_values"

    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__(config)
        self.net = digits_mlp(config.hidden_size, config.dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation."""

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> SequenceClassifierOutput:
        """Logits, and the loss when ``labels`` are given."""
        logits = self.net(pixel_values)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class DigitsDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """One split of the digits as ``{'pixel_values': (64,) float, 'labels': int64}`` items.

    Args:
        split: ``'train'`` (1347 images) or ``'val'`` (450).
        seed: shuffles the 75/25 split.

    >>> data = DigitsDataset('train')
    >>> len(data), sorted(data[0])
    (1347, ['labels', 'pixel_values'])
    """

    def __init__(self, split: str = "train", seed: int = 0) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
        x, y, xv, yv = digits_tensors(seed)
        self.pixel_values, self.labels = (x, y) if split == "train" else (xv, yv)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: Any) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``{'accuracy': ...}`` from the Trainer's ``EvalPrediction`` (logits, label ids).

    >>> from transformers import EvalPrediction
    >>> compute_metrics(EvalPrediction(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 1])))
    {'accuracy': 0.5}
    """
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.asarray(logits).argmax(axis=-1) == labels).mean())}


class _EpochEvaluator(TrainerCallback):  # type: ignore[misc]
    """After every epoch: evaluate the training weights and the EMA's view."""

    def __init__(
        self, ema: EMATrainerCallback, data: DigitsDataset, progress: ProgressFn | None
    ) -> None:
        self.ema, self.data, self.progress = ema, data, progress
        self.rows: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress(int(state.global_step), int(state.max_steps))

    def on_epoch_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any
    ) -> None:
        raw, ema = _evaluate_raw_and_ema(
            model,
            self.ema.controller.weights,
            lambda call: call(pixel_values=self.data.pixel_values).logits,
            self.data.labels,
        )
        self.rows.append(_row(round(float(state.epoch)), raw, ema))


def run_digits_demo(
    epochs: int = 4,
    half_life: str = "0.5ep",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Train :class:`DigitsMLP` with the Hugging Face ``Trainer`` and
    :class:`~ema_callbacks.transformers.EMATrainerCallback` (updated every optimizer step);
    after every epoch evaluate the training weights and the EMA weights on the validation
    split.

    Returns one row per epoch: ``{'epoch', 'raw_accuracy', 'raw_loss', 'ema_accuracy',
    'ema_loss'}``. Quiet (no progress bar, no logs); ``progress(done, total)`` is called after
    every optimizer step. Nothing is written outside a temporary folder.

    >>> rows = run_digits_demo(epochs=1)                      # doctest: +SKIP
    >>> sorted(rows[0])                                       # doctest: +SKIP
    ['ema_accuracy', 'ema_loss', 'epoch', 'raw_accuracy', 'raw_loss']
    """
    return _train(epochs, half_life, seed, progress)[0]


def _train(
    epochs: int, half_life: str, seed: int, progress: ProgressFn | None
) -> tuple[list[dict[str, Any]], DigitsMLP, EMATrainerCallback]:
    """The demo run; also returns the trained model (training weights in) and the callback."""
    ema = EMATrainerCallback(half_life=half_life, update_interval="1ba", final_weights="training")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with quiet("transformers", "accelerate"), tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(seed)
            model = DigitsMLP(DigitsMLPConfig())
            val = DigitsDataset("val", seed)
            evaluator = _EpochEvaluator(ema, val, progress)
            args = transformers.TrainingArguments(
                output_dir=folder,
                num_train_epochs=epochs,
                per_device_train_batch_size=DEMO_BATCH_SIZE,
                learning_rate=DEMO_LR,
                optim="sgd",
                optim_args=f"momentum={DEMO_MOMENTUM}",
                lr_scheduler_type="constant",
                max_grad_norm=0.0,
                eval_strategy="no",
                save_strategy="no",
                logging_strategy="no",
                report_to="none",
                disable_tqdm=True,
                use_cpu=True,
                dataloader_pin_memory=False,
                seed=seed,
            )
            trainer = transformers.Trainer(
                model=model,
                args=args,
                train_dataset=DigitsDataset("train", seed),
                callbacks=[ema, evaluator],
            )
            trainer.remove_callback(transformers.PrinterCallback)
            trainer.train()
    finally:
        transformers.logging.set_verbosity(verbosity)
    return evaluator.rows, model, ema
