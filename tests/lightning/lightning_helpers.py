"""Shared helpers for the Lightning adapter's tests: run a real Trainer, record the training
weights after every optimizer step, and compute the reference EMA by hand."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from tests.lightning.lightning_tiny import TinyData, TinyRegression

QUIET = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "devices": 1,
    "enable_checkpointing": False,
}


class StepRecorder(Callback):
    """Training weights (by state_dict name) after every optimizer step, read in
    ``on_train_batch_end`` once ``global_step`` moved."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._last = -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.steps.append((trainer.global_step, state))


def fit(
    callbacks: Sequence[Callback],
    *,
    model: TinyRegression | None = None,
    data: Any = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, TinyRegression]:
    kwargs: dict[str, Any] = {**QUIET, "num_sanity_val_steps": 0, "limit_val_batches": 0}
    kwargs.update(trainer_kwargs)
    model = model or TinyRegression()
    trainer = Trainer(callbacks=list(callbacks), **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.*treespec.*")
        trainer.fit(model, data if data is not None else TinyData(), ckpt_path=ckpt_path)
    return trainer, model


def reference_ema(
    steps: Sequence[dict[str, torch.Tensor]], betas: Sequence[float | None]
) -> dict[str, torch.Tensor]:
    """Hand-computed EMA: ``betas[i] is None`` copies step ``i``'s weights (initialisation or
    no update: use ``math.nan`` to skip a step), otherwise ``ema = beta*ema + (1-beta)*w``.
    Integer tensors follow the weights."""
    ema: dict[str, torch.Tensor] = {}
    for weights, beta in zip(steps, betas, strict=True):
        if beta is not None and math.isnan(beta):
            continue
        for name, w in weights.items():
            if beta is None or not w.is_floating_point() or name not in ema:
                ema[name] = w.clone().double() if w.is_floating_point() else w.clone()
            else:
                ema[name] = beta * ema[name] + (1.0 - beta) * w.double()
    return ema


def assert_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 1e-6
) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        if e.is_floating_point():
            assert torch.allclose(a.double(), e, atol=atol, rtol=0), (name, a, e)
        else:
            assert torch.equal(a, e), name


def shadow(cb: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in cb.controller.weights.state_dict().items()}
