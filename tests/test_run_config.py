"""``ema_callbacks.run_config`` (Lightning and transformers; Composer's are in tests/composer),
the digits demos of ``ema_callbacks.examples`` and ``configs/ema_options.yaml``.

Equivalences, not existence: a config run's final metrics are the EMA's metrics of the same run
made by the demo; a demo's EMA rows are what the adapter's EMA weights give when swapped in;
the Lightning demo is the plain-loop demo, number for number. Config errors are reported with
the file and the key before anything is built (the model here fails loudly if built).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml

from ema_callbacks.examples import (
    _train_plain,
    digits_datasets,
    evaluate_logits,
    lightning_digits,
    run_digits_demo,
    transformers_digits,
)
from ema_callbacks.lightning import EMACallback
from ema_callbacks.run_config import ConfigError, load_config, run
from ema_callbacks.transformers import EMATrainerCallback

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class ExplodingModule(pl.LightningModule):
    """A model whose construction fails loudly: config errors must be found before it."""

    def __init__(self, lr: float = 0.1) -> None:
        raise AssertionError("the model was built although the config has an error")


def explode(**kwargs: Any) -> None:
    raise AssertionError("built although the config has an error")


def _evaluate(model: torch.nn.Module, forward: Any) -> tuple[float, float]:
    _, val = digits_datasets(0)
    x, y = val.tensors
    was = model.training
    model.eval()
    with torch.no_grad():
        result = evaluate_logits(forward(model, x), y)
    model.train(was)
    return result


def _check_rows_are_the_emas(
    rows: list[dict[str, Any]], model: torch.nn.Module, controller: Any, forward: Any
) -> None:
    """The last row's raw metrics are the model's (training weights in), its EMA metrics are
    those of the adapter's EMA swapped into the model, and the two differ."""
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert controller.weights_active == "training"
    raw = _evaluate(model, forward)
    with controller.ema_weights(model):
        assert controller.weights_active == "ema"
        ema = _evaluate(model, forward)
    last = rows[-1]
    assert (last["raw_accuracy"], last["raw_loss"]) == pytest.approx(raw, abs=1e-6)
    assert (last["ema_accuracy"], last["ema_loss"]) == pytest.approx(ema, abs=1e-6)
    assert abs(last["ema_loss"] - last["raw_loss"]) > 1e-3  # not the same weights


# -- run() end to end ---------------------------------------------------------------------------


