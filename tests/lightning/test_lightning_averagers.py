"""BEMA, uniform (SWA) averaging and ``update_bn_batches`` on the real Lightning Trainer: the
shadow is a float64 reference computed from the training weights after every optimizer step;
the model holds it after fit and during validation; BatchNorm statistics recomputed as
``torch.optim.swa_utils.update_bn`` would, without touching the training run; several
profiles; resume from a mid-training checkpoint."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.optim.swa_utils import update_bn as swa_update_bn
from torch.utils.data import DataLoader, TensorDataset

from ema_callbacks.lightning import EMACallback
from tests.averager_reference import ReferenceBEMA, ReferenceUniform, clone64, due
from tests.lightning.lightning_helpers import QUIET, StepRecorder, fit, shadow
from tests.lightning.lightning_tiny import TinyData, TinyRegression, ValBatches

State = dict[str, torch.Tensor]


def references(
    rec: StepRecorder, reference: ReferenceBEMA | ReferenceUniform, interval: int, start: int
) -> dict[int, State]:
    """The reference's evaluated weights after every step once it has started."""
    out: dict[int, State] = {}
    for step, weights in rec.steps:
        if due(step, interval, start):
            reference.update(step, weights)
        if isinstance(reference, ReferenceUniform) and reference.seen:
            out[step] = reference.evaluated
        elif isinstance(reference, ReferenceBEMA) and reference.s0 is not None:
            out[step] = dict(reference.evaluated)
    return out


def assert_close(actual: State, expected: State, rtol: float = 1e-6) -> None:
    assert sorted(actual) == sorted(expected)
    for k, e in expected.items():
        a = actual[k]
        if e.is_floating_point():
            assert a.dtype == torch.float32, k
            err = (a.double() - e).abs().max().item()
            assert torch.allclose(a.double(), e, rtol=rtol, atol=1e-7), (k, err)
        else:
            assert torch.equal(a, e), k


def flat(state: State, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1).double() for k in keys])


def equal(a: State, b: State) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def every_val(**kwargs: Any) -> dict[str, Any]:
    """Validation on one batch every other optimizer step (EMAs swapped in mid-training)."""
    return {"limit_val_batches": 1, "val_check_interval": 2, **kwargs}


# -- BEMA and uniform against references ---------------------------------------------------

SCHEDULES = [(1, 0), (3, 2)]  # (update_interval, start) in optimizer steps


@pytest.mark.parametrize(
    ("options", "interval", "start"),
    [
        ({"ema_power": 0.5}, 1, 0),
        ({"ema_power": 0.7, "bias_power": 0.4, "lag": 3, "multiplier": 2.0}, 3, 2),
    ],
    ids=["defaults-1ba", "custom-3ba-start2ba"],
)
def test_bema_is_the_reference_and_is_evaluated(
    options: dict[str, float], interval: int, start: int
) -> None:
    rec = StepRecorder()
    cb = EMACallback(**options, update_interval=f"{interval}ba", start=f"{start}ba")
    model = TinyRegression(record=True)
    _, model = fit([rec, cb], model=model, max_epochs=2, **every_val())
    assert [s for s, _ in rec.steps] == list(range(1, 17))
    expected = references(rec, ReferenceBEMA(**options), interval, start)
    keys = list(rec.steps[0][1])
    ema = shadow(cb)
    assert_close(ema, expected[16] if due(16, interval, start) else expected[15])
    assert cb.controller.num_updates == sum(due(s, interval, start) for s in range(1, 17)) - 1
    # final_weights='ema': the model holds the evaluated BEMA weights after fit.
    assert equal(model.state_dict(), ema)
    assert not torch.equal(model.state_dict()["net.0.weight"], rec.steps[-1][1]["net.0.weight"])
    # Every validation (steps 2, 4, ..., 16) ran on the evaluated weights at that step (on the
    # training weights before the BEMA started).
    seen = [(step, w) for phase, step, w in model.seen if phase == "val"]
    assert [s for s, _ in seen] == list(range(2, 17, 2))
    for step, weights in seen:
        training = flat(rec.steps[step - 1][1], keys)
        if step not in expected:
            assert torch.equal(weights.double(), training), step
            continue
        reference = flat(expected[step], keys)
        assert torch.allclose(weights.double(), reference, rtol=1e-6, atol=1e-7), step
        if step > (start or 1):
            assert not torch.allclose(weights.double(), training, atol=1e-5), step
    # Training steps ran on the training weights.
    trained = [(step, w) for phase, step, w in model.seen if phase == "train"]
    for step, weights in trained[1:]:
        assert torch.equal(weights, flat(dict(rec.steps[step - 1][1]), keys)), step


