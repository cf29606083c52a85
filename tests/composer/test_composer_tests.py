"""What Composer's own EMA tests check (composer v0.32.1, tests/algorithms/test_ema.py and
tests/algorithms/test_algorithm_resumption.py), checked here of ema_callbacks.composer.EMA with
the real Trainer (tests written here, not copied), plus the documented differences in when an
EMA starts (docs/composer.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger
from composer.models import ComposerClassifier
from composer_runs import EMA, ComposerEMA, run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = [pytest.mark.composer]


def first_started_batch(algo: Any, max_duration: str = "12ba") -> int:
    """The 1-based batch at whose BATCH_END the EMA existed for the first time."""
    _, rec = run(algo, max_duration, eval_interval=None)
    return next(i for i, ema in enumerate(rec.ema, start=1) if ema is not None)


def test_ema_start_in_epochs_is_one_batch_earlier_than_composer() -> None:
    # 4 batches per epoch: one epoch of training is done after batch 4 (fractional epoch 1.0);
    # Composer's timestamp.epoch becomes 1 only after EPOCH_END, so it starts at batch 5.
    assert first_started_batch(EMA(half_life="4ba", ema_start="1ep")) == 4
    assert first_started_batch(ComposerEMA(half_life="4ba", ema_start="1ep")) == 5


@pytest.mark.parametrize(("ema_start", "ours", "composers"), [("0ba", 4, 1), ("5ba", 5, 5)])
def test_start_with_an_update_interval(ema_start: str, ours: int, composers: int) -> None:
    # Ours: the first batch at or after both ema_start and the first interval multiple.
    kw = {"half_life": "8ba", "update_interval": "4ba", "ema_start": ema_start}
    assert first_started_batch(EMA(**kw)) == ours
    assert first_started_batch(ComposerEMA(**kw)) == composers


# -- tests/algorithms/test_ema.py --------------------------------------------------------------
#
# Composer's test_ema_algorithm builds EMA(half_life, update_interval) or EMA(half_life=None,
# smoothing=0.999), checks algorithm.smoothing against exp(-ln 2 * interval / half_life), fakes
# one update through apply(BATCH_END / EPOCH_END), checks ema = s * old + (1 - s) * new for the
# parameters and buffers of three models, then that apply(EVAL_START) puts the EMA into the
# model and apply(EVAL_END) the training weights back. test_ema does the same update with
# compute_ema for smoothing 0, 0.5, 0.99 and 1. Here the same behaviours run in the real Trainer.


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


def conv_model() -> ComposerClassifier:
    """Convolutions with a BatchNorm (float and integer buffers), like SimpleConvModel."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    return ComposerClassifier(net, num_classes=2)


