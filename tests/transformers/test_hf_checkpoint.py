"""Save and resume: the EMA lives in checkpoint-N/, and resume is bit-identical."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from hf_tiny import (
    Recorder,
    TinyData,
    TinyRegressor,
    assert_close,
    assert_equal,
    reference_ema,
    shadow,
    snapshot,
    trainer,
)

from ema_callbacks.transformers import EMATrainerCallback, load_ema_state

# 16 samples, batch 4: 4 steps per epoch; 3 epochs; a checkpoint every 3 steps (mid-epoch).
RUN = {
    "num_train_epochs": 3,
    "save_strategy": "steps",
    "save_steps": 3,
    "eval_strategy": "steps",
    "eval_steps": 5,
}
OPTIONS = {"half_life": "0.75ep", "update_interval": "1ba", "final_weights": "training"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    rec, ema = Recorder(), EMATrainerCallback(**OPTIONS)
    tr = trainer(out, [rec, ema], data=TinyData(16), **RUN)
    tr.train()
    return out, rec, shadow(ema), snapshot(tr.model)


def test_checkpoints_hold_training_weights_and_the_ema(uninterrupted):
    out, rec, _, _ = uninterrupted
    for step in (3, 6, 9, 12):
        folder = out / f"checkpoint-{step}"
        assert sorted(p for p in os.listdir(folder) if p.startswith("ema")) == [
            "ema_state.json",
            "ema_state.safetensors",
        ]
        assert not [p for p in os.listdir(folder) if p.startswith(".tmp")]
        state = load_ema_state(folder)
        upto = {k: v for k, v in rec.steps.items() if k <= step}
        assert_close(state["shadow"], reference_ema(upto, {k: 0.25 for k in upto}, 0.75))
        assert state["schedule"]["num_updates"] == step - 1
        assert "training" not in state  # the model files hold the training weights
    json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())  # still JSON


@pytest.mark.parametrize("stop", [3, 6])
def test_resume_is_bit_identical(uninterrupted, tmp_path, stop):
    out, _, full_ema, full_weights = uninterrupted
    ema = EMATrainerCallback(**OPTIONS)
    # a differently initialised model: everything must come from the checkpoint
    tr = trainer(tmp_path, [ema], data=TinyData(16), model=TinyRegressor(seed=7), **RUN)
    tr.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
    assert_equal(shadow(ema), full_ema)
    assert_equal(snapshot(tr.model), full_weights)


def test_resume_true_and_rebuilt_callbacks(uninterrupted, tmp_path):
    out, _, full_ema, full_weights = uninterrupted
    shutil.copytree(out / "checkpoint-6", tmp_path / "checkpoint-6")
    ema = EMATrainerCallback(**OPTIONS)
    tr = trainer(
        tmp_path,
        [ema],
        data=TinyData(16),
        model=TinyRegressor(seed=7),
        restore_callback_states_from_checkpoint=True,
        **RUN,
    )
    tr.train(resume_from_checkpoint=True)
    live = [cb for cb in tr.callback_handler.callbacks if isinstance(cb, EMATrainerCallback)]
    assert len(live) == 1 and live[0] is not ema  # the Trainer rebuilt it from its JSON args ...
    assert_equal(shadow(ema), full_ema)  # ... and the one we hold still sees the run
    assert_equal(snapshot(tr.model), full_weights)


def test_save_total_limit_rotates_the_ema_with_its_checkpoint(tmp_path):
    ema = EMATrainerCallback(half_life="2ba")
    trainer(
        tmp_path, [ema], num_train_epochs=2, save_strategy="steps", save_steps=2, save_total_limit=2
    ).train()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]
    assert load_ema_state(tmp_path / "checkpoint-8")["schedule"]["num_updates"] == 7


def test_resume_without_the_ema_files(uninterrupted, tmp_path):
    out, _, _, _ = uninterrupted
    shutil.copytree(out / "checkpoint-9", tmp_path / "checkpoint-9")
    for name in ("ema_state.json", "ema_state.safetensors"):
        os.remove(tmp_path / "checkpoint-9" / name)
    tr = trainer(tmp_path, [EMATrainerCallback(**OPTIONS)], data=TinyData(16), **RUN)
    with pytest.raises(FileNotFoundError, match="ema_state"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-9"))


def test_resume_from_a_run_without_ema_starts_afresh(tmp_path):
    trainer(tmp_path, [], max_steps=2, save_strategy="steps", save_steps=2).train()
    rec, ema = Recorder(), EMATrainerCallback(half_life="1ba", final_weights="training")
    tr = trainer(tmp_path, [rec, ema], max_steps=4, save_strategy="no")
    with pytest.warns(UserWarning, match="EMA starts afresh"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert ema.controller.num_updates == 1  # initialised at step 3, averaged at step 4
    assert_close(shadow(ema), reference_ema(rec.steps, {4: 1.0}, 1.0, first=3))


def test_resume_on_the_same_trainer_after_train_left_the_ema_in(uninterrupted, tmp_path):
    out, _, full_ema, full_weights = uninterrupted
    ema = EMATrainerCallback(**{**OPTIONS, "final_weights": "ema"})
    tr = trainer(tmp_path, [ema], data=TinyData(16), **RUN)
    tr.train()
    assert ema.controller.weights_active == "ema"
    # the Trainer loads checkpoint-6 into the model that holds the EMA: the training weights
    # must be back in before that, or the load would land in the EMA's storage
    tr.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert_equal(shadow(ema), full_ema)
    assert_equal(ema.controller.weights.training_state_dict(), full_weights)