@pytest.mark.parametrize(("interval", "start"), SCHEDULES, ids=["1ba", "3ba-start2ba"])
def test_uniform_is_the_mean_of_the_weights_at_the_due_steps(interval: int, start: int) -> None:
    rec = StepRecorder()
    cb = EMACallback(uniform=True, update_interval=f"{interval}ba", start=f"{start}ba")
    model = TinyRegression(record=True)
    _, model = fit([rec, cb], model=model, max_epochs=2, **every_val())
    at = [s for s, _ in rec.steps if due(s, interval, start)]
    assert at == (list(range(1, 17)) if interval == 1 else [3, 6, 9, 12, 15])
    weights = dict(rec.steps)
    mean = {
        k: torch.stack([weights[s][k].double() for s in at]).mean(0)
        for k, v in weights[at[-1]].items()
        if v.is_floating_point()
    }
    mean["net.1.num_batches_tracked"] = weights[at[-1]]["net.1.num_batches_tracked"]
    ema = shadow(cb)
    assert_close(ema, mean)
    assert equal(model.state_dict(), ema)
    # Validation ran on the running mean at that step.
    expected = references(rec, ReferenceUniform(), interval, start)
    keys = list(rec.steps[0][1])
    for phase, step, w in model.seen:
        if phase == "val":
            reference = expected.get(step, clone64(weights[step]))  # not started: training
            assert torch.allclose(w.double(), flat(reference, keys), rtol=1e-6, atol=1e-7), step


# -- update_bn_batches ---------------------------------------------------------------------


