"""``EMATrainerCallback(fused_optimizer=True)``: the EMA fused into the Trainer's optimizer step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_tiny import TinyData, TinyRegressor, assert_equal, shadow, snapshot, trainer

from ema_callbacks.fused import fused_step_in
from ema_callbacks.transformers import EMATrainerCallback

pytestmark = pytest.mark.slow

CASES = {
    "batches": {"half_life": ["3ba", "9ba"], "update_interval": "2ba"},
    "samples-duration": {"half_life": "16sp", "update_interval": "8sp", "start": "0.2dur"},
    "bema": {"ema_power": 0.5},
    "warmup": {"half_life": "4ba", "warmup": "power"},
}
# 24 samples, batch 2, accumulation 2: 6 optimizer steps per epoch, 2 epochs
RUN = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "num_train_epochs": 2}


def torch_optimizer(tr: Any) -> torch.optim.Optimizer:
    opt = tr.optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt  # type: ignore[no-any-return]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize("case", list(CASES))
def test_fused_optimizer_step_matches_the_separate_update(tmp_path: Any, case: str) -> None:
    options = {**CASES[case], "final_weights": "training"}
    separate = EMATrainerCallback(**options)
    ts = trainer(tmp_path / "s", [separate], data=TinyData(24), **RUN)
    ts.train()
    fused = EMATrainerCallback(**options, fused_optimizer=True)
    tf = trainer(tmp_path / "f", [fused], data=TinyData(24), **RUN)
    tf.train()
    assert tf.state.global_step == 12
    # torch.compile's AdamW differs from the eager one by ~1e-6 relative after a few steps
    for k, v in snapshot(ts.model).items():
        assert relative(snapshot(tf.model)[k], v) < 1e-5, k
    assert fused.controller.num_updates == separate.controller.num_updates > 0
    for name in separate.controller.names:
        a = fused.controller.profile(name).weights
        b = separate.controller.profile(name).weights
        assert a is not None and b is not None
        sa = a.state_dict()
        for k, v in b.state_dict().items():
            assert float((sa[k] - v).abs().max()) < 1e-5, (name, k)
    assert not fused_step_in(torch_optimizer(tf))  # the optimizer's own step is back
    assert 1 <= fused.fused_compilations <= 4


def test_fused_optimizer_resume_is_bit_identical(tmp_path: Any) -> None:
    options = {"half_life": "3ba", "final_weights": "training", "fused_optimizer": True}
    run = {**RUN, "save_strategy": "steps", "save_steps": 5}
    full = EMATrainerCallback(**options)
    tf = trainer(tmp_path / "full", [full], data=TinyData(24), **run)
    tf.train()
    resumed = EMATrainerCallback(**options)
    tr = trainer(tmp_path / "r", [resumed], data=TinyData(24), model=TinyRegressor(seed=7), **run)
    tr.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    assert_equal(shadow(resumed), shadow(full))
    assert_equal(snapshot(tr.model), snapshot(tf.model))


def test_an_exception_mid_training_leaves_the_training_weights_and_the_optimizer_step(
    tmp_path: Any,
) -> None:
    model = TinyRegressor()
    model.fail_at = 9  # micro-batches: the fifth optimizer step's second one raises
    ema = EMATrainerCallback(half_life="3ba", fused_optimizer=True)
    tr = trainer(tmp_path, [ema], data=TinyData(24), model=model, **RUN)
    with pytest.raises(RuntimeError, match="boom"):
        tr.train()
    assert ema.controller.num_updates == 3 and ema.controller.weights_active == "training"
    assert not fused_step_in(torch_optimizer(tr))


def test_fused_optimizer_options_refused_at_construction_and_kept_in_the_state() -> None:
    with pytest.raises(TypeError, match="fused_optimizer must be True or False; got 1"):
        EMATrainerCallback(fused_optimizer=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before the Trainer sets state.epoch"):
        EMATrainerCallback(half_life="1ep", fused_optimizer=True)
    with pytest.raises(ValueError, match="fused_optimizer=True needs nonfinite='ignore'"):
        EMATrainerCallback(fused_optimizer=True, nonfinite="error")
    EMATrainerCallback(snapshot_every="1ep", sigma_rel=0.1, fused_optimizer=True)  # at step end
    cb = EMATrainerCallback(half_life="3ba", fused_optimizer=True)
    assert EMATrainerCallback(**cb.state()["args"]).fused_optimizer is True
