"""The controller's event semantics (one event at a time, with a fake clock)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ema_callbacks.controller import EMAController
from ema_callbacks.schedule import Clock, Schedule


def model_and_controller(**kwargs: object) -> tuple[nn.Module, EMAController]:
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    ctl = EMAController.create(**kwargs)  # type: ignore[arg-type]
    ctl.fit_start(model, Clock(batch=0))
    return model, ctl


def nudge(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def test_no_swap_before_start() -> None:
    model, ctl = model_and_controller(half_life="5ba", start="3ba")
    ctl.batch_end(model, Clock(batch=1))
    ctl.eval_start(model)
    assert ctl.weights_active == "training"  # Lightning #21724: never validate an unstarted EMA
    ctl.eval_end(model)


def test_eval_swaps_and_restores() -> None:
    model, ctl = model_and_controller(half_life="5ba")
    ctl.batch_end(model, Clock(batch=1))
    nudge(model)
    ctl.batch_end(model, Clock(batch=2))
    raw = model.weight.detach().clone()
    ctl.eval_start(model)
    assert ctl.weights_active == "ema"
    assert not torch.equal(model.weight, raw)
    ctl.eval_end(model)
    assert torch.equal(model.weight, raw)


def test_update_during_eval_swaps_out_first() -> None:
    model, ctl = model_and_controller(half_life="5ba")
    ctl.batch_end(model, Clock(batch=1))
    ctl.eval_start(model)
    nudge(model)  # (would be a bug in a trainer; the controller still keeps things straight)
    assert ctl.batch_end(model, Clock(batch=2))
    assert ctl.weights_active == "training"


def test_fit_end_final_weights() -> None:
    model, ctl = model_and_controller(half_life="0ba")  # EMA follows the model
    ctl.batch_end(model, Clock(batch=1))
    raw = model.weight.detach().clone()
    nudge(model)
    ctl.fit_end(model)
    assert ctl.weights_active == "ema"
    ctl.eval_start(model)
    ctl.eval_end(model)  # validate() after fit keeps the final EMA weights
    assert ctl.weights_active == "ema"
    assert torch.equal(model.weight, raw)
    ctl.fit_start(model, Clock(batch=1))  # training again: training weights back
    assert ctl.weights_active == "training"

    model2, ctl2 = model_and_controller(half_life="5ba", final_weights="training")
    ctl2.batch_end(model2, Clock(batch=1))
    ctl2.fit_end(model2)
    assert ctl2.weights_active == "training"


def test_exception_restores_training_weights() -> None:
    model, ctl = model_and_controller(half_life="5ba")
    ctl.batch_end(model, Clock(batch=1))
    nudge(model)
    raw = model.weight.detach().clone()
    ctl.fit_end(model)
    ctl.exception(model)
    assert ctl.weights_active == "training"
    assert torch.equal(model.weight, raw)


def test_train_with_ema_weights_copies_average_into_model() -> None:
    model, ctl = model_and_controller(smoothing=0.5, train_with_ema_weights=True)
    ctl.batch_end(model, Clock(batch=1))
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ctl.batch_end(model, Clock(batch=2))
    assert torch.allclose(model.weight, before + 1.0)


def test_state_with_training_weights_round_trip() -> None:
    model, ctl = model_and_controller(half_life="5ba")
    ctl.batch_end(model, Clock(batch=1))
    nudge(model)
    ctl.batch_end(model, Clock(batch=2))
    raw = model.weight.detach().clone()
    ema = ctl.weights.shadow["weight"].clone()  # type: ignore[union-attr]
    ctl.eval_start(model)
    state = ctl.state_dict()  # model holds the EMA now: the state carries training weights
    assert state["weights_active"] == "ema"
    assert torch.equal(state["training"]["weight"], raw)

    # A trainer restores the model slot (EMA weights) and then our state, before fit starts.
    torch.manual_seed(1)
    model2 = nn.Linear(3, 3)
    with torch.no_grad():
        model2.weight.copy_(ema)
    ctl2 = EMAController.create(half_life="5ba")
    ctl2.load_state_dict(state)
    ctl2.fit_start(model2, Clock(batch=2))
    assert torch.equal(model2.weight, raw)
    assert torch.equal(ctl2.weights.shadow["weight"], ema)  # type: ignore[union-attr]
    assert ctl2.num_updates == 1 and ctl2.started


def test_check_clock_names_unit_and_hint() -> None:
    ctl = EMAController(Schedule(half_life="2e6tok"))
    with pytest.raises(ValueError, match="'tok' but tokens are not counted here; set X"):
        ctl.check_clock(Clock(batch=1), hint="set X")


def test_metrics() -> None:
    model, ctl = model_and_controller(half_life="5ba")
    ctl.batch_end(model, Clock(batch=1))
    ctl.batch_end(model, Clock(batch=2))
    assert ctl.metrics() == {
        "num_updates": 1.0,
        "num_skipped": 0.0,
        "smoothing": pytest.approx(2 ** (-1 / 5)),
    }


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"final_weights": "best"}, ValueError, "final_weights must be one of"),
        ({"eval_with_ema": 1}, TypeError, "eval_with_ema must be True or False"),
        ({"device": "tpu:x"}, ValueError, "device must be"),
        ({"include": 5}, TypeError, "include must be a glob"),
        ({"nonfinite": "raise"}, ValueError, "nonfinite must be one of"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        EMAController.create(**kwargs)
    assert fragment in str(info.value)
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        EMAController("50ba")  # type: ignore[arg-type]


def test_state_saved_before_the_shadow_existed_loads() -> None:
    # A checkpoint written before fit (no shadow yet) restores into a fresh controller.
    state = EMAController.create(half_life="5ba").state_dict()
    assert state["shadow"] == {}
    model, ctl = nn.Linear(3, 3), EMAController.create(half_life="5ba")
    ctl.load_state_dict(state)
    ctl.fit_start(model, Clock(batch=0))
    assert ctl.weights is not None and not ctl.started
