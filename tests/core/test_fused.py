"""``EMA.fused_step``: the optimizer step and the EMA's due update in one compiled function."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from ema_callbacks import EMA

STEPS = 30


def make_model(dtype: torch.dtype = torch.float32, on: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    return model.to(on, dtype)


DATA = [
    (torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g))
    for g in [torch.Generator().manual_seed(1)]
    for _ in range(STEPS)
]


def optimizer_for(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    first, last = model[0], model[2]  # two param groups with their own learning rates
    groups = [{"params": first.parameters(), "lr": 0.01}, {"params": last.parameters()}]
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=0.02)
    return torch.optim.SGD(groups, lr=0.05, momentum=0.9)


def train(model: nn.Module, opt: torch.optim.Optimizer, step: Any) -> None:
    for x, y in DATA:
        p = next(model.parameters())
        loss = (model(x.to(p.device, p.dtype)) - y.to(p.device)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        step()


def separate(
    kind: str, dtype: torch.dtype = torch.float32, on: str = "cpu", **options: Any
) -> tuple[nn.Module, EMA]:
    model = make_model(dtype, on)
    opt = optimizer_for(model, kind)
    ema = EMA(model, **options)

    def step() -> None:
        opt.step()
        ema.step(model)

    train(model, opt, step)
    return model, ema


def fused(
    kind: str,
    dtype: torch.dtype = torch.float32,
    compile: bool = True,
    on: str = "cpu",
    **options: Any,
) -> tuple[nn.Module, EMA, Any]:
    model = make_model(dtype, on)
    opt = optimizer_for(model, kind)
    ema = EMA(model, **options)
    step = ema.fused_step(opt, compile=compile)
    train(model, opt, step)
    return model, ema, step


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_eager_fused_step_is_the_separate_update(kind: str) -> None:
    m1, e1 = separate(kind, half_life=["3ba", "9ba"], update_interval="2ba")
    m2, e2, _ = fused(kind, compile=False, half_life=["3ba", "9ba"], update_interval="2ba")
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    for name in e1.profiles:
        for k, v in e1.shadow_of(name).items():
            assert torch.equal(e2.shadow_of(name)[k], v)


@pytest.mark.parametrize(
    "options",
    [
        {"half_life": "5ba"},
        {"half_life": "6ba", "warmup": "power"},  # a new smoothing every step: no recompile
        {"half_life": ["3ba", "9ba"], "update_interval": "3ba"},
        {
            "profiles": [
                {"name": "b", "ema_power": 0.5},
                {"name": "u", "uniform": True, "start": "4ba"},
            ]
        },
    ],
    ids=["half_life", "warmup", "profiles", "bema-uniform"],
)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_compiled_fused_step_matches_the_separate_update(
    kind: str, options: dict[str, Any]
) -> None:
    m1, e1 = separate(kind, **options)
    m2, e2, step = fused(kind, **options)
    # training weights: as eager; torch.compile's own AdamW differs from eager AdamW by about
    # 3e-6 (relative) after 30 steps here, so that is the bound, not the EMA
    for p, q in zip(m2.parameters(), m1.parameters(), strict=True):
        assert relative(p.detach(), q.detach()) < 1e-5
    assert e2.profiles == e1.profiles
    for name in e1.profiles:
        assert e2.controller.profile(name).state.num_updates == (
            e1.controller.profile(name).state.num_updates
        )
        for k, v in e1.shadow_of(name).items():
            assert float((e2.shadow_of(name)[k] - v).abs().max()) < 1e-5, (name, k)
    # one graph per set of profiles due together and per initialising copy, plus the
    # optimizer alone where some step has no update due; never one per smoothing
    interval = options.get("update_interval")
    expected = {
        "half_life": 2,
        "warmup": 2,
        "profiles": 3,  # copy of both, lerp of both, the optimizer alone (steps 1-2, 4-5, ...)
        "bema-uniform": 4,  # copy of both at step 1 ... then BEMA alone, both, uniform's copy
    }
    key = next(k for k in expected if options == _CASES[k])
    assert step.compilations == expected[key], (interval, step.compilations)


_CASES = {
    "half_life": {"half_life": "5ba"},
    "warmup": {"half_life": "6ba", "warmup": "power"},
    "profiles": {"half_life": ["3ba", "9ba"], "update_interval": "3ba"},
    "bema-uniform": {
        "profiles": [
            {"name": "b", "ema_power": 0.5},
            {"name": "u", "uniform": True, "start": "4ba"},
        ]
    },
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_cuda_compiled_fused_step_matches_the_separate_update(kind: str) -> None:
    options = {"half_life": ["3ba", "9ba"], "update_interval": "3ba", "warmup": "power"}
    m1, e1 = separate(kind, on="cuda", **options)
    m2, e2, step = fused(kind, on="cuda", **options)
    assert next(m2.parameters()).is_cuda and e2.shadow["0.weight"].is_cuda
    for p, q in zip(m2.parameters(), m1.parameters(), strict=True):
        assert relative(p.detach(), q.detach()) < 1e-5
    for name in e1.profiles:
        for k, v in e1.shadow_of(name).items():
            assert float((e2.shadow_of(name)[k] - v).abs().max()) < 1e-5, (name, k)
    assert step.compilations == 3  # copy, lerp (a tensor smoothing: no recompile), optimizer alone


def test_bf16_weights_with_a_float32_shadow() -> None:
    # compiled and eager bf16 optimizers round differently (their trajectories part by about 1%),
    # so the reference is a separate EMA of the fused run's own weights, stepped beside it
    model = make_model(torch.bfloat16)
    opt = optimizer_for(model, "sgd")
    ema = EMA(model, half_life="4ba")
    beside = EMA(model, half_life="4ba")
    from ema_callbacks.fused import _PRECISE_CASTS

    if not _PRECISE_CASTS:  # torch < 2.13: refused, with the reason
        with pytest.raises(ValueError, match="needs torch >= 2.13"):
            ema.fused_step(opt)
        return
    step = ema.fused_step(opt)

    def both() -> None:
        step()
        beside.step(model)

    train(model, opt, both)
    for k, v in beside.shadow.items():
        assert v.dtype == torch.float32 and ema.shadow[k].dtype == torch.float32
        assert float((ema.shadow[k] - v).abs().max()) < 1e-6, k


def test_frozen_and_excluded_parameters() -> None:
    def run(use_fused: bool) -> tuple[nn.Module, EMA]:
        model = make_model()
        model[0].bias.requires_grad_(False)  # frozen: the optimizer skips it, the EMA too
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        ema = EMA(model, half_life="4ba", exclude="2.bias")
        if use_fused:
            train(model, opt, ema.fused_step(opt))
        else:
            train(model, opt, lambda: (opt.step(), ema.step(model)))
        return model, ema

    (_, e1), (_, e2) = run(False), run(True)
    assert sorted(e2.shadow) == ["0.weight", "2.weight"]
    for k, v in e1.shadow.items():
        assert float((e2.shadow[k] - v).abs().max()) < 1e-6


def test_state_swap_and_resume_as_for_every_ema() -> None:
    m1, e1, _ = fused("sgd", half_life="4ba")
    state = e1.state_dict()
    model = make_model()
    model.load_state_dict(m1.state_dict())
    again = EMA(model, half_life="4ba")
    again.load_state_dict(state)
    assert again.num_updates == e1.num_updates == STEPS - 1
    for k, v in e1.shadow.items():
        assert torch.equal(again.shadow[k], v)
    with e1.swapped(m1):
        assert torch.equal(m1[0].weight, e1.shadow["0.weight"])
    # and training goes on with the fused step after the resume
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    step = again.fused_step(opt)
    train(model, opt, step)
    assert again.num_updates == 2 * STEPS - 1


def test_optimizer_hooks_run_once_per_step_and_lr_schedulers_see_the_step() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    ema = EMA(model, half_life="4ba")
    step = ema.fused_step(opt)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        for x, y in DATA[:3]:
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            step()
            scheduler.step()
    assert calls == ["pre", "post"] * 3


def test_bad_arguments() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        EMA(model).fused_step("sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="compile must be True or False"):
        EMA(model).fused_step(opt, compile="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        EMA(model, nonfinite="skip").fused_step(opt)
    EMA(model, nonfinite="skip").fused_step(opt, compile=False)  # eager: the guard works


def test_the_compiled_function_reads_the_parameters_the_optimizer_writes() -> None:
    # Not the detached aliases the eager update reads: an alias is a second graph input on the
    # storage of a parameter the graph mutates, so AOTAutograd rebuilds both from a synthetic
    # base (a copy of every weight, written back after the graph) and the lerp gets loops of its
    # own; the EMA then cost 3x the separate update (docs/performance_fused.md).
    from ema_callbacks.fused import _sources

    model = make_model()
    opt = optimizer_for(model, "adamw")
    ema = EMA(model, half_life="4ba")
    train(model, opt, ema.fused_step(opt))
    weights = ema.controller.weights
    assert weights is not None
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    sources = [s for g in (*weights._groups, *weights._mixed) for s in _sources(g)]
    assert len(sources) == 4 and all(id(s) in optimized for s in sources)


def test_replace_step_keeps_an_lr_schedulers_wrapper_and_refuses_a_foreign_one() -> None:
    from ema_callbacks.fused import fused_step_in, replace_step

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    before = vars(opt).get("step")  # torch < 2.8 wraps it on the instance; newer torch does not
    calls: list[str] = []
    restore = replace_step(opt, lambda: (calls.append("fused"), setattr(opt, "_opt_called", True)))
    assert fused_step_in(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        opt.step()
        scheduler.step()
        later = torch.optim.lr_scheduler.StepLR(opt, step_size=10)  # leaves the fused step alone
        opt.step()
        later.step()
    assert calls == ["fused", "fused"] and fused_step_in(opt)
    restore()
    assert vars(opt).get("step") is before and not fused_step_in(opt)
    opt.step = lambda closure=None: None  # type: ignore[method-assign]  # e.g. a scaler's patch
    with pytest.raises(ValueError, match="SGD.step is already replaced on this optimizer"):
        replace_step(opt, lambda: None)
