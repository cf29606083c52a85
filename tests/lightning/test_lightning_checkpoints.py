"""Checkpoints of the Lightning adapter on the real Trainer: what they hold, resuming after a
crash or a stop gives bit-identical EMA and training weights, best-checkpoint selection on
EMA metrics, and starting from a checkpoint of Lightning's own ``EMAWeightAveraging``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import callbacks
from lightning.pytorch.callbacks import ModelCheckpoint

from ema_callbacks.lightning import CHECKPOINT_KEY, EMACallback
from tests.lightning.lightning_helpers import StepRecorder, assert_close, fit, reference_ema, shadow
from tests.lightning.lightning_tiny import TinyData, TinyRegression

BETA = 2 ** (-1 / 3)


def every_step(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, every_n_train_steps=1, save_top_k=-1, filename="{step}")


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


# -- resume ------------------------------------------------------------------------------

SCHEDULES = {
    "ba": {"half_life": "3ba"},
    "sp": {"half_life": "24sp"},
    "ep": {"half_life": "0.5ep", "update_interval": "0.25ep"},
}


@pytest.mark.parametrize(
    ("schedule", "accumulate", "crash_at"),
    [
        ("ba", 1, 3),  # mid-epoch
        ("ba", 1, 4),  # at the last batch of an epoch
        ("sp", 2, 3),  # mid-epoch, gradient accumulation, sample counter
        ("ep", 1, 6),  # fractional epochs across the resume
    ],
)
def test_crash_and_resume_is_bit_identical(
    tmp_path: Path, schedule: str, accumulate: int, crash_at: int
) -> None:
    options = {"max_epochs": 3, "accumulate_grad_batches": accumulate}
    data = TinyData(train_batches=4 * accumulate)
    kwargs = {**SCHEDULES[schedule], "final_weights": "training"}

    full = EMACallback(**kwargs)
    _, model_full = fit([full], data=data, **options)

    crashed = EMACallback(**kwargs)
    with pytest.raises(RuntimeError, match="crash at step"):
        fit(
            [crashed, every_step(tmp_path)],
            model=TinyRegression(crash_at_step=crash_at),
            data=data,
            enable_checkpointing=True,
            **options,
        )
    resumed = EMACallback(**kwargs)
    _, model_resumed = fit(
        [resumed], data=data, ckpt_path=str(tmp_path / f"step={crash_at}.ckpt"), **options
    )

    assert torch.equal(model_resumed.flat(), model_full.flat())
    a, b = shadow(resumed), shadow(full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.controller.state.to_dict() == full.controller.state.to_dict()
    assert resumed.controller.num_updates > crashed.controller.num_updates > 0


def test_stop_at_epoch_end_and_resume_is_bit_identical(tmp_path: Path) -> None:
    data = TinyData(train_batches=4)
    full = EMACallback(half_life="3ba", final_weights="training")
    _, model_full = fit([full], data=data, max_epochs=3)

    first = EMACallback(half_life="3ba")  # final_weights='ema': the model ends on the EMA
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit([first, ckpt], data=data, max_epochs=1, enable_checkpointing=True)
    resumed = EMACallback(half_life="3ba", final_weights="training")
    _, model_resumed = fit(
        [resumed], data=data, max_epochs=3, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert torch.equal(model_resumed.flat(), model_full.flat())
    a, b = shadow(resumed), shadow(full)
    assert all(torch.equal(a[k], b[k]) for k in b)


# -- contents ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "step", "holds"),
    [
        ({}, 4, "ema"),
        ({"checkpoint_weights": "training"}, 4, "training"),
        ({"start": "3ba"}, 2, "training"),  # not started yet: no stale copy in the slot
    ],
)
def test_checkpoint_says_which_weights_its_state_dict_holds(
    tmp_path: Path, kwargs: dict[str, Any], step: int, holds: str
) -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="3ba", **kwargs)
    fit([rec, cb, every_step(tmp_path)], max_steps=5, enable_checkpointing=True)
    path = tmp_path / f"step={step}.ckpt"
    ckpt = load(path)
    assert ckpt[CHECKPOINT_KEY]["state_dict_holds"] == holds
    state = ckpt["callbacks"][ckpt[CHECKPOINT_KEY]["callback"]]
    training = rec.steps[step - 1][1]
    if holds == "ema":
        ema = reference_ema([w for _, w in rec.steps[:step]], [None] + [BETA] * (step - 1))
        assert_close(ckpt["state_dict"], ema)
        assert_close(state["training"], {k: v.double() for k, v in training.items()}, atol=0)
        assert_close(state["shadow"], ema)
        # Model.load_from_checkpoint gives the EMA model.
        loaded = TinyRegression.load_from_checkpoint(path)
        assert_close(loaded.state_dict(), ema)
    else:
        assert_close(ckpt["state_dict"], {k: v.double() for k, v in training.items()}, atol=0)


def test_checkpoint_during_a_swap_still_holds_both(tmp_path: Path) -> None:
    # trainer.save_checkpoint after fit, with the final EMA in the model.
    rec, cb = StepRecorder(), EMACallback(half_life="3ba", checkpoint_weights="training")
    trainer, _ = fit([rec, cb], max_steps=4)
    assert cb.controller.weights_active == "ema"
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    ckpt = load(tmp_path / "after.ckpt")
    training = {k: v.double() for k, v in rec.steps[-1][1].items()}
    assert_close(ckpt["state_dict"], training, atol=0)
    state = ckpt["callbacks"]["EMACallback"]
    assert state["weights_active"] == "ema"
    assert_close(state["training"], training, atol=0)


def test_model_checkpoint_monitoring_an_ema_metric(tmp_path: Path) -> None:
    cb = EMACallback(half_life="2ba")
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min", save_top_k=1)
    fit(
        [cb, best],
        data=TinyData(4),
        max_epochs=4,
        limit_val_batches=2,
        enable_checkpointing=True,
    )
    assert best.best_model_path
    model = TinyRegression.load_from_checkpoint(best.best_model_path).eval()
    with torch.no_grad():
        losses = [
            torch.nn.functional.mse_loss(model(x), y) for x, y in TinyData(4).val_dataloader()
        ]
    # The score was measured on the weights the best checkpoint holds: the EMA.
    assert best.best_model_score is not None
    assert torch.stack(losses).mean().item() == pytest.approx(
        best.best_model_score.item(), abs=1e-6
    )
    assert load(Path(best.best_model_path))[CHECKPOINT_KEY]["state_dict_holds"] == "ema"


# -- from Lightning's EMAWeightAveraging -------------------------------------------------


@pytest.mark.skipif(
    not hasattr(callbacks, "EMAWeightAveraging"),
    reason="Lightning < 2.6 has no EMAWeightAveraging, so no such checkpoint to start from",
)
def test_start_from_a_lightning_ema_weight_averaging_checkpoint(tmp_path: Path) -> None:
    theirs = callbacks.EMAWeightAveraging(decay=0.8)
    _, model_theirs = fit([theirs, every_step(tmp_path)], max_steps=8, enable_checkpointing=True)
    reference = EMACallback(smoothing=0.8, final_weights="training")
    _, model_reference = fit([reference], max_steps=8)

    ours = EMACallback(smoothing=0.8, final_weights="training")
    _, model_ours = fit([ours], max_steps=8, ckpt_path=str(tmp_path / "step=4.ckpt"))
    # Training resumed from the training weights (current_model_state), not the average.
    assert torch.equal(model_ours.flat(), model_reference.flat())
    assert ours.controller.num_updates == 7
    # The EMA continued from theirs: equal to their uninterrupted average (float tensors).
    averaged = {k: v for k, v in model_theirs.state_dict().items() if v.is_floating_point()}
    ema = {k: v for k, v in shadow(ours).items() if k in averaged}
    assert_close(ema, {k: v.double() for k, v in averaged.items()}, atol=1e-6)
