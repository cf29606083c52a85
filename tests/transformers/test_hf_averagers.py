"""BEMA, uniform (SWA) averaging and ``update_bn_batches`` with the real Trainer: the shadow
against float64 references built from the recorded training weights, what evaluations and the
model after ``train()`` hold, BatchNorm statistics against ``torch.optim.swa_utils.update_bn``,
several profiles, and resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_tiny import (
    Recorder,
    TinyData,
    TinyRegressor,
    assert_close,
    assert_equal,
    snapshot,
    trainer,
)
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import update_bn as swa_update_bn
from transformers import Trainer

from ema_callbacks.transformers import EMATrainerCallback, load_ema_state
from tests.averager_reference import BEMA_DEFAULTS, due_steps, reference_bema, reference_uniform

EVAL = TinyData(8, seed=5)  # what hf_tiny.trainer evaluates on: one batch of 8
Weights = dict[str, torch.Tensor]


def evaluate_by_hand(weights: Weights) -> float:
    """The evaluation loss of ``weights`` (a TinyRegressor), computed without the Trainer."""
    model = TinyRegressor()
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.eval()
    with torch.no_grad():
        return float(model(EVAL.x, EVAL.y)["loss"])


def shadow(cb: EMATrainerCallback, profile: str | None = None) -> Weights:
    """The evaluated weights of ``profile`` (default the primary one), cloned."""
    p = cb.controller.profile(profile)
    assert p.weights is not None
    return {k: v.clone() for k, v in p.weights.state_dict().items()}


def extra(cb: EMATrainerCallback) -> dict[str, Weights]:
    """The primary profile's extra buffers (BEMA: 'ema' and 'theta0'), cloned."""
    buffers = cb.controller.state_dict()["buffers"]
    return {b: {k: v.clone() for k, v in t.items()} for b, t in buffers.items()}


def eval_logs(tr: Trainer) -> dict[int, dict[str, float]]:
    return {h["step"]: h for h in tr.state.log_history if "eval_loss" in h}


# -- BEMA ---------------------------------------------------------------------------------------

# (options, update interval, start) in optimizer steps
BEMA_RUNS = [
    ({"ema_power": 0.5, "update_interval": "1ba"}, 1, 0),
    ({"ema_power": 0.5, "update_interval": "2ba", "start": "1ba"}, 2, 1),
    ({"ema_power": 0.6, "lag": 4, "update_interval": "2ba", "start": "3ba"}, 2, 3),
]


@pytest.mark.parametrize(("options", "interval", "start"), BEMA_RUNS, ids=["1ba", "2ba", "late"])
def test_bema_shadow_evaluations_and_final_weights(
    tmp_path: Path, options: dict[str, Any], interval: int, start: int
) -> None:
    rec = Recorder()
    cb = EMATrainerCallback(**options)  # final_weights='ema'
    tr = trainer(tmp_path, [rec, cb], num_train_epochs=2, eval_strategy="steps", eval_steps=3)
    tr.train()
    assert sorted(rec.steps) == list(range(1, 9))
    bema = {k: v for k, v in options.items() if k in BEMA_DEFAULTS}
    due = due_steps(rec.steps, interval, start)
    assert cb.controller.primary.name.startswith("bema")
    assert cb.controller.num_updates == len(due) - 1  # the initialising copy is not one
    evaluated, ema, theta0 = reference_bema(rec.steps, due, **bema)
    assert_close(shadow(cb), evaluated)
    # the extra buffers: the running EMA and the weights at the initialising copy
    buffers = extra(cb)
    assert sorted(buffers) == ["ema", "theta0"]
    assert_close(buffers["ema"], ema)
    assert_close(buffers["theta0"], theta0)
    assert_equal(buffers["theta0"], rec.steps[due[0]])
    # the correction is not nothing: the evaluated weights are not the running EMA
    assert any(not torch.allclose(evaluated[k], ema[k]) for k in ema)

    # the model holds the evaluated weights after train(), the training weights are aside
    assert cb.controller.weights_active == "ema"
    assert_equal(snapshot(tr.model), shadow(cb))
    assert_equal(cb.controller.weights.training_state_dict(), rec.steps[8])

    # evaluations during training: the BEMA up to that step, under the Trainer's names
    logs = eval_logs(tr)
    # newer Trainers evaluate at the last step too (5.x does; 4.47 does not)
    assert sorted(logs) in ([3, 6], [3, 6, 8])
    for step, metrics in logs.items():
        upto = [s for s in due if s <= step]
        expected = reference_bema(rec.steps, upto, **bema)[0]
        assert_close(rec.eval_weights[step], expected)
        assert metrics["eval_loss"] == pytest.approx(evaluate_by_hand(expected), rel=1e-5)
        if len(upto) > 1:  # not just the initialising copy: not the training weights
            assert metrics["eval_loss"] != pytest.approx(
                evaluate_by_hand(rec.steps[step]), rel=1e-6
            )

    # an evaluation after train(): the final BEMA, and the model keeps it
    held = snapshot(tr.model)
    metrics = tr.evaluate()
    assert metrics["eval_loss"] == pytest.approx(evaluate_by_hand(evaluated), rel=1e-5)
    assert_equal(snapshot(tr.model), held)


