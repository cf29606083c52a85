"""A tiny LightningModule and DataModule for the Lightning adapter's tests and YAML config.

Imported as ``tests.lightning.lightning_tiny`` (the repository root is on ``sys.path`` under
pytest and when running from the root), so ``configs/lightning.yaml`` can name
``tests.lightning.lightning_tiny.TinyRegression`` as its model ``class_path``.

The training data is a deterministic function of ``(epoch, batch index)``: a resumed run sees
exactly the batches an uninterrupted one saw, whatever Lightning does with a restarted loader.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn


def make_batch(
    epoch: int, index: int, batch_size: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic ``(x, y)`` regression batch for ``(epoch, index)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + index)
    x = torch.randn(batch_size, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(batch_size, 1, generator=g)
    return x, y


class IndexBatches:
    """``n`` batches of ``(x, y)`` per epoch; ``sizes`` gives per-batch sizes (for sample
    counting). :class:`TinyRegression` trains on ``make_batch(epoch, batch_idx, len(x))``, so
    only the sizes matter."""

    def __init__(
        self, n: int = 8, batch_size: int = 4, sizes: list[int] | None = None, seed: int = 0
    ):
        self.n = n
        self.sizes = sizes or [batch_size] * n
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        for i in range(self.n):
            yield make_batch(0, i, self.sizes[i], self.seed)


class ValBatches:
    """Two fixed validation batches of 8."""

    def __len__(self) -> int:
        return 2

    def __iter__(self) -> Any:
        return iter([make_batch(999, i, 8) for i in range(2)])


class TinyMixin:
    """The body of :class:`TinyRegression`, shared with a ``pytorch_lightning`` twin in tests.

    ``crash_at_step``: raise in ``training_step`` when ``global_step`` reaches it;
    ``crash_in_validation``: raise in ``validation_step`` (not during the sanity check).
    ``record``: keep ``(phase, global_step, flattened weights)`` at every step, to check which
    weights each phase ran on. ``norm``: ``'batch'`` (buffers to average) or ``'layer'``.
    """

    def __init__(
        self,
        lr: float = 0.05,
        hidden: int = 8,
        crash_at_step: int | None = None,
        crash_in_validation: bool = False,
        record: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()  # type: ignore[call-arg]
        self.save_hyperparameters()
        torch.manual_seed(0)
        norm_layer = nn.BatchNorm1d(hidden) if norm == "batch" else nn.LayerNorm(hidden)
        self.net = nn.Sequential(nn.Linear(4, hidden), norm_layer, nn.ReLU(), nn.Linear(hidden, 1))
        self.lr = lr
        self.crash_at_step = crash_at_step
        self.crash_in_validation = crash_in_validation
        self.record = record
        self.seen: list[tuple[str, int, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def flat(self) -> torch.Tensor:
        return torch.cat(
            [t.detach().reshape(-1).float().clone() for t in self.state_dict().values()]
        )

    def _note(self, phase: str) -> None:
        if self.record:
            self.seen.append((phase, self.global_step, self.flat()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.crash_at_step is not None and self.global_step >= self.crash_at_step:
            raise RuntimeError(f"crash at step {self.global_step}")
        self._note("train")
        x, y = make_batch(self.current_epoch, batch_idx, batch[0].shape[0])
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._note("sanity" if self.trainer.sanity_checking else "val")
        if self.crash_in_validation and not self.trainer.sanity_checking:
            raise RuntimeError("crash in validation")
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._note("test")
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._note("predict")
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TinyRegression(TinyMixin, LightningModule):
    """Linear -> BatchNorm -> ReLU -> Linear, trained with Adam on a sum-of-inputs target.

    >>> TinyRegression().net[0].weight.shape
    torch.Size([8, 4])
    """


class TinyData(LightningDataModule):
    """Training batches from :class:`IndexBatches`; two fixed validation batches."""

    def __init__(self, train_batches: int = 8, batch_size: int = 4) -> None:
        super().__init__()
        self.train_batches = train_batches
        self.batch_size = batch_size

    def train_dataloader(self) -> Any:
        return IndexBatches(self.train_batches, self.batch_size)

    def val_dataloader(self) -> Any:
        return ValBatches()

    def test_dataloader(self) -> Any:
        return self.val_dataloader()

    def predict_dataloader(self) -> Any:
        return self.val_dataloader()


def first_len(batch: Any) -> int:
    """``batch_size_fn`` for the tests: the length of the inputs."""
    return int(batch[0].shape[0])


def double_len(batch: Any) -> int:
    """A ``batch_size_fn`` that counts every sample twice (proves the option is used)."""
    return 2 * int(batch[0].shape[0])


def count_tokens(batch: Any) -> int:
    """``tokens_fn`` for the tests: every input number is a 'token'."""
    return int(batch[0].numel())
