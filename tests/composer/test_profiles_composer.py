"""Several EMAs ("profiles") in one Composer ``EMA``, with the real Trainer: each profile equals
a single-EMA run, evaluation covers the training weights and every profile in one pass with
per-profile metrics that Composer logs and callbacks can monitor, post-hoc snapshots, resume."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from composer import Callback
from composer.callbacks import EarlyStopper
from composer.core import State
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerClassifier
from composer_runs import EMA, float_tensors, make_loader, model_tensors, run
from torch import nn

from ema_callbacks.posthoc import find_snapshots, load_snapshot, reconstruct
from ema_callbacks.weights import normalize_name

pytestmark = [
    pytest.mark.composer,
    pytest.mark.filterwarnings("ignore:No batches were trained:UserWarning"),
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning"),
]

N = 12
Tensors = dict[str, torch.Tensor]
# Three profiles of three kinds: a named half-life, a default-named one, an EDM2 one.
PROFILES = [{"name": "fast", "half_life": "2ba"}, {"half_life": "8ba"}, {"sigma_rel": 0.1}]
NAMES = ["fast", "ema_8ba", "ema_sigma_rel0.1"]
METRICS = ["CrossEntropy", "MulticlassAccuracy"]


def make_classifier(seed: int = 0) -> ComposerClassifier:
    """composer_runs' network with Composer's default eval metrics (CrossEntropy, accuracy)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return ComposerClassifier(net, num_classes=3)


def make_multi(**kw: Any) -> EMA:
    return EMA(profiles=PROFILES, snapshot_every="4ba", snapshot_dtype="float32", **kw)


def shadows(algo: EMA) -> dict[str, Tensors]:
    """Every started profile's EMA, by profile name."""
    return {
        p.name: float_tensors(p.weights.state_dict())
        for p in algo.controller.profiles
        if p.started and p.weights is not None
    }


def same(a: Tensors | None, b: Tensors | None) -> bool:
    assert a is not None and b is not None
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


class ProfileRecorder(Callback):
    """After the algorithm ran: every profile's EMA and the training weights at each BATCH_END;
    the model's weights and every EMA at each EVAL_START; what the model held after each
    profile forward (EVAL_AFTER_FORWARD runs the algorithm first)."""

    def __init__(self, algo: EMA) -> None:
        self.algo = algo
        self.ema: list[dict[str, Tensors]] = []
        self.training: list[Tensors] = []
        self.eval_model: list[Tensors] = []
        self.eval_ema: list[dict[str, Tensors]] = []
        self.eval_values: list[dict[str, float]] = []
        self.storage_kept: list[bool] = []
        self._pointers: list[int] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.ema.append(shadows(self.algo))
        self.training.append(model_tensors(state.model))

    def eval_start(self, state: State, logger: Logger) -> None:
        self.eval_model.append(model_tensors(state.model))
        self.eval_ema.append(shadows(self.algo))
        self._pointers = [p.data_ptr() for p in state.model.parameters()]

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        # The profiles' forwards swapped their EMA in and out: the training tensors are back,
        # the same storage (an O(1) exchange, not a copy).
        self.storage_kept.append(
            [p.data_ptr() for p in state.model.parameters()] == self._pointers
            and same(model_tensors(state.model), self.eval_model[-1])
        )

    def eval_end(self, state: State, logger: Logger) -> None:
        self.eval_values.append({k: float(v) for k, v in state.eval_metric_values.items()})


def evaluate(weights: Tensors) -> dict[str, torch.Tensor]:
    """The trainer's evaluation by hand: ``weights`` in a fresh model, Composer's metrics."""
    model = make_classifier(7)
    state = model.state_dict()
    model.load_state_dict({k: weights.get(normalize_name(k), v) for k, v in state.items()})
    model.eval()
    metrics = copy.deepcopy(model.get_metrics(is_train=False))
    with torch.no_grad():
        for batch in make_loader(1, 2):  # composer_runs.run's eval loader (seed + 1)
            outputs = model.eval_forward(batch)
            for metric in metrics.values():
                model.update_metric(batch, outputs, metric)
    return {k: m.compute() for k, m in metrics.items()}


