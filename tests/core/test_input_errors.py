"""Odd inputs to the plain API and the core: each refused with a ValueError/TypeError that
names the parameter the user typed and quotes the value as typed (issue 15)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.controller import EMAController


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


# -- the parameter named, the value quoted as typed ---------------------------------------------


@pytest.mark.parametrize("every", ["0ba", "+0ba", "infba", "Infinityba", "-1ba", "3", "1.5ba"])
def test_bad_snapshot_every_names_snapshot_every(every: str, tmp_path) -> None:
    with pytest.raises(ValueError) as err:
        EMA(_model(), sigma_rel=0.1, snapshot_every=every, snapshot_folder=tmp_path)
    message = str(err.value)
    assert message.startswith("snapshot_every"), message
    assert "update_interval" not in message
    assert repr(every) in message


def test_bad_snapshot_every_in_the_controller_names_snapshot_every() -> None:
    with pytest.raises(
        ValueError, match=r"^snapshot_every must be positive and finite; got '\+0ba'"
    ):
        EMAController.create(sigma_rel=0.1, snapshot_every="+0ba")


@pytest.mark.parametrize(
    ("kwargs", "name", "typed"),
    [
        ({"update_interval": "+0ba"}, "update_interval", "'+0ba'"),
        ({"update_interval": "0.0ep"}, "update_interval", "'0.0ep'"),
        ({"update_interval": "Infinityba"}, "update_interval", "'Infinityba'"),
        ({"start": "Infinityba"}, "start", "'Infinityba'"),
        ({"start": "+infEP"}, "start", "'+infEP'"),
    ],
)
def test_values_quoted_as_typed(kwargs: dict, name: str, typed: str) -> None:
    with pytest.raises(ValueError) as err:
        EMA(_model(), **kwargs)
    assert str(err.value).startswith(name)
    assert typed in str(err.value)


# -- exception types: ValueError/TypeError, never OverflowError, AssertionError, ... -----------


@pytest.mark.parametrize("sigma_rel", [1e-151, 1e-160, 1e-300, 5e-324])
def test_tiny_sigma_rel_is_a_value_error(sigma_rel: float) -> None:
    with pytest.raises(ValueError, match=r"^sigma_rel must be at least 1e-150"):
        EMA(_model(), sigma_rel=sigma_rel)
    with pytest.raises(ValueError, match=r"^sigma_rel"):
        EMAController.create(sigma_rel=[0.1, sigma_rel])


def test_smallest_sigma_rel_and_huge_gamma_compute() -> None:
    from ema_callbacks.schedule import SIGMA_REL_MIN, gamma_to_sigma_rel, sigma_rel_to_gamma

    gamma = sigma_rel_to_gamma(SIGMA_REL_MIN)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(SIGMA_REL_MIN, rel=1e-9)
    assert gamma_to_sigma_rel(1e300) == pytest.approx(1e-300, rel=1e-9)  # no OverflowError


def test_posthoc_sigma_rel_too_small_is_a_value_error() -> None:
    from ema_callbacks.posthoc import _gamma

    with pytest.raises(ValueError, match="^--sigma-rel"):
        _gamma(1e-160, "--sigma-rel")


@pytest.mark.parametrize(
    "dtype", [torch.int64, torch.int8, torch.bool, torch.uint8, torch.float8_e4m3fn]
)
def test_non_floating_dtype_refused_at_construction(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=r"^dtype must be a floating dtype"):
        EMA(_model(), dtype=dtype)


def test_floating_dtype_objects_accepted() -> None:
    ema = EMA(_model(), dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in ema.shadow.values())


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ("meta", "real tensors"),
        ("xla", "cannot allocate"),
        ("cuda:99", "cuda:99"),
        ("not-a-device", "torch device like"),
    ],
)
def test_unusable_device_refused_at_construction(device: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        EMA(_model(), device=device)
    assert str(info.value).startswith("device"), str(info.value)
    assert words in str(info.value)
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()  # the check did not initialise CUDA


def test_device_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"^device must be a torch device"):
        EMA(_model(), device=0)  # type: ignore[arg-type]


def _saved() -> dict:
    model = _model()
    ema = EMA(model, half_life="4ba")
    ema.step(model)
    ema.step(model)
    return ema.state_dict()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("schedule", None, "'schedule'"),
        ("schedule", {"last": 5}, "'schedule.last'"),
        ("schedule", {"num_updates": "x"}, "'schedule.num_updates'"),
        ("schedule", {"started": "yes"}, "'schedule.started'"),
        ("shadow", {"0.weight": 3}, "'shadow'"),
        ("profiles", 5, "'profiles'"),
        ("training", 3, "'training'"),
        ("aliases", [1], "'aliases'"),
        ("version", "1", "'version'"),
        ("clock", None, "'clock'"),
        ("clock", {"batch": -1}, "'clock.batch'"),
    ],
)
def test_malformed_state_is_a_value_error_naming_the_field(
    key: str, value: object, named: str
) -> None:
    state = _saved()
    state[key] = value
    model = _model()
    ema = EMA(model, half_life="4ba")
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with pytest.raises(ValueError) as info:
        ema.load_state_dict(state)
    assert named in str(info.value), str(info.value)
    # nothing was half-loaded
    assert ema.num_updates == 0
    assert all(torch.equal(before[k], v) for k, v in ema.shadow.items())


# -- nothing silently accepted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"exclude": "typo.*"}, "'typo.*'"),
        ({"include": ["*weight", "nomatch"]}, "'nomatch'"),
        ({"include": ["0.*"], "exclude": ["2.*"]}, "'2.*'"),
    ],
)
def test_pattern_matching_nothing_is_refused_naming_it(kwargs: dict, pattern: str) -> None:
    option = next(k for k in ("exclude", "include") if pattern.strip("'") in str(kwargs.get(k)))
    with pytest.raises(ValueError) as info:
        EMA(_model(), **kwargs)
    assert str(info.value).startswith(f"{option} pattern {pattern} matches no weight"), str(
        info.value
    )


def test_patterns_that_match_are_taken() -> None:
    ema = EMA(_model(), include=["0.*", "1.bias"], exclude="0.bias")
    assert sorted(ema.shadow) == ["0.weight", "1.bias"]


@pytest.mark.parametrize("option", ["warmup_gamma", "warmup_power", "rampup_ratio"])
def test_infinite_warmup_numbers_refused(option: str) -> None:
    kwargs: dict = {option: float("inf")}
    if option != "rampup_ratio":
        kwargs["warmup"] = "power"
    with pytest.raises(ValueError, match=rf"^{option} must be positive and finite; got inf"):
        EMA(_model(), half_life="1000ba", **kwargs)


def _trained(**kwargs: object) -> tuple[nn.Module, EMA]:
    model = _model()
    ema = EMA(model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        ema.step(model)
    return model, ema


@pytest.mark.parametrize(
    ("saved", "now", "words"),
    [
        ({"half_life": "10ba"}, {"half_life": "20ba"}, "half_life: saved '10ba', now '20ba'"),
        ({"half_life": "10ba"}, {"half_life": "10ep"}, "half_life: saved '10ba', now '10ep'"),
        ({"smoothing": 0.9}, {"smoothing": 0.99}, "smoothing: saved 0.9, now 0.99"),
        ({"half_life": "10ba"}, {"smoothing": 0.9}, "half_life: saved '10ba', now None"),
        (
            {"half_life": "4ba", "update_interval": "2ba"},
            {"half_life": "4ba"},
            "update_interval: saved '2ba', now '1ba'",
        ),
    ],
)
def test_resume_with_another_schedule_warns_and_the_constructor_wins(
    saved: dict, now: dict, words: str
) -> None:
    model, before = _trained(**saved)
    state = before.state_dict()
    resumed = EMA(model, **now)
    with pytest.warns(UserWarning, match="saved with another schedule") as caught:
        resumed.load_state_dict(state)
    assert words in str(caught[0].message), str(caught[0].message)
    # the saved weights and progress are kept, the constructor's schedule applies
    assert resumed.num_updates == before.num_updates
    assert all(torch.equal(resumed.shadow[k], before.shadow[k]) for k in before.shadow)
    assert resumed.controller.schedule.config() == EMA(_model(), **now).controller.schedule.config()


def test_resume_with_the_same_schedule_is_silent() -> None:
    import warnings

    model, before = _trained(half_life="10ba", update_interval="1ba")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EMA(model, half_life="10ba").load_state_dict(before.state_dict())


# -- odd models and calls -----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_nonfinite_guard_on_a_float64_model(policy: str) -> None:
    from ema_callbacks import NonFiniteWeightsError

    model = _model().double()
    ema = EMA(model, half_life="2ba", nonfinite=policy)
    ema.step(model)
    with torch.no_grad():
        model[0].weight.mul_(1e100)  # finite in float64, beyond float32: not a NaN/Inf
    assert ema.step(model)
    assert ema.num_skipped == 0 and ema.num_updates == 1
    good = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    if policy == "skip":
        with pytest.warns(RuntimeWarning, match="skipped"):
            assert not ema.step(model)
        assert ema.num_skipped == 1
    else:
        with pytest.raises(NonFiniteWeightsError):
            ema.step(model)
    assert all(torch.equal(good[k], v) for k, v in ema.shadow.items())
    assert all(v.dtype == torch.float64 for v in ema.shadow.values())


def test_refused_step_counts_nothing() -> None:
    model = _model()
    ema = EMA(model, half_life="16sp")
    ema.step(model, samples=4)
    with pytest.raises(ValueError, match="^tokens must be a non-negative integer; got -1"):
        ema.step(model, samples=4, tokens=-1)
    assert ema.clock.sample == 4 and ema.clock.batch == 1
    ema.step(model, samples=4)
    assert ema.clock.sample == 8 and ema.clock.batch == 2


def test_schedule_state_keeps_integer_progress_integers() -> None:
    # A resumed state must have the types of the one written (Composer compares checkpoints
    # type-strictly): ba/sp/tok progress as int, also when a JSON/float copy is read back.
    from ema_callbacks.schedule import Clock, Schedule, ScheduleState

    read = ScheduleState.from_dict(
        {"started": True, "last": {"ba": 3.0, "ep": 1.0, "sp": 24.0, "start_ba": 1.0, "dur": 0.5}}
    )
    assert {k: type(v) for k, v in read.last.items()} == {
        "ba": int,
        "ep": float,
        "sp": int,
        "start_ba": int,
        "dur": float,
    }
    resumed = Schedule(half_life="4ba", update_interval="2ba").resumed_state(Clock(batch=5))
    assert resumed.last["ba"] == 4 and type(resumed.last["ba"]) is int


# -- found by tests/core/test_properties_entry_points.py -----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"smoothing": [0.0, 0.0]}, "smoothing"),
        ({"smoothing": [0.9999999, 0.99999999]}, "smoothing"),  # both print as 'ema_1'
        ({"half_life": ["10ba", "10BA"]}, "half_life"),
    ],
)
def test_a_list_giving_two_emas_one_name_names_the_option(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}=.*: two EMAs share the name"):
        EMA(_model(), **kwargs)


@pytest.mark.parametrize("value", [2**53 + 1, 10**400, -(10**400)])
def test_an_integer_a_float_cannot_hold_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match=r"^rampup_ratio must be a number a float holds exactly"):
        EMA(_model(), half_life="10ba", rampup_ratio=value)
    assert (
        EMA(_model(), half_life="10ba", rampup_ratio=2**53).controller.schedule.rampup_ratio
        == 2**53
    )


@pytest.mark.parametrize("typed", ["+0ba", "Infinityba", "0.5DUR"])
def test_max_duration_quoted_as_typed(typed: str) -> None:
    with pytest.raises(ValueError, match=rf"^max_duration must .*; got {re.escape(repr(typed))}$"):
        EMA(_model(), max_duration=typed)