def test_bema_evaluation_before_its_first_update_is_the_training_weights(tmp_path: Path) -> None:
    rec = Recorder()
    cb = EMATrainerCallback(ema_power=0.5, start="3ba", final_weights="training")
    tr = trainer(tmp_path, [rec, cb], eval_strategy="steps", eval_steps=2)
    tr.train()
    assert_equal(rec.eval_weights[2], rec.steps[2])  # not started: nothing swapped in
    expected = reference_bema(rec.steps, [3, 4])[0]
    assert_close(rec.eval_weights[4], expected)
    assert_close(shadow(cb), expected)
    assert_equal(snapshot(tr.model), rec.steps[4])  # final_weights='training'


# -- uniform (SWA) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "interval", "start"),
    [
        ({"uniform": True}, 1, 0),
        ({"uniform": True, "update_interval": "2ba", "start": "3ba"}, 2, 3),
    ],
    ids=["1ba", "2ba-late"],
)
def test_uniform_is_the_mean_of_the_weights_at_due_steps(
    tmp_path: Path, options: dict[str, Any], interval: int, start: int
) -> None:
    rec = Recorder()
    cb = EMATrainerCallback(**options)
    tr = trainer(tmp_path, [rec, cb], num_train_epochs=2, eval_strategy="steps", eval_steps=5)
    tr.train()
    due = due_steps(rec.steps, interval, start)
    assert due == ([1, 2, 3, 4, 5, 6, 7, 8] if interval == 1 else [3, 4, 6, 8])
    assert cb.controller.primary.name == "uniform"
    expected = reference_uniform(rec.steps, due)
    assert_close(shadow(cb), expected)
    assert_equal(snapshot(tr.model), shadow(cb))  # final_weights='ema'
    mid = reference_uniform(rec.steps, [s for s in due if s <= 5])
    assert_close(rec.eval_weights[5], mid)
    assert eval_logs(tr)[5]["eval_loss"] == pytest.approx(evaluate_by_hand(mid), rel=1e-5)
    assert tr.evaluate()["eval_loss"] == pytest.approx(evaluate_by_hand(expected), rel=1e-5)


# -- update_bn_batches --------------------------------------------------------------------------


