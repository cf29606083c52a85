"""``EMA(fused_optimizer=True)``: the EMA fused into the optimizer step Composer's Trainer runs."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from composer_runs import EMA, run

from ema_callbacks.fused import fused_step_in

pytestmark = [
    pytest.mark.composer,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:No batches were trained:UserWarning"),
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning"),
]

CASES = {
    "batches": ({"half_life": ["3ba", "9ba"], "update_interval": "2ba"}, "12ba"),
    "epochs-duration": ({"half_life": "0.5ep", "ema_start": "0.25dur"}, "12ba"),
    "duration-in-epochs": ({"half_life": "3ba", "ema_start": "0.4dur"}, "3ep"),
    "bema": ({"ema_power": 0.5, "update_interval": "1ba"}, "3ep"),
}


def close(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> None:
    if b is None:
        assert a is None
        return
    assert a is not None and sorted(a) == sorted(b)
    for k in b:
        assert float((a[k] - b[k]).abs().max()) < 1e-5, k


@pytest.mark.parametrize("case", list(CASES))
def test_fused_optimizer_step_matches_the_separate_update(case: str) -> None:
    options, duration = CASES[case]
    separate = EMA(**options)
    _, rs = run(separate, duration)
    fused = EMA(**options, fused_optimizer=True)
    trainer, rf = run(fused, duration)
    assert len(rf.ema) == len(rs.ema) == 12
    for i in range(12):  # the EMA and the training weights at every batch end
        close(rf.ema[i], rs.ema[i])
        close(rf.training[i], rs.training[i])
    # the schedule's state, but for the samples and tokens of the last update, which the fused
    # step does not know yet (its times refuse them) and records as of the batch before
    a, b = fused.controller.state.to_dict(), separate.controller.state.to_dict()
    for state in (a, b):
        state["last"] = {
            k: v for k, v in state["last"].items() if k.rsplit("_", 1)[-1] not in ("sp", "tok")
        }
    assert a == b
    assert rf.eval_metrics == pytest.approx(rs.eval_metrics, rel=1e-5)
    assert not fused_step_in(trainer.state.optimizers[0])  # its own step back after fit
    assert 1 <= fused.fused_compilations <= 4


def test_fused_optimizer_resume_is_bit_identical(tmp_path: Any) -> None:
    def make() -> EMA:
        return EMA(half_life="4ba", fused_optimizer=True)

    _, full = run(make(), "12ba")
    run(make(), "6ba", save_folder=str(tmp_path), save_interval="6ba", save_filename="ba{batch}.pt")
    _, rec = run(make(), "12ba", load_path=os.path.join(tmp_path, "ba6.pt"))
    for i, (ema, training) in enumerate(zip(rec.ema, rec.training, strict=True), start=6):
        assert ema is not None and full.ema[i] is not None
        assert all(torch.equal(ema[k], full.ema[i][k]) for k in ema), i
        assert all(torch.equal(training[k], full.training[i][k]) for k in training), i


def test_fused_optimizer_refusals() -> None:
    with pytest.raises(TypeError, match="fused_optimizer must be True or False; got 'on'"):
        EMA(fused_optimizer="on")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before Composer counts the batch's samples"):
        EMA(half_life="64sp", fused_optimizer=True)
    with pytest.raises(ValueError, match="fused_optimizer=True needs nonfinite='ignore'"):
        EMA(nonfinite="skip", fused_optimizer=True)
    with pytest.raises(ValueError, match="counted in samples or tokens after the optimizer step"):
        run(EMA(half_life="2ba", ema_start="0.5dur", fused_optimizer=True), "96sp")
