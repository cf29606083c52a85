"""``EMACallback(fused_optimizer=True)``: the EMA fused into the optimizer step Lightning runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ema_callbacks.fused import fused_step_in
from ema_callbacks.lightning import EMACallback
from tests.lightning.lightning_helpers import fit, shadow
from tests.lightning.lightning_tiny import TinyData, TinyRegression

pytestmark = pytest.mark.slow

CASES = {
    "batches": {"half_life": ["3ba", "9ba"], "update_interval": "2ba"},
    "epochs-samples": {"half_life": "0.5ep", "update_interval": "12sp", "warmup": "power"},
    "bema-duration": {"ema_power": 0.5, "start": "0.25dur"},
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def assert_same_run(fused: EMACallback, separate: EMACallback, mf: Any, ms: Any) -> None:
    # torch.compile's own AdamW differs from the eager one by ~1e-6 relative after a few steps
    assert relative(mf.flat(), ms.flat()) < 1e-5
    assert fused.controller.state.to_dict() == separate.controller.state.to_dict()
    for name in separate.controller.names:
        a = fused.controller.profile(name).weights
        b = separate.controller.profile(name).weights
        assert a is not None and b is not None
        sa, sb = a.state_dict(), b.state_dict()
        for k, v in sb.items():
            assert float((sa[k].float() - v.float()).abs().max()) < 1e-5, (name, k)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_optimizer_step_matches_the_separate_update(case: str) -> None:
    options = {"max_epochs": 2, "accumulate_grad_batches": 2}
    data = TinyData(train_batches=8)
    # LayerNorm: before a BatchNorm the first layer's bias gets a zero gradient up to rounding,
    # which Adam normalises into steps of either sign (compiled and eager Adam then part)
    separate = EMACallback(**CASES[case], final_weights="training")
    _, ms = fit([separate], model=TinyRegression(norm="layer"), data=data, **options)
    fused = EMACallback(**CASES[case], final_weights="training", fused_optimizer=True)
    trainer, mf = fit([fused], model=TinyRegression(norm="layer"), data=data, **options)
    assert trainer.global_step == 8
    assert_same_run(fused, separate, mf, ms)
    assert fused.controller.num_updates > 0
    # the optimizer has its own step back after fit
    assert not fused_step_in(trainer.optimizers[0])


def test_fused_optimizer_compiles_a_few_graphs_not_one_per_step() -> None:
    cb = EMACallback(half_life="4ba", warmup="power", fused_optimizer=True)
    fit([cb], data=TinyData(train_batches=8), max_epochs=2)
    assert cb.controller.num_updates == 15  # 16 steps: the first initialises
    assert cb.fused_compilations == 2  # the copy and the lerp, whose weight is a tensor


def test_an_exception_mid_training_leaves_the_training_weights_and_the_optimizer_step() -> None:
    cb = EMACallback(half_life="3ba", fused_optimizer=True)
    model = TinyRegression(crash_at_step=3)
    with pytest.raises(RuntimeError, match="crash at step 3"):
        fit([cb], model=model, max_steps=6)
    assert cb.controller.num_updates == 2 and cb.controller.active_profile is None
    assert not fused_step_in(model.trainer.optimizers[0])


def test_fused_optimizer_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"half_life": "3ba", "final_weights": "training"}
    data = TinyData(train_batches=4)
    full = EMACallback(**kwargs, fused_optimizer=True)
    _, model_full = fit([full], data=data, max_epochs=3)

    first = EMACallback(**kwargs, fused_optimizer=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="last")
    fit([first, ckpt], data=data, max_epochs=1, enable_checkpointing=True)
    resumed = EMACallback(**kwargs, fused_optimizer=True)
    _, model_resumed = fit(
        [resumed], data=data, max_epochs=3, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert torch.equal(model_resumed.flat(), model_full.flat())
    a, b = shadow(resumed), shadow(full)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed.controller.state.to_dict() == full.controller.state.to_dict()


class Manual(TinyRegression):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


def test_fused_optimizer_refused_with_manual_optimization() -> None:
    # (Lightning itself allows several optimizers only with manual optimization)
    cb = EMACallback(half_life="3ba", fused_optimizer=True)
    with pytest.raises(ValueError, match="needs automatic optimization"):
        fit([cb], model=Manual(), max_steps=2)


def test_fused_optimizer_bad_options_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="fused_optimizer must be True or False; got 'yes'"):
        EMACallback(fused_optimizer="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused_optimizer=True needs nonfinite='ignore'"):
        EMACallback(fused_optimizer=True, nonfinite="skip")
    with pytest.raises(ValueError, match="build the EMA with stream=False"):
        EMACallback(fused_optimizer=True, stream=True)


def test_fused_optimizer_refused_under_deepspeed() -> None:
    # Lightning's DeepSpeed strategy needs CUDA: the setup event alone, with its strategy
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = TinyRegression()
    trainer = SimpleNamespace(
        strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy),
        optimizers=[torch.optim.SGD(module.parameters(), lr=0.1)],
    )
    cb = EMACallback(half_life="3ba", fused_optimizer=True)
    with pytest.raises(ValueError, match="DeepSpeed steps its own optimizer"):
        cb._fuse(trainer, module)  # type: ignore[arg-type]
    assert not fused_step_in(trainer.optimizers[0])
