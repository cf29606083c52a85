"""Tiny, seeded Composer runs shared by the Composer adapter tests (CPU, about a second each)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from composer import Callback, Trainer
from composer.algorithms import EMA as ComposerEMA
from composer.core import State
from composer.loggers import Logger
from composer.metrics import CrossEntropy
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ema_callbacks.composer import EMA
from ema_callbacks.weights import normalize_name

BATCHES_PER_EPOCH = 4
BATCH_SIZE = 8

logging.getLogger("composer").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*No batches were.*")


def make_model(seed: int = 0) -> ComposerClassifier:
    """Linear-BatchNorm-ReLU-Linear: parameters, float buffers and an integer buffer."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return ComposerClassifier(net, num_classes=3, val_metrics=CrossEntropy())


def make_loader(seed: int, batches: int = BATCHES_PER_EPOCH) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * BATCH_SIZE, 8, generator=g)
    y = torch.randint(0, 3, (batches * BATCH_SIZE,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=False)


def float_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items() if v.is_floating_point()}


def ema_tensors(algo: Any) -> dict[str, torch.Tensor] | None:
    """The EMA of either algorithm, by normalised name (None before it has started)."""
    if isinstance(algo, EMA):
        c = algo.controller
        if not c.started or c.weights is None:
            return None
        return float_tensors(c.weights.state_dict())
    if not algo.ema_started or algo.ema_weights_active:
        return None
    m = algo.ema_model
    return float_tensors(
        {
            normalize_name(k): v
            for k, v in {**m.named_buffers_dict, **m.named_parameters_dict}.items()
        }
    )


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return float_tensors({normalize_name(k): v for k, v in sd.items()})


class Recorder(Callback):
    """Records, after the algorithms ran: the EMA and the training weights at every
    BATCH_END, the eval metrics at every EVAL_END, and the event sequence."""

    def __init__(self, algo: Any) -> None:
        self.algo = algo
        self.ema: list[dict[str, torch.Tensor] | None] = []
        self.training: list[dict[str, torch.Tensor]] = []
        self.eval_metrics: list[float] = []
        self.eval_weights: list[dict[str, torch.Tensor]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.ema.append(ema_tensors(self.algo))
        self.training.append(model_tensors(state.model))

    def eval_start(self, state: State, logger: Logger) -> None:
        self.eval_weights.append(model_tensors(state.model))

    def eval_end(self, state: State, logger: Logger) -> None:
        for name, value in state.eval_metric_values.items():
            if "CrossEntropy" in name:
                self.eval_metrics.append(float(value))


def run(
    algo: Any,
    max_duration: str = "12ba",
    *,
    seed: int = 0,
    eval_interval: str | None = "3ba",
    callbacks: list[Callback] | None = None,
    model: nn.Module | None = None,
    fit: bool = True,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Recorder]:
    """A seeded CPU run: SGD with momentum, 4 batches per epoch."""
    model = make_model(seed) if model is None else model
    recorder = Recorder(algo)
    extra: dict[str, Any] = {}
    if eval_interval is not None:
        extra = {"eval_dataloader": make_loader(seed + 1, 2), "eval_interval": eval_interval}
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(seed),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
        algorithms=[algo] if algo is not None else [],
        callbacks=[recorder, *(callbacks or [])],
        device="cpu",
        seed=seed,
        progress_bar=False,
        log_to_console=False,
        **extra,
        **trainer_kwargs,
    )
    if fit:
        trainer.fit()
    return trainer, recorder


__all__ = [
    "BATCHES_PER_EPOCH",
    "EMA",
    "ComposerEMA",
    "Recorder",
    "ema_tensors",
    "make_loader",
    "make_model",
    "model_tensors",
    "run",
]
