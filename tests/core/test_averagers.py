"""BEMA and uniform (SWA) averaging in the plain-loop EMA, against hand-written references."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.swa_utils import update_bn as swa_update_bn

from ema_callbacks import EMA
from tests.averager_reference import BEMA_DEFAULTS, ReferenceBEMA, ReferenceUniform, due


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def make_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    return model.double()


def make_data(
    n: int, seed: int = 1, dtype: torch.dtype = torch.float64, out: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 4, generator=gen, dtype=dtype),
            torch.randn(8, out, generator=gen, dtype=dtype),
        )
        for _ in range(n)
    ]


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def params64(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().double().clone() for k, p in model.named_parameters()}


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def assert_matches(
    shadow: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> None:
    assert set(shadow) == set(expected)
    for k, v in expected.items():
        got = shadow[k].double()
        assert torch.allclose(got, v, rtol=rtol, atol=atol), (k, (got - v).abs().max().item())


BEMA_CASES = [
    {"ema_power": 0.5},
    dict(BEMA_DEFAULTS),
    {"ema_power": 0.7, "bias_power": 0.4, "lag": 3, "multiplier": 2.0},
    {"ema_power": 0.5, "min_ema_multiplier": 0.2},  # the floor binds from lag + t > 25 on
    {"ema_power": 0.5, "bias_power": float("inf")},  # alpha = 0: evaluated is the running EMA
    {"ema_power": 0.0},  # beta = 1: the EMA follows theta
    {"lag": 1, "multiplier": 0.5, "bias_power": 0.0},  # alpha = 1
]


@pytest.mark.parametrize("interval,start", [(1, 0), (3, 2)])
@pytest.mark.parametrize(
    "options", BEMA_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_bema_matches_reference_every_step(
    options: dict[str, float], interval: int, start: int
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, **options, update_interval=f"{interval}ba", start=f"{start}ba")
    ref = ReferenceBEMA(**options)
    for step, (x, y) in enumerate(make_data(30), start=1):
        train_step(model, opt, x, y)
        is_due = due(step, interval, start)
        assert ema.step(model) is is_due, step
        if is_due:
            ref.update(step, params64(model))
        if ref.s0 is not None:
            assert_matches(ema.shadow, ref.evaluated)
    assert ref.s0 == (1 if interval == 1 else 3)


@pytest.mark.parametrize(
    "option,value",
    [
        ("ema_power", 0.6),
        ("bias_power", 0.3),
        ("lag", 5),
        ("multiplier", 2.0),
        ("min_ema_multiplier", 0.25),
    ],
)
def test_any_single_bema_option_selects_bema_with_trl_defaults(option: str, value: float) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, **{option: value})
    assert len(ema.profiles) == 1 and ema.profiles[0].startswith("bema")
    ref = ReferenceBEMA(**{option: value})
    for step, (x, y) in enumerate(make_data(20), start=1):
        train_step(model, opt, x, y)
        assert ema.step(model)
        ref.update(step, params64(model))
        assert_matches(ema.shadow, ref.evaluated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interval,start", [(1, 0), (2, 3)])
def test_uniform_is_the_mean_and_matches_averaged_model(
    dtype: torch.dtype, interval: int, start: int
) -> None:
    model = make_model(dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, uniform=True, update_interval=f"{interval}ba", start=f"{start}ba")
    swa = AveragedModel(model)
    ref = ReferenceUniform()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for step, (x, y) in enumerate(make_data(30, dtype=dtype), start=1):
        train_step(model, opt, x, y)
        is_due = due(step, interval, start)
        assert ema.step(model) is is_due, step
        if is_due:
            ref.update(step, params64(model))
            swa.update_parameters(model)
        if ref.seen:
            assert all(v.dtype == dtype for v in ema.shadow.values())
            assert_matches(ema.shadow, ref.evaluated, rtol=tol, atol=tol)
            assert_matches(ema.shadow, params64(swa.module), rtol=tol, atol=tol)
    assert len(ref.seen) == (30 if interval == 1 else 15)  # steps 3, 4, 6, ..., 30
    assert int(swa.n_averaged) == len(ref.seen)


@pytest.mark.parametrize(
    "options",
    [
        {"ema_power": 0.5},
        {"uniform": True},
        {"profiles": [{"name": "b", "ema_power": 0.5}, {"name": "u", "uniform": True}]},
    ],
    ids=["bema", "uniform", "profiles"],
)
def test_swapped_puts_shadow_in_and_restores(options: dict[str, Any]) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, **options)
    for x, y in make_data(12):
        train_step(model, opt, x, y)
        ema.step(model)
    for profile in [None, *ema.profiles]:
        shadow = clone(ema.shadow_of(profile))
        training = clone(model.state_dict())
        with ema.swapped(model, profile=profile) as swapped_model:
            assert swapped_model is model
            inside = model.state_dict()
            assert set(shadow) == set(inside)
            for k, v in shadow.items():
                assert torch.equal(inside[k], v), (profile, k)
                assert not torch.equal(v, training[k]), (profile, k)
        after = model.state_dict()
        for k, v in training.items():
            assert torch.equal(after[k], v), (profile, k)
        for k, v in shadow.items():
            assert torch.equal(ema.shadow_of(profile)[k], v), (profile, k)
    for k, v in ema.shadow.items():
        assert torch.equal(v, ema.shadow_of(ema.profiles[0])[k])


@pytest.mark.parametrize(
    "options",
    [
        {"ema_power": 0.5},
        {"ema_power": 0.6, "lag": 4, "update_interval": "3ba", "start": "2ba"},
        {"uniform": True},
        {"uniform": True, "update_interval": "2ba", "start": "3ba"},
    ],
    ids=["bema", "bema-interval", "uniform", "uniform-interval"],
)
def test_resume_is_bit_identical(options: dict[str, Any]) -> None:
    data = make_data(20, dtype=torch.float32)

    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, **options)
    for x, y in data:
        train_step(model, opt, x, y)
        ema.step(model)
    expected = clone(ema.shadow)

    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, **options)
    for x, y in data[:10]:
        train_step(model, opt, x, y)
        ema.step(model)
    saved = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}
    )

    model = make_model(seed=123, dtype=torch.float32)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(saved["opt"])
    ema = EMA(model, **options)
    ema.load_state_dict(saved["ema"])
    for x, y in data[10:]:
        train_step(model, opt, x, y)
        ema.step(model)
    assert set(ema.shadow) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ema.shadow[k], v), (k, (ema.shadow[k] - v).abs().max().item())


def test_profiles_together_equal_single_runs() -> None:
    model = make_model(dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    together = EMA(
        model,
        profiles=[
            {"name": "b", "ema_power": 0.5},
            {"name": "u", "uniform": True},
            {"name": "h", "half_life": "10ba"},
        ],
    )
    alone = {
        "b": EMA(model, ema_power=0.5),
        "u": EMA(model, uniform=True),
        "h": EMA(model, half_life="10ba"),
    }
    assert together.profiles == ["b", "u", "h"]
    for x, y in make_data(25, dtype=torch.float32):
        train_step(model, opt, x, y)
        assert together.step(model)
        for single in alone.values():
            assert single.step(model)
    for name, single in alone.items():
        mine = together.shadow_of(name)
        assert set(mine) == set(single.shadow)
        for k, v in single.shadow.items():
            assert torch.equal(mine[k], v), (name, k, (mine[k] - v).abs().max().item())
    for k, v in together.shadow.items():
        assert torch.equal(v, alone["b"].shadow[k])
    training = clone(model.state_dict())
    with together.swapped(model, profile="u"):
        for k, v in alone["u"].shadow.items():
            assert torch.equal(model.state_dict()[k], v), k
    for k, v in training.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("pass_model", [True, False])
@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_update_bn_matches_swa_utils(buffers: str, train_mode: bool, pass_model: bool) -> None:
    model = make_bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = EMA(model, uniform=True, buffers=buffers)
    for x, y in make_data(12, out=1):
        train_step(model, opt, x, y)
        ema.step(model)
    loader = make_data(5, seed=7, out=1)
    model.train(train_mode)
    before_model = clone(model.state_dict())
    before_shadow = clone(ema.shadow)
    assert {"1.running_mean", "1.running_var"} <= set(before_shadow)

    reference = copy.deepcopy(model)
    reference.load_state_dict(before_shadow, strict=False)
    swa_update_bn(loader, reference)
    expected = reference.state_dict()

    if pass_model:
        ema.update_bn(loader, model)
    else:
        ema.update_bn(loader)

    shadow = ema.shadow
    for k in ("1.running_mean", "1.running_var"):
        assert torch.allclose(shadow[k], expected[k], rtol=1e-6, atol=1e-6), k
        assert not torch.allclose(shadow[k], before_shadow[k]), k
    for k, _ in model.named_parameters():
        assert torch.equal(shadow[k], before_shadow[k]), k
    after_model = model.state_dict()
    assert set(after_model) == set(before_model)
    for k, v in before_model.items():
        assert torch.equal(after_model[k], v), k
    assert model.training is train_mode
    assert all(m.training is train_mode for m in model.modules())


def test_update_bn_refuses_ignored_buffers_and_models_without_batchnorm() -> None:
    model = make_bn_model()
    ema = EMA(model, uniform=True, buffers="ignore")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = make_data(3, out=1)
    for x, y in loader:
        train_step(model, opt, x, y)
        ema.step(model)
    with pytest.raises(ValueError, match="buffers"):
        ema.update_bn(loader, model)

    plain = make_model()
    ema = EMA(plain, uniform=True)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    loader = make_data(3)
    for x, y in loader:
        train_step(plain, opt, x, y)
        ema.step(plain)
    with pytest.raises(ValueError):
        ema.update_bn(loader, plain)


NAN = float("nan")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"ema_power": 0.5, "half_life": "10ba"}, ValueError, "ema_power"),
        ({"ema_power": 0.5, "smoothing": 0.9}, ValueError, "ema_power"),
        ({"ema_power": 0.5, "sigma_rel": 0.1}, ValueError, "ema_power"),
        ({"lag": 5, "smoothing": 0.9}, ValueError, "lag"),
        ({"uniform": True, "half_life": "10ba"}, ValueError, "uniform"),
        ({"uniform": True, "ema_power": 0.5}, ValueError, "uniform"),
        ({"uniform": "yes"}, TypeError, "uniform"),
        ({"ema_power": -1}, ValueError, "ema_power"),
        ({"lag": 0.5}, ValueError, "lag"),
        ({"min_ema_multiplier": 2}, ValueError, "min_ema_multiplier"),
        ({"multiplier": -1}, ValueError, "(?<!min_ema_)multiplier"),
        ({"bias_power": -1}, ValueError, "bias_power"),
        ({"ema_power": "x"}, TypeError, "ema_power"),
        ({"ema_power": 0.5, "warmup": "tf"}, ValueError, "warmup"),
        ({"uniform": True, "warmup": "tf"}, ValueError, "warmup"),
        ({"ema_power": NAN}, ValueError, "ema_power"),
        ({"bias_power": NAN}, ValueError, "bias_power"),
        ({"lag": NAN}, ValueError, "lag"),
        ({"multiplier": NAN}, ValueError, "(?<!min_ema_)multiplier"),
        ({"min_ema_multiplier": NAN}, ValueError, "min_ema_multiplier"),
        ({"profiles": [{"name": "b", "ema_power": -1}]}, ValueError, "ema_power"),
    ],
)
def test_bad_input_names_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as caught:
        EMA(make_model(), **kwargs)
    message = str(caught.value)
    assert "unexpected keyword" not in message and "unknown key" not in message, message


def test_default_profile_names() -> None:
    model = make_model()
    assert EMA(model, uniform=True).profiles == ["uniform"]
    assert EMA(model, ema_power=0.5).profiles == ["bema"]
