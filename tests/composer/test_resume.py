"""Stop at batch k, resume with ``load_path``: bit-identical to the uninterrupted run (as
Lightning's ``test_ema_resume`` does), also from a ``composer.algorithms.EMA`` checkpoint."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from composer_runs import EMA, ComposerEMA, Recorder, model_tensors, run

pytestmark = [
    pytest.mark.composer,
    pytest.mark.slow,
    # Resuming at an epoch's last batch replays the epoch end over an empty remainder.
    pytest.mark.filterwarnings("ignore:No batches were trained:UserWarning"),
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning"),
]

N = 12


def equal(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    assert a is not None and b is not None
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor] | None) -> bool:
    assert a is not None and b is not None
    return sorted(a) == sorted(b) and all(
        torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a
    )


def stop_and_resume(
    make_first: Any, make_second: Any, k: int, tmp_path: Any, **kw: Any
) -> Recorder:
    """Train to batch k (checkpoint written by the CheckpointSaver at k), then resume to N in
    a new Trainer with a fresh algorithm; returns the second run's recorder."""
    run(
        make_first(),
        f"{k}ba",
        save_folder=str(tmp_path),
        save_interval=f"{k}ba",
        save_filename="ba{batch}.pt",
        **kw,
    )
    path = os.path.join(tmp_path, f"ba{k}.pt")
    assert os.path.exists(path)
    _, rec = run(make_second(), f"{N}ba", load_path=path, **kw)
    return rec


@pytest.fixture(scope="module")
def uninterrupted() -> Recorder:
    return run(EMA(half_life="4ba"), f"{N}ba")[1]


@pytest.mark.parametrize("k", [3, 6, 8])  # mid-epoch, mid-epoch after an eval, epoch boundary
def test_resume_is_bit_identical(k: int, tmp_path: Any, uninterrupted: Recorder) -> None:
    rec = stop_and_resume(lambda: EMA(half_life="4ba"), lambda: EMA(half_life="4ba"), k, tmp_path)
    assert len(rec.ema) == N - k
    for i, (ema, training) in enumerate(zip(rec.ema, rec.training, strict=True), start=k):
        assert equal(training, uninterrupted.training[i]), f"training weights, batch {i + 1}"
        assert equal(ema, uninterrupted.ema[i]), f"EMA, batch {i + 1}"
    # Evaluations after the resume saw the same EMA and computed the same metrics.
    n = len(rec.eval_metrics)
    assert n >= 1 and rec.eval_metrics == uninterrupted.eval_metrics[-n:]


@pytest.mark.parametrize("k", [5, 8])
def test_resume_from_composer_ema_checkpoint(k: int, tmp_path: Any) -> None:
    """A run that used composer.algorithms.EMA continues with ours: training weights
    bit-identical, EMA equal to Composer's uninterrupted EMA up to float32 round-off."""
    reference = run(ComposerEMA(half_life="4ba"), f"{N}ba")[1]
    rec = stop_and_resume(
        lambda: ComposerEMA(half_life="4ba"), lambda: EMA(half_life="4ba"), k, tmp_path
    )
    for i, (ema, training) in enumerate(zip(rec.ema, rec.training, strict=True), start=k):
        assert equal(training, reference.training[i]), f"training weights, batch {i + 1}"
        assert close(ema, reference.ema[i]), f"EMA, batch {i + 1}"


def test_resume_from_composer_checkpoint_saved_by_hand(tmp_path: Any) -> None:
    """``trainer.save_checkpoint`` after fit: Composer's EMA is not swapped in
    (``ema_weights_active=False``), so its storage holds the EMA and the slot training."""
    k = 6
    reference = run(ComposerEMA(half_life="4ba"), f"{N}ba", eval_interval=None)[1]
    first, _ = run(ComposerEMA(half_life="4ba"), f"{k}ba", eval_interval=None)
    assert first.state.algorithms[0].ema_weights_active is False
    path = first.save_checkpoint(os.path.join(tmp_path, "manual.pt"))
    assert path is not None
    _, rec = run(EMA(half_life="4ba"), f"{N}ba", eval_interval=None, load_path=path)
    for i, (ema, training) in enumerate(zip(rec.ema, rec.training, strict=True), start=k):
        assert equal(training, reference.training[i]), f"training weights, batch {i + 1}"
        assert close(ema, reference.ema[i]), f"EMA, batch {i + 1}"


def test_eval_without_fit_after_load_uses_the_loaded_ema(tmp_path: Any) -> None:
    """``Trainer(load_path=...).eval()``, no fit: the loaded EMA is evaluated and the model
    holds the loaded training weights afterwards."""
    k = 6
    _, first = run(
        EMA(half_life="4ba"),
        f"{k}ba",
        save_folder=str(tmp_path),
        save_interval=f"{k}ba",
        save_filename="ba{batch}.pt",
    )
    trainer, rec = run(
        EMA(half_life="4ba"), f"{N}ba", load_path=os.path.join(tmp_path, f"ba{k}.pt"), fit=False
    )
    trainer.eval()
    assert len(rec.eval_weights) == 1
    assert equal(rec.eval_weights[0], first.ema[k - 1])
    assert rec.eval_metrics[-1] == first.eval_metrics[-1]
    assert equal(model_tensors(trainer.state.model), first.training[k - 1])


def test_checkpoint_written_before_fit_loads(tmp_path: Any) -> None:
    trainer, _ = run(EMA(half_life="4ba"), "2ba", eval_interval=None, fit=False)
    path = trainer.save_checkpoint(os.path.join(tmp_path, "before_fit.pt"))
    algo = EMA(half_life="4ba")
    _, rec = run(algo, "2ba", eval_interval=None, load_path=path)
    assert algo.controller.started and rec.ema[-1] is not None