def test_lightning_digits_config_gives_the_emas_metrics(tmp_path: Path) -> None:
    metrics = run(CONFIGS / "lightning_digits.yaml", ["trainer.max_epochs=1"], output_dir=tmp_path)
    # 43 optimizer steps; the first one initialises the EMA
    assert metrics["ema/num_updates"] == 42
    # the same run, evaluated by the demo through the EMA's functional view
    (row,) = lightning_digits._train(1, "0.5ep", 0, None)[0]
    assert metrics["val_acc"] == pytest.approx(row["ema_accuracy"], abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(row["ema_loss"], abs=1e-5)
    assert metrics["val_loss"] != pytest.approx(row["raw_loss"], abs=1e-3)


def test_transformers_digits_config_gives_the_emas_metrics(tmp_path: Path) -> None:
    metrics = run(
        CONFIGS / "transformers_digits.yaml",
        {"training_arguments.num_train_epochs": 1},
        output_dir=tmp_path,
    )
    assert metrics["ema/num_updates"] == 42
    (row,) = transformers_digits._train(1, "0.5ep", 0, None)[0]
    assert metrics["eval_accuracy"] == pytest.approx(row["ema_accuracy"], abs=1e-6)
    assert metrics["eval_loss"] == pytest.approx(row["ema_loss"], abs=1e-5)
    assert metrics["eval_loss"] != pytest.approx(row["raw_loss"], abs=1e-3)


# -- errors, before anything is built -------------------------------------------------------------

_LIGHTNING = """\
framework: lightning
model:
  class_path: tests.test_run_config.ExplodingModule
data:
  class_path: ema_callbacks.examples.lightning_digits.DigitsDataModule
trainer:
  max_epochs: 1
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: ema_callbacks.lightning.EMACallback
      init_args:
        update_interval: 1ba
        half_life: 50ba
"""
_TRANSFORMERS = """\
framework: transformers
model:
  class_path: tests.test_run_config.explode
train_dataset:
  class_path: tests.test_run_config.explode
compute_metrics: ema_callbacks.examples.transformers_digits.compute_metrics
training_arguments:
  num_train_epochs: 1
callbacks:
  - class_path: ema_callbacks.transformers.EMATrainerCallback
    init_args:
      half_life: 50ba
"""


@pytest.mark.parametrize(
    ("text", "old", "new", "key", "words"),
    [
        (
            _LIGHTNING,
            "half_life: 50ba",
            "half_life: -3ba",
            "trainer.callbacks[1].init_args.half_life",
            ["half_life must not be negative", "'-3ba'"],
        ),
        (
            _LIGHTNING,
            "half_life: 50ba",
            "half_lfe: 50ba",
            "trainer.callbacks[1].init_args.half_lfe",
            ["an argument of EMACallback", "did you mean 'half_life'"],
        ),
        (
            _LIGHTNING,
            "half_life: 50ba",
            "half_life: 2000tok",
            "trainer.callbacks[1].init_args.half_life",
            ["tokens_fn"],
        ),
        (
            _LIGHTNING,
            "  max_epochs: 1",
            "  max_epoch: 1",
            "trainer.max_epoch",
            ["did you mean 'max_epochs'"],
        ),
        (
            _LIGHTNING,
            "LearningRateMonitor",
            "LearningRateMonitr",
            "trainer.callbacks[0].class_path",
            ["importable dotted path", "LearningRateMonitr"],
        ),
        (_LIGHTNING, "trainer:", "trainr:", "trainr", ["did you mean 'trainer'"]),
        (
            _LIGHTNING,
            "framework: lightning",
            "framework: keras",
            "framework",
            ["'composer', 'lightning', 'transformers'", "'keras'"],
        ),
        (_LIGHTNING, "framework: lightning\n", "", "framework", ["the key is missing"]),
        (
            _LIGHTNING,
            "lightning_digits.DigitsDataModule",
            "lightning_digits.Nope",
            "data.class_path",
            ["has no attribute 'Nope'"],
        ),
        (
            _TRANSFORMERS,
            "half_life: 50ba",
            "buffers: mean",
            "callbacks[0].init_args.buffers",
            ["buffers must be one of"],
        ),
        (
            _TRANSFORMERS,
            "class_path: tests.test_run_config.explode",
            "class_path: ema_callbacks.examples.transformers_digits.DigitsMLP",
            "model.init_args.config",
            ["expected a value (it is required), got nothing"],
        ),
        (
            _TRANSFORMERS,
            "num_train_epochs: 1",
            "num_train_epoch: 1",
            "training_arguments.num_train_epoch",
            ["did you mean 'num_train_epochs'"],
        ),
        (
            _TRANSFORMERS,
            "digits.compute_metrics",
            "digits.compute_metric",
            "compute_metrics",
            ["compute_metric"],
        ),
        (
            _TRANSFORMERS,
            _TRANSFORMERS[_TRANSFORMERS.index("callbacks:") :],
            "callbacks: 3\n",
            "callbacks",
            ["a list of {class_path, init_args}"],
        ),
        (
            _TRANSFORMERS,
            "  num_train_epochs: 1",
            "  eval_strategy: often",
            "training_arguments.eval_strategy",
            ["'often'"],
        ),
    ],
)
def test_config_errors_name_file_and_key_before_anything_is_built(
    tmp_path: Path, text: str, old: str, new: str, key: str, words: list[str]
) -> None:
    assert old in text
    path = tmp_path / "run.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        run(path)
    err = info.value
    assert (err.file, err.key) == (str(path), key)
    assert str(err).startswith(f"{path}: {key}: expected ")
    for word in words:
        assert word in str(err)


def test_unbroken_error_configs_do_reach_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The configs above are valid but for the one edit: unedited, building the model is what
    fails (so the errors above were found before it)."""
    monkeypatch.chdir(tmp_path)  # the default output folder, runs/..., is made here
    for text in (_LIGHTNING, _TRANSFORMERS):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        load_config(path)
        # (jsonargparse re-raises the model's error as a ValueError)
        with pytest.raises((AssertionError, ValueError), match="built although"):
            run(path)


def test_lightningcli_type_errors_are_config_errors_before_the_model_is_built(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        _LIGHTNING.replace(
            "  class_path: tests.test_run_config.ExplodingModule",
            "  class_path: tests.test_run_config.ExplodingModule\n  init_args: {lr: fast}",
        )
    )
    with pytest.raises(ConfigError) as info:
        run(path)
    assert info.value.key == "model.init_args.lr"
    assert "'fast'" in str(info.value)


def test_overrides_are_validated_with_their_key() -> None:
    key = "trainer.callbacks[0].init_args.half_life"
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "lightning_digits.yaml", {key: "1xyz"})
    assert info.value.key == key and "'1xyz'" in str(info.value)
    config = load_config(CONFIGS / "lightning_digits.yaml", [f"{key}=3ba", "trainer.max_epochs=2"])
    assert config.config["trainer"]["callbacks"][0]["init_args"]["half_life"] == "3ba"
    assert config.config["trainer"]["max_epochs"] == 2


def test_yaml_syntax_errors_and_missing_trainers(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("framework: lightning\ntrainer: [\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line \d+: expected valid YAML"):
        load_config(path)
    path.write_text("framework: composer\n")
    with pytest.raises(ImportError, match=r'pip install "ema-callbacks\[composer\]"'):
        load_config(CONFIGS / "composer_digits.yaml")


def test_every_config_here_loads() -> None:
    for name in ("lightning_digits.yaml", "transformers_digits.yaml"):
        assert load_config(CONFIGS / name).framework == name.split("_")[0]


# -- configs/ema_options.yaml --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "own"), [(EMACallback, "lightning"), (EMATrainerCallback, "transformers")]
)
def test_ema_options_reference_lists_every_option_with_its_default(cls: type, own: str) -> None:
    options = yaml.safe_load((CONFIGS / "ema_options.yaml").read_text())
    assert set(options) == {"common", "lightning", "transformers", "composer"}
    listed = {**options["common"], **options[own]}
    params = inspect.signature(cls).parameters
    assert set(listed) == set(params)
    for name, value in listed.items():
        assert value == params[name].default, name
    cls(**listed)  # accepted as written


# -- the demos ------------------------------------------------------------------------------------


def test_plain_demo_rows_are_the_emas() -> None:
    rows, model, ema = _train_plain(1, "0.5ep", 0, None)
    _check_rows_are_the_emas(rows, model, ema.controller, lambda m, x: m(x))
    assert run_digits_demo(epochs=1) == rows  # deterministic


def test_lightning_demo_rows_are_the_emas_and_match_the_plain_loop() -> None:
    calls: list[tuple[int, int]] = []
    rows, model, callback = lightning_digits._train(
        2, "0.5ep", 0, lambda d, t: calls.append((d, t))
    )
    _check_rows_are_the_emas(rows, model, callback.controller, lambda m, x: m(x))
    assert calls == [(i, 86) for i in range(1, 87)]
    # the same run as the plain PyTorch loop with ema_callbacks.EMA, number for number
    assert rows == _train_plain(2, "0.5ep", 0, None)[0]
    assert rows[-1]["ema_accuracy"] > rows[-1]["raw_accuracy"]


def test_transformers_demo_rows_are_the_emas() -> None:
    calls: list[tuple[int, int]] = []
    rows, model, callback = transformers_digits._train(
        1, "0.5ep", 0, lambda d, t: calls.append((d, t))
    )
    _check_rows_are_the_emas(
        rows, model, callback.controller, lambda m, x: m(pixel_values=x).logits
    )
    assert calls == [(i, 43) for i in range(1, 44)]
