"""Several EMAs (profiles) with the real Trainer: one evaluation covers the training weights and
every profile, best-model selection by a profile's metric, post-hoc snapshots, checkpoints."""

from __future__ import annotations

import json
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from hf_tiny import (
    Recorder,
    TinyData,
    TinyRegressor,
    assert_close,
    assert_equal,
    reference_ema,
    snapshot,
    trainer,
)
from safetensors.torch import load_file
from transformers import TrainerCallback

from ema_callbacks.posthoc import find_snapshots, reconstruct
from ema_callbacks.transformers import EMATrainerCallback, load_ema_state, save_ema_state

EVAL = TinyData(8, seed=5)
# 'late' starts at step 3: its evaluations at step 2 are the training weights'.
PROFILES = [
    {"name": "fast", "half_life": "2ba"},
    {"name": "late", "half_life": "4ba", "start": "3ba"},
]
SINGLE = {"fast": {"half_life": "2ba"}, "late": {"half_life": "4ba", "start": "3ba"}}
EVAL_RUN = {"num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 2}


def mae(prediction: Any) -> dict[str, float]:
    return {"mae": float(np.abs(prediction.predictions - prediction.label_ids).mean())}


def evaluate_by_hand(weights: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(loss, mae) of ``weights`` on the evaluation set, computed without the Trainer."""
    model = TinyRegressor()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        out = model(EVAL.x, EVAL.y)
    return float(out["loss"]), float((out["logits"] - EVAL.y).abs().mean())


def shadows(cb: EMATrainerCallback) -> dict[str, dict[str, torch.Tensor]]:
    return {
        p.name: {k: v.clone() for k, v in p.weights.state_dict().items()}
        for p in cb.controller.profiles
    }


class EvalRecorder(TrainerCallback):
    """The weights in the model at every evaluation batch (one list per evaluation: training
    weights first, then each profile), the metrics ``on_evaluate`` got, and the logs."""

    def __init__(self) -> None:
        self.passes: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.evaluated: list[dict[str, float]] = []
        self.logs: list[dict[str, float]] = []

    def on_prediction_step(self, args, state, control, model, **kw):
        self.passes.setdefault(state.global_step, []).append(snapshot(model))

    def on_evaluate(self, args, state, control, metrics, **kw):
        self.evaluated.append(dict(metrics))

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def run(tmp_path, callback, callbacks=(), **overrides):
    tr = trainer(tmp_path, [*callbacks, callback], **{**EVAL_RUN, **overrides})
    tr.compute_metrics = mae
    tr.train()
    return tr


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """One run with two profiles, evaluated every 2 steps, and one single-EMA run per profile."""
    out = tmp_path_factory.mktemp("multi")
    rec, evals = Recorder(), EvalRecorder()
    cb = EMATrainerCallback(profiles=PROFILES, final_weights="training")
    tr = run(out / "multi", cb, [rec, evals])
    singles = {}
    for name, options in SINGLE.items():
        single = EMATrainerCallback(**options, final_weights="training")
        single_tr = run(out / name, single)
        singles[name] = (single, single_tr)
    return tr, cb, rec, evals, singles


def eval_logs(tr) -> dict[int, dict[str, float]]:
    return {h["step"]: h for h in tr.state.log_history if "eval_loss" in h}


def test_each_profile_is_bit_identical_to_a_single_ema_run(multi):
    tr, cb, rec, _, singles = multi
    assert cb.controller.names == ["fast", "late"] and cb.controller.eval_all
    for name, (single, single_tr) in singles.items():
        assert_equal(shadows(cb)[name], single.controller.weights.state_dict())
        assert_equal(snapshot(tr.model), snapshot(single_tr.model))  # training is untouched
        # a single EMA is evaluated under the Trainer's names; the profile under its prefix
        for step, logs in eval_logs(single_tr).items():
            assert eval_logs(tr)[step][f"eval_{name}_loss"] == logs["eval_loss"]
            assert eval_logs(tr)[step][f"eval_{name}_mae"] == logs["eval_mae"]
    assert_close(shadows(cb)["fast"], reference_ema(rec.steps, {k: 1.0 for k in rec.steps}, 2.0))


def test_one_evaluation_holds_raw_and_every_profile(multi):
    tr, _, rec, evals, _ = multi
    logs = eval_logs(tr)
    assert sorted(logs) == [2, 4, 6, 8]
    for step, metrics in logs.items():
        passes = evals.passes[step]
        # training weights, fast, then late; 'late' starts at step 3: at step 2 its weights are
        # the training weights, whose metrics are copied, not evaluated again
        assert len(passes) == (2 if step == 2 else 3)
        assert_equal(passes[0], rec.steps[step])  # raw = the training weights, exactly
        upto = {k: v for k, v in rec.steps.items() if k <= step}
        assert_close(passes[1], reference_ema(upto, {k: 1.0 for k in upto}, 2.0))
        for prefix, weights in (("eval", passes[0]), ("eval_fast", passes[1])):
            loss, error = evaluate_by_hand(weights)
            assert metrics[f"{prefix}_loss"] == pytest.approx(loss, rel=1e-5)
            assert metrics[f"{prefix}_mae"] == pytest.approx(error, rel=1e-5)
        if step == 2:
            assert metrics["eval_late_loss"] == metrics["eval_loss"]
            assert metrics["eval_late_mae"] == metrics["eval_mae"]
        else:
            late = {k: v for k, v in rec.steps.items() if 3 <= k <= step}
            expected = reference_ema(late, {k: 1.0 for k in late}, 4.0, first=3)
            assert_close(passes[2], expected)
            loss, error = evaluate_by_hand(expected)
            assert metrics["eval_late_loss"] == pytest.approx(loss, rel=1e-5)
            assert metrics["eval_late_mae"] == pytest.approx(error, rel=1e-5)
        assert "eval_runtime" in metrics and "eval_fast_runtime" not in metrics
    # one metrics dict per evaluation: logged once, and the one on_evaluate got
    logged = [log for log in evals.logs if "eval_loss" in log]
    assert len(logged) == len(evals.evaluated) == 4
    for log, seen in zip(logged, evals.evaluated, strict=True):
        assert "eval_fast_loss" in log and "eval_late_mae" in log
        assert {k: v for k, v in seen.items() if k in log} == {k: log[k] for k in seen}


def test_evaluate_by_hand_covers_every_profile_and_keeps_the_model(tmp_path):
    rec, evals = Recorder(), EvalRecorder()
    cb = EMATrainerCallback(half_life=["2ba", "8ba"])  # final_weights='ema': primary kept
    tr = run(tmp_path, cb, [rec, evals], eval_strategy="no")
    held = snapshot(tr.model)
    assert_equal(held, cb.controller.weights.state_dict())  # the primary EMA after train()
    metrics = tr.evaluate()
    assert sorted(k for k in metrics if k.endswith("_loss")) == [
        "eval_ema_2ba_loss",
        "eval_ema_8ba_loss",
        "eval_loss",
    ]
    training = cb.controller.weights.training_state_dict()
    assert metrics["eval_loss"] == pytest.approx(evaluate_by_hand(training)[0], rel=1e-5)
    for name, weights in shadows(cb).items():
        assert metrics[f"eval_{name}_loss"] == pytest.approx(evaluate_by_hand(weights)[0])
    assert_equal(snapshot(tr.model), held)  # the primary EMA is back in
    # inside ema_weights(model, profile): one evaluation of that profile, the Trainer's names
    with cb.ema_weights(tr.model, "ema_8ba"):
        one = tr.evaluate()
    assert "eval_ema_2ba_loss" not in one
    assert one["eval_loss"] == metrics["eval_ema_8ba_loss"]
    # predict is not expanded
    assert sorted(tr.predict(EVAL).metrics) == sorted(
        [
            "test_loss",
            "test_mae",
            "test_runtime",
            "test_samples_per_second",
            "test_steps_per_second",
        ]
    )
    assert_equal(snapshot(tr.model), held)


def test_eval_all_false_evaluates_the_primary_under_the_trainers_names(tmp_path):
    rec, evals = Recorder(), EvalRecorder()
    cb = EMATrainerCallback(half_life=["2ba", "8ba"], eval_all=False, final_weights="training")
    tr = run(tmp_path, cb, [rec, evals], num_train_epochs=1)
    assert not [k for k in eval_logs(tr)[2] if "ema_" in k]
    assert [len(p) for p in evals.passes.values()] == [1, 1]
    upto = {k: v for k, v in rec.steps.items() if k <= 2}
    assert_close(evals.passes[2][0], reference_ema(upto, {k: 1.0 for k in upto}, 2.0))


BEST = {
    "num_train_epochs": 3,
    "eval_strategy": "steps",
    "eval_steps": 1,
    "save_strategy": "steps",
    "save_steps": 1,
    "load_best_model_at_end": True,
    "greater_is_better": False,
    "learning_rate": 0.6,  # the loss goes up and down: the best step is not the last
}


@pytest.mark.parametrize(("metric", "profile"), [("slow_mae", "slow"), ("eval_mae", None)])
def test_best_checkpoint_by_a_profiles_metric(tmp_path, metric, profile):
    rec = Recorder()
    cb = EMATrainerCallback(
        profiles=[{"name": "fast", "half_life": "1ba"}, {"name": "slow", "half_life": "3ba"}]
    )
    tr = run(tmp_path, cb, [rec], metric_for_best_model=metric, **BEST)
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    values = {step: logs[key] for step, logs in eval_logs(tr).items()}
    best = min(values, key=values.get)
    other = "eval_mae" if profile else "eval_slow_mae"
    others = {step: logs[other] for step, logs in eval_logs(tr).items()}
    assert best != max(values) and best != min(others, key=others.get), (values, others)
    checkpoint = tmp_path / f"checkpoint-{best}"
    assert tr.state.best_model_checkpoint == str(checkpoint)
    assert_equal(load_file(str(checkpoint / "model.safetensors")), rec.steps[best])
    state = load_ema_state(checkpoint)
    if profile is None:  # a metric of the training weights: the model holds those
        held = rec.steps[best]
        assert cb.controller.weights_active == "training"
    else:  # the model holds the EMA that got the best metric, from that checkpoint
        held = state["profiles"][profile]["shadow"]
        assert cb.controller.active_profile == profile
    assert_equal(snapshot(tr.model), {k: v.float() for k, v in held.items()})
    assert values[best] == pytest.approx(evaluate_by_hand(held)[1], rel=1e-5)


class StepShadows(TrainerCallback):
    """Every profile's shadow after each step (place it after the EMA callback)."""

    def __init__(self, cb: EMATrainerCallback) -> None:
        self.cb, self.steps = cb, {}

    def on_step_end(self, args, state, control, **kw):
        self.steps[state.global_step] = shadows(self.cb)


def test_snapshots_are_written_when_due_and_reconstruct(tmp_path):
    cb = EMATrainerCallback(sigma_rel=[0.05, 0.1], snapshot_every="3ba", snapshot_dtype="float32")
    seen = StepShadows(cb)
    tr = trainer(tmp_path, [cb, seen], num_train_epochs=2)  # 8 steps
    tr.train()
    found = find_snapshots(tmp_path / "ema_snapshots")
    assert [(s.time, s.sigma_rel) for s in found] == [
        (t, s) for t in (3.0, 6.0) for s in (0.05, 0.1)
    ]
    for snap in found:
        name = f"ema_sigma_rel{snap.sigma_rel:g}"
        assert_equal(snap.tensors(), seen.steps[int(snap.time)][name])
    assert cb.controller.state_dict()["snapshot"]["last"]["ba"] == 6.0
    # the snapshots are inputs of the reconstruction: reproduced; other widths are averages
    at6 = reconstruct(tmp_path / "ema_snapshots", sigma_rel=0.1)
    assert_close(at6, {k: v.double() for k, v in seen.steps[6]["ema_sigma_rel0.1"].items()})
    between = reconstruct(tmp_path / "ema_snapshots", sigma_rel=0.07, at="6ba")
    assert sorted(between) == sorted(at6)
    assert all(torch.isfinite(v).all() for v in between.values())


def test_snapshot_folder_and_keep(tmp_path):
    cb = EMATrainerCallback(
        profiles=[{"half_life": "2ba"}, {"sigma_rel": 0.1}],
        snapshot_every="1ep",
        snapshot_keep=2,
        snapshot_folder=str(tmp_path / "posthoc"),
    )
    trainer(tmp_path / "out", [cb], num_train_epochs=3, data=TinyData(12)).train()
    assert not (tmp_path / "out" / "ema_snapshots").exists()
    found = find_snapshots(tmp_path / "posthoc")
    # only sigma_rel profiles are snapshotted, at 1ep (3 steps), 2ep, 3ep, named by the time in
    # the profile's update unit (ba); only the latest 2 are kept
    assert [(s.time, s.sigma_rel, s.unit) for s in found] == [(6.0, 0.1, "ba"), (9.0, 0.1, "ba")]
    assert {s.run for s in found} == {cb.controller.snapshot_run}

    # A second run into the same folder is refused at train start; the first run's files stay.
    before = {p.name: p.read_bytes() for p in (tmp_path / "posthoc").iterdir()}
    again = EMATrainerCallback(
        sigma_rel=0.1, snapshot_every="1ep", snapshot_folder=str(tmp_path / "posthoc")
    )
    with pytest.raises(ValueError, match="snapshot.s. of another run"):
        trainer(tmp_path / "out2", [again], num_train_epochs=1, data=TinyData(12)).train()
    assert {p.name: p.read_bytes() for p in (tmp_path / "posthoc").iterdir()} == before


RESUME = {
    "num_train_epochs": 3,
    "save_strategy": "steps",
    "save_steps": 3,
    "eval_strategy": "steps",
    "eval_steps": 5,
}
RESUME_OPTIONS: dict[str, Any] = {
    "profiles": [
        {"half_life": "0.75ep", "update_interval": "1ba"},
        {"name": "edm", "sigma_rel": 0.1},
        {"name": "slow", "smoothing": 0.9},
    ],
    "snapshot_every": "2ba",
    "final_weights": "training",
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cb = EMATrainerCallback(**RESUME_OPTIONS)
    tr = trainer(out, [cb], data=TinyData(16), **RESUME)
    tr.train()
    return out, shadows(cb), snapshot(tr.model)


def test_checkpoints_hold_every_profile(uninterrupted):
    out, _, _ = uninterrupted
    state = load_ema_state(out / "checkpoint-6")
    assert sorted(state["profiles"]) == ["edm", "slow"]
    assert state["snapshot"]["last"]["ba"] == 6.0
    keys = load_file(str(out / "checkpoint-6" / "ema_state.safetensors"))
    assert sorted({k.rsplit("/", 1)[0] for k in keys}) == [
        "profiles/edm",
        "profiles/slow",
        "shadow",
    ]
    assert_equal(
        {k: keys[f"profiles/slow/{k}"] for k in state["profiles"]["slow"]["shadow"]},
        state["profiles"]["slow"]["shadow"],
    )
    json.loads((out / "checkpoint-6" / "ema_state.json").read_text())
    # the primary profile is where a single-EMA reader looks (export reads shadow/ keys)
    from ema_callbacks.export import read_ema

    exported = read_ema(out / "checkpoint-6")
    assert_equal({k: exported.tensors[k] for k in state["shadow"]}, state["shadow"])


@pytest.mark.parametrize("stop", [3, 6])
def test_resume_with_several_profiles_is_bit_identical(uninterrupted, tmp_path, stop):
    out, full, weights = uninterrupted
    cb = EMATrainerCallback(**RESUME_OPTIONS)
    tr = trainer(tmp_path, [cb], data=TinyData(16), model=TinyRegressor(seed=7), **RESUME)
    tr.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
    for name, shadow in full.items():
        assert_equal(shadows(cb)[name], shadow)
    assert_equal(snapshot(tr.model), weights)
    # snapshots after the checkpoint are written again, identical; earlier ones are not
    before = {s.path.name: s for s in find_snapshots(out / "ema_snapshots")}
    again = find_snapshots(tmp_path / "ema_snapshots")
    assert again and all(s.time > stop for s in again)
    assert sorted(s.path.name for s in again) == sorted(
        n for n, s in before.items() if s.time > stop
    )
    for s in again:
        assert_equal(s.tensors(), before[s.path.name].tensors())


def test_resume_true_rebuilds_the_callback_from_its_json(uninterrupted, tmp_path):
    out, full, weights = uninterrupted
    shutil.copytree(out / "checkpoint-6", tmp_path / "checkpoint-6")
    stored = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    assert stored["stateful_callbacks"]["EMATrainerCallback"]["args"]["profiles"][1] == {
        "name": "edm",
        "sigma_rel": 0.1,
    }
    cb = EMATrainerCallback(**RESUME_OPTIONS)
    tr = trainer(
        tmp_path,
        [cb],
        data=TinyData(16),
        model=TinyRegressor(seed=7),
        restore_callback_states_from_checkpoint=True,
        **RESUME,
    )
    tr.train(resume_from_checkpoint=True)
    live = [c for c in tr.callback_handler.callbacks if isinstance(c, EMATrainerCallback)]
    assert len(live) == 1 and live[0] is not cb and live[0].state() == cb.state()
    for name, shadow in full.items():
        assert_equal(shadows(cb)[name], shadow)
    assert_equal(snapshot(tr.model), weights)


def test_old_single_ema_files_still_load(tmp_path):
    from ema_callbacks.controller import EMAController

    ctrl = EMAController.create(half_life="4ba")
    ctrl.fit_start(torch.nn.Linear(2, 1))
    save_ema_state(ctrl.state_dict(), tmp_path)
    meta = json.loads((tmp_path / "ema_state.json").read_text())
    assert meta["tensors"] == {"shadow": ["bias", "weight"]}  # the format before profiles
    state = load_ema_state(tmp_path)
    assert "profiles" not in state and sorted(state["shadow"]) == ["bias", "weight"]
    two = EMATrainerCallback(half_life=["4ba", "8ba"]).controller
    with pytest.warns(UserWarning, match="start afresh"):
        two.load_state_dict(state)


def test_arguments_round_trip_through_json():
    cb = EMATrainerCallback(
        half_life=("10ba", float("inf")),
        include=("net.*",),
        eval_all=True,
        snapshot_dtype="bfloat16",
        name="mine",
    )
    args = json.loads(json.dumps(cb.state()))["args"]
    assert args["half_life"] == ["10ba", "infba"] and args["eval_all"] is True
    assert EMATrainerCallback(**args).state() == cb.state()
    options = dict(RESUME_OPTIONS, snapshot_keep=3, snapshot_folder="snaps")
    cb = EMATrainerCallback(**options)
    args = json.loads(json.dumps(cb.state(), allow_nan=False))["args"]
    assert args["profiles"] == RESUME_OPTIONS["profiles"] and args["snapshot_keep"] == 3
    rebuilt = EMATrainerCallback(**args)
    assert rebuilt.state() == cb.state() and rebuilt.controller.names == cb.controller.names


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"half_life": ["2ba", "2ba"]}, ValueError, "share the name"),
        ({"half_life": []}, ValueError, "half_life must not be an empty list"),
        ({"half_life": ["2ba"], "smoothing": [0.9]}, ValueError, "only one of"),
        ({"profiles": [{"half_life": "2ba"}], "half_life": "2ba"}, ValueError, "not both"),
        ({"profiles": [{"half_lif": "2ba"}]}, ValueError, "unknown keys"),
        ({"profiles": {"half_life": "2ba"}}, TypeError, "profiles"),
        ({"profiles": [{"name": "a/b", "half_life": "2ba"}]}, ValueError, "profile names"),
        ({"half_life": ["2ba", "-1ba"]}, ValueError, "half_life"),
        ({"half_life": ["2ba", "4ba"], "eval_all": "yes"}, TypeError, "eval_all"),
        ({"half_life": "2ba", "eval_all": True, "eval_with_ema": False}, ValueError, "eval_all"),
        ({"half_life": ["2ba", "4ba"], "train_with_ema_weights": True}, ValueError, "single"),
        ({"half_life": "2ba", "snapshot_every": "10ba"}, ValueError, "sigma_rel"),
        ({"sigma_rel": [0.1], "snapshot_every": 10}, TypeError, "snapshot_every"),
        ({"sigma_rel": [0.1], "snapshot_every": "10x"}, ValueError, "unknown unit"),
        (
            {"sigma_rel": [0.1], "snapshot_every": "5ba", "snapshot_dtype": "int8"},
            ValueError,
            "snapshot_dtype",
        ),
        (
            {"sigma_rel": [0.1], "snapshot_every": "5ba", "snapshot_keep": 0},
            ValueError,
            "snapshot_keep",
        ),
        ({"sigma_rel": [0.1], "snapshot_folder": "x"}, ValueError, "snapshot_every"),
        (
            {"sigma_rel": [0.1], "snapshot_every": "5ba", "snapshot_folder": 3},
            TypeError,
            "snapshot_folder",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EMATrainerCallback(**kwargs)


def test_two_callbacks_evaluating_the_same_profile_names(tmp_path):
    with pytest.raises(ValueError, match="overwrite each other"):
        trainer(
            tmp_path,
            [
                EMATrainerCallback(half_life=["2ba", "4ba"]),
                EMATrainerCallback(half_life=["2ba", "8ba"], name="other"),
            ],
        )


def failing_metrics(fail_at: int):
    calls = {"n": 0}

    def compute(prediction):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("boom in a profile's compute_metrics")
        return mae(prediction)

    return compute


def test_an_exception_in_a_profile_evaluation_leaves_training_weights(tmp_path):
    rec = Recorder()
    cb = EMATrainerCallback(half_life=["1ba", "4ba"])
    tr = trainer(tmp_path / "train", [rec, cb], **EVAL_RUN)
    tr.compute_metrics = failing_metrics(3)  # the second profile's pass at step 2
    with pytest.raises(RuntimeError, match="profile"):
        tr.train()
    assert cb.controller.weights_active == "training"
    assert_equal(snapshot(tr.model), rec.steps[2])

    # by hand: the weights the model held before evaluate() come back
    for final in ("training", "ema"):
        cb = EMATrainerCallback(half_life=["1ba", "4ba"], final_weights=final)
        tr = trainer(tmp_path / final, [cb], max_steps=3)
        tr.train()
        held = snapshot(tr.model)
        tr.compute_metrics = failing_metrics(2)  # the first profile's pass
        with pytest.raises(RuntimeError, match="profile"):
            tr.evaluate()
        assert_equal(snapshot(tr.model), held)
        expected = "training" if final == "training" else "ema_1ba"
        assert (cb.controller.active_profile or "training") == expected


def test_zero3_rank_files_with_profiles_reassemble(tmp_path):
    # what each of 2 ZeRO-3 ranks writes: flat, padded partitions of every profile's shadow
    full = {"w": torch.arange(5.0).reshape(5, 1), "b": torch.tensor([7.0])}
    slow = {k: v * 10 for k, v in full.items()}

    def part(t, rank):
        flat = torch.cat([t.reshape(-1), torch.zeros(1)])  # 6 elements: 3 per rank
        return flat[3 * rank : 3 * rank + 3].clone() if t.numel() > 1 else t.clone()

    for rank in (0, 1):
        state = {
            "format": "ema_callbacks",
            "version": 1,
            "shadow": {k: part(v, rank) for k, v in full.items()},
            "profiles": {
                "slow": {"schedule": {}, "shadow": {k: part(v, rank) for k, v in slow.items()}}
            },
        }
        save_ema_state(state, tmp_path, shard=(rank, 2), full_shapes={"w": [5, 1]})
    merged = load_ema_state(tmp_path)
    assert_equal(merged["shadow"], full)
    assert_equal(merged["profiles"]["slow"]["shadow"], slow)
    assert "shard" not in merged