def transformer_model() -> ComposerClassifier:
    """Embedding, one encoder layer, mean pooling, a linear head: SimpleTransformerClassifier's
    shape."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    net = nn.Sequential(
        nn.Embedding(10, 16), nn.TransformerEncoder(layer, 1), _Mean(), nn.Linear(16, 2)
    )
    return ComposerClassifier(net, num_classes=2)


def loader(kind: str, batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    n = batches * 4
    if kind == "conv":
        x = torch.randn(n, 3, 8, 8, generator=g)
    else:
        x = torch.randint(0, 10, (n, 6), generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 2, (n,), generator=g)), batch_size=4)


MODELS: dict[str, Callable[[], ComposerClassifier]] = {
    "conv": conv_model,
    "transformer": transformer_model,
}


def _clone(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors}


class Updates(Callback):
    """After the algorithm ran at each update event: the EMA as Composer's attributes show it
    (``ema_model``) and the model's weights; at EVAL_START / EVAL_END the model's weights."""

    def __init__(self, algo: EMA, event: str) -> None:
        self.algo, self.event = algo, event
        self.ema: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.model: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.at_eval_start: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]] = []
        self.at_eval_end: list[tuple[dict[str, torch.Tensor], bool]] = []

    def _record(self, state: State) -> None:
        m = self.algo.ema_model
        assert m is not None
        self.ema.append((_clone(m.named_parameters()), _clone(m.named_buffers())))
        self.model.append(
            (_clone(state.model.named_parameters()), _clone(state.model.named_buffers()))
        )

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.event == "batch":
            self._record(state)

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self.event == "epoch":
            self._record(state)

    def eval_start(self, state: State, logger: Logger) -> None:
        m = self.algo.ema_model
        assert m is not None
        self.at_eval_start.append(
            (
                _clone(state.model.named_parameters()),
                _clone(m.named_parameters()),
                self.algo.ema_weights_active,
            )
        )

    def eval_end(self, state: State, logger: Logger) -> None:
        self.at_eval_end.append(
            (_clone(state.model.named_parameters()), self.algo.ema_weights_active)
        )


def fit(algo: EMA, kind: str, max_duration: str, callback: Callback, **kw: Any) -> Trainer:
    model = MODELS[kind]()
    trainer = Trainer(
        model=model,
        train_dataloader=loader(kind),
        max_duration=max_duration,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        algorithms=[algo],
        callbacks=[callback],
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
        **kw,
    )
    trainer.fit()
    return trainer


def check_lerp(rec: Updates, smoothing: float) -> None:
    """Every update after the first (the copy): ema = s * previous + (1 - s) * weights, for
    parameters and float buffers; integer buffers are copied (Composer averages them)."""
    assert len(rec.ema) >= 3
    for k in range(1, len(rec.ema)):
        (params, buffers), (old_params, old_buffers) = rec.ema[k], rec.ema[k - 1]
        model_params, model_buffers = rec.model[k]
        assert sorted(params) == sorted(model_params)
        for name, value in params.items():
            expected = old_params[name] * smoothing + (1.0 - smoothing) * model_params[name]
            torch.testing.assert_close(value, expected)
        assert sorted(buffers) == sorted(model_buffers)
        for name, value in buffers.items():
            if value.is_floating_point():
                expected = old_buffers[name] * smoothing + (1.0 - smoothing) * model_buffers[name]
                torch.testing.assert_close(value, expected)
            else:
                assert torch.equal(value, model_buffers[name])


@pytest.mark.parametrize(
    ("kwargs", "event", "max_duration", "expected"),
    [
        ({"half_life": "10ba", "update_interval": "1ba"}, "batch", "4ba", 2 ** (-1 / 10)),
        ({"half_life": "1ep", "update_interval": "1ep"}, "epoch", "3ep", 0.5),
        ({"half_life": None, "smoothing": 0.999, "update_interval": "1ba"}, "batch", "4ba", 0.999),
    ],
    ids=["10ba", "1ep", "smoothing"],
)
def test_smoothing_update_and_eval_swap(
    kwargs: dict, event: str, max_duration: str, expected: float
) -> None:
    theirs = ComposerEMA(**kwargs)
    algo = EMA(**kwargs)
    assert algo.smoothing == pytest.approx(theirs.smoothing, rel=1e-15)
    assert algo.smoothing == pytest.approx(expected, rel=1e-15)
    rec = Updates(algo, event)
    fit(algo, "conv", max_duration, rec, eval_dataloader=loader("conv", 1), eval_interval="1ep")
    check_lerp(rec, algo.smoothing)
    assert rec.at_eval_start and rec.at_eval_end
    training_after = {}
    for model_now, ema_now, active in rec.at_eval_start:  # EVAL_START: the EMA in
        assert active
        assert all(torch.equal(model_now[k], ema_now[k]) for k in ema_now)
    for model_now, active in rec.at_eval_end:  # EVAL_END: the training weights back
        assert not active
        training_after = model_now
    assert not all(
        torch.equal(training_after[k], rec.at_eval_start[-1][1][k]) for k in training_after
    )


@pytest.mark.parametrize("kind", list(MODELS))
def test_update_on_each_model(kind: str) -> None:
    algo = EMA(half_life="10ba")
    rec = Updates(algo, "batch")
    fit(algo, kind, "4ba", rec)
    check_lerp(rec, 2 ** (-1 / 10))


@pytest.mark.parametrize("smoothing", [0.0, 0.5, 0.99, 1.0])
def test_edge_smoothings(smoothing: float) -> None:
    # 0: the EMA follows the weights; 1: it never moves from its first copy.
    algo = EMA(smoothing=smoothing)
    rec = Updates(algo, "batch")
    fit(algo, "conv", "4ba", rec)
    check_lerp(rec, smoothing)
    params, first = rec.ema[-1][0], rec.ema[0][0]
    if smoothing == 0.0:
        assert all(torch.equal(params[k], rec.model[-1][0][k]) for k in params)
    if smoothing == 1.0:
        assert all(torch.equal(params[k], first[k]) for k in params)


# -- tests/algorithms/test_algorithm_resumption.py ---------------------------------------------
#
# Composer trains 2 batches saving a checkpoint after each, then trains again from the first
# checkpoint (a fresh algorithm, a fresh model from the same initial weights, an optimizer
# built with another learning rate that the checkpoint overrides), and compares the two
# second-batch checkpoints with deep_compare: every value of the same type (an int is not a
# float) and equal, tensors exactly, except wall-clock times, the run name and the saver's list
# of checkpoints; then checks that the two checkpoints of the first run differ in the model.


def strict_compare(a: Any, b: Any, path: str = "") -> None:
    """Equal, recursively, with the types of all scalars equal (1 is not 1.0)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert a.shape == b.shape and torch.equal(a, b), f"{path} differs"
        return
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, path
        assert np.array_equal(a, b), f"{path} differs"
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), path
        for key in a:
            strict_compare(a[key], b[key], f"{path}/{key}")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            strict_compare(x, y, f"{path}[{i}]")
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} {a!r} vs {type(b).__name__} {b!r}"
    assert a == b, f"{path}: {a!r} != {b!r}"


