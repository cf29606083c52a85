"""What Composer's own EMA tests check (composer v0.32.1, tests/algorithms/test_ema.py and
tests/algorithms/test_algorithm_resumption.py), checked here of ema_callbacks.composer.EMA with
the real Trainer (tests written here, not copied), plus the documented differences in when an
EMA starts (docs/composer.md)."""

from __future__ import annotations

from typing import Any

import pytest
from composer_runs import EMA, ComposerEMA, run

pytestmark = [pytest.mark.composer]


def first_started_batch(algo: Any, max_duration: str = "12ba") -> int:
    """The 1-based batch at whose BATCH_END the EMA existed for the first time."""
    _, rec = run(algo, max_duration, eval_interval=None)
    return next(i for i, ema in enumerate(rec.ema, start=1) if ema is not None)


def test_ema_start_in_epochs_is_one_batch_earlier_than_composer() -> None:
    # 4 batches per epoch: one epoch of training is done after batch 4 (fractional epoch 1.0);
    # Composer's timestamp.epoch becomes 1 only after EPOCH_END, so it starts at batch 5.
    assert first_started_batch(EMA(half_life="4ba", ema_start="1ep")) == 4
    assert first_started_batch(ComposerEMA(half_life="4ba", ema_start="1ep")) == 5


@pytest.mark.parametrize(("ema_start", "ours", "composers"), [("0ba", 4, 1), ("5ba", 5, 5)])
def test_start_with_an_update_interval(ema_start: str, ours: int, composers: int) -> None:
    # Ours: the first batch at or after both ema_start and the first interval multiple.
    kw = {"half_life": "8ba", "update_interval": "4ba", "ema_start": ema_start}
    assert first_started_batch(EMA(**kw)) == ours
    assert first_started_batch(ComposerEMA(**kw)) == composers
