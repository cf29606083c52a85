"""``ema-callbacks export`` on real Composer checkpoints: this library's EMA algorithm and
``composer.algorithms.EMA`` (users switching over can export their old runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.algorithms import EMA as ComposerEMA
from composer_runs import make_loader, make_model
from safetensors.torch import load_file

from ema_callbacks.cli import main
from ema_callbacks.composer import EMA
from ema_callbacks.weights import normalize_name


def _train(tmp_path: Path, algorithm: object) -> tuple[Trainer, Path]:
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(0),
        max_duration="4ba",
        algorithms=[algorithm],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        save_folder=str(tmp_path),
        save_interval="4ba",
        progress_bar=False,
    )
    trainer.fit()
    return trainer, tmp_path / "ep0-ba4-rank0.pt"


@pytest.mark.parametrize("final_weights", ["ema", "training"])
def test_export_our_composer_checkpoint(tmp_path: Path, final_weights: str) -> None:
    algorithm = EMA(half_life="2ba", final_weights=final_weights)
    _, checkpoint = _train(tmp_path, algorithm)
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    exported = load_file(out)
    make_model().load_state_dict(exported, strict=True)  # loads into the bare model
    weights = algorithm.controller.weights
    assert weights is not None
    ema = weights.state_dict()
    training = weights.training_state_dict()
    for key, value in exported.items():
        name = normalize_name(key)
        if name in ema:
            assert torch.equal(value, ema[name]), key
    assert any(not torch.equal(ema[n], training[n]) for n in ema if ema[n].is_floating_point())


def test_export_composer_algorithms_ema_checkpoint(tmp_path: Path) -> None:
    algorithm = ComposerEMA(half_life="2ba")
    trainer, checkpoint = _train(tmp_path, algorithm)
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    exported = load_file(out)
    make_model().load_state_dict(exported, strict=True)
    ema = algorithm.ema_model.named_parameters_dict if not algorithm.ema_weights_active else None
    reference = ema or {k: v for k, v in trainer.state.model.named_parameters()}
    for key, value in reference.items():
        assert torch.equal(exported[key], value.detach()), key
