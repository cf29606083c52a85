"""``ema_callbacks.run_config`` (Lightning and transformers; Composer's are in tests/composer),
the digits demos of ``ema_callbacks.examples``, the bundled configs (``ema_callbacks/configs``) and
``ema-callbacks run``.

Equivalences, not existence: a config run's final metrics are the EMA's metrics of the same run
made by the demo; a demo's EMA rows are what the adapter's EMA weights give when swapped in;
the Lightning demo is the plain-loop demo, number for number. Config errors are reported with
the file and the key before anything is built (the model here fails loudly if built).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ema_callbacks.cli import main
from ema_callbacks.examples import (
    _train_plain,
    digits_datasets,
    evaluate_logits,
    lightning_digits,
    run_digits_demo,
    transformers_digits,
)
from ema_callbacks.export import export_ema
from ema_callbacks.lightning import EMACallback
from ema_callbacks.run_config import (
    ConfigError,
    bundled_configs,
    describe_config,
    load_config,
    run,
)
from ema_callbacks.transformers import EMATrainerCallback, load_ema_state

CONFIGS = Path(__file__).resolve().parents[1] / "ema_callbacks" / "configs"


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


# -- bundled configs, the `run` command as a user types it --------------------------------------

REPO = Path(__file__).resolve().parents[1]


def test_bundled_configs_are_the_package_files_and_say_what_they_are() -> None:
    bundled = bundled_configs()
    package = REPO / "ema_callbacks" / "configs"
    assert {p.resolve() for p in bundled.values()} == set(package.glob("*.yaml"))
    assert len(bundled) == 7
    for name, path in bundled.items():
        text = path.read_text()
        runnable = "\nframework:" in text
        assert runnable != ("not a run config" in describe_config(path)), name
        assert "class_path: tests." not in text, name  # nothing lives under tests/
        if runnable and name.split("_")[0] != "composer":
            assert load_config(name).framework == name.split("_")[0]
    with pytest.raises(ConfigError, match="framework: expected one of .*the key is missing"):
        load_config("ema_options")  # a reference: said so, not run


def test_docs_and_configs_point_at_nothing_under_tests() -> None:
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"), *bundled_configs().values()]:
        assert not re.search(r"\btests\.\w+\.\w+", path.read_text()), path


def test_run_list_and_print_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # outside the repository
    assert main(["run", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{n}: {describe_config(p)}" for n, p in bundled_configs().items()]
    text = bundled_configs()["transformers_digits"].read_text()
    assert main(["run", "transformers_digits", "--print-config"]) == 0
    assert capsys.readouterr().out == text
    assert main(["run", "transformers_digits.yaml", "--print-config", "-o", "mine.yaml"]) == 0
    assert capsys.readouterr().out == "config: mine.yaml\n"
    assert (tmp_path / "mine.yaml").read_text() == text
    assert load_config("mine.yaml").path == Path("mine.yaml")  # a path, not the bundled name
    assert main(["run", "transformers_digits", "--print-config", "-o", "mine.yaml"]) == 2
    assert "mine.yaml: exists" in capsys.readouterr().err  # never written over
    for argv, words in [
        (["run", "lightning_digit"], "did you mean 'lightning_digits'?"),
        (["run", str(tmp_path)], "is a folder"),
        (["run", "lightning_digits", "trainer.max_epoch=1"], "did you mean 'max_epochs'?"),
        (["run", "lightning_digits", "max_epochs"], "must look like 'dotted.key=value'"),
        (["run", "lightning_digits", "-o", "x.yaml"], "--print-config"),
        (["run"], "run --list"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ema-callbacks run: error: ") and err.count("\n") == 1, err
        assert words in err, (argv, err)
    assert not (tmp_path / "runs").exists()  # nothing was started


def _printed(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_run_keeps_its_folder_and_reports_metrics_checkpoints_and_the_ema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Default folder runs/NAME-TIME in the working directory, printed first; the EMA weights
    written there are what ``ema-callbacks export`` takes out of the last checkpoint, and they
    load into the model."""
    readme = (REPO / "README.md").read_text()
    assert "ema-callbacks run lightning_digits trainer.max_epochs=1 " in readme  # as run here
    assert "ema-callbacks run --list " in readme  # run in test_run_list_and_print_config
    monkeypatch.chdir(tmp_path)
    assert main(["run", "lightning_digits", "trainer.max_epochs=1"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"output_dir: runs/lightning_digits-\d{8}-\d{6}\n", out)
    printed = _printed(out)
    folder = Path(printed["output_dir"])
    assert printed["checkpoints"] == str(folder / "checkpoints")
    assert printed["last_checkpoint"] == str(folder / "checkpoints" / "epoch=0-step=43.ckpt")
    assert printed["ema_weights"] == str(folder / "ema_weights.safetensors")
    assert float(printed["ema/num_updates"]) == 42 and 0.5 < float(printed["val_acc"]) <= 1
    exported = export_ema(printed["last_checkpoint"], tmp_path / "export.safetensors")
    assert exported["tensors"] > 0
    mine, theirs = load_file(printed["ema_weights"]), load_file(tmp_path / "export.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    model = lightning_digits.DigitsClassifier()
    model.load_state_dict(mine)  # strict
    # a second run the same second gets its own folder
    assert main(["run", "lightning_digits", "trainer.max_epochs=1"]) == 0
    assert Path(_printed(capsys.readouterr().out)["output_dir"]) != folder


def test_run_output_dir_and_the_configs_own_output_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own"
    argv = ["run", "transformers_digits", "training_arguments.num_train_epochs=1"]
    assert main([*argv, f"training_arguments.output_dir={own}"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["output_dir"] == str(own)
    assert printed["last_checkpoint"] == str(own / "checkpoint-43")
    shadow = load_ema_state(own / "checkpoint-43")["shadow"]
    mine = load_file(printed["ema_weights"])
    assert shadow.keys() <= mine.keys() and all(torch.equal(mine[k], shadow[k]) for k in shadow)
    assert main([*argv, "--output-dir", "elsewhere", "training_arguments.save_strategy='no'"]) == 0
    printed = _printed(capsys.readouterr().out)
    assert printed["output_dir"] == "elsewhere" and printed["checkpoints"] == "(none written)"
    assert (tmp_path / "elsewhere" / "ema_weights.safetensors").is_file()
    assert "last_checkpoint" not in printed


# -- types, from the trainers' own signatures ------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        (
            "training_arguments.num_train_epochs=three",
            "training_arguments.num_train_epochs",
            ["expected float, got 'three'"],
        ),
        (
            "training_arguments.per_device_train_batch_size=1.5",
            "training_arguments.per_device_train_batch_size",
            ["expected int, got 1.5"],
        ),
        ("training_arguments.use_cpu=maybe", "training_arguments.use_cpu", ["bool", "'maybe'"]),
        (
            "model.init_args.config.init_args.hidden_size=wide",
            "model.init_args.config.init_args.hidden_size",
            ["expected int, got 'wide'"],
        ),
        (
            "train_dataset.init_args.seed=[1]",
            "train_dataset.init_args.seed",
            ["expected int, got a list of 1"],
        ),
    ],
)
def test_type_errors_name_the_file_and_the_key(override: str, key: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("transformers_digits", [override])
    assert info.value.key == key and info.value.file.endswith("transformers_digits.yaml")
    for word in words:
        assert word in str(info.value)


def test_a_number_written_as_a_string_is_read_as_a_number(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; where the signature says float it is the
    number 0.001 (a word stays an error, above)."""
    text = bundled_configs()["transformers_digits"].read_text()
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("learning_rate: 0.2", "learning_rate: 1e-3"))
    assert yaml.safe_load(path.read_text())["training_arguments"]["learning_rate"] == "1e-3"
    config = load_config(path)
    assert config.config["training_arguments"]["learning_rate"] == 0.001
    config = load_config("lightning_digits", ["trainer.max_epochs=2", "model.init_args.lr=5e-2"])
    assert config.config["trainer"]["max_epochs"] == 2
    assert config.config["model"]["init_args"]["lr"] == 0.05
    with pytest.raises(ConfigError, match=r"trainer.max_epochs: expected int or null, got 'two'"):
        load_config("lightning_digits", ["trainer.max_epochs=two"])
    with pytest.raises(ConfigError, match=r"save_strategy: expected .*str, got False .*quote"):
        load_config("transformers_digits", ["training_arguments.save_strategy=no"])