def bn_dataset(n: int = 32, seed: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, 4, generator=g) + 1.0
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class BNData(LightningDataModule):
    """32 training samples in batches of 8, shuffled (the refresh reads them in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.train = bn_dataset()
        self.val = bn_dataset(8, seed=6)

    def train_dataloader(self) -> Any:
        return DataLoader(self.train, batch_size=8, shuffle=True)

    def val_dataloader(self) -> Any:
        return DataLoader(self.val, batch_size=8)


class BNNet(LightningModule):
    """Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear, trained on its ``(x, y)`` batches.
    Dropout after the BatchNorm leaves the statistics deterministic but draws from the global
    RNG in every training-mode forward (a recomputation that did not keep the RNG state would
    change the run). Records the state during validation and counts forwards in training
    mode outside ``training_step`` (the recomputation's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 1)
        )
        self.in_step = False
        self.refresh_forwards = 0
        self.val_states: list[tuple[int, State]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not self.in_step:
            self.refresh_forwards += 1
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.in_step = True
        try:
            x, y = batch
            return nn.functional.mse_loss(self(x), y)
        finally:
            self.in_step = False

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        self.val_states.append((self.global_step, state))
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


BN_STATS = ("net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked")


def fit_bn(callbacks: list[Any], **kwargs: Any) -> tuple[Trainer, BNNet]:
    options: dict[str, Any] = {**QUIET, "num_sanity_val_steps": 0, "max_epochs": 2}
    options.update(kwargs)
    model = BNNet()
    trainer = Trainer(callbacks=callbacks, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, BNData())
    return trainer, model


def swa_stats(model: nn.Module, state: State, batches: int) -> State:
    """``swa_utils.update_bn`` over the first ``batches`` training batches, in order, on a copy
    of ``model`` holding ``state``'s parameters."""
    reference = copy.deepcopy(model)
    reference.load_state_dict(state)
    data = bn_dataset()
    loader = [
        (data.tensors[0][8 * i : 8 * i + 8], data.tensors[1][8 * i : 8 * i + 8])
        for i in range(batches)
    ]
    swa_update_bn(loader, reference)
    return {k: v for k, v in reference.state_dict().items() if k in BN_STATS}


def assert_stats(actual: State, expected: State) -> None:
    for k in BN_STATS:
        if expected[k].is_floating_point():
            assert torch.allclose(actual[k], expected[k], rtol=1e-6, atol=1e-7), k
        else:
            assert torch.equal(actual[k], expected[k]), k


@pytest.mark.parametrize(
    ("options", "validate"),
    [({"half_life": "2ba"}, True), ({"ema_power": 0.5}, True), ({"uniform": True}, False)],
    ids=["half_life", "bema", "uniform-fit-end-only"],
)
def test_update_bn_batches_recomputes_the_ema_statistics(
    options: dict[str, Any], validate: bool
) -> None:
    rec = StepRecorder()
    cb = EMACallback(**options, update_bn_batches=2)
    _, model = fit_bn([rec, cb], **(every_val() if validate else {"limit_val_batches": 0}))
    ema = shadow(cb)
    final = model.state_dict()
    assert equal(final, ema)  # final_weights='ema'
    # The statistics are those of swa_utils.update_bn over the first 2 training batches.
    expected = swa_stats(model, final, 2)
    assert_stats(final, expected)
    assert int(final["net.1.num_batches_tracked"]) == 2
    # The training weights kept their own statistics.
    training = cb.controller.weights.training_state_dict()
    assert equal(dict(training), rec.steps[-1][1])
    if not validate:  # recomputed once, at the end of fit
        assert model.val_states == [] and model.refresh_forwards == 2
        return
    # Every validation ran on the average with statistics recomputed for its weights.
    assert [s for s, _ in model.val_states] == list(range(2, 9, 2))
    for step, state in model.val_states:
        assert_stats(state, swa_stats(model, state, 2))
        assert not torch.equal(state["net.1.running_mean"], rec.steps[step - 1][1][BN_STATS[0]])


def test_update_bn_batches_does_not_change_the_training_run() -> None:
    runs, shadows = [], []
    for bn in (2, None):
        rec = StepRecorder()
        cb = EMACallback(half_life="2ba", update_bn_batches=bn, final_weights="training")
        _, model = fit_bn([rec, cb], **every_val())
        runs.append((rec, model))
        shadows.append(shadow(cb))
    (with_bn, model_bn), (without, model_plain) = runs
    assert model_bn.refresh_forwards == 4 * 2 and model_plain.refresh_forwards == 0
    assert len(with_bn.steps) == len(without.steps) == 8
    for (step, a), (_, b) in zip(with_bn.steps, without.steps, strict=True):
        assert equal(a, b), step  # bit-identical, BatchNorm statistics included
    assert equal(model_bn.state_dict(), model_plain.state_dict())
    assert equal(model_bn.state_dict(), with_bn.steps[-1][1])
    # The averages differ only in the recomputed statistics.
    refreshed, plain = shadows
    assert all(torch.equal(plain[k], v) for k, v in refreshed.items() if k not in BN_STATS)
    assert not torch.allclose(plain["net.1.running_var"], refreshed["net.1.running_var"])
    assert not torch.allclose(plain["net.1.running_mean"], refreshed["net.1.running_mean"])


def test_update_bn_batches_recomputes_only_when_the_average_moved() -> None:
    # Updates at steps 4 and 8; validations at 2 (not started), 4, 6 (unchanged), 8; fit end
    # (unchanged since 8): two recomputations of 2 batches.
    cb = EMACallback(half_life="2ba", update_interval="4ba", update_bn_batches=2)
    _, model = fit_bn([cb], **every_val())
    assert cb.controller.num_updates == 1
    assert model.refresh_forwards == 2 * 2
    assert_stats(model.state_dict(), swa_stats(model, model.state_dict(), 2))


def test_update_bn_batches_needs_the_statistics_and_batchnorm() -> None:
    with pytest.raises(ValueError, match="update_bn_batches"):
        EMACallback(half_life="2ba", buffers="ignore", update_bn_batches=2)
    cb = EMACallback(half_life="2ba", update_bn_batches=2)
    with pytest.raises(ValueError, match="no BatchNorm"):
        fit([cb], model=TinyRegression(norm="layer"), max_steps=2)


# -- several profiles ----------------------------------------------------------------------

PROFILES: list[dict[str, Any]] = [
    {"name": "bema", "ema_power": 0.5},
    {"name": "swa", "uniform": True},
    {"half_life": "10ba"},
]


def test_bema_uniform_and_half_life_profiles_are_logged_and_equal_single_runs() -> None:
    cb = EMACallback(profiles=PROFILES, final_weights="training")
    options: dict[str, Any] = {"max_epochs": 2, "limit_val_batches": 2, "data": TinyData(4)}
    trainer, model = fit([cb], **options)
    assert cb.controller.names == ["bema", "swa", "ema_10ba"]
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    for key in ("val_loss", "bema/val_loss", "swa/val_loss", "ema_10ba/val_loss"):
        assert key in metrics, sorted(metrics)
    for name in cb.controller.names:
        with cb.controller.ema_weights(model, name), torch.no_grad():
            model.eval()
            losses = [nn.functional.mse_loss(model(x), y) for x, y in ValBatches()]
            model.train()
        loss = torch.stack(losses).mean().item()
        assert metrics[f"{name}/val_loss"] == pytest.approx(loss, abs=1e-6), name
        assert metrics[f"{name}/val_loss"] != pytest.approx(metrics["val_loss"], abs=1e-5)
    for kwargs in PROFILES:
        single_kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        single = EMACallback(**single_kwargs, final_weights="training")
        _, alone = fit([single], **options)
        weights = cb.controller.profile(kwargs.get("name", "ema_10ba")).weights
        assert weights is not None
        assert equal({k: v.clone() for k, v in weights.state_dict().items()}, shadow(single))
        assert torch.equal(model.flat(), alone.flat())


# -- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ema_power": 0.5},
        {"ema_power": 0.6, "lag": 4, "update_interval": "3ba", "start": "2ba"},
    ],
    ids=["bema-1ba", "bema-3ba-start2ba"],
)
def test_resume_from_a_mid_training_checkpoint_is_bit_identical(
    tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    options: dict[str, Any] = {"max_epochs": 3, "data": TinyData(4), **every_val()}
    full = EMACallback(**kwargs, final_weights="training")
    _, model_full = fit([full], **options)

    crashed = EMACallback(**kwargs, final_weights="training")
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_last=True)
    with pytest.raises(RuntimeError, match="crash at step"):
        fit(
            [crashed, ckpt],
            model=TinyRegression(crash_at_step=7),
            enable_checkpointing=True,
            **options,
        )
    last = tmp_path / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    # mid-training: step 5 (the second batch of the second epoch); Lightning 2.5's save_last
    # writes last.ckpt again at the end of that epoch (step 6)
    assert saved["global_step"] in (5, 6)
    assert 0 < crashed.controller.num_updates < full.controller.num_updates
    resumed = EMACallback(**kwargs, final_weights="training")
    _, model_resumed = fit([resumed], ckpt_path=str(last), **options)

    assert torch.equal(model_resumed.flat(), model_full.flat())
    assert equal(shadow(resumed), shadow(full))
    assert resumed.controller.state.to_dict() == full.controller.state.to_dict()
    a = resumed.controller.weights.extra_state_dict()
    b = full.controller.weights.extra_state_dict()
    assert sorted(a) == sorted(b) == ["ema", "theta0"]
    for buffer in b:
        assert equal(dict(a[buffer]), dict(b[buffer])), buffer