def logged(logger: InMemoryLogger, key: str) -> list[tuple[int, torch.Tensor]]:
    return [(int(ts.batch), value) for ts, value in logger.data[key]]


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run: three profiles, eval every 3 batches, snapshots every 4."""
    folder = tmp_path_factory.mktemp("multi")
    algo = make_multi()
    recorder = ProfileRecorder(algo)
    logger = InMemoryLogger()
    stopper = EarlyStopper(
        monitor="ema_8ba/CrossEntropy", dataloader_label="eval", comp=torch.less, patience="99ba"
    )
    trainer, _ = run(
        algo,
        f"{N}ba",
        model=make_classifier(),
        callbacks=[recorder, stopper],
        loggers=[logger],
        save_folder=str(folder),
        save_interval="100ba",
    )
    return {
        "algo": algo,
        "trainer": trainer,
        "recorder": recorder,
        "logger": logger,
        "stopper": stopper,
        "folder": folder,
    }


# -- each profile is the EMA a run with just that profile computes ---------------------------


@pytest.mark.parametrize(
    ("name", "single"),
    [("fast", {"half_life": "2ba"}), ("ema_sigma_rel0.1", {"sigma_rel": 0.1})],
)
def test_each_profile_equals_a_single_ema_run(
    name: str, single: dict[str, Any], multi: dict[str, Any]
) -> None:
    algo = EMA(**single)
    recorder = ProfileRecorder(algo)
    run(algo, f"{N}ba", model=make_classifier(), eval_interval=None, callbacks=[recorder])
    many: ProfileRecorder = multi["recorder"]
    assert len(recorder.ema) == len(many.ema) == N
    for i in range(N):
        # Bit-identical EMA, and the other profiles' evaluations left training untouched.
        assert same(recorder.ema[i][algo.controller.primary.name], many.ema[i][name]), i + 1
        assert same(recorder.training[i], many.training[i]), i + 1


# -- evaluation: training weights and every profile, one pass, Composer's metric names --------


def test_every_profile_is_evaluated_and_logged_under_its_name(multi: dict[str, Any]) -> None:
    logger: InMemoryLogger = multi["logger"]
    rec: ProfileRecorder = multi["recorder"]
    keys = {k for k in logger.data if k.startswith("metrics/eval/")}
    assert keys == {f"metrics/eval/{m}" for m in METRICS} | {
        f"metrics/eval/{n}/{m}" for n in NAMES for m in METRICS
    }
    evals = [3, 6, 9, 12]  # the fit's evaluations (a later test runs trainer.eval() again)
    assert len(rec.eval_model) >= len(evals)
    differs = 0
    for i, batch in enumerate(evals):
        # The trainer's own metrics are the training weights', unchanged names.
        assert same(rec.eval_model[i], rec.training[batch - 1])
        expected = {"": evaluate(rec.eval_model[i])}
        for name in NAMES:
            assert same(rec.eval_ema[i][name], rec.ema[batch - 1][name])
            expected[f"{name}/"] = evaluate(rec.eval_ema[i][name])
        for prefix, values in expected.items():
            for metric in METRICS:
                key = f"metrics/eval/{prefix}{metric}"
                value = next(v for b, v in logged(logger, key) if b == batch)
                assert torch.equal(value, values[metric]), (batch, prefix, metric)
        differs += sum(
            not torch.equal(expected[f"{n}/"]["CrossEntropy"], expected[""]["CrossEntropy"])
            for n in NAMES
        )
    assert differs > len(evals)  # the EMAs' metrics are not the training weights' metrics
    # After each profile's forward the model held the training weights, in the same storage.
    kept = rec.storage_kept[: len(evals) * 2]  # two batches per evaluation
    assert len(kept) == len(evals) * 2 and all(kept)


def test_composer_callbacks_can_monitor_a_profile(multi: dict[str, Any]) -> None:
    """Composer has no best-checkpoint callback; EarlyStopper reads
    ``state.eval_metrics['eval'][monitor]``: it tracks the chosen profile's metric."""
    stopper: EarlyStopper = multi["stopper"]
    values = logged(multi["logger"], "metrics/eval/ema_8ba/CrossEntropy")
    raw = logged(multi["logger"], "metrics/eval/CrossEntropy")
    best_batch, best = min(values, key=lambda bv: float(bv[1]))
    assert torch.equal(stopper.best, best)
    assert stopper.best_occurred is not None and int(stopper.best_occurred.batch) == best_batch
    assert not any(torch.equal(stopper.best, v) for _, v in raw)
    # state.eval_metric_values holds every profile's values too.
    at_12 = multi["recorder"].eval_values[3]
    assert at_12["ema_8ba/CrossEntropy"] == float(values[3][1])


