"""Which weights the model holds, phase by phase, on the real Trainer: training weights for
every training step, the EMA for validation/test/predict once it has started, the chosen
weights after ``fit``, training weights after an exception."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from ema_callbacks.lightning import EMACallback
from tests.lightning.lightning_helpers import (
    QUIET,
    StepRecorder,
    assert_close,
    fit,
    reference_ema,
    shadow,
)
from tests.lightning.lightning_tiny import IndexBatches, TinyData, TinyMixin, TinyRegression

HALF = 3
BETA = 2 ** (-1 / HALF)


def flat(state: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).float() for k in keys])


def phases(model: TinyRegression, phase: str) -> list[tuple[int, torch.Tensor]]:
    return [(step, w) for p, step, w in model.seen if p == phase]


def _validating_fit(cb: Callback | None, **kwargs: Any) -> tuple[TinyRegression, StepRecorder]:
    rec = StepRecorder()
    callbacks = [rec] if cb is None else [rec, cb]
    options: dict[str, Any] = {"max_epochs": 3, "num_sanity_val_steps": 1, "limit_val_batches": 1}
    options.update(kwargs)
    _, model = fit(callbacks, model=TinyRegression(record=True), data=TinyData(4), **options)
    return model, rec


def test_training_steps_run_on_training_weights_and_validation_on_the_ema() -> None:
    plain, _ = _validating_fit(None)
    model, rec = _validating_fit(EMACallback(half_life=f"{HALF}ba", final_weights="training"))
    keys = list(model.state_dict())
    # Training is unaffected by the EMA: bit-identical weights at every training step.
    train, plain_train = phases(model, "train"), phases(plain, "train")
    assert len(train) == 12
    assert all(torch.equal(a[1], b[1]) for a, b in zip(train, plain_train, strict=True))
    # The sanity check ran before the EMA started: the initial (training) weights.
    (sanity,) = phases(model, "sanity")
    assert torch.equal(sanity[1], train[0][1])
    # Each validation saw the hand-computed EMA of the training weights so far.
    vals = phases(model, "val")
    assert [s for s, _ in vals] == [4, 8, 12]
    steps = [w for _, w in rec.steps]
    for step, seen in vals:
        expected = reference_ema(steps[:step], [None] + [BETA] * (step - 1))
        assert torch.allclose(seen, flat(expected, keys).float(), atol=1e-6)
        assert not torch.allclose(seen, flat(steps[step - 1], keys), atol=1e-4)
    # final_weights='training': the model ends on the last training weights.
    assert torch.equal(model.flat(), flat(steps[-1], keys))


def test_after_fit_the_model_holds_the_ema_and_evaluation_uses_it() -> None:
    cb = EMACallback(half_life=f"{HALF}ba")  # final_weights='ema' by default
    trainer, model = fit([cb], model=TinyRegression(record=True), max_steps=6, limit_val_batches=2)
    keys = list(model.state_dict())
    ema = flat(shadow(cb), keys)
    assert torch.equal(model.flat(), ema)
    data = TinyData(4)
    trainer.validate(model, data, verbose=False)
    trainer.test(model, data, verbose=False)
    trainer.predict(model, data)
    for phase in ("val", "test", "predict"):
        assert phases(model, phase) and all(torch.equal(w, ema) for _, w in phases(model, phase)), (
            phase
        )
    assert torch.equal(model.flat(), ema)


def test_final_weights_training_then_validate_test_predict_swap_the_ema_in_and_out() -> None:
    rec, cb = StepRecorder(), EMACallback(half_life=f"{HALF}ba", final_weights="training")
    trainer, model = fit(
        [rec, cb], model=TinyRegression(record=True), max_steps=6, limit_val_batches=2
    )
    keys = list(model.state_dict())
    training, ema = flat(rec.steps[-1][1], keys), flat(shadow(cb), keys)
    assert torch.equal(model.flat(), training)
    data = TinyData(4)
    for run, phase in (
        (trainer.validate, "val"),
        (trainer.test, "test"),
        (trainer.predict, "predict"),
    ):
        run(model, data)
        assert phases(model, phase) and all(torch.equal(w, ema) for _, w in phases(model, phase))
        assert torch.equal(model.flat(), training), phase


def test_no_swap_before_the_ema_started() -> None:
    # Lightning #21724: a delayed EMA must not validate an untouched copy.
    model, rec = _validating_fit(EMACallback(half_life="2ba", start="6ba"), max_epochs=2)
    keys = list(model.state_dict())
    (first, second) = phases(model, "val")
    assert first[0] == 4 and torch.equal(first[1], flat(rec.steps[3][1], keys))
    assert second[0] == 8 and not torch.equal(second[1], flat(rec.steps[7][1], keys))


def test_exception_during_validation_leaves_training_weights() -> None:
    rec, cb = StepRecorder(), EMACallback(half_life=f"{HALF}ba")
    model = TinyRegression(crash_in_validation=True)
    with pytest.raises(RuntimeError, match="crash in validation"):
        fit([rec, cb], model=model, data=TinyData(4), max_epochs=2, limit_val_batches=1)
    assert cb.controller.weights_active == "training"
    assert torch.equal(model.flat(), flat(rec.steps[-1][1], list(model.state_dict())))


class _NaNOnce(Callback):
    """Puts NaN in a weight at one optimizer step (before the EMA reads it), then restores it
    (after): the EMA must skip that update and count it."""

    def __init__(self, step: int, restore: bool) -> None:
        self.step, self.restore, self.saved = step, restore, None

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        weight = pl_module.net[0].weight
        with torch.no_grad():
            if self.restore:
                weight[0, 0] = _NaNOnce.saved_value
            else:
                _NaNOnce.saved_value = weight[0, 0].item()
                weight[0, 0] = math.nan


def test_metrics_go_to_the_logger(tmp_path: Path) -> None:
    rec = StepRecorder()
    cb = EMACallback(half_life=f"{HALF}ba", nonfinite="skip")
    logger = CSVLogger(tmp_path, name="run", version=0)
    with pytest.warns(RuntimeWarning, match="EMA update skipped"):
        fit(
            [_NaNOnce(3, restore=False), rec, cb, _NaNOnce(3, restore=True)],
            max_steps=5,
            logger=logger,
            log_every_n_steps=1,
        )
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ema/num_updates")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [float(r["ema/num_updates"]) for r in rows] == [0, 1, 1, 2, 3]
    assert [float(r["ema/num_skipped"]) for r in rows] == [0, 0, 1, 1, 1]
    smoothing = [float(r["ema/smoothing"]) if r["ema/smoothing"] else None for r in rows]
    # Step 4 covers the skipped step 3: two steps of progress.
    assert smoothing == pytest.approx([None, BETA, BETA, BETA**2, BETA])
    steps = [w for _, w in rec.steps]
    expected = reference_ema(steps, [None, BETA, math.nan, BETA**2, BETA])
    assert_close(shadow(cb), expected)


def test_metrics_are_logged_at_the_trainers_logging_steps(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    fit([EMACallback(half_life="3ba")], max_steps=7, logger=logger, log_every_n_steps=3)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    ema_steps = [int(r["step"]) for r in rows if r.get("ema/num_updates")]
    loss_steps = [int(r["step"]) for r in rows if r.get("train_loss")]
    assert ema_steps == loss_steps == [2, 5]
    assert [float(r["ema/num_updates"]) for r in rows if r.get("ema/num_updates")] == [2, 5]


# -- both import styles ------------------------------------------------------------------


def test_same_callback_for_lightning_pytorch_and_pytorch_lightning() -> None:
    pl_old = pytest.importorskip("pytorch_lightning")
    import lightning.pytorch as pl_new

    class OldStyleTiny(TinyMixin, pl_old.LightningModule):
        pass

    results = []
    for pl, module_cls in ((pl_new, TinyRegression), (pl_old, OldStyleTiny)):
        cb = EMACallback(half_life=f"{HALF}ba", final_weights="training")
        assert isinstance(cb, pl.Callback)
        model = module_cls()
        options = {k: v for k, v in QUIET.items()}
        trainer = pl.Trainer(callbacks=[cb], max_steps=4, limit_val_batches=0, **options)
        trainer.fit(model, train_dataloaders=IndexBatches(8))
        assert cb.controller.num_updates == 3
        results.append((shadow(cb), model.flat()))
    (ema_new, w_new), (ema_old, w_old) = results
    assert torch.equal(w_new, w_old)
    assert all(torch.equal(ema_new[k], ema_old[k]) for k in ema_new)


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"half_life": "-3ba"}, ValueError, "half_life must not be negative; got '-3ba'"),
        ({"half_life": "10s"}, ValueError, "not wall-clock"),
        ({"half_life": 50}, TypeError, "half_life must be a time string"),
        ({"half_life": "5ba", "smoothing": 0.9}, ValueError, "exactly one of"),
        ({"smoothing": 1.5}, ValueError, "smoothing must be between 0 and 1"),
        ({"final_weights": "best"}, ValueError, "final_weights must be one of"),
        ({"checkpoint_weights": "raw"}, ValueError, "checkpoint_weights must be one of"),
        ({"buffers": "mean"}, ValueError, "buffers must be one of"),
        ({"log_metrics": "yes"}, TypeError, "log_metrics must be True or False"),
        ({"eval_with_ema": 1}, TypeError, "eval_with_ema must be True or False"),
        (
            {"batch_size_fn": "nowhere_pkg.count"},
            ValueError,
            "batch_size_fn must name an importable",
        ),
        ({"batch_size_fn": "count"}, ValueError, "batch_size_fn must be an import path"),
        ({"tokens_fn": 3}, TypeError, "tokens_fn must be an import path"),
        ({"tokens_fn": "math.pi"}, TypeError, "tokens_fn must name a callable"),
        ({"half_life": "1e6tok"}, ValueError, "pass tokens_fn="),
    ],
)
def test_bad_input_is_rejected_at_construction(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)


def test_bad_batch_size_fn_result_is_named() -> None:
    cb = EMACallback(half_life="10sp", batch_size_fn=lambda batch: -1)
    with pytest.raises(
        ValueError, match="batch_size_fn must return a non-negative integer; got -1"
    ):
        fit([cb], max_steps=2)


def test_val_loss_is_measured_on_the_ema() -> None:
    cb = EMACallback(half_life=f"{HALF}ba", final_weights="training")
    trainer, model = fit([cb], data=TinyData(4), max_epochs=1, limit_val_batches=2)
    model.eval()
    with cb.controller.ema_weights(model), torch.no_grad():
        losses = [
            torch.nn.functional.mse_loss(model(x), y) for x, y in TinyData(4).val_dataloader()
        ]
    logged = trainer.callback_metrics["val_loss"].item()
    assert logged == pytest.approx(torch.stack(losses).mean().item(), abs=1e-6)


def test_reusing_the_callback_on_a_new_trainer_starts_a_new_ema() -> None:
    cb = EMACallback(half_life=f"{HALF}ba", final_weights="training")
    fit([cb], max_steps=4)
    rec = StepRecorder()
    fit([rec, cb], max_steps=3)  # a new Trainer: global_step restarts at 0
    assert cb.controller.num_updates == 2
    expected = reference_ema([w for _, w in rec.steps], [None, BETA, BETA])
    assert_close(shadow(cb), expected)
