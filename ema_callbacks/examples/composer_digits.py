"""Composer digits example: a ``ComposerClassifier`` factory, dataloaders and the demo.

Importable by ``class_path`` from a YAML config (the bundled ``composer_digits``)::

    model:
      class_path: ema_callbacks.examples.composer_digits.digits_model
      init_args: {hidden: 128}
    train_dataloader:
      class_path: ema_callbacks.examples.composer_digits.digits_train_dataloader
      init_args: {batch_size: 32}
    eval_dataloader:
      class_path: ema_callbacks.examples.composer_digits.digits_eval_dataloader

>>> model = digits_model(hidden=16)
>>> batch = next(iter(digits_eval_dataloader()))
>>> tuple(model(batch).shape)
(450, 10)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

try:
    from composer import Callback, Trainer
    from composer.core import State
    from composer.loggers import Logger
    from composer.metrics import CrossEntropy
    from composer.models import ComposerClassifier
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy
except ImportError as _err:  # pragma: no cover - exercised only without Composer
    raise ImportError(
        "ema_callbacks.examples.composer_digits needs MosaicML Composer: "
        'pip install "ema-callbacks[composer,demo]"'
    ) from _err

from ema_callbacks.composer import EMA
from ema_callbacks.examples import (
    DEMO_BATCH_SIZE,
    DEMO_LR,
    DEMO_MOMENTUM,
    ProgressFn,
    _evaluate_raw_and_ema,
    _row,
    digits_datasets,
    digits_mlp,
    quiet,
)

__all__ = [
    "digits_eval_dataloader",
    "digits_model",
    "digits_train_dataloader",
    "run_digits_demo",
]


def digits_model(hidden: int = 128, dropout: float = 0.1) -> ComposerClassifier:
    """The digits MLP as a ``ComposerClassifier`` (cross-entropy loss; eval metrics
    ``CrossEntropy`` and ``MulticlassAccuracy`` (micro: the fraction right), no train metrics, which would cost a metric
    update per batch).

    >>> sorted(digits_model(hidden=8).get_metrics(is_train=False))
    ['CrossEntropy', 'MulticlassAccuracy']
    """
    return ComposerClassifier(
        digits_mlp(hidden, dropout),
        num_classes=10,
        train_metrics=MetricCollection([]),
        val_metrics=MetricCollection(
            [CrossEntropy(), MulticlassAccuracy(num_classes=10, average="micro")]
        ),
    )


def digits_train_dataloader(batch_size: int = DEMO_BATCH_SIZE, seed: int = 0) -> DataLoader[Any]:
    """Shuffled ``(x, y)`` batches of the digits' training split (1347 images).

    >>> len(digits_train_dataloader(batch_size=32))
    43
    """
    train, _ = digits_datasets(seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size=int(batch_size), shuffle=True, generator=generator)


def digits_eval_dataloader(batch_size: int = 450, seed: int = 0) -> DataLoader[Any]:
    """The digits' validation split (450 images), one batch by default.

    >>> len(digits_eval_dataloader(batch_size=100))
    5
    """
    _, val = digits_datasets(seed)
    return DataLoader(val, batch_size=int(batch_size))


class _EpochEvaluator(Callback):  # type: ignore[misc]
    """After every epoch (the algorithms, EMA included, ran first): evaluate the training
    weights and the EMA's view."""

    def __init__(
        self, ema: EMA, x: torch.Tensor, y: torch.Tensor, total: int, progress: ProgressFn | None
    ) -> None:
        self.ema, self.x, self.y = ema, x, y
        self.total, self.progress = total, progress
        self.rows: list[dict[str, Any]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.progress is not None:
            self.progress(min(int(state.timestamp.batch), self.total), self.total)

    def epoch_end(self, state: State, logger: Logger) -> None:
        batch = (self.x, self.y)
        raw, ema = _evaluate_raw_and_ema(
            state.model, self.ema.controller.weights, lambda call: call(batch), self.y
        )
        self.rows.append(_row(int(state.timestamp.epoch), raw, ema))


def run_digits_demo(
    epochs: int = 4,
    half_life: str = "0.5ep",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Train :func:`digits_model` with Composer's ``Trainer`` and
    :class:`~ema_callbacks.composer.EMA` (updated every batch); after every epoch evaluate the
    training weights and the EMA weights on the validation split.

    Returns one row per epoch: ``{'epoch', 'raw_accuracy', 'raw_loss', 'ema_accuracy',
    'ema_loss'}``. Quiet (no progress bar, no logs); ``progress(done, total)`` is called after
    every batch.

    >>> rows = run_digits_demo(epochs=1)                      # doctest: +SKIP
    >>> sorted(rows[0])                                       # doctest: +SKIP
    ['ema_accuracy', 'ema_loss', 'epoch', 'raw_accuracy', 'raw_loss']
    """
    return _train(epochs, half_life, seed, progress)[0]


def _train(
    epochs: int, half_life: str, seed: int, progress: ProgressFn | None
) -> tuple[list[dict[str, Any]], ComposerClassifier, EMA]:
    """The demo run; also returns the trained model (training weights in) and the algorithm."""
    ema = EMA(half_life=half_life, update_interval="1ba", final_weights="training")
    with quiet("composer"):
        torch.manual_seed(seed)
        model = digits_model()
        train = digits_train_dataloader(DEMO_BATCH_SIZE, seed)
        _, val = digits_datasets(seed)
        x, y = val.tensors
        evaluator = _EpochEvaluator(ema, x, y, epochs * len(train), progress)
        trainer = Trainer(
            model=model,
            train_dataloader=train,
            max_duration=f"{epochs}ep",
            optimizers=torch.optim.SGD(model.parameters(), lr=DEMO_LR, momentum=DEMO_MOMENTUM),
            algorithms=[ema],
            callbacks=[evaluator],
            loggers=[],
            progress_bar=False,
            log_to_console=False,
            device="cpu",
            seed=seed,
        )
        try:
            trainer.fit()
        finally:
            trainer.close()
    return evaluator.rows, model, ema
