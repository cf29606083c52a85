"""Tied weights (one ``nn.Parameter`` under two names) on the real Composer Trainer: one shadow,
the checkpoint's model slot holds the EMA under both names (strict loads), ``get_ema_model``
into another model fills both, and a resume continues bit-identically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from composer.metrics import CrossEntropy
from composer.models import ComposerClassifier
from composer_runs import EMA, run
from torch import nn

pytestmark = [
    pytest.mark.composer,
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning"),
    # Resuming at an epoch's last batch replays the epoch end over an empty remainder.
    pytest.mark.filterwarnings("ignore:No batches were trained:UserWarning"),
]

BETA = 2 ** (-1 / 2)


class TiedNet(nn.Module):
    """``again.weight`` is ``mid.weight``: the same parameter applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)
        self.again = nn.Linear(16, 16)
        self.again.weight = self.mid.weight
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        h = torch.relu(self.again(torch.relu(self.mid(h))))
        return self.out(h)  # type: ignore[no-any-return]


def make_tied(seed: int = 0) -> ComposerClassifier:
    torch.manual_seed(seed)
    return ComposerClassifier(TiedNet(), num_classes=3, val_metrics=CrossEntropy())


def _reference(training: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ema = {k: v.double() for k, v in training[0].items()}
    for step in training[1:]:
        ema = {k: BETA * ema[k] + (1 - BETA) * step[k].double() for k in ema}
    return ema


def test_checkpoint_model_slot_holds_the_ema_under_both_names(tmp_path: Path) -> None:
    algo = EMA(half_life="2ba")
    _, rec = run(
        algo,
        "4ba",
        model=make_tied(),
        eval_interval=None,
        save_folder=str(tmp_path),
        save_interval="4ba",
        save_filename="ba{batch}.pt",
    )
    weights = algo.controller.weights
    assert weights is not None
    assert weights.aliases == {"again.weight": "mid.weight"}
    assert "again.weight" not in weights.names
    # rec.training is keyed by normalised model state_dict names: both tied names.
    expected = _reference(rec.training[:4])
    ckpt = torch.load(tmp_path / "ba4.pt", map_location="cpu", weights_only=False)
    slot = ckpt["state"]["model"]
    for name in ("module.mid.weight", "module.again.weight", "module.out.bias"):
        torch.testing.assert_close(slot[name].double(), expected[name[len("module.") :]])
    assert torch.equal(slot["module.mid.weight"], slot["module.again.weight"])
    ours = [v for _, v in ckpt["state"]["algorithms"] if isinstance(v, dict) and "shadow" in v]
    assert ours[0]["aliases"] == {"again.weight": "mid.weight"}
    fresh = make_tied(seed=3)
    fresh.load_state_dict(slot, strict=True)
    assert fresh.module.again.weight is fresh.module.mid.weight
    torch.testing.assert_close(
        fresh.module.again.weight.detach().double(), expected["again.weight"]
    )


def test_get_ema_model_fills_every_name_of_another_model() -> None:
    algo = EMA(half_life="2ba")
    _, rec = run(algo, "4ba", model=make_tied(), eval_interval=None)
    expected = _reference(rec.training[:4])
    untied = make_tied(seed=5)
    untied.module.again.weight = nn.Parameter(untied.module.again.weight.detach().clone())
    algo.get_ema_model(untied)
    for name in ("mid.weight", "again.weight"):
        value = untied.module.get_parameter(name).detach().double()
        torch.testing.assert_close(value, expected[name])


def test_resume_with_tied_weights_is_bit_identical(tmp_path: Path) -> None:
    _, full = run(EMA(half_life="2ba"), "8ba", model=make_tied(), eval_interval=None)
    run(
        EMA(half_life="2ba"),
        "4ba",
        model=make_tied(),
        eval_interval=None,
        save_folder=str(tmp_path),
        save_interval="4ba",
        save_filename="ba{batch}.pt",
    )
    path = os.path.join(tmp_path, "ba4.pt")
    model: Any = make_tied(seed=9)
    _, resumed = run(EMA(half_life="2ba"), "8ba", model=model, eval_interval=None, load_path=path)
    assert model.module.again.weight is model.module.mid.weight
    for got, want in zip(resumed.ema, full.ema[4:], strict=True):
        assert got is not None and want is not None
        assert all(torch.equal(got[k], want[k]) for k in want)
    for got, want in zip(resumed.training, full.training[4:], strict=True):
        assert all(torch.equal(got[k], want[k]) for k in want)