class TinyBN(nn.Module):
    """A regressor with a BatchNorm1d, and a dropout after it: the statistics do not depend on
    the dropout, but a forward in training mode draws from the global RNG."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1)
        )

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        out = self.net(x).squeeze(-1)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = ((out - labels) ** 2).mean()
        return result


BN_STATS = ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked")
BN_DATA = TinyData(16)
BN_RUN = {"num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 2}


def bn_run(tmp_path: Path, **options: Any) -> tuple[Trainer, EMATrainerCallback, Recorder]:
    rec = Recorder()
    cb = EMATrainerCallback(half_life="2ba", **options)  # final_weights='ema'
    tr = trainer(tmp_path, [rec, cb], data=BN_DATA, model=TinyBN(), **BN_RUN)
    tr.train()
    return tr, cb, rec


def swa_reference(weights: Weights, batches: int) -> Weights:
    """``swa_utils.update_bn`` over the first ``batches`` training batches (in order, batch 4)
    on a copy of the model holding the parameters of ``weights``."""
    model = copy.deepcopy(TinyBN(seed=3))
    params = {k for k, _ in model.named_parameters()}
    model.load_state_dict({k: v for k, v in weights.items() if k in params}, strict=False)
    loader = [BN_DATA.x[4 * i : 4 * i + 4] for i in range(batches)]
    swa_update_bn(loader, model)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in BN_STATS}


def assert_stats(held: Weights, reference: Weights) -> None:
    for name in BN_STATS:
        torch.testing.assert_close(
            held[name].double(), reference[name].double(), rtol=1e-6, atol=1e-6
        )


@pytest.fixture(scope="module")
def bn_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[
    tuple[Trainer, EMATrainerCallback, Recorder], tuple[Trainer, EMATrainerCallback, Recorder]
]:
    out = tmp_path_factory.mktemp("bn")
    return bn_run(out / "bn", update_bn_batches=2), bn_run(out / "plain")


def test_update_bn_batches_matches_swa_update_bn(
    bn_runs: tuple[tuple[Trainer, EMATrainerCallback, Recorder], ...],
) -> None:
    (tr, cb, rec), (plain_tr, plain_cb, _) = bn_runs
    held = snapshot(tr.model)
    assert cb.controller.weights_active == "ema"
    # the parameters are the EMA's, the same as without update_bn_batches
    params = [k for k, _ in tr.model.named_parameters()]
    assert_equal({k: held[k] for k in params}, {k: shadow(plain_cb)[k] for k in params})
    # the statistics: recomputed at the end of fit over the first 2 training batches
    assert_stats(held, swa_reference(held, 2))
    assert int(held["net.1.num_batches_tracked"]) == 2
    assert not torch.allclose(held["net.1.running_mean"], shadow(plain_cb)["net.1.running_mean"])
    assert_equal(held, shadow(cb))  # the shadow holds the refreshed statistics
    # and before each evaluation: the weights evaluated
    assert sorted(rec.eval_weights) == [2, 4, 6, 8]
    for step, weights in rec.eval_weights.items():
        assert_stats(weights, swa_reference(weights, 2))
        assert not torch.equal(weights["net.1.running_var"], rec.steps[step]["net.1.running_var"])
    # the training weights' own statistics are untouched
    training = cb.controller.weights.training_state_dict()
    assert_equal({k: training[k] for k in BN_STATS}, {k: rec.steps[8][k] for k in BN_STATS})
    assert plain_tr.state.global_step == tr.state.global_step == 8


def test_update_bn_batches_leaves_training_bit_identical(
    bn_runs: tuple[tuple[Trainer, EMATrainerCallback, Recorder], ...],
) -> None:
    (tr, cb, rec), (plain_tr, plain_cb, plain_rec) = bn_runs
    assert sorted(rec.steps) == sorted(plain_rec.steps) == list(range(1, 9))
    for step in rec.steps:
        assert_equal(rec.steps[step], plain_rec.steps[step])
    assert_equal(
        cb.controller.weights.training_state_dict(),
        plain_cb.controller.weights.training_state_dict(),
    )
    # the training losses logged are the same, the evaluations differ (other statistics)
    assert tr.state.log_history[-1]["train_loss"] == plain_tr.state.log_history[-1]["train_loss"]
    bn_logs, plain_logs = eval_logs(tr), eval_logs(plain_tr)
    assert sorted(bn_logs) == sorted(plain_logs) == [2, 4, 6, 8]
    assert all(bn_logs[s]["eval_loss"] != plain_logs[s]["eval_loss"] for s in bn_logs)


def test_update_bn_batches_needs_the_statistics_in_the_average() -> None:
    with pytest.raises(ValueError, match="buffers"):
        EMATrainerCallback(half_life="2ba", buffers="ignore", update_bn_batches=2)


def test_update_bn_batches_without_batchnorm_fails_when_training_starts(tmp_path: Path) -> None:
    rec = Recorder()
    cb = EMATrainerCallback(half_life="2ba", update_bn_batches=2)  # built fine
    tr = trainer(tmp_path, [rec, cb])
    with pytest.raises(ValueError, match="BatchNorm"):
        tr.train()
    assert not rec.steps  # before the first step


# -- several profiles ---------------------------------------------------------------------------

PROFILES: list[dict[str, Any]] = [
    {"name": "bema", "ema_power": 0.5},
    {"name": "swa", "uniform": True},
    {"half_life": "4ba"},
]


def test_bema_swa_and_an_ema_as_profiles(tmp_path: Path) -> None:
    rec = Recorder()
    cb = EMATrainerCallback(profiles=PROFILES, final_weights="training")
    run = {"num_train_epochs": 2, "eval_strategy": "steps", "eval_steps": 3}
    tr = trainer(tmp_path / "multi", [rec, cb], **run)
    tr.train()
    assert cb.controller.names == ["bema", "swa", "ema_4ba"]
    logs = eval_logs(tr)
    # newer Trainers evaluate at the last step too (5.x does; 4.47 does not)
    assert sorted(logs) in ([3, 6], [3, 6, 8])
    for step, metrics in logs.items():
        assert {"eval_loss", "eval_bema_loss", "eval_swa_loss", "eval_ema_4ba_loss"} <= set(metrics)
        upto = [s for s in rec.steps if s <= step]
        bema = reference_bema(rec.steps, upto)[0]
        swa = reference_uniform(rec.steps, upto)
        assert metrics["eval_loss"] == pytest.approx(evaluate_by_hand(rec.steps[step]), rel=1e-5)
        assert metrics["eval_bema_loss"] == pytest.approx(evaluate_by_hand(bema), rel=1e-5)
        assert metrics["eval_swa_loss"] == pytest.approx(evaluate_by_hand(swa), rel=1e-5)
    assert_close(shadow(cb, "bema"), reference_bema(rec.steps, list(rec.steps))[0])
    assert_close(shadow(cb, "swa"), reference_uniform(rec.steps, list(rec.steps)))
    assert_equal(snapshot(tr.model), rec.steps[8])  # final_weights='training'
    # each profile is bit-identical to its single-profile run, evaluated under the Trainer's
    # names there and under its prefix here
    for profile in PROFILES:
        options = {k: v for k, v in profile.items() if k != "name"}
        name = profile.get("name", "ema_4ba")
        single = EMATrainerCallback(**options, final_weights="training")
        single_tr = trainer(tmp_path / name, [single], **run)
        single_tr.train()
        assert_equal(shadow(cb, name), shadow(single))
        for step, metrics in eval_logs(single_tr).items():
            assert logs[step][f"eval_{name}_loss"] == metrics["eval_loss"]
        assert_equal(snapshot(single_tr.model), rec.steps[8])


# -- resume -------------------------------------------------------------------------------------

# 16 samples, batch 4: 4 steps per epoch; 3 epochs; a checkpoint every 3 steps (mid-epoch)
RESUME = {
    "num_train_epochs": 3,
    "save_strategy": "steps",
    "save_steps": 3,
    "eval_strategy": "steps",
    "eval_steps": 5,
}
RESUME_OPTIONS: dict[str, dict[str, Any]] = {
    "bema": {"ema_power": 0.5, "final_weights": "training"},
    "bema-interval": {
        "ema_power": 0.6,
        "lag": 4,
        "update_interval": "2ba",
        "start": "3ba",
        "final_weights": "training",
    },
}
RESUME_DUE = {"bema": (1, 0), "bema-interval": (2, 3)}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, Recorder, Weights, dict[str, Weights], Weights]]:
    runs = {}
    for key, options in RESUME_OPTIONS.items():
        out = tmp_path_factory.mktemp(key)
        rec, cb = Recorder(), EMATrainerCallback(**options)
        tr = trainer(out, [rec, cb], data=TinyData(16), **RESUME)
        tr.train()
        runs[key] = (out, rec, shadow(cb), extra(cb), snapshot(tr.model))
    return runs


@pytest.mark.parametrize("key", list(RESUME_OPTIONS))
def test_bema_checkpoints_hold_the_extra_buffers(
    uninterrupted: dict[str, tuple[Path, Recorder, Weights, dict[str, Weights], Weights]],
    key: str,
) -> None:
    out, rec, _, _, _ = uninterrupted[key]
    interval, start = RESUME_DUE[key]
    options = {k: v for k, v in RESUME_OPTIONS[key].items() if k in BEMA_DEFAULTS}
    for step in (3, 6, 9, 12):
        folder = out / f"checkpoint-{step}"
        meta = json.loads((folder / "ema_state.json").read_text())
        names = sorted(rec.steps[1])
        assert meta["tensors"]["buffers"] == {"ema": names, "theta0": names}
        keys = load_file(str(folder / "ema_state.safetensors"))
        assert sorted({k.rsplit("/", 1)[0] for k in keys}) == [
            "buffers/ema",
            "buffers/theta0",
            "shadow",
        ]
        state = load_ema_state(folder)
        due = due_steps([s for s in rec.steps if s <= step], interval, start)
        evaluated, ema, theta0 = reference_bema(rec.steps, due, **options)
        assert_close(state["shadow"], evaluated)
        assert sorted(state["buffers"]) == ["ema", "theta0"]
        assert_close(state["buffers"]["ema"], ema)
        assert_close(state["buffers"]["theta0"], theta0)
        assert_equal(state["buffers"]["theta0"], rec.steps[due[0]])
        assert_equal(load_file(str(folder / "model.safetensors")), rec.steps[step])


@pytest.mark.parametrize("stop", [3, 6])
@pytest.mark.parametrize("key", list(RESUME_OPTIONS))
def test_bema_resume_is_bit_identical(
    uninterrupted: dict[str, tuple[Path, Recorder, Weights, dict[str, Weights], Weights]],
    tmp_path: Path,
    key: str,
    stop: int,
) -> None:
    out, _, full_shadow, full_extra, full_weights = uninterrupted[key]
    cb = EMATrainerCallback(**RESUME_OPTIONS[key])
    # a differently initialised model: everything must come from the checkpoint
    tr = trainer(tmp_path, [cb], data=TinyData(16), model=TinyRegressor(seed=7), **RESUME)
    tr.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
    assert_equal(shadow(cb), full_shadow)
    resumed = extra(cb)
    assert sorted(resumed) == sorted(full_extra) == ["ema", "theta0"]
    for name in full_extra:
        assert_equal(resumed[name], full_extra[name])
    assert_equal(snapshot(tr.model), full_weights)