def test_eval_after_fit_evaluates_training_weights_and_keeps_the_primary_ema_in(
    multi: dict[str, Any],
) -> None:
    trainer, rec = multi["trainer"], multi["recorder"]
    model = trainer.state.model
    assert same(model_tensors(model), rec.ema[-1]["fast"])  # final_weights='ema': the primary
    trainer.eval()
    assert same(rec.eval_model[-1], rec.training[-1])
    expected = evaluate(rec.training[-1])
    assert rec.eval_values[-1]["CrossEntropy"] == float(expected["CrossEntropy"])
    slow = evaluate(rec.ema[-1]["ema_8ba"])
    assert rec.eval_values[-1]["ema_8ba/CrossEntropy"] == float(slow["CrossEntropy"])
    assert same(model_tensors(model), rec.ema[-1]["fast"])
    assert "update_metric" not in model.__dict__ and "train" not in model.__dict__


class PredictWeights(Callback):
    def __init__(self) -> None:
        self.weights: list[Tensors] = []

    def predict_batch_start(self, state: State, logger: Logger) -> None:
        self.weights.append(model_tensors(state.model))


def test_predict_and_get_ema_model_use_the_primary_or_the_named_profile() -> None:
    record = PredictWeights()
    algo = EMA(half_life=["2ba", "8ba"], final_weights="training")
    trainer, _ = run(algo, "4ba", eval_interval=None, model=make_classifier(), callbacks=[record])
    model = trainer.state.model
    training = model_tensors(model)
    ema = shadows(algo)
    trainer.predict(make_loader(3, 1))
    assert same(record.weights[-1], ema["ema_2ba"])  # predict: the primary EMA
    assert same(model_tensors(model), training)
    assert algo.get_ema_model(model, "ema_8ba") is model
    assert same(model_tensors(model), ema["ema_8ba"])
    trainer.predict(make_loader(3, 1))  # a pinned profile stays in across predict
    assert same(record.weights[-1], ema["ema_8ba"])
    assert same(model_tensors(model), ema["ema_8ba"])
    assert same(model_tensors(algo.get_training_model(model)), training)


# -- exceptions: the training weights are never left out ----------------------------------


