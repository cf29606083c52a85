"""Evaluation: EMA weights during the Trainer's evaluations, training weights for training."""

from __future__ import annotations

import os

import pytest
import torch
from hf_tiny import (
    Recorder,
    TinyData,
    TinyRegressor,
    assert_close,
    assert_equal,
    reference_ema,
    snapshot,
    trainer,
)
from safetensors.torch import load_file

from ema_callbacks.transformers import EMATrainerCallback, load_ema_state

EVAL = TinyData(8, seed=5)


def loss_with(weights: dict[str, torch.Tensor]) -> float:
    model = TinyRegressor()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        return float(model(EVAL.x, EVAL.y)["loss"])


def ones(steps):
    return {k: 1.0 for k in steps}


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_trainer_evaluations_see_the_ema_and_training_is_untouched(tmp_path, strategy):
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba", final_weights="training")
    tr = trainer(
        tmp_path / "ema", [rec, ema], num_train_epochs=2, eval_strategy=strategy, eval_steps=2
    )
    tr.train()
    evaluated = sorted(rec.eval_weights)
    assert evaluated == ([2, 4, 6, 8] if strategy == "steps" else [4, 8])
    losses = {h["step"]: h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h}
    for step in evaluated:
        upto = {k: v for k, v in rec.steps.items() if k <= step}
        expected = reference_ema(upto, ones(upto), 2.0)
        assert_close(rec.eval_weights[step], expected)  # the model held the EMA
        assert losses[step] == pytest.approx(loss_with(expected), rel=1e-5)  # so did the metric
    # Training continued from the training weights: identical to a run without the EMA.
    plain = Recorder()
    trainer(
        tmp_path / "plain", [plain], num_train_epochs=2, eval_strategy=strategy, eval_steps=2
    ).train()
    assert_equal(snapshot(tr.model), plain.steps[8])


def test_evaluate_yourself_with_the_context_manager(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba", final_weights="training")
    tr = trainer(tmp_path, [rec, ema])
    tr.train()
    training = snapshot(tr.model)
    expected = reference_ema(rec.steps, ones(rec.steps), 2.0)
    assert tr.evaluate()["eval_loss"] == pytest.approx(loss_with(training), rel=1e-5)
    with ema.ema_weights(tr.model):
        metrics = tr.evaluate()  # on_evaluate must not swap the EMA out under our feet
        assert_close(snapshot(tr.model), expected)
        predictions = tr.predict(EVAL).predictions
    assert metrics["eval_loss"] == pytest.approx(loss_with(expected), rel=1e-5)
    model = TinyRegressor()
    model.load_state_dict({k: v.float() for k, v in expected.items()})
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(predictions), model(EVAL.x)["logits"])
    assert_equal(snapshot(tr.model), training)


def test_save_model_after_training_writes_the_ema(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba")
    tr = trainer(tmp_path, [rec, ema])
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    saved = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert_close(saved, reference_ema(rec.steps, ones(rec.steps), 2.0))
    # and the training weights are still there for a later train()
    assert_equal(ema.controller.weights.training_state_dict(), rec.steps[4])


def test_load_best_model_at_end_uses_the_best_checkpoints_ema(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="1ba")
    # a high learning rate makes the loss go up and down, so the best step is not the last
    tr = trainer(
        tmp_path,
        [rec, ema],
        num_train_epochs=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        learning_rate=0.6,
    )
    tr.train()
    losses = {h["step"]: h["eval_loss"] for h in tr.state.log_history if "eval_loss" in h}
    best = min(losses, key=losses.get)
    assert best != max(losses), losses  # otherwise this test would not test loading the best
    assert tr.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    upto = {k: v for k, v in rec.steps.items() if k <= best}
    best_ema = reference_ema(upto, ones(upto), 1.0)
    assert losses[best] == pytest.approx(loss_with(best_ema), rel=1e-5)  # metric of the EMA
    checkpoint = tmp_path / f"checkpoint-{best}"
    # the checkpoint's model file holds the training weights (exact resume), the EMA is beside it
    assert_equal(load_file(str(checkpoint / "model.safetensors")), rec.steps[best])
    assert_close(load_ema_state(checkpoint)["shadow"], best_ema)
    # after train(): the model holds the weights that got the best metric
    assert_close(snapshot(tr.model), best_ema)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == sorted(
        f"checkpoint-{k}" for k in rec.steps
    )


def test_before_start_and_without_eval_with_ema_evaluations_use_training_weights(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba", start="4ba")
    tr = trainer(
        tmp_path / "a", [rec, ema], num_train_epochs=2, eval_strategy="steps", eval_steps=2
    )
    tr.train()
    assert_equal(rec.eval_weights[2], rec.steps[2])  # the EMA has not started: not swapped in
    later = {k: v for k, v in rec.steps.items() if 4 <= k <= 6}
    assert_close(rec.eval_weights[6], reference_ema(later, ones(later), 2.0, first=4))

    rec = Recorder()
    off = EMATrainerCallback(half_life="2ba", eval_with_ema=False)
    trainer(tmp_path / "b", [rec, off], eval_strategy="steps", eval_steps=2).train()
    assert_equal(rec.eval_weights[2], rec.steps[2])