def train(folder: str, lr: float, **kw: Any) -> None:
    model = conv_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    Trainer(
        model=model,
        train_dataloader=loader("conv"),
        max_duration="2ba",
        optimizers=optimizer,
        schedulers=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
        algorithms=[EMA(half_life="1ba")],  # Composer's settings for EMA
        save_folder=folder,
        save_filename="checkpoint_ba{batch}-rank{rank}",
        save_interval="1ba",
        train_subset_num_batches=2,
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
        **kw,
    ).fit()


def _without_run_specific(checkpoint: dict[str, Any]) -> dict[str, Any]:
    state = checkpoint["state"]
    for key in ("total_wct", "iteration_wct", "epoch_wct", "batch_wct"):
        del state["timestamp"]["Timestamp"][key]
    del state["run_name"]
    del state["callbacks"]["CheckpointSaver"]["all_saved_checkpoints_to_timestamp"]
    return checkpoint


def test_resumed_checkpoint_equals_the_uninterrupted_one_type_strictly(tmp_path: Any) -> None:
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    train(first, lr=0.01)
    train(
        second,
        lr=0.1,
        load_path=f"{first}/checkpoint_ba1-rank{{rank}}",
        load_weights_only=False,
        load_strict_model_weights=False,
    )
    a = torch.load(f"{first}/checkpoint_ba2-rank0", weights_only=False)
    b = torch.load(f"{second}/checkpoint_ba2-rank0", weights_only=False)
    ((name, ours),) = [(n, s) for n, s in a["state"]["algorithms"]]
    assert name == "EMA" and ours["format"] == "ema_callbacks" and "0x" not in ours["repr"]
    last = ours["schedule"]["last"]
    assert type(last["ba"]) is int and type(last["start_ba"]) is int  # 1, not 1.0
    strict_compare(a["rng"], b["rng"], "rng")
    strict_compare(_without_run_specific(a)["state"], _without_run_specific(b)["state"], "state")
    one = torch.load(f"{first}/checkpoint_ba1-rank0", weights_only=False)
    with pytest.raises(AssertionError):
        strict_compare(one["state"]["model"], a["state"]["model"])


# -- the attributes Composer's tests and user code read -----------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"half_life": "10ba", "update_interval": "1ba"},
        {"half_life": "1ep"},
        {"half_life": "50ba", "ema_start": "0.5dur", "update_interval": "5ba"},
        # (without update_interval Composer's constructor crashes with AttributeError)
        {"half_life": None, "smoothing": 0.999, "update_interval": "1ba"},
    ],
)
def test_public_attributes_have_composers_meaning(kwargs: dict) -> None:
    ours, theirs = EMA(**kwargs), ComposerEMA(**kwargs)
    for attr in ("smoothing", "ema_start", "update_interval", "ema_started", "ema_weights_active"):
        mine, composers = getattr(ours, attr), getattr(theirs, attr)
        assert type(mine) is type(composers) and mine == composers, attr
    if kwargs.get("half_life", "1000ba") is not None:
        assert type(ours.half_life) is type(theirs.half_life) and ours.half_life == theirs.half_life
    else:
        assert ours.half_life is None  # Composer's attribute does not exist then
    for attr in (
        "half_life",
        "smoothing",
        "ema_start",
        "update_interval",
        "ema_model",
        "ema_started",
        "ema_weights_active",
    ):
        with pytest.raises(AttributeError):
            setattr(ours, attr, None)


def test_ema_model_and_flags_follow_training() -> None:
    algo = EMA(half_life="4ba", final_weights="training")
    assert algo.ema_model is None and not algo.ema_started
    trainer, rec = run(algo, "4ba", eval_interval=None)
    assert algo.ema_started and not algo.ema_weights_active
    m = algo.ema_model
    assert m is not None
    names = dict(trainer.state.model.named_parameters())
    assert sorted(m.named_parameters_dict) == sorted(names)  # the trained model's names
    assert rec.ema[-1] is not None
    assert all(
        torch.equal(v, rec.ema[-1][k.removeprefix("module.")])
        for k, v in m.named_parameters_dict.items()
    )
    algo.get_ema_model(trainer.state.model)
    assert algo.ema_weights_active


def test_composer_time_objects_are_accepted() -> None:
    from composer.core import Time, TimeUnit

    ema = EMA(
        half_life=Time(10, TimeUnit.BATCH),
        ema_start=Time.from_timestring("0.25dur"),
        update_interval=Time(2, TimeUnit.BATCH),
    )
    same = EMA(half_life="10ba", ema_start="0.25dur", update_interval="2ba")
    assert ema.controller.schedule.config() == same.controller.schedule.config()
    assert repr(ema) == repr(same)
    several = EMA(half_life=[Time(1, TimeUnit.EPOCH), "100ba"])
    assert several.controller.names == ["ema_1ep", "ema_100ba"]
    with pytest.raises(ValueError, match="^half_life"):
        EMA(half_life=Time(30, TimeUnit.SECOND))
