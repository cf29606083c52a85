"""Bad input is refused at construction; exceptions leave the training weights in the model."""

from __future__ import annotations

import json

import pytest
from hf_tiny import Recorder, TinyRegressor, assert_equal, snapshot, trainer

from ema_callbacks.transformers import EMATrainerCallback


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"half_life": "-3ba"}, ValueError, "half_life"),
        ({"half_life": "10minutes"}, ValueError, "half_life"),
        ({"half_life": "5ba", "smoothing": 0.9}, ValueError, "exactly one"),
        ({"smoothing": 1.5}, ValueError, "smoothing"),
        ({"update_interval": "0ba"}, ValueError, "update_interval"),
        ({"buffers": "mean"}, ValueError, "buffers"),
        ({"final_weights": "best"}, ValueError, "final_weights"),
        ({"eval_with_ema": "yes"}, TypeError, "eval_with_ema"),
        ({"dtype": "int3"}, ValueError, "dtype"),
        ({"include": 3}, TypeError, "include"),
        ({"name": "../x"}, ValueError, "name"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMATrainerCallback(**kwargs)


def test_arguments_are_json_and_rebuild_the_callback():
    cb = EMATrainerCallback(half_life=float("inf"), include=("net.*",), dtype="float64")
    args = json.loads(json.dumps(cb.state()))["args"]
    assert args["half_life"] == "infba" and args["include"] == ["net.*"]
    assert EMATrainerCallback(**args).state() == cb.state()


def test_exception_during_evaluation_leaves_training_weights(tmp_path):
    def broken_metrics(prediction):
        raise RuntimeError("boom in compute_metrics")

    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba")
    tr = trainer(tmp_path, [rec, ema], eval_strategy="steps", eval_steps=2)
    tr.compute_metrics = broken_metrics
    with pytest.raises(RuntimeError, match="compute_metrics"):
        tr.train()
    assert ema.controller.weights_active == "training"
    assert_equal(snapshot(tr.model), rec.steps[2])


def test_exception_during_a_training_step_leaves_training_weights(tmp_path):
    model = TinyRegressor()
    model.fail_at = 3  # the 4th training forward raises, after an evaluation at step 2
    rec, ema = Recorder(), EMATrainerCallback(half_life="2ba")
    tr = trainer(tmp_path, [rec, ema], model=model, eval_strategy="steps", eval_steps=2)
    with pytest.raises(RuntimeError, match="training step"):
        tr.train()
    assert ema.controller.weights_active == "training"
    assert_equal(snapshot(tr.model), rec.steps[3])


def test_missing_transformers_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "try:\n    import ema_callbacks.transformers\n"
        "except ImportError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert 'pip install "ema-callbacks[transformers]"' in out.stdout, out.stderr


def test_public_names():
    import ema_callbacks.transformers as module

    assert module.__all__ == sorted(module.__all__)
    assert module.__all__ == ["EMATrainerCallback", "load_ema_state", "save_ema_state"]
