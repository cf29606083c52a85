"""Step semantics: each unit of the Trainer's clock, checked against a hand-computed EMA."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
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
from transformers import TrainerCallback

from ema_callbacks.transformers import EMATrainerCallback


def test_ba_counts_optimizer_steps_with_gradient_accumulation(tmp_path):
    # 20 samples, batch 2, accumulation 3: 10 micro-batches -> 4 optimizer steps (3+3+3+1).
    # max_steps=4: for one epoch transformers 4.47 plans floor(10 / 3) = 3 steps and stops
    # before the partial one (5.x plans ceil), but its epoch loop runs all four when allowed.
    rec, ema = Recorder(), EMATrainerCallback(half_life="3ba")
    tr = trainer(
        tmp_path,
        [rec, ema],
        data=TinyData(20),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=4,
    )
    tr.train()
    assert sorted(rec.steps) == [1, 2, 3, 4]
    assert tr.state.epoch == pytest.approx(1.0)  # the fourth step is the epoch's partial one
    assert ema.controller.num_updates == 3  # step 1 initialises, steps 2-4 average
    expected = reference_ema(rec.steps, {k: 1.0 for k in rec.steps}, 3.0)
    assert_close(shadow(ema), expected)
    # default final_weights='ema': the model holds the EMA after train()
    assert_close(snapshot(tr.model), expected)


def test_final_weights_training_leaves_training_weights(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="3ba", final_weights="training")
    tr = trainer(tmp_path, [rec, ema])
    tr.train()
    assert_equal(snapshot(tr.model), rec.steps[max(rec.steps)])


def test_fractional_epochs(tmp_path):
    # 12 samples, batch 4: 3 steps per epoch, state.epoch advances by 1/3 per step.
    rec, ema = Recorder(), EMATrainerCallback(half_life="0.5ep", update_interval="1ba")
    tr = trainer(tmp_path, [rec, ema], data=TinyData(12), num_train_epochs=2)
    tr.train()
    assert sorted(rec.steps) == list(range(1, 7))
    assert_close(shadow(ema), reference_ema(rec.steps, {k: 1 / 3 for k in rec.steps}, 0.5))


def test_epoch_interval_updates_once_per_epoch(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="1ep")
    tr = trainer(tmp_path, [rec, ema], data=TinyData(12), num_train_epochs=3)
    tr.train()
    assert ema.controller.num_updates == 2
    epochs = {k: v for k, v in rec.steps.items() if k % 3 == 0}
    assert_close(shadow(ema), reference_ema(epochs, {3: 1.0, 6: 1.0, 9: 1.0}, 1.0, first=3))


def test_samples_count_the_short_last_batch(tmp_path):
    # 10 samples, batch 4: 4, 4, 2 samples per step, twice.
    rec, ema = Recorder(), EMATrainerCallback(half_life="8sp")
    tr = trainer(tmp_path, [rec, ema], data=TinyData(10), num_train_epochs=2)
    tr.train()
    elapsed = {1: 4, 2: 4, 3: 2, 4: 4, 5: 4, 6: 2}
    assert_close(shadow(ema), reference_ema(rec.steps, elapsed, 8.0))


def test_duration_and_start(tmp_path):
    # max_steps=8: each step is 1/8 of the run; the EMA starts (copies) at half the run.
    rec, ema = Recorder(), EMATrainerCallback(half_life="0.25dur", start="0.5dur")
    tr = trainer(tmp_path, [rec, ema], max_steps=8)
    tr.train()
    assert ema.controller.num_updates == 4
    later = {k: v for k, v in rec.steps.items() if k >= 4}
    assert_close(shadow(ema), reference_ema(later, {k: 1 / 8 for k in later}, 0.25, first=4))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 10, length: int = 6) -> None:
        self.ids = torch.randint(0, 32, (n, length), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_tokens_from_num_input_tokens_seen(tmp_path):
    # 10 sequences of 6 tokens, batch 4: 24, 24, 12 tokens per step.
    rec, ema = Recorder(), EMATrainerCallback(half_life="40tok", final_weights="training")
    tr = trainer(
        tmp_path, [rec, ema], data=Tokens(), model=_gpt2(), include_num_input_tokens_seen=True
    )
    tr.train()
    assert rec.tokens == {1: 24, 2: 48, 3: 60}
    expected = reference_ema(rec.steps, {1: 24, 2: 24, 3: 12}, 40.0)
    got = shadow(ema)
    assert_close(got, {k: v for k, v in expected.items() if k in got})


def test_tokens_without_the_setting_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        trainer(tmp_path, [EMATrainerCallback(half_life="1e4tok")])


class MarkSkipped(TrainerCallback):
    """What accelerate reports after a GradScaler overflow: the step did not happen."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.saved: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        optimizer._is_overflow = False
        if state.global_step + 1 == self.step:
            self.saved = snapshot(model)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        if state.global_step + 1 == self.step:
            optimizer._is_overflow = True
            model.load_state_dict(self.saved)  # an overflowed step leaves the weights alone


def test_skipped_optimizer_steps_do_not_update(tmp_path):
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba", final_weights="training")
    tr = trainer(tmp_path, [MarkSkipped(3), rec, ema])
    tr.train()
    assert ema.controller.num_updates == 2  # steps 2 and 4; 3 was skipped
    kept = {k: v for k, v in rec.steps.items() if k != 3}
    assert_close(shadow(ema), reference_ema(kept, {2: 1.0, 4: 2.0}, 2.0))


def test_on_step_end_skips_a_skipped_step_unit():
    ema = EMATrainerCallback(half_life="2ba")
    model = TinyRegressor()
    args = SimpleNamespace(
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        world_size=1,
        include_num_input_tokens_seen="no",
    )
    state = SimpleNamespace(
        global_step=0, epoch=0.0, train_batch_size=1, max_steps=4, num_input_tokens_seen=0
    )
    control = SimpleNamespace(should_evaluate=False)
    ema.controller.fit_start(model)
    state.global_step = 1
    ema.on_step_end(
        args, state, control, model=model, optimizer=SimpleNamespace(step_was_skipped=True)
    )
    assert not ema.controller.started
    ema.on_step_end(
        args, state, control, model=model, optimizer=SimpleNamespace(step_was_skipped=False)
    )
    assert ema.controller.started