class FailIn(Callback):
    """Raises in the second evaluation: at its first batch (the trainer's forward) or in the
    second profile's forward (a forward hook counting the forwards of that batch)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.evals = 0
        self.training: Tensors = {}
        self.calls = 0

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.where == "profile":
            state.model.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not module.training and self.evals == 2:
            self.calls += 1
            if self.calls == 3:  # training weights, first profile, second profile
                raise RuntimeError("boom in eval")

    def batch_end(self, state: State, logger: Logger) -> None:
        self.training = model_tensors(state.model)

    def eval_start(self, state: State, logger: Logger) -> None:
        self.evals += 1

    def eval_batch_start(self, state: State, logger: Logger) -> None:
        if self.where == "trainer" and self.evals == 2:
            raise RuntimeError("boom in eval")


@pytest.mark.parametrize("where", ["trainer", "profile"])
def test_exception_during_eval_leaves_training_weights(where: str) -> None:
    algo = EMA(half_life=["2ba", "8ba"])
    failing = FailIn(where)
    model = make_classifier()
    with pytest.raises(RuntimeError, match="boom in eval"):
        run(algo, "8ba", eval_interval="2ba", callbacks=[failing], model=model)
    assert failing.evals == 2 and failing.training
    assert same(model_tensors(model), failing.training)
    assert algo.controller.active_profile is None
    assert "train" not in model.__dict__ and "update_metric" not in model.__dict__


# -- post-hoc snapshots --------------------------------------------------------------------


def test_snapshots_in_save_folder_at_their_times_and_reconstruct(multi: dict[str, Any]) -> None:
    folder = Path(multi["folder"]) / "ema_snapshots"
    rec: ProfileRecorder = multi["recorder"]
    found = find_snapshots(folder)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(
        f"ema-{t}ba-sigma_rel0.1.safetensors" for t in (4, 8, 12)
    )
    assert sorted(s.time for s in found) == [4.0, 8.0, 12.0]
    for t in (4, 8, 12):
        snap = load_snapshot(folder / f"ema-{t}ba-sigma_rel0.1.safetensors")
        expected = rec.ema[t - 1]["ema_sigma_rel0.1"]
        assert snap.sigma_rel == 0.1
        saved = snap.tensors()
        assert same({k: saved[k] for k in expected}, expected), t
    # A tracked width is reproduced; any other width can be reconstructed.
    final = reconstruct(folder, sigma_rel=0.1)
    for key, value in rec.ema[-1]["ema_sigma_rel0.1"].items():
        assert torch.allclose(final[key], value, atol=1e-5), key
    with warnings.catch_warnings():  # one tracked width: others are poorly represented
        warnings.simplefilter("ignore", UserWarning)
        other = reconstruct(folder, sigma_rel=0.07, at="8ba")
    assert sorted(other) == sorted(final)
    # The snapshot clock is in the algorithm's state (a resume does not write twice).
    assert multi["algo"].state_dict()["snapshot"]["last"]["ba"] == 12.0


def test_snapshots_need_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snapshot_folder") as info:
        run(make_multi(), "4ba", eval_interval=None, model=make_classifier(), fit=False)
    assert "save_folder" in str(info.value)
    target = tmp_path / "snaps"
    run(make_multi(snapshot_folder=str(target)), "4ba", eval_interval=None)
    assert [p.name for p in target.iterdir()] == ["ema-4ba-sigma_rel0.1.safetensors"]


# -- checkpoint and resume -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("k", [6, 8])  # after an eval mid-epoch, an epoch boundary
def test_resume_with_profiles_is_bit_identical(
    k: int, tmp_path: Path, multi: dict[str, Any]
) -> None:
    def go(max_duration: str, **kw: Any) -> ProfileRecorder:
        algo = make_multi()
        recorder = ProfileRecorder(algo)
        run(
            algo,
            max_duration,
            model=make_classifier(),
            callbacks=[recorder],
            save_folder=str(tmp_path),
            save_interval=f"{k}ba",
            save_filename="ba{batch}.pt",
            **kw,
        )
        return recorder

    go(f"{k}ba")
    ckpt = torch.load(tmp_path / f"ba{k}.pt", weights_only=False)
    state = dict(ckpt["state"]["algorithms"])["EMA"]
    assert sorted(state["profiles"]) == NAMES[1:] and "training" in state
    rec = go(f"{N}ba", load_path=str(tmp_path / f"ba{k}.pt"))
    full: ProfileRecorder = multi["recorder"]
    assert len(rec.ema) == N - k
    for i in range(k, N):
        assert same(rec.training[i - k], full.training[i]), f"training weights, batch {i + 1}"
        assert sorted(rec.ema[i - k]) == sorted(NAMES)
        for name in NAMES:
            assert same(rec.ema[i - k][name], full.ema[i][name]), f"{name}, batch {i + 1}"
    # The evaluations after the resume computed the same metrics, every profile's.
    n = len(rec.eval_values)  # the evaluations at 9 and 12 (of 3, 6, 9, 12)
    assert n == 2 and rec.eval_values == full.eval_values[2:4]
    # Snapshots: none written twice, the same files as the uninterrupted run.
    ours, theirs = tmp_path / "ema_snapshots", Path(multi["folder"]) / "ema_snapshots"
    names = sorted(p.name for p in ours.glob("*.safetensors"))
    assert names == sorted(p.name for p in theirs.glob("*.safetensors"))
    assert names == sorted(f"ema-{t}ba-sigma_rel0.1.safetensors" for t in (4, 8, 12))
    for name in names:
        assert same(load_snapshot(ours / name).tensors(), load_snapshot(theirs / name).tensors())


# -- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"half_life": []}, ValueError, ["half_life", "empty"]),
        ({"half_life": ["2ba", "2ba"]}, ValueError, ["ema_2ba", "name"]),
        ({"half_life": ["2ba"], "smoothing": [0.9]}, ValueError, ["half_life", "smoothing"]),
        ({"half_life": "2ba", "profiles": [{"half_life": "4ba"}]}, ValueError, ["profiles"]),
        ({"profiles": [{"half_lif": "4ba"}]}, ValueError, ["half_lif"]),
        ({"profiles": [{"name": "a b", "half_life": "4ba"}]}, ValueError, ["'a b'"]),
        ({"profiles": {"half_life": "4ba"}}, TypeError, ["profiles"]),
        ({"eval_all": "yes"}, TypeError, ["eval_all", "'yes'"]),
        ({"half_life": ["2ba", "8ba"], "train_with_ema_weights": True}, ValueError, ["single"]),
        ({"snapshot_every": "4ba"}, ValueError, ["snapshot_every", "sigma_rel"]),
        ({"sigma_rel": [0.1], "snapshot_every": "4ba", "snapshot_keep": 0}, ValueError, ["keep"]),
        ({"sigma_rel": 0.1, "snapshot_every": "4ba", "snapshot_dtype": "int8"}, ValueError, []),
        ({"sigma_rel": 0.1, "snapshot_every": "4ba", "snapshot_folder": 5}, TypeError, ["5"]),
        ({"sigma_rel": 0.1, "snapshot_folder": "snaps"}, ValueError, ["snapshot_every"]),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        EMA(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_metric_named_like_a_profile_copy_is_an_error() -> None:
    model = make_classifier()
    model.val_metrics["ema_2ba/CrossEntropy"] = copy.deepcopy(model.val_metrics["CrossEntropy"])
    trainer, _ = run(EMA(half_life=["2ba", "8ba"]), "2ba", model=model, fit=False)
    with pytest.raises(ValueError, match="ema_2ba/CrossEntropy"):
        trainer.eval()
    assert "update_metric" not in model.__dict__ and "train" not in model.__dict__


def test_single_profile_keeps_composer_names_and_eval_all_adds_the_copies() -> None:
    logger = InMemoryLogger()
    algo = EMA(half_life="2ba", eval_all=True, ema_start="4ba")
    run(algo, "3ba", model=make_classifier(), loggers=[logger])
    keys = {k for k in logger.data if k.startswith("metrics/eval/")}
    assert keys == {f"metrics/eval/{m}" for m in METRICS} | {
        f"metrics/eval/ema_2ba/{m}" for m in METRICS
    }
    # Not started yet: the EMA is the training weights, and shares their outputs.
    assert not algo.controller.started
    for m in METRICS:
        assert logged(logger, f"metrics/eval/ema_2ba/{m}") == logged(logger, f"metrics/eval/{m}")
    logger = InMemoryLogger()
    run(EMA(half_life=["2ba", "8ba"], eval_all=False), "3ba", model=make_classifier(),
        loggers=[logger])  # fmt: skip
    assert {k for k in logger.data if k.startswith("metrics/eval/")} == {
        f"metrics/eval/{m}" for m in METRICS
    }


def test_state_dict_carries_every_profile() -> None:
    algo = EMA(half_life=["2ba", "8ba"])
    assert sorted(algo.state_dict()["profiles"]) == ["ema_8ba"]
