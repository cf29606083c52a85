"""Lightning digits example: a ``LightningModule``, a ``LightningDataModule`` and the demo.

Importable by ``class_path`` from a LightningCLI YAML (the bundled ``lightning_digits``)::

    model:
      class_path: ema_callbacks.examples.lightning_digits.DigitsClassifier
      init_args: {hidden: 128, lr: 0.2}
    data:
      class_path: ema_callbacks.examples.lightning_digits.DigitsDataModule
      init_args: {batch_size: 32}

>>> model = DigitsClassifier(hidden=32, lr=0.1)
>>> model.hparams.lr
0.1
>>> data = DigitsDataModule(batch_size=16)
>>> data.setup('fit')
>>> x, y = next(iter(data.train_dataloader()))
>>> tuple(x.shape), tuple(model(x).shape)
((16, 64), (16, 10))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

try:
    import lightning.pytorch as pl
except ImportError as _err:  # pragma: no cover - exercised only without Lightning
    raise ImportError(
        "ema_callbacks.examples.lightning_digits needs Lightning: "
        'pip install "ema-callbacks[lightning,demo]"'
    ) from _err

from ema_callbacks.examples import (
    DEMO_BATCH_SIZE,
    DEMO_LR,
    DEMO_MOMENTUM,
    ProgressFn,
    _evaluate_raw_and_ema,
    _row,
    digits_datasets,
    digits_mlp,
    evaluate_logits,
    quiet,
)
from ema_callbacks.lightning import EMACallback

__all__ = ["DigitsClassifier", "DigitsDataModule", "run_digits_demo"]

_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


class DigitsClassifier(pl.LightningModule):
    """An MLP on 8x8 digits trained with SGD (momentum ``momentum``); logs ``val_loss`` and
    ``val_acc`` (on the EMA weights when an ``EMACallback`` is in the Trainer).

    Args:
        hidden: width of the hidden layer.
        lr: SGD learning rate (large on purpose: the raw weights bounce, the EMA is steadier).
        momentum: SGD momentum.
        dropout: dropout after the hidden layer.

    >>> DigitsClassifier(hidden=8).configure_optimizers().defaults['momentum']
    0.9
    """

    def __init__(
        self,
        hidden: int = 128,
        lr: float = DEMO_LR,
        momentum: float = DEMO_MOMENTUM,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = digits_mlp(hidden, dropout)
        self.lr = float(lr)
        self.momentum = float(momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, 10)``."""
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        """Cross-entropy on one batch."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Log ``val_loss`` and ``val_acc`` (averaged over the epoch)."""
        x, y = batch
        accuracy, loss = evaluate_logits(self(x), y)
        self.log_dict({"val_loss": loss, "val_acc": accuracy}, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, split 75/25 (``seed`` shuffles the split and the batches).

    >>> data = DigitsDataModule(batch_size=64)
    >>> data.setup('fit')
    >>> len(data.train_dataloader()), len(data.val_dataloader())
    (22, 1)
    """

    def __init__(self, batch_size: int = DEMO_BATCH_SIZE, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str) -> None:
        """Load the digits (bundled with scikit-learn, nothing is downloaded)."""
        if self.train_set is None:
            self.train_set, self.val_set = digits_datasets(self.seed)

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled batches of ``batch_size``."""
        assert self.train_set is not None, "call setup() first"
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator
        )

    def val_dataloader(self) -> DataLoader[Any]:
        """The whole validation split in one batch."""
        assert self.val_set is not None, "call setup() first"
        return DataLoader(self.val_set, batch_size=len(self.val_set))


class _EpochEvaluator(pl.Callback):
    """After every training epoch: evaluate the training weights and the EMA's view."""

    def __init__(
        self, ema: EMACallback, x: torch.Tensor, y: torch.Tensor, total: int, progress: Any
    ) -> None:
        self.ema, self.x, self.y = ema, x, y
        self.total, self.progress = total, progress
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.progress is not None:
            self.progress(min(trainer.global_step, self.total), self.total)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        raw, ema = _evaluate_raw_and_ema(
            pl_module, self.ema.controller.weights, lambda call: call(self.x), self.y
        )
        self.rows.append(_row(trainer.current_epoch + 1, raw, ema))


def run_digits_demo(
    epochs: int = 4,
    half_life: str = "0.5ep",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Train :class:`DigitsClassifier` with a Lightning ``Trainer`` and
    :class:`~ema_callbacks.lightning.EMACallback` (updated every optimizer step); after every
    epoch evaluate the training weights and the EMA weights on the validation split.

    Returns one row per epoch: ``{'epoch', 'raw_accuracy', 'raw_loss', 'ema_accuracy',
    'ema_loss'}``. Quiet (no progress bar, no logs); ``progress(done, total)`` is called after
    every optimizer step.

    >>> rows = run_digits_demo(epochs=1)                      # doctest: +SKIP
    >>> sorted(rows[0])                                       # doctest: +SKIP
    ['ema_accuracy', 'ema_loss', 'epoch', 'raw_accuracy', 'raw_loss']
    """
    return _train(epochs, half_life, seed, progress)[0]


def _train(
    epochs: int, half_life: str, seed: int, progress: ProgressFn | None
) -> tuple[list[dict[str, Any]], DigitsClassifier, EMACallback]:
    """The demo run; also returns the trained model (training weights in) and the callback."""
    ema = EMACallback(
        half_life=half_life, update_interval="1ba", final_weights="training", log_metrics=False
    )
    with quiet(*_LOGGERS):
        torch.manual_seed(seed)
        data = DigitsDataModule(batch_size=DEMO_BATCH_SIZE, seed=seed)
        data.setup("fit")
        assert data.val_set is not None
        x, y = data.val_set.tensors
        steps = len(data.train_dataloader())
        evaluator = _EpochEvaluator(ema, x, y, epochs * steps, progress)
        model = DigitsClassifier(lr=DEMO_LR, momentum=DEMO_MOMENTUM)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[ema, evaluator],
        )
        trainer.fit(model, datamodule=data)
    return evaluator.rows, model, ema
