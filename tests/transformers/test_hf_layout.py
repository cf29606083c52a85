"""What the adapter assumes about the installed transformers ``Trainer``, proved on the real one
(these run on every tested version: 4.47 in ``.venv-oldest``, 5.x in ``.venv``).

The Trainer passes itself to no callback: the adapter finds it on the call stack (the Trainer
whose ``callback_handler`` holds the callback), wraps its ``train`` (exceptions; the documented
``resume_from_checkpoint`` argument), ``evaluate`` and ``evaluation_loop`` (the metrics of every
EMA). A layout it cannot hook is refused with the transformers version in the message.
"""

from __future__ import annotations

import shutil

import pytest
import transformers
from hf_tiny import Recorder, TinyData, TinyRegressor, args, assert_equal, shadow, snapshot, trainer
from transformers import Trainer, TrainerControl, TrainerState

from ema_callbacks.transformers import EMATrainerCallback

VERSION = f"transformers {transformers.__version__}"
PROFILES = {"half_life": ["2ba", "8ba"]}
RUN = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}


def test_the_trainer_is_found_and_hooked(tmp_path):
    ema = EMATrainerCallback(**PROFILES)
    tr = trainer(tmp_path, [ema])
    hooked = vars(tr)
    assert hooked["_ema_callbacks_runs"] == {"ema": ema._run}
    for name in ("train", "evaluate", "evaluation_loop"):
        assert hooked[name].__wrapped__.__func__ is getattr(Trainer, name), name
    tr.train()
    metrics = tr.evaluate()
    assert {"eval_loss", "eval_ema_2ba_loss", "eval_ema_8ba_loss"} <= set(metrics)


def test_hooks_called_without_a_trainer_name_the_version(tmp_path):
    ema = EMATrainerCallback(half_life="2ba")
    with pytest.raises(RuntimeError, match=f"{VERSION}.*on_init_end was not called by"):
        ema.on_init_end(args(tmp_path), TrainerState(), TrainerControl())
    # a Trainer on the stack that does not hold this callback is not taken for its owner
    other = EMATrainerCallback(half_life="2ba")

    class Calls(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, model=None, **kw):
            other.on_train_begin(a, state, control, model=model)

    with pytest.raises(RuntimeError, match=f"{VERSION}.*on_train_begin was not called by"):
        trainer(tmp_path, [Calls()], max_steps=1).train()


def test_evaluation_loop_without_metric_key_prefix_is_refused(tmp_path):
    class OwnLoop(Trainer):
        def evaluation_loop(self, dataloader, description, prediction_loss_only=None):
            return super().evaluation_loop(dataloader, description, prediction_loss_only)

    def build(callback):
        return OwnLoop(
            model=TinyRegressor(),
            args=args(tmp_path),
            train_dataset=TinyData(),
            eval_dataset=TinyData(8, seed=5),
            callbacks=[callback],
        )

    with pytest.raises(RuntimeError, match=f"{VERSION}.*takes no metric_key_prefix"):
        build(EMATrainerCallback(**PROFILES))
    build(EMATrainerCallback(**PROFILES, eval_all=False)).train()  # one EMA: no expansion


def test_legacy_prediction_loop_is_refused(tmp_path):
    if not hasattr(transformers.TrainingArguments, "use_legacy_prediction_loop"):
        pytest.skip(f"{VERSION} has no use_legacy_prediction_loop")
    with pytest.raises(RuntimeError, match=f"{VERSION}.*use_legacy_prediction_loop"):
        trainer(tmp_path, [EMATrainerCallback(**PROFILES)], use_legacy_prediction_loop=True)


def test_an_evaluate_without_the_evaluation_loop_raises(tmp_path):
    class OwnEvaluate(Trainer):
        def evaluate(self, *a, **kw):
            return {"eval_loss": 0.0}  # measures nothing the profiles could be added to

    ema = EMATrainerCallback(**PROFILES)
    tr = OwnEvaluate(model=TinyRegressor(), args=args(tmp_path), callbacks=[ema])
    with pytest.raises(RuntimeError, match=f"{VERSION}.*evaluate\\(\\) ran no evaluation_loop"):
        tr.evaluate()


# -- trainer.add_callback after the Trainer was built (no on_init_end for the callback) -------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    ema = EMATrainerCallback(**PROFILES, final_weights="training")
    tr = trainer(out, [ema], **RUN)
    tr.train()
    return out, shadow(ema), snapshot(tr.model)


def test_add_callback_resumes_from_the_train_argument(uninterrupted, tmp_path):
    out, full_ema, full_weights = uninterrupted
    shutil.copytree(out / "checkpoint-3", tmp_path / "elsewhere")  # not under output_dir
    ema = EMATrainerCallback(**PROFILES, final_weights="training")
    tr = trainer(tmp_path / "out", [], model=TinyRegressor(seed=7), **RUN)
    tr.add_callback(ema)  # this train() runs unwrapped: the path comes from the training loop
    tr.train(resume_from_checkpoint=str(tmp_path / "elsewhere"))
    assert_equal(shadow(ema), full_ema)
    assert_equal(snapshot(tr.model), full_weights)
    metrics = tr.evaluate()
    assert {"eval_loss", "eval_ema_2ba_loss", "eval_ema_8ba_loss"} <= set(metrics)


def test_add_callback_exception_in_evaluation_leaves_training_weights(tmp_path):
    def broken_metrics(prediction):
        raise RuntimeError("boom in compute_metrics")

    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba")
    tr = trainer(tmp_path, [rec], eval_strategy="steps", eval_steps=2)
    tr.add_callback(ema)
    tr.compute_metrics = broken_metrics
    with pytest.raises(RuntimeError, match="compute_metrics"):
        tr.train()
    assert ema.controller.weights_active == "training"
    assert_equal(snapshot(tr.model), rec.steps[2])
