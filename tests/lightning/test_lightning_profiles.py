"""Several EMAs (profiles) in one ``EMACallback`` on the real Lightning Trainer: each profile is
the EMA a single-EMA run computes; one validation pass measures the training weights under the
module's names and every EMA under prefixed names, torchmetrics objects included;
``ModelCheckpoint`` can monitor a profile's metric; post-hoc snapshots; resume; LightningCLI."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file

from ema_callbacks.export import read_ema
from ema_callbacks.lightning import CHECKPOINT_KEY, EMACallback
from ema_callbacks.posthoc import find_snapshots, load_snapshot, reconstruct
from tests.lightning.lightning_classifier import ClassifierData, TinyClassifier, evaluate
from tests.lightning.lightning_helpers import QUIET, fit, shadow
from tests.lightning.lightning_tiny import TinyData, TinyRegression

NAMES = ["ema_2ba", "ema_20ba"]


def profile_shadow(cb: EMACallback, name: str) -> dict[str, torch.Tensor]:
    weights = cb.controller.profile(name).weights
    assert weights is not None
    return {k: v.clone() for k, v in weights.state_dict().items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def fit_classifier(
    callbacks: list[Any], model: TinyClassifier | None = None, **kwargs: Any
) -> tuple[Trainer, TinyClassifier]:
    options: dict[str, Any] = {
        **QUIET,
        "max_epochs": 2,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    options.update(kwargs)
    model = model or TinyClassifier()
    trainer = Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, ClassifierData())
    return trainer, model


def read_csv(path: Path) -> list[dict[str, str]]:
    (metrics,) = path.rglob("metrics.csv")
    with open(metrics) as f:
        return list(csv.DictReader(f))


# -- the EMAs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("several", "singles"),
    [
        ({"half_life": ["2ba", "5ba"]}, [{"half_life": "2ba"}, {"half_life": "5ba"}]),
        (
            {
                "profiles": [
                    {"name": "fast", "half_life": "2ba"},
                    {"name": "slow", "smoothing": 0.9, "start": "3ba"},
                ]
            },
            [{"half_life": "2ba"}, {"smoothing": 0.9, "start": "3ba"}],
        ),
    ],
)
def test_each_profile_equals_a_single_ema_run(
    several: dict[str, Any], singles: list[dict[str, Any]]
) -> None:
    options = {"max_epochs": 2, "limit_val_batches": 2, "data": TinyData(4)}
    cb = EMACallback(**several, final_weights="training")
    _, model = fit([cb], **options)  # validating every EPOCH: the re-runs must not disturb
    assert cb.controller.names == (
        ["ema_2ba", "ema_5ba"] if "half_life" in several else ["fast", "slow"]
    )
    for name, kwargs in zip(cb.controller.names, singles, strict=True):
        single = EMACallback(**kwargs, final_weights="training")
        _, alone = fit([single], **options)
        assert equal(profile_shadow(cb, name), shadow(single)), name  # bit-identical
        assert cb.controller.profile(name).state.to_dict() == single.controller.state.to_dict()
        assert torch.equal(model.flat(), alone.flat())  # training weights untouched


# -- evaluation ------------------------------------------------------------------------------


def test_prefixed_metrics_are_each_ema_evaluated_by_hand(tmp_path: Path) -> None:
    cb = EMACallback(half_life=["2ba", "20ba"], final_weights="training")
    model = TinyClassifier()
    acc, collection = model.val_acc, model.val_set
    trainer, _ = fit_classifier(
        [cb], model=model, logger=CSVLogger(tmp_path), num_sanity_val_steps=1
    )
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert metrics["ema/ema_20ba/num_updates"] == metrics["ema/num_updates"] == 11
    metrics = {k: v for k, v in metrics.items() if not k.startswith("ema/")}
    keys = ["val_loss", "val_acc", "val_macro", "val_micro"]
    assert sorted(metrics) == sorted(keys + [f"{n}/{k}" for n in NAMES for k in keys])
    # The last validation ran on the final weights: the model holds them (final_weights).
    raw = evaluate(model)
    assert {k: metrics[k] for k in keys} == pytest.approx(raw, abs=1e-6)
    for name in NAMES:
        with cb.controller.ema_weights(model, name):
            expected = evaluate(model)
        assert {k: metrics[f"{name}/{k}"] for k in keys} == pytest.approx(expected, abs=1e-6)
        assert expected != pytest.approx(raw, abs=1e-3)  # a real difference to get right
    # Training weights back after every batch; grad stayed off in every run.
    assert cb.controller.weights_active == "training"
    assert model.grad_enabled and not any(model.grad_enabled)
    assert len(model.grad_enabled) == (1 + 2 * 2) * 3  # (1 sanity + 2 x 2 batches) x 3 runs
    # The module's own metric objects are back.
    assert model.val_acc is acc and model.val_set is collection
    assert "log" not in model.__dict__
    # A logger sees the prefixed columns, once per epoch.
    rows = [r for r in read_csv(tmp_path) if r.get("val_loss")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for name in NAMES:
        assert all(r[f"{name}/val_acc"] for r in rows)
    assert float(rows[-1]["ema_20ba/val_loss"]) == pytest.approx(metrics["ema_20ba/val_loss"])


def test_test_and_predict_with_several_emas() -> None:
    cb = EMACallback(half_life=["2ba", "20ba"], final_weights="training")
    trainer, model = fit_classifier([cb], max_epochs=1, limit_val_batches=0)
    training = [p.detach().clone() for p in model.parameters()]
    (result,) = trainer.test(model, ClassifierData(), verbose=False)
    assert result["test_loss"] == pytest.approx(evaluate(model)["val_loss"], abs=1e-6)
    for name in NAMES:
        with cb.controller.ema_weights(model, name):
            expected = evaluate(model)["val_loss"]
        assert result[f"{name}/test_loss"] == pytest.approx(expected, abs=1e-6)
    # predict runs on the primary EMA; the training weights are back afterwards.
    predictions = trainer.predict(model, ClassifierData())
    assert predictions is not None
    with cb.controller.ema_weights(model, NAMES[0]), torch.no_grad():
        expected_out = [model(x) for x, _ in ClassifierData().predict_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(predictions, expected_out, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), training, strict=True))


def test_eval_all_with_one_ema_and_without() -> None:
    one = EMACallback(half_life="2ba", eval_all=True, final_weights="training")
    trainer, model = fit_classifier([one], max_epochs=1)
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(
        evaluate(model)["val_loss"], abs=1e-6
    )
    with one.controller.ema_weights(model):
        ema = evaluate(model)["val_loss"]
    assert trainer.callback_metrics["ema_2ba/val_loss"].item() == pytest.approx(ema, abs=1e-6)
    # eval_all=False with several: only the primary EMA, under the module's own names.
    primary = EMACallback(half_life=["2ba", "20ba"], eval_all=False, final_weights="training")
    trainer, model = fit_classifier([primary], max_epochs=1)
    assert not any("/" in k for k in trainer.callback_metrics)
    with primary.controller.ema_weights(model):
        ema = evaluate(model)["val_loss"]
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(ema, abs=1e-6)


def test_a_profile_before_its_start_is_the_training_weights() -> None:
    cb = EMACallback(
        profiles=[{"half_life": "2ba"}, {"name": "late", "half_life": "2ba", "start": "100ba"}]
    )
    trainer, _ = fit_classifier([cb], max_epochs=1)
    metrics = trainer.callback_metrics
    assert metrics["late/val_loss"].item() == metrics["val_loss"].item()
    assert metrics["ema_2ba/val_loss"].item() != metrics["val_loss"].item()


def test_a_profile_that_never_started_is_the_training_weights_outside_fit_too() -> None:
    # as in the Composer and transformers adapters: trainer.validate after fit reports it
    cb = EMACallback(
        profiles=[{"half_life": "2ba"}, {"name": "late", "half_life": "2ba", "start": "100ba"}],
        final_weights="training",
    )
    trainer, model = fit_classifier([cb], max_epochs=1)
    assert not cb.controller.profile("late").started
    (result,) = trainer.validate(model, ClassifierData(), verbose=False)
    assert result["late/val_loss"] == pytest.approx(evaluate(model)["val_loss"], abs=1e-6)
    assert result["late/val_loss"] == result["val_loss"]
    assert result["ema_2ba/val_loss"] != result["val_loss"]


class IterValidation(TinyClassifier):
    def validation_step(self, dataloader_iter: Any) -> None:  # type: ignore[override]
        next(dataloader_iter)


def test_a_dataloader_iter_validation_step_is_refused() -> None:
    with pytest.raises(ValueError, match="validation_step\\(dataloader_iter\\) cannot"):
        fit_classifier([EMACallback(half_life=["2ba", "20ba"])], model=IterValidation())


def test_exception_in_an_ema_run_leaves_the_training_weights() -> None:
    cb = EMACallback(half_life=["2ba", "20ba"])
    model = TinyClassifier(crash_in_ema=True)
    model.ema_active = lambda: cb.controller.active_profile is not None
    with pytest.raises(RuntimeError, match="crash in an EMA's validation_step"):
        fit_classifier([cb], model=model, max_epochs=1)
    assert cb.controller.weights_active == "training"
    expected = TinyClassifier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        Trainer(max_epochs=1, limit_val_batches=0, **QUIET).fit(expected, ClassifierData())
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters(), strict=True)
    )
    assert "log" not in model.__dict__ and model._current_fx_name != "validation_step"
    assert isinstance(model.val_acc, type(expected.val_acc)) and model.val_acc.update_count == 1


# -- checkpoints -----------------------------------------------------------------------------


PROFILES = [{"name": "fast", "half_life": "2ba"}, {"name": "slow", "half_life": "20ba"}]


def test_model_checkpoint_monitors_a_profile_metric(tmp_path: Path) -> None:
    cb = EMACallback(profiles=PROFILES)
    best = ModelCheckpoint(dirpath=tmp_path / "best", monitor="slow/val_acc", mode="max")
    every = ModelCheckpoint(dirpath=tmp_path / "all", save_top_k=-1, filename="{epoch}")
    trainer, model = fit_classifier(
        [cb, best, every], max_epochs=3, logger=CSVLogger(tmp_path), enable_checkpointing=True
    )
    rows = [r for r in read_csv(tmp_path) if r.get("slow/val_acc")]
    assert len(rows) == 3
    logged = [float(r["slow/val_acc"]) for r in rows]
    assert best.best_model_score is not None
    score = best.best_model_score.item()
    assert score == pytest.approx(max(logged))
    ckpt = torch.load(best.best_model_path, map_location="cpu", weights_only=False)
    assert ckpt[CHECKPOINT_KEY] == {
        "state_dict_holds": "ema",
        "callback": "EMACallback",
        "profile": "fast",
    }
    state = ckpt["callbacks"]["EMACallback"]
    # The monitored EMA, as saved with the best checkpoint, scores what was logged.
    checked = TinyClassifier()
    checked.load_state_dict(state["profiles"]["slow"]["shadow"])
    assert evaluate(checked)["val_acc"] == pytest.approx(score)
    row = rows[int(ckpt["epoch"])]
    assert evaluate(checked)["val_loss"] == pytest.approx(float(row["slow/val_loss"]), abs=1e-6)
    # state_dict holds the primary EMA (Model.load_from_checkpoint gives it).
    primary = TinyClassifier.load_from_checkpoint(best.best_model_path)
    assert all(torch.equal(primary.state_dict()[k], v) for k, v in state["shadow"].items())
    # ... and the monitored EMA is exported by name.
    exported = read_ema(best.best_model_path, profile="slow").tensors
    assert equal(exported, state["profiles"]["slow"]["shadow"])
    # trainer.validate(ckpt_path=...) evaluates that checkpoint's EMAs (not the last ones);
    # the plain names measure the checkpoint's state_dict (the primary EMA).
    first = tmp_path / "all" / "epoch=0.ckpt"
    (again,) = trainer.validate(model, ClassifierData(), ckpt_path=str(first), verbose=False)
    for key in ("fast/val_loss", "slow/val_loss", "slow/val_acc"):
        assert again[key] == pytest.approx(float(rows[0][key]), abs=1e-6), key
    assert again["val_loss"] == pytest.approx(float(rows[0]["fast/val_loss"]), abs=1e-6)
    # So does a new Trainer with a new callback (which can go on to fit afterwards).
    fresh = EMACallback(profiles=PROFILES)
    cold_trainer = Trainer(callbacks=[fresh], **QUIET)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        (cold,) = cold_trainer.validate(
            TinyClassifier(), ClassifierData(), ckpt_path=str(first), verbose=False
        )
    assert cold == pytest.approx(again, abs=1e-6)
    fit_classifier([fresh], max_epochs=1)
    assert fresh.controller.num_updates == 5


def every_step(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, every_n_train_steps=1, save_top_k=-1, filename="{step}")


def test_crash_and_resume_with_several_emas_is_bit_identical(tmp_path: Path) -> None:
    options: dict[str, Any] = {"max_epochs": 3, "data": TinyData(4)}
    kwargs: dict[str, Any] = {
        "profiles": [
            {"half_life": "2ba"},
            {"half_life": "0.5ep", "update_interval": "0.25ep"},
            {"sigma_rel": 0.1, "start": "2ba"},
        ],
        "final_weights": "training",
    }
    full = EMACallback(**kwargs)
    _, model_full = fit([full], **options)
    crashed = EMACallback(**kwargs)
    with pytest.raises(RuntimeError, match="crash at step"):
        fit(
            [crashed, every_step(tmp_path)],
            model=TinyRegression(crash_at_step=6),
            enable_checkpointing=True,
            **options,
        )
    ckpt = torch.load(tmp_path / "step=5.ckpt", map_location="cpu", weights_only=False)
    assert sorted(ckpt["callbacks"]["EMACallback"]["profiles"]) == full.controller.names[1:]
    resumed = EMACallback(**kwargs)
    _, model_resumed = fit([resumed], ckpt_path=str(tmp_path / "step=5.ckpt"), **options)
    assert torch.equal(model_resumed.flat(), model_full.flat())
    for name in full.controller.names:
        assert equal(profile_shadow(resumed, name), profile_shadow(full, name)), name
        a, b = resumed.controller.profile(name).state, full.controller.profile(name).state
        assert a.to_dict() == b.to_dict()


# -- post-hoc snapshots ----------------------------------------------------------------------


def test_snapshots_go_next_to_the_checkpoints_and_reconstruct(tmp_path: Path) -> None:
    cb = EMACallback(sigma_rel=[0.05, 0.1], snapshot_every="3ba", final_weights="training")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    fit([cb, ckpt], max_steps=9, enable_checkpointing=True)
    folder = tmp_path / "ckpt" / "ema_snapshots"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        f"ema-{t}ba-sigma_rel{s}.safetensors" for t in (3, 6, 9) for s in ("0.05", "0.1")
    )
    assert [(s.time, s.sigma_rel) for s in find_snapshots(folder)] == [
        (t, s) for t in (3.0, 6.0, 9.0) for s in (0.05, 0.1)
    ]
    # Reconstructing a tracked width at the last snapshot gives that EMA (float16 files).
    rebuilt = reconstruct(folder, sigma_rel=0.1)
    ema = profile_shadow(cb, "ema_sigma_rel0.1")
    for k, v in rebuilt.items():
        assert torch.allclose(v.double(), ema[k].double(), atol=2e-3), k
    between = reconstruct(folder, sigma_rel=0.07)
    assert all(torch.isfinite(v).all() for v in between.values() if v.is_floating_point())


def test_snapshot_folder_defaults_and_explicit(tmp_path: Path) -> None:
    cb = EMACallback(sigma_rel=[0.1], snapshot_every="2ba", snapshot_keep=1)
    fit([cb], max_steps=4, default_root_dir=str(tmp_path / "root"))
    (only,) = (tmp_path / "root" / "checkpoints" / "ema_snapshots").iterdir()
    assert load_snapshot(only).time == 4.0  # snapshot_keep=1: the latest
    explicit = EMACallback(
        sigma_rel=[0.1], snapshot_every="2ba", snapshot_folder=str(tmp_path / "s")
    )
    fit([explicit], max_steps=4)
    assert len(list((tmp_path / "s").iterdir())) == 2
    # A second run into the same folder is refused when training starts; nothing is touched.
    before = {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()}
    again = EMACallback(sigma_rel=[0.1], snapshot_every="2ba", snapshot_folder=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="snapshot.s. of another run"):
        fit([again], max_steps=4)
    assert {p.name: p.read_bytes() for p in (tmp_path / "s").iterdir()} == before


def test_resumed_snapshots_are_written_once(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"sigma_rel": [0.05, 0.1], "snapshot_every": "2ba"}
    options: dict[str, Any] = {"max_epochs": 2, "data": TinyData(4)}
    fit([EMACallback(**kwargs, snapshot_folder=str(tmp_path / "full"))], **options)
    crashed = EMACallback(**kwargs, snapshot_folder=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="crash at step"):
        fit(
            [crashed, every_step(tmp_path / "ckpt")],
            model=TinyRegression(crash_at_step=5),
            enable_checkpointing=True,
            **options,
        )
    ckpt = torch.load(tmp_path / "ckpt" / "step=3.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["callbacks"]["EMACallback"]["snapshot"]["last"]["ba"] == 2
    resumed = EMACallback(**kwargs, snapshot_folder=str(tmp_path / "run"))
    fit([resumed], ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"), **options)
    full = {p.name: p for p in (tmp_path / "full").iterdir()}
    run = {p.name: p for p in (tmp_path / "run").iterdir()}
    assert sorted(run) == sorted(full) and len(full) == 2 * 4  # no snapshot time twice
    for name, path in full.items():
        a, b = load_snapshot(run[name]), load_snapshot(path)
        assert (a.time, a.unit, a.sigma_rel, a.buffers) == (b.time, b.unit, b.sigma_rel, b.buffers)
        assert equal(load_file(run[name]), load_file(path)), name


# -- configuration ---------------------------------------------------------------------------


def cli_callback(tmp_path: Path, init_args: dict[str, Any], run: bool = False) -> EMACallback:
    """``EMACallback`` as LightningCLI builds it from a YAML file (jsonargparse, type hints)."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 1,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {"class_path": "ema_callbacks.lightning.EMACallback", "init_args": init_args}
            ],
        },
        "model": {"class_path": "tests.lightning.lightning_tiny.TinyRegression"},
        "data": {"class_path": "tests.lightning.lightning_tiny.TinyData"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["fit", "--config", str(path)] if run else ["--config", str(path)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        cli = LightningCLI(args=args, run=run, save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
    if run:
        assert "ema_10ba/val_loss" in cli.trainer.callback_metrics
    return cb


def test_lightning_cli_yaml_with_several_emas(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("half_life: [10ba, 100ba]\n")
    assert yaml.safe_load(path.read_text()) == {"half_life": ["10ba", "100ba"]}
    cb = cli_callback(tmp_path, {"half_life": ["10ba", "100ba"]}, run=True)
    assert cb.controller.names == ["ema_10ba", "ema_100ba"] and cb.controller.eval_all
    assert cb.controller.num_updates == 7  # 8 batches: initialised, then 7 updates
    cb = cli_callback(
        tmp_path,
        {
            "profiles": [{"name": "fast", "half_life": "10ba"}, {"name": "edm", "sigma_rel": 0.05}],
            "eval_all": False,
            "snapshot_every": "1ba",
            "snapshot_dtype": "float32",
            "snapshot_keep": 3,
            "snapshot_folder": str(tmp_path / "snap"),
        },
    )
    assert cb.controller.names == ["fast", "edm"] and not cb.controller.eval_all
    assert cb.controller.snapshot_dtype == "float32" and cb.controller.snapshot_keep == 3
    assert cb.snapshot_folder == str(tmp_path / "snap")
    cb = cli_callback(tmp_path, {"smoothing": [0.9, 0.99]})
    assert cb.controller.names == ["ema_0.9", "ema_0.99"]
    cb = cli_callback(tmp_path, {"sigma_rel": [0.05, 0.1]})
    assert cb.controller.names == ["ema_sigma_rel0.05", "ema_sigma_rel0.1"]
    assert cli_callback(tmp_path, {"half_life": "50ba"}).controller.names == ["ema_50ba"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"half_life": ["2ba", "-1ba"]}, ValueError, "half_life must not be negative"),
        ({"half_life": []}, ValueError, "half_life must not be an empty list"),
        ({"half_life": ["2ba"], "smoothing": [0.9]}, ValueError, "only one of half_life"),
        ({"half_life": ["2ba", "2ba"]}, ValueError, "share the name 'ema_2ba'"),
        ({"profiles": [{"name": "a b", "half_life": "2ba"}]}, ValueError, "profile names"),
        ({"profiles": [{"half_life": "2ba", "decay": 0.9}]}, ValueError, "unknown keys"),
        ({"profiles": [{"half_life": "2ba"}], "half_life": "3ba"}, ValueError, "not both"),
        ({"profiles": {"half_life": "2ba"}}, TypeError, "profiles must be a list"),
        ({"half_life": ["2ba", "20ba"], "eval_all": "yes"}, TypeError, "eval_all must be"),
        ({"half_life": ["2ba", "2000tok"]}, ValueError, r"'2000tok' \(EMA profile 'ema_2000tok'\)"),
        ({"half_life": "2ba", "snapshot_every": "10ba"}, ValueError, "no.*sigma_rel|there is none"),
        (
            {"sigma_rel": [0.1], "snapshot_every": "2ba", "snapshot_dtype": "int8"},
            ValueError,
            "snapshot_dtype",
        ),
        (
            {"sigma_rel": [0.1], "snapshot_every": "2ba", "snapshot_keep": 0},
            ValueError,
            "snapshot_keep",
        ),
        (
            {"sigma_rel": [0.1], "snapshot_folder": "snaps"},
            ValueError,
            "snapshot_folder=.*snapshot_every",
        ),
        (
            {"sigma_rel": [0.1], "snapshot_every": "2ba", "snapshot_folder": "s3://b/x"},
            ValueError,
            "snapshot_folder must be a local",
        ),
    ],
)
def test_bad_input_is_rejected_at_construction(
    kwargs: dict[str, Any], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        EMACallback(**kwargs)


def test_snapshots_without_a_local_folder_name_snapshot_folder() -> None:
    cb = EMACallback(sigma_rel=[0.1], snapshot_every="2ba")
    remote = ModelCheckpoint(dirpath="memory://checkpoints")
    with pytest.raises(ValueError, match="pass snapshot_folder="):
        fit([cb, remote], max_steps=2, enable_checkpointing=True)
