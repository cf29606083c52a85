"""Which weights the model holds at each Composer event, with the real Trainer."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from composer import Callback
from composer.core import State
from composer.loggers import Logger
from composer_runs import EMA, ComposerEMA, make_loader, make_model, model_tensors, run

pytestmark = [pytest.mark.composer]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


class Snapshots(Callback):
    """The model's weights before every training forward and at every checkpoint event."""

    def __init__(self) -> None:
        self.forward_weights: list[dict[str, torch.Tensor]] = []
        self.at_checkpoint: dict[int, dict[str, torch.Tensor]] = {}

    def before_forward(self, state: State, logger: Logger) -> None:
        self.forward_weights.append(model_tensors(state.model))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self.at_checkpoint[int(state.timestamp.batch)] = model_tensors(state.model)


def test_training_weights_for_every_batch_ema_for_eval_and_written_checkpoints(tmp_path) -> None:
    snaps = Snapshots()
    algo = EMA(half_life="4ba")
    _, rec = run(
        algo,
        eval_interval="2ba",
        callbacks=[snaps],
        save_folder=str(tmp_path),
        save_interval="3ba",
        save_filename="ba{batch}.pt",
    )
    # Every training forward saw the weights the previous optimizer step produced, although
    # evaluation (every 2 batches) and checkpoints (every 3) swapped the EMA in meanwhile.
    assert len(snaps.forward_weights) == 12
    for i in range(1, 12):
        assert same(snaps.forward_weights[i], rec.training[i - 1]), f"batch {i + 1}"
    # Evaluation saw the EMA.
    for i, weights in zip(range(1, 12, 2), rec.eval_weights, strict=True):
        assert rec.ema[i] is not None and same(weights, rec.ema[i])
        assert not same(weights, rec.training[i])
    # The model slot holds the EMA exactly when the CheckpointSaver writes (3, 6, 9, 12).
    for batch, weights in snaps.at_checkpoint.items():
        expected = rec.ema[batch - 1] if batch % 3 == 0 else rec.training[batch - 1]
        assert expected is not None and same(weights, expected), f"batch {batch}"
    # The files: EMA in the model slot, training weights in the algorithm state.
    ckpt = torch.load(os.path.join(tmp_path, "ba6.pt"), weights_only=False)
    slot = {k.removeprefix("module."): v for k, v in ckpt["state"]["model"].items()}
    state = dict(ckpt["state"]["algorithms"])["EMA"]
    assert state["weights_active"] == "ema"
    assert rec.ema[5] is not None
    for name, value in rec.ema[5].items():
        assert torch.equal(slot[name], value), name
        assert torch.equal(state["shadow"][name], value), name
        assert torch.equal(state["training"][name], rec.training[5][name]), name


@pytest.mark.parametrize("final_weights", ["ema", "training"])
def test_final_weights_and_get_models(final_weights: str) -> None:
    algo = EMA(half_life="4ba", final_weights=final_weights)
    trainer, rec = run(algo, eval_interval="4ba")
    model = trainer.state.model
    ema, training = rec.ema[-1], rec.training[-1]
    assert ema is not None and not same(ema, training)
    assert same(model_tensors(model), ema if final_weights == "ema" else training)
    # Composer's accessors, on the trained model (swap) and on a copy (copy).
    other = copy.deepcopy(make_model(5))
    assert same(model_tensors(algo.get_ema_model(other)), ema)
    assert same(model_tensors(algo.get_training_model(other)), training)
    assert algo.get_ema_model(model) is model and same(model_tensors(model), ema)
    # The pinned EMA survives a predict, and get_training_model takes it out again.
    trainer.predict(make_loader(3, 1))
    assert same(model_tensors(model), ema)
    assert same(model_tensors(algo.get_training_model(model)), training)
    trainer.predict(make_loader(3, 1))
    assert same(model_tensors(model), training)


