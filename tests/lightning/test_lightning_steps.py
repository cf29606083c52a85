"""Step semantics of the Lightning adapter against hand-computed EMAs, on the real Trainer:
optimizer steps under gradient accumulation, fractional epochs, samples, tokens, ``dur``."""

from __future__ import annotations

import math

import pytest

from ema_callbacks.lightning import EMACallback
from tests.lightning.lightning_helpers import StepRecorder, assert_close, fit, reference_ema, shadow
from tests.lightning.lightning_tiny import IndexBatches, TinyData


def test_ba_counts_optimizer_steps_under_gradient_accumulation() -> None:
    # 8 batches per epoch, 2 epochs, accumulate 4: 4 optimizer steps -> 1 copy + 3 updates.
    rec, cb = StepRecorder(), EMACallback(half_life="2ba", final_weights="training")
    trainer, _ = fit([rec, cb], max_epochs=2, accumulate_grad_batches=4)
    assert trainer.global_step == 4
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4]
    assert cb.controller.num_updates == 3
    beta = 2 ** (-1 / 2)
    expected = reference_ema([w for _, w in rec.steps], [None, beta, beta, beta])
    assert_close(shadow(cb), expected)


def test_default_half_life_is_1000ba() -> None:
    rec, cb = StepRecorder(), EMACallback()
    fit([rec, cb], max_steps=3)
    beta = 2 ** (-1 / 1000)
    assert cb.controller.smoothing == pytest.approx(beta)
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], [None, beta, beta]))


def test_fractional_epochs() -> None:
    # 8 batches/epoch: '0.25ep' interval = every 2 steps; half-life 0.5ep -> beta 2**-0.5.
    rec, cb = StepRecorder(), EMACallback(half_life="0.5ep", update_interval="0.25ep")
    fit([rec, cb], max_epochs=1)
    assert cb.controller.num_updates == 3  # updates at steps 2 (copy), 4, 6, 8
    beta = 2**-0.5
    betas: list[float | None] = [math.nan, None, math.nan, beta, math.nan, beta, math.nan, beta]
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], betas))


def test_epoch_interval_updates_at_the_last_batch_of_each_epoch() -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="1ep")
    fit([rec, cb], max_epochs=3, data=TinyData(train_batches=3))
    assert cb.controller.num_updates == 2
    betas: list[float | None] = [math.nan, math.nan, None] + [math.nan, math.nan, 0.5] * 2
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], betas))


class _RaggedData(TinyData):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__(train_batches=len(sizes))
        self.sizes = sizes

    def train_dataloader(self) -> IndexBatches:
        return IndexBatches(len(self.sizes), sizes=self.sizes)


@pytest.mark.parametrize(
    ("batch_size_fn", "factor"),
    [(None, 1), ("tests.lightning.lightning_tiny.double_len", 2)],
)
def test_samples_follow_batch_sizes(batch_size_fn: str | None, factor: int) -> None:
    sizes = [3, 5, 4, 7, 2, 6]
    rec = StepRecorder()
    cb = EMACallback(half_life="20sp", batch_size_fn=batch_size_fn)
    fit([rec, cb], max_epochs=1, data=_RaggedData(sizes))
    betas: list[float | None] = [None] + [2 ** (-factor * n / 20) for n in sizes[1:]]
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], betas))


def test_samples_sum_micro_batches_under_accumulation() -> None:
    sizes = [3, 5, 4, 7, 2, 6]
    rec = StepRecorder()
    cb = EMACallback(half_life="20sp")
    fit([rec, cb], max_epochs=1, data=_RaggedData(sizes), accumulate_grad_batches=2)
    betas: list[float | None] = [None, 2 ** (-(4 + 7) / 20), 2 ** (-(2 + 6) / 20)]
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], betas))


def test_tokens_need_tokens_fn_and_use_it() -> None:
    with pytest.raises(ValueError, match="tokens_fn="):
        EMACallback(half_life="100tok")
    with pytest.raises(ValueError, match="update_interval='8tok' counts tokens"):
        EMACallback(half_life="5ba", update_interval="8tok")
    rec = StepRecorder()
    cb = EMACallback(half_life="64tok", tokens_fn="tests.lightning.lightning_tiny:count_tokens")
    fit([rec, cb], max_steps=4)
    beta = 2 ** (-16 / 64)  # 4 samples x 4 inputs per batch
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], [None, beta, beta, beta]))


def test_duration_from_estimated_stepping_batches() -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="0.25dur")
    fit([rec, cb], max_steps=8)
    beta = 2 ** (-(1 / 8) / 0.25)
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], [None] + [beta] * 7))


def test_duration_needs_a_finite_run() -> None:
    cb = EMACallback(half_life="0.1dur")
    with pytest.raises(ValueError, match="max_steps"):
        fit([cb], max_epochs=-1, max_steps=-1)


def test_start_delays_the_ema() -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="2ba", start="3ba")
    fit([rec, cb], max_steps=5)
    beta = 2**-0.5
    betas: list[float | None] = [math.nan, math.nan, None, beta, beta]
    assert_close(shadow(cb), reference_ema([w for _, w in rec.steps], betas))
