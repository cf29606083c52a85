"""Smoothing maths against closed forms, and the schedule's decisions in every unit."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ema_callbacks.schedule import (
    Clock,
    Schedule,
    ScheduleState,
    debiased_weight,
    gamma_to_sigma_rel,
    half_life_to_smoothing,
    power_function_smoothing,
    power_warmup_smoothing,
    sigma_rel_to_gamma,
    smoothing_to_half_life,
    tf_dynamic_smoothing,
)


@given(st.floats(1.0, 1e6), st.floats(0.01, 1e3))
def test_half_life_halves(half_life: float, interval: float) -> None:
    beta = half_life_to_smoothing(half_life, interval)
    assert beta ** (half_life / interval) == pytest.approx(0.5, rel=1e-6)
    assert smoothing_to_half_life(beta, interval) == pytest.approx(half_life, rel=1e-6)


def test_composer_formula() -> None:
    # Composer: smoothing = 2 ** (-(interval / half_life)).
    assert half_life_to_smoothing(50, 1) == 2 ** (-1 / 50)
    assert half_life_to_smoothing(1000, 10) == 2 ** (-10 / 1000)


def test_edges() -> None:
    assert half_life_to_smoothing(0, 1) == 0.0
    assert half_life_to_smoothing(math.inf, 1) == 1.0
    assert half_life_to_smoothing(5, 0) == 1.0
    assert smoothing_to_half_life(0.0) == 0.0
    assert smoothing_to_half_life(1.0) == math.inf
    assert smoothing_to_half_life(0.999, 1) == pytest.approx(692.8, abs=0.05)
    with pytest.raises(ValueError):
        half_life_to_smoothing(-1, 1)
    with pytest.raises(ValueError):
        smoothing_to_half_life(1.5)


def test_tf_dynamic_decay_matches_seed() -> None:
    # seeds 002/004: min(decay, (1 + n) / (10 + n)), n counting from 0.
    assert [tf_dynamic_smoothing(0.9999, n) for n in range(3)] == [0.1, 2 / 11, 3 / 12]
    assert tf_dynamic_smoothing(0.9, 10**6) == 0.9


def test_power_warmup_matches_timm_diffusers() -> None:
    # diffusers get_decay: t = step - update_after_step - 1; 1 - (1 + t / inv_gamma) ** -power.
    for n in range(5):
        t = n + 1
        assert power_warmup_smoothing(n, 1.0, 2 / 3) == pytest.approx(1 - (1 + t) ** (-2 / 3))
    assert power_warmup_smoothing(9, 2.0, 0.75) == pytest.approx(1 - (1 + 10 / 2.0) ** -0.75)


def test_debiased_weight_equals_optax_zero_init() -> None:
    betas = [0.9, 0.95, 0.5, 0.99, 0.8]
    xs = [1.0, -2.0, 3.5, 0.25, 7.0]
    m, product, d = 0.0, 1.0, 123.0  # optax: zero init; ours: any init (first weight is 1)
    for beta, x in zip(betas, xs, strict=True):
        m = beta * m + (1 - beta) * x
        w, product = debiased_weight(beta, product)
        d = d + w * (x - d)
        assert d == pytest.approx(m / (1 - product), rel=1e-12)


@pytest.mark.parametrize(
    ("sigma_rel", "gamma"), [(0.05, 16.97), (0.10, 6.94), (0.15, 3.56), (0.20, 1.83)]
)
def test_edm2_published_pairs(sigma_rel: float, gamma: float) -> None:
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.005)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)
    # the cubic of EDM2 Algorithm 2 vanishes at the root
    t = sigma_rel**-2
    assert g**3 + 7 * g**2 + (16 - t) * g + (12 - t) == pytest.approx(0, abs=1e-7 * t)


def test_sigma_rel_bounds() -> None:
    for bad in (0.0, -0.1, 0.29, 1.0):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(TypeError, match="sigma_rel"):
        sigma_rel_to_gamma("0.1")  # type: ignore[arg-type]


def test_power_function_smoothing() -> None:
    gamma = 6.94
    assert power_function_smoothing(10, 1, gamma) == pytest.approx((1 - 1 / 10) ** (gamma + 1))
    assert power_function_smoothing(1, 1, gamma) == 0.0


def run(schedule: Schedule, clocks: list[Clock]) -> list[tuple[int, float, bool] | None]:
    """Apply the schedule to a sequence of clocks; record (batch, weight, initialise)."""
    state = ScheduleState()
    out: list[tuple[int, float, bool] | None] = []
    for clock in clocks:
        update = schedule.due(clock, state)
        schedule.commit(clock, state, update)
        out.append(None if update is None else (clock.batch, update.weight, update.initialise))
    return out


def test_every_batch_constant_smoothing() -> None:
    s = Schedule(half_life="10ba")
    got = run(s, [Clock(batch=b) for b in range(1, 5)])
    beta = 2 ** (-1 / 10)
    assert got == [
        (1, 1.0, True),
        (2, pytest.approx(1 - beta), False),
        (3, pytest.approx(1 - beta), False),
        (4, pytest.approx(1 - beta), False),
    ]


def test_interval_in_batches() -> None:
    s = Schedule(half_life="100ba", update_interval="10ba")
    got = [g for g in run(s, [Clock(batch=b) for b in range(1, 41)]) if g is not None]
    assert [g[0] for g in got] == [10, 20, 30, 40]
    assert got[0][2] is True
    assert got[1][1] == pytest.approx(1 - 2 ** (-10 / 100))


def test_start_delays_initialisation() -> None:
    s = Schedule(half_life="10ba", start="5ba")
    got = run(s, [Clock(batch=b) for b in range(1, 8)])
    assert got[:4] == [None] * 4
    assert got[4] == (5, 1.0, True)
    assert got[5] is not None and got[5][2] is False


def test_start_in_duration() -> None:
    s = Schedule(half_life="10ba", start="0.5dur")
    got = run(s, [Clock(batch=b, duration=b / 10) for b in range(1, 11)])
    assert [g[0] for g in got if g is not None and g[2]] == [5]


def test_smoothing_from_elapsed_samples_with_variable_batches() -> None:
    # A half-life in samples with batches of different sizes: each update's beta follows
    # the samples actually seen, so the total decay over the run is exact.
    s = Schedule(half_life="64sp", update_interval="1ba")
    sizes = [32, 8, 64, 16, 100]
    state = ScheduleState()
    seen, product = 0, 1.0
    for b, size in enumerate(sizes, start=1):
        seen += size
        clock = Clock(batch=b, sample=seen)
        update = s.due(clock, state)
        assert update is not None
        if not update.initialise:
            assert update.smoothing == pytest.approx(2 ** (-size / 64))
            product *= update.smoothing
        s.commit(clock, state, update)
    assert product == pytest.approx(2 ** (-(seen - sizes[0]) / 64))


def test_interval_in_other_unit_than_half_life() -> None:
    # Update every 2 epochs, half-life in batches (100 batches per epoch).
    s = Schedule(half_life="50ba", update_interval="2ep")
    state = ScheduleState()
    updates = []
    for b in range(1, 601):
        clock = Clock(batch=b, epoch=b / 100)
        u = s.due(clock, state)
        s.commit(clock, state, u)
        if u is not None:
            updates.append((b, u.smoothing, u.initialise))
    assert [u[0] for u in updates] == [200, 400, 600]
    assert updates[1][1] == pytest.approx(2 ** (-200 / 50))


def test_fractional_epoch_interval() -> None:
    s = Schedule(half_life="1ep", update_interval="0.25ep")
    got = run(s, [Clock(batch=b, epoch=b / 8) for b in range(1, 17)])
    assert [g[0] for g in got if g is not None] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_epoch_half_life_defaults_to_epoch_interval() -> None:
    s = Schedule(half_life="2ep")
    assert str(s.update_interval) == "1ep"
    # mid-epoch batch ends with integer epochs are not due; epoch ends are
    state = ScheduleState()
    assert s.due(Clock(batch=5, epoch=0.0), state) is None
    u = s.due(Clock(batch=10, epoch=1.0), state)
    assert u is not None and u.initialise


def test_smoothing_constant_per_update() -> None:
    s = Schedule(smoothing=0.9, update_interval="3ba")
    got = [g for g in run(s, [Clock(batch=b) for b in range(1, 10)]) if g is not None]
    assert [(g[0], round(g[1], 12)) for g in got] == [(3, 1.0), (6, 0.1), (9, 0.1)]


def test_zero_and_infinite_half_life() -> None:
    assert [g[1] for g in run(Schedule(half_life="0ba"), [Clock(batch=b) for b in (1, 2)])] == [
        1.0,
        1.0,
    ]
    assert [g[1] for g in run(Schedule(half_life="infba"), [Clock(batch=b) for b in (1, 2)])] == [
        1.0,
        0.0,
    ]
    assert Schedule(half_life=float("inf")).half_life is not None


def test_warmups_cap_smoothing() -> None:
    tf = run(Schedule(smoothing=0.999, warmup="tf"), [Clock(batch=b) for b in range(1, 4)])
    assert [g[1] for g in tf] == [1.0, pytest.approx(0.9), pytest.approx(1 - 2 / 11)]
    pw = run(Schedule(smoothing=0.999, warmup="power"), [Clock(batch=b) for b in range(1, 3)])
    assert pw[1][1] == pytest.approx((1 + 1) ** (-2 / 3))


def test_debias_warmup_first_weight_is_one() -> None:
    got = run(Schedule(smoothing=0.9, warmup="debias"), [Clock(batch=b) for b in range(1, 4)])
    # initialise, then the first debiased update copies (P = 0.9 -> w = 1), then 0.1/(1-0.81)
    assert [g[1] for g in got] == [1.0, pytest.approx(1.0), pytest.approx(0.1 / (1 - 0.81))]


def test_rampup_ratio_caps_half_life() -> None:
    s = Schedule(half_life="1000ba", rampup_ratio=0.1)
    got = run(s, [Clock(batch=b) for b in range(1, 102)])
    # at batch 101, 100 batches since start: half-life min(1000, 10) = 10
    assert got[-1][1] == pytest.approx(1 - 2 ** (-1 / 10))


def test_power_function_schedule() -> None:
    s = Schedule(sigma_rel=0.1)
    got = run(s, [Clock(batch=b) for b in range(1, 5)])
    gamma = sigma_rel_to_gamma(0.1)
    assert got[3][1] == pytest.approx(1 - (1 - 1 / 4) ** (gamma + 1))


def test_skip_does_not_advance_time() -> None:
    s = Schedule(half_life="10ba")
    state = ScheduleState()
    for b in (1, 2):
        s.commit(Clock(batch=b), state, s.due(Clock(batch=b), state))
    s.skip(state)  # batch 3 skipped (non-finite weights)
    u = s.due(Clock(batch=4), state)
    assert u is not None and u.smoothing == pytest.approx(2 ** (-2 / 10))
    assert state.num_skipped == 1


def test_missing_unit_is_a_clear_error() -> None:
    s = Schedule(half_life="1e6tok")
    with pytest.raises(ValueError, match="'tok'"):
        s.due(Clock(batch=1), ScheduleState())


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"half_life": "50ba", "smoothing": 0.9}, ValueError, "exactly one"),
        ({"smoothing": 1.5}, ValueError, "smoothing must be between 0 and 1"),
        ({"smoothing": "0.9"}, TypeError, "smoothing must be a number"),
        ({"smoothing": float("nan")}, ValueError, "NaN"),
        ({"half_life": "-1ba"}, ValueError, "half_life must not be negative"),
        ({"half_life": 50}, TypeError, "half_life must be a time string"),
        ({"half_life": 5.0}, ValueError, "float('inf')"),
        ({"update_interval": "0ba"}, ValueError, "update_interval must be positive"),
        ({"update_interval": "30s"}, ValueError, "update_interval must measure training progress"),
        ({"start": "infba"}, ValueError, "start must be finite"),
        ({"warmup": "cosine"}, ValueError, "warmup must be one of"),
        ({"warmup": 1}, TypeError, "warmup must be one of"),
        ({"warmup_gamma": 0}, ValueError, "warmup_gamma must be positive"),
        ({"warmup_power": -1.0}, ValueError, "warmup_power must be positive"),
        ({"sigma_rel": 0.5}, ValueError, "sigma_rel must be between"),
        ({"sigma_rel": 0.1, "warmup": "tf"}, ValueError, "cannot be combined"),
        ({"smoothing": 0.9, "rampup_ratio": 0.1}, ValueError, "rampup_ratio needs a half_life"),
        ({"rampup_ratio": -0.1}, ValueError, "rampup_ratio must be positive"),
    ],
)
def test_bad_input(kwargs: dict, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=None) as info:
        Schedule(**kwargs)
    assert fragment in str(info.value)


def test_state_round_trip_and_defaults() -> None:
    state = ScheduleState(True, {"ba": 3.0}, 2, 1, 0.5, 0.9)
    assert ScheduleState.from_dict(state.to_dict()) == state
    assert ScheduleState.from_dict({"started": True}) == ScheduleState(started=True)