class RecordPredict(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def predict_batch_start(self, state: State, logger: Logger) -> None:
        self.weights.append(model_tensors(state.model))


def test_predict_uses_ema_weights() -> None:
    record = RecordPredict()
    trainer, rec = run(
        EMA(half_life="4ba", final_weights="training"), eval_interval=None, callbacks=[record]
    )
    assert same(model_tensors(trainer.state.model), rec.training[-1])
    trainer.predict(make_loader(3, 2))
    assert len(record.weights) == 2
    assert rec.ema[-1] is not None
    assert all(same(w, rec.ema[-1]) for w in record.weights)
    assert same(model_tensors(trainer.state.model), rec.training[-1])


class FailingEval(Callback):
    """Raises inside the evaluation loop (after EVAL_START swapped the EMA in)."""

    def __init__(self, at_eval: int) -> None:
        self.at_eval = at_eval
        self.evals = 0
        self.training: dict[str, torch.Tensor] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.training = model_tensors(state.model)

    def eval_start(self, state: State, logger: Logger) -> None:
        self.evals += 1

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        if self.evals == self.at_eval:
            raise RuntimeError("boom in eval")


@pytest.mark.parametrize("algo_cls", [EMA, ComposerEMA], ids=["ours", "composer"])
def test_exception_during_eval_leaves_training_weights(algo_cls: Any) -> None:
    algo = algo_cls(half_life="4ba")
    failing = FailingEval(at_eval=2)
    model = make_model(0)
    with pytest.raises(RuntimeError, match="boom in eval"):
        run(algo, eval_interval="3ba", callbacks=[failing], model=model, fit=True)
    # The failed evaluation was the one after batch 6.
    now = model_tensors(model)
    if algo_cls is EMA:
        assert same(now, failing.training)
        assert algo.controller.weights_active == "training"
        assert "train" not in model.__dict__  # the guard removed itself
    else:
        # composer.algorithms.EMA leaves its EMA weights in the model (the gap we close).
        assert algo.ema_weights_active is True
        assert not same(now, failing.training)


def test_exception_during_predict_leaves_training_weights() -> None:
    class FailingPredict(Callback):
        def predict_batch_start(self, state: State, logger: Logger) -> None:
            raise RuntimeError("boom in predict")

    algo = EMA(half_life="4ba", final_weights="training")
    trainer, rec = run(algo, eval_interval=None, callbacks=[FailingPredict()])
    with pytest.raises(RuntimeError, match="boom in predict"):
        trainer.predict(make_loader(3, 1))
    assert same(model_tensors(trainer.state.model), rec.training[-1])
    assert algo.controller.weights_active == "training"


def test_reused_algorithm_gives_the_model_its_training_weights_back() -> None:
    """A second Trainer with the same algorithm instance starts a fresh EMA (as Composer's
    does at INIT), after handing the model, which ended the first fit holding the EMA
    (``final_weights='ema'``), its training weights back."""
    algo = EMA(half_life="4ba")
    model = make_model(0)
    _, first = run(algo, "4ba", eval_interval=None, model=model)
    assert first.ema[-1] is not None and same(model_tensors(model), first.ema[-1])
    run(algo, "4ba", eval_interval=None, model=model, fit=False)
    assert same(model_tensors(model), first.training[-1])
    assert not algo.controller.started


class LastTraining(Callback):
    """The training weights at the latest BATCH_END (after the algorithms ran); its state
    holds a lambda, which the CheckpointSaver cannot pickle, so every checkpoint write fails
    inside the saver."""

    def __init__(self) -> None:
        self.training: dict[str, torch.Tensor] = {}

    def batch_end(self, state: State, logger: Logger) -> None:
        self.training = model_tensors(state.model)

    def state_dict(self) -> dict[str, Any]:
        return {"unpicklable": lambda: None}


@pytest.mark.parametrize("algo_cls", [EMA, ComposerEMA], ids=["ours", "composer"])
def test_exception_in_the_checkpoint_saver_leaves_training_weights(
    algo_cls: Any, tmp_path: Any
) -> None:
    # Issue 15: the CheckpointSaver runs while the EMA is in the model slot; if writing fails,
    # the exception must not leave the EMA weights in the model being trained.
    algo = algo_cls(half_life="4ba")
    last = LastTraining()
    model = make_model(0)
    with pytest.raises(Exception, match="lambda|pickle") as info:
        run(
            algo,
            "6ba",
            eval_interval=None,
            callbacks=[last],
            model=model,
            save_folder=str(tmp_path),
            save_interval="3ba",
        )
    assert "save" in "".join(str(f) for f in info.traceback).lower()  # raised while writing
    now = model_tensors(model)
    if algo_cls is EMA:
        assert same(now, last.training)
        assert algo.controller.weights_active == "training"
        assert not algo._guarded and "run_event" not in last.__dict__
    else:
        assert algo.ema_weights_active is True  # Composer's own EMA leaves its EMA in
        assert not same(now, last.training)


def test_checkpoint_guard_removes_itself(tmp_path: Any) -> None:
    algo = EMA(half_life="4ba")
    trainer, _ = run(
        algo,
        "6ba",
        eval_interval=None,
        save_folder=str(tmp_path),
        save_interval="3ba",
        save_filename="ba{batch}.pt",
    )
    assert os.path.exists(os.path.join(tmp_path, "ba3.pt"))
    assert not algo._guarded
    assert all("run_event" not in cb.__dict__ for cb in trainer.state.callbacks)
