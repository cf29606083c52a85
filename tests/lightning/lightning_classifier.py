"""A tiny classifier with torchmetrics objects, for the Lightning adapter's tests of several
EMAs (``test_lightning_profiles.py``): accuracy is a ``Metric`` logged as an object, a macro
accuracy and a micro accuracy share a ``MetricCollection`` (one compute group), the loss is a
tensor. Validation batches have different sizes, so epoch means are weighted by batch size.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

CLASSES = 3
_W = torch.randn(4, CLASSES, generator=torch.Generator().manual_seed(1))


def cls_batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic ``(x, y)`` batch of ``n``: ``y`` is the argmax of a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x @ _W).argmax(dim=1)


class Batches:
    """An iterable of fixed batches (a single dataloader to Lightning)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return iter(self.batches)


def val_batches() -> Batches:
    return Batches([cls_batch(1000, 8), cls_batch(1001, 5)])


class TinyClassifier(LightningModule):
    """Linear -> ReLU -> Linear over 3 classes, SGD. ``crash_in_ema``: raise in
    ``validation_step`` while an EMA is in the model (``ema_active`` is set by the test).

    >>> TinyClassifier().net[0].weight.shape
    torch.Size([16, 4])
    """

    def __init__(self, lr: float = 0.5, crash_in_ema: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.lr = lr
        self.val_acc = torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro")
        self.val_set = torchmetrics.MetricCollection(
            {
                "macro": torchmetrics.classification.MulticlassAccuracy(CLASSES, average="macro"),
                "micro": torchmetrics.classification.MulticlassAccuracy(CLASSES, average="micro"),
            },
            prefix="val_",
        )
        self.crash_in_ema = crash_in_ema
        self.ema_active: Any = None
        self.grad_enabled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.grad_enabled.append(torch.is_grad_enabled())
        if self.crash_in_ema and self.ema_active is not None and self.ema_active():
            raise RuntimeError("crash in an EMA's validation_step")
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc)
        self.val_set.update(logits, y)
        self.log_dict(self.val_set)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ClassifierData(LightningDataModule):
    """``train_batches`` batches of 8 per epoch; two validation batches (8 and 5)."""

    def __init__(self, train_batches: int = 6) -> None:
        super().__init__()
        self.train_batches = train_batches

    def train_dataloader(self) -> Any:
        return Batches([cls_batch(i, 8) for i in range(self.train_batches)])

    def val_dataloader(self) -> Any:
        return val_batches()

    def test_dataloader(self) -> Any:
        return val_batches()

    def predict_dataloader(self) -> Any:
        return val_batches()


@torch.no_grad()
def evaluate(model: TinyClassifier) -> dict[str, float]:
    """The validation metrics of the weights ``model`` holds, computed by hand."""
    model.eval()
    xs, ys = zip(*val_batches(), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    logits = model(x)
    per_class = [((logits.argmax(1) == y) & (y == c)).sum() / (y == c).sum() for c in range(3)]
    # Lightning's epoch mean of a tensor is weighted by batch size: the mean over samples.
    loss = sum(nn.functional.cross_entropy(model(a), b) * len(b) for a, b in val_batches())
    return {
        "val_loss": float(loss / len(y)),
        "val_acc": float((logits.argmax(1) == y).float().mean()),
        "val_micro": float((logits.argmax(1) == y).float().mean()),
        "val_macro": float(torch.stack(per_class).mean()),
    }
