"""Tiny models, data and a reference EMA for the transformers adapter tests (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments


class TinyRegressor(nn.Module):
    """A two-layer regressor in the shape the Trainer expects (returns ``loss``)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fail_at: int | None = None  # forward raises when this many training calls are done
        self.calls = 0

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if self.training:
            self.calls += 1
            if self.fail_at is not None and self.calls > self.fail_at:
                raise RuntimeError("boom in a training step")
        out = self.net(x).squeeze(-1)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = ((out - labels) ** 2).mean()
        return result


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seed: int = 1) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


class Recorder(TrainerCallback):
    """Training weights after every optimizer step (place it before the EMA callback), and the
    weights the model holds during every evaluation batch."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}
        self.tokens: dict[int, int] = {}
        self.eval_weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any) -> None:
        self.steps[state.global_step] = snapshot(model)
        self.tokens[state.global_step] = state.num_input_tokens_seen

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, model: nn.Module, **kw: Any
    ) -> None:
        self.eval_weights.setdefault(state.global_step, snapshot(model))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def args(tmp_path: Any, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 1,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "logging_strategy": "no",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    base.update(overrides)
    return TrainingArguments(**base)


def trainer(
    tmp_path: Any,
    callbacks: list[Any],
    data: Any = None,
    model: nn.Module | None = None,
    **overrides: Any,
) -> Trainer:
    return Trainer(
        model=model if model is not None else TinyRegressor(),
        args=args(tmp_path, **overrides),
        train_dataset=data if data is not None else TinyData(),
        eval_dataset=TinyData(8, seed=5),
        callbacks=callbacks,
    )


def reference_ema(
    steps: dict[int, dict[str, torch.Tensor]],
    elapsed: dict[int, float],
    half_life: float,
    first: int = 1,
) -> dict[str, torch.Tensor]:
    """Hand-computed EMA: a copy at step ``first``, then ``ema += (1 - 2**(-dt/h)) (w - ema)``
    with ``dt = elapsed[k]`` (progress since the previous update, in the half-life's unit)."""
    ema = {k: v.clone().double() for k, v in steps[first].items()}
    for k in sorted(s for s in steps if s > first):
        beta = 2.0 ** (-elapsed[k] / half_life)
        for name in ema:
            ema[name] = beta * ema[name] + (1 - beta) * steps[k][name].double()
    return ema


def assert_close(ema: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ema) == sorted(reference)
    for name, value in ema.items():
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-7)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def shadow(callback: Any) -> dict[str, torch.Tensor]:
    return callback.controller.state_dict()["shadow"]
