"""``ema-callbacks run`` for Composer configs, the Composer digits demo, and Composer's part of
``configs/ema_options.yaml`` (runs in ``.venv-composer``)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from composer import Callback
from composer.core import State
from composer.loggers import Logger
from safetensors.torch import load_file

from ema_callbacks.composer import EMA
from ema_callbacks.examples import composer_digits, digits_datasets, evaluate_logits
from ema_callbacks.export import export_ema
from ema_callbacks.run_config import ConfigError, load_config, run, train

pytestmark = [pytest.mark.composer]

CONFIGS = Path(__file__).resolve().parents[2] / "ema_callbacks" / "configs"


def explode(**kwargs: Any) -> None:
    raise AssertionError("built although the config has an error")


def _evaluate(model: torch.nn.Module) -> tuple[float, float]:
    _, val = digits_datasets(0)
    x, y = val.tensors
    model.eval()
    with torch.no_grad():
        return evaluate_logits(model((x, y)), y)


class EMARecorder(Callback):  # type: ignore[misc]
    """At every EPOCH_END (after the EMA algorithm's update): the validation metrics of the
    training weights and of the EMA's functional view, into ``RECORDED``."""

    def epoch_end(self, state: State, logger: Logger) -> None:
        (ema,) = [a for a in state.algorithms if isinstance(a, EMA)]
        _, val = digits_datasets(0)
        x, y = val.tensors
        state.model.eval()
        with torch.no_grad():
            raw = evaluate_logits(state.model((x, y)), y)
            averaged = evaluate_logits(
                ema.controller.weights.functional_call(state.model, (x, y)), y
            )
        state.model.train()
        RECORDED.append({"raw": raw, "ema": averaged})


RECORDED: list[dict[str, tuple[float, float]]] = []


def test_composer_digits_config_gives_the_emas_metrics(tmp_path: Path) -> None:
    RECORDED.clear()
    recorder = {"class_path": f"{__name__}.EMARecorder"}
    metrics = run(
        CONFIGS / "composer_digits.yaml",
        {"trainer.max_duration": "1ep", "callbacks": [recorder]},
        tmp_path,
    )
    assert metrics["ema/num_updates"] == 42  # 43 batches, the first initialises the EMA
    # the evaluation after the epoch ran on the EMA weights
    ((accuracy, loss),) = [r["ema"] for r in RECORDED]
    assert metrics["metrics/eval/MulticlassAccuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["metrics/eval/CrossEntropy"] == pytest.approx(loss, abs=1e-5)
    assert metrics["metrics/eval/CrossEntropy"] != pytest.approx(RECORDED[0]["raw"][1], abs=1e-3)


def test_composer_run_keeps_the_checkpoint_and_the_ema_weights_it_holds(tmp_path: Path) -> None:
    result = train(load_config("composer_digits", ["trainer.max_duration=1ep"]), tmp_path)
    assert result.checkpoints == tmp_path
    assert result.last_checkpoint == tmp_path / "ep1-ba43-rank0.pt"
    export_ema(result.last_checkpoint, tmp_path / "export.safetensors")
    mine, theirs = load_file(result.ema_weights), load_file(tmp_path / "export.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    composer_digits.digits_model().module.load_state_dict(mine)  # the bare module, strict


def test_composer_demo_rows_are_the_emas() -> None:
    calls: list[tuple[int, int]] = []
    rows, model, ema = composer_digits._train(1, "0.5ep", 0, lambda d, t: calls.append((d, t)))
    assert calls == [(i, 43) for i in range(1, 44)]
    assert [r["epoch"] for r in rows] == [1]
    controller = ema.controller
    assert controller.weights_active == "training"
    raw = _evaluate(model)
    with controller.ema_weights(model):
        averaged = _evaluate(model)
    assert (rows[0]["raw_accuracy"], rows[0]["raw_loss"]) == pytest.approx(raw, abs=1e-6)
    assert (rows[0]["ema_accuracy"], rows[0]["ema_loss"]) == pytest.approx(averaged, abs=1e-6)
    assert abs(raw[1] - averaged[1]) > 1e-3


_COMPOSER = """\
framework: composer
model:
  class_path: tests.composer.test_run_config_composer.explode
train_dataloader:
  class_path: tests.composer.test_run_config_composer.explode
optimizer:
  class_path: torch.optim.SGD
  init_args: {lr: 0.1}
trainer:
  max_duration: 1ep
algorithms:
  ema:
    half_life: 50ba
"""


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("half_life: 50ba", "half_life: 50", "algorithms.ema.half_life", ["time string"]),
        (
            "half_life: 50ba",
            "ema_start: -1ba",
            "algorithms.ema.ema_start",
            ["must not be negative"],
        ),
        ("half_life: 50ba", "start: 1ba", "algorithms.ema.start", ["did you mean 'ema_start'"]),
        ("  max_duration: 1ep", "  optimizers: null", "trainer.optimizers", ["top level"]),
        ("  max_duration: 1ep", "  max_duraton: 1ep", "trainer.max_duraton", ["max_duration"]),
        ("{lr: 0.1}", "{lr: 0.1, params: []}", "optimizer.init_args.params", ["model's"]),
        ("  max_duration: 1ep", "  seed: zero", "trainer.seed", ["expected int or null", "'zero'"]),
        ("{lr: 0.1}", "{lr: fast}", "optimizer.init_args.lr", ["'fast'"]),
    ],
)
def test_composer_config_errors_name_file_and_key_before_anything_is_built(
    tmp_path: Path, old: str, new: str, key: str, words: list[str]
) -> None:
    path = tmp_path / "run.yaml"
    assert old in _COMPOSER
    path.write_text(_COMPOSER.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        run(path)
    assert (info.value.file, info.value.key) == (str(path), key)
    for word in words:
        assert word in str(info.value)
    path.write_text(_COMPOSER)  # unedited, building the model is what fails
    load_config(path)
    with pytest.raises(AssertionError, match="built although"):
        run(path, output_dir=tmp_path / "out")


def test_ema_options_reference_lists_every_composer_option_with_its_default() -> None:
    options = yaml.safe_load((CONFIGS / "ema_options.yaml").read_text())
    listed = {**options["common"], **options["composer"]}
    listed["ema_start"] = "0.0dur"  # Composer's name and default for `start`
    assert options["common"].pop("start") == "0ba"
    del listed["start"]
    params = inspect.signature(EMA).parameters
    assert set(listed) == set(params)
    for name, value in listed.items():
        if name != "half_life":  # None in the reference means Composer's '1000ba'
            assert value == params[name].default, name
    assert params["half_life"].default == "1000ba" and listed["half_life"] is None
    EMA(**{**listed, "half_life": "1000ba"})  # accepted as written
