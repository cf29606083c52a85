"""Parameters and buffers replaced or resized during training (issue 15, item 2): followed
(re-bound at the next update) or refused with an error naming the weight; never a silent
average of a detached tensor, never an old-shaped tensor swapped into the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.weights import EMAWeights


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_replaced_parameter_same_shape_is_followed() -> None:
    model = _model()
    ema = EMA(model, half_life="0ba")  # the EMA follows the model exactly
    ema.step(model)
    old = model[0].weight
    model[0].weight = nn.Parameter(torch.full((2, 3), 7.0))
    ema.step(model)
    assert torch.equal(ema.shadow["0.weight"], torch.full((2, 3), 7.0))
    # the detached old tensor is no longer read: changing it changes nothing
    with torch.no_grad():
        old.fill_(-1.0)
        model[0].weight.fill_(3.0)
    ema.step(model)
    assert torch.equal(ema.shadow["0.weight"], torch.full((2, 3), 3.0))
    # and the swap puts the EMA into the new parameter, then the new parameter's values back
    with ema.swapped(model):
        assert model[0].weight.shape == (2, 3)
    assert torch.equal(model[0].weight, torch.full((2, 3), 3.0))


def test_replaced_parameter_other_shape_is_refused_by_update_and_swap() -> None:
    model = _model()
    ema = EMA(model, half_life="10ba")
    ema.step(model)
    model[0].weight = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(
        ValueError, match=r"'0\.weight' was replaced or resized.*\(4, 3\).*\(2, 3\)"
    ):
        ema.step(model)
    with pytest.raises(ValueError, match=r"'0\.weight' was replaced or resized"):
        with ema.swapped(model):
            pass
    assert model[0].weight.shape == (4, 3)  # the model keeps its own tensor
    assert torch.equal(model[0].weight, torch.zeros(4, 3))
    assert not ema.controller.weights.is_swapped  # type: ignore[union-attr]


@pytest.mark.parametrize("shape", [(1, 3), (3,), (4, 3)], ids=["smaller", "flat", "larger"])
def test_data_resized_is_refused_naming_the_weight(shape: tuple[int, ...]) -> None:
    model = _model()
    weights = EMAWeights(model)
    before = weights.shadow["0.weight"].clone()
    model[0].weight.data = torch.ones(shape)  # once broadcast silently, or a raw RuntimeError
    with pytest.raises(ValueError, match=r"parameter '0\.weight' was replaced or resized"):
        weights.update_(0.5)
    assert torch.equal(weights.shadow["0.weight"], before)  # nothing averaged
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        weights.swap_in()
    assert model[0].weight.shape == shape
    with pytest.raises(ValueError, match=r"'0\.weight'"):
        weights.copy_to()


def test_data_reassigned_same_shape_is_followed() -> None:
    model = _model()
    weights = EMAWeights(model)
    model[0].weight.data = torch.full((2, 3), 2.0)  # new storage, same shape
    assert weights.update_(1.0)
    assert torch.equal(weights.shadow["0.weight"], torch.full((2, 3), 2.0))
    weights.swap_in()
    weights.swap_out()
    assert torch.equal(model[0].weight, torch.full((2, 3), 2.0))


def test_data_reassigned_another_dtype_is_followed() -> None:
    model = _model()
    weights = EMAWeights(model)
    model[0].weight.data = torch.full((2, 3), 2.0, dtype=torch.float64)
    assert weights.update_(1.0)
    assert weights.shadow["0.weight"].dtype == torch.float32
    assert torch.equal(weights.shadow["0.weight"], torch.full((2, 3), 2.0))


def test_replaced_buffer_is_followed() -> None:
    model = _model()
    weights = EMAWeights(model, buffers="average")
    model[1].running_mean = torch.full((2,), 5.0)  # a module assigning a fresh buffer
    assert weights.update_(1.0)
    assert torch.equal(weights.shadow["1.running_mean"], torch.full((2,), 5.0))


def test_removed_parameter_is_refused() -> None:
    model = _model()
    weights = EMAWeights(model)
    model[0].bias = nn.Parameter(torch.zeros(2), requires_grad=False)  # now frozen
    with pytest.raises(ValueError, match=r"missing \['0\.bias'\]"):
        weights.update_(0.5)


def test_unrelated_registration_does_not_disturb_the_update() -> None:
    model = _model()
    weights = EMAWeights(model)
    layout, groups = weights._layout, weights._groups
    nn.Linear(4, 4)  # registers parameters elsewhere in the process
    assert weights.update_(0.5)
    assert weights._groups is groups and weights._layout == layout  # checked, not re-bound


def test_several_emas_follow_a_replaced_parameter_together() -> None:
    model = _model()
    ema = EMA(model, half_life=["0ba", "1ba"])
    ema.step(model)
    before = ema.shadow_of("ema_1ba")["0.weight"].clone()
    model[0].weight = nn.Parameter(torch.full((2, 3), 4.0))
    ema.step(model)
    assert torch.equal(ema.shadow_of("ema_0ba")["0.weight"], torch.full((2, 3), 4.0))
    assert torch.allclose(ema.shadow_of("ema_1ba")["0.weight"], (before + 4.0) / 2)


def test_bf16_staging_plan_matches_a_reference_over_several_batches() -> None:
    """The mixed-dtype update planned once at bind (several scratch batches) equals a float32
    lerp of the bf16 weights, and follows a replaced bf16 parameter."""
    torch.manual_seed(0)
    model = nn.Module()
    model.params = nn.ParameterList(  # 40 x 4,096: three batches of the 64K-element scratch
        [nn.Parameter(torch.randn(4096).bfloat16()) for _ in range(40)]
    )
    weights = EMAWeights(model)
    reference = [p.detach().float().clone() for p in model.parameters()]
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        if step == 1:
            model.params[7] = nn.Parameter(torch.full((4096,), 9.0, dtype=torch.bfloat16))
        weights.update_(0.25)
        for r, p in zip(reference, model.parameters(), strict=True):
            r.lerp_(p.detach().float(), 0.25)
    assert len(weights._mixed[0].plan or []) == 3
    for i, r in enumerate(reference):
        assert torch.equal(weights.shadow[f"params.{i}"], r)
