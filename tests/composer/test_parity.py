"""Same seeded run, same arguments: our EMA equals composer.algorithms.EMA after every update."""

from __future__ import annotations

import pytest
import torch
from composer_runs import EMA, ComposerEMA, run

pytestmark = [pytest.mark.composer]

# float32 round-off: Composer computes ema*s + p*(1-s), we lerp.
RTOL, ATOL = 1e-5, 1e-6


def assert_close_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=k)


def assert_equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"half_life": "10ba"}, {"half_life": "10ba"}),
        ({"half_life": "10ba", "ema_start": "4ba"}, {"half_life": "10ba", "ema_start": "4ba"}),
        # Composer needs update_interval here: without it, it crashes (AttributeError).
        ({"smoothing": 0.8}, {"half_life": None, "smoothing": 0.8, "update_interval": "1ba"}),
    ],
    ids=["half_life", "ema_start", "smoothing"],
)
def test_ema_matches_composer_after_every_update(ours: dict, theirs: dict) -> None:
    _, mine = run(EMA(**ours))
    _, ref = run(ComposerEMA(**theirs))
    # Training is untouched by either EMA: bit-identical training weights.
    assert len(mine.training) == len(ref.training) == 12
    for a, b in zip(mine.training, ref.training, strict=True):
        assert_equal_dicts(a, b)
    started = 0
    for a, b in zip(mine.ema, ref.ema, strict=True):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            started += 1
            assert_close_dicts(a, b)
    assert started == (9 if "ema_start" in ours else 12)
    # The EMA moved away from the training weights, so the comparison above has teeth.
    assert not torch.allclose(mine.ema[-1]["0.weight"], mine.training[-1]["0.weight"], atol=1e-3)
    # Evaluation ran on the EMA weights in both, with the same metrics.
    assert len(mine.eval_metrics) == len(ref.eval_metrics) >= 4
    torch.testing.assert_close(
        torch.tensor(mine.eval_metrics), torch.tensor(ref.eval_metrics), rtol=RTOL, atol=ATOL
    )
    for a, b in zip(mine.eval_weights, ref.eval_weights, strict=True):
        assert_close_dicts(a, b)


def test_epoch_half_life_matches_composer() -> None:
    """'1ep': Composer updates at EPOCH_END; we update when the fractional epoch reaches the
    boundary, at the epoch's last BATCH_END: same weights, same EMA."""
    _, mine = run(EMA(half_life="1ep"), eval_interval="1ep")
    _, ref = run(ComposerEMA(half_life="1ep"), eval_interval="1ep")
    # After each epoch (the last BATCH_END of the epoch for us; Composer updates one event
    # later, so compare at the next epoch's first batch end, before either updates again).
    for i in (4, 8):
        assert mine.ema[i] is not None and ref.ema[i] is not None
        assert_close_dicts(mine.ema[i], ref.ema[i])
    torch.testing.assert_close(
        torch.tensor(mine.eval_metrics), torch.tensor(ref.eval_metrics), rtol=RTOL, atol=ATOL
    )
    assert len(mine.eval_metrics) == 3
