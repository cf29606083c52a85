"""Property test (issue 15, item 6): every time-string option and every numeric option of the
four entry points (the plain ``EMA``, Composer's ``EMA``, Lightning's ``EMACallback``,
transformers' ``EMATrainerCallback``), fed arbitrary values, either raises ``ValueError`` or
``TypeError`` whose message names the parameter, or keeps a value equal to what was typed.

Each entry point runs where its framework is installed: this file is collected by both suites
(``.venv``: plain, Lightning, transformers; ``.venv-composer``: plain, Composer).
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ema_callbacks import EMA
from ema_callbacks.time_strings import Time

SNAPSHOTS = "/tmp/ema-callbacks-property-test-snapshots"  # never written: nothing is trained


def _plain(**kwargs: Any) -> Any:
    kwargs.setdefault("max_duration", "100ba")  # so 'dur' times are meaningful
    return EMA(torch.nn.Linear(2, 2), **kwargs)


def _need(distribution: str, module: str) -> None:
    """Skip unless ``distribution`` is installed: by distribution, since ``tests/composer`` can
    be importable as a namespace package called ``composer`` where Composer is not."""
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} is not installed")
    pytest.importorskip(module)


def _composer(**kwargs: Any) -> Any:
    _need("mosaicml", "composer")
    from ema_callbacks.composer import EMA as ComposerEMA

    return ComposerEMA(**kwargs)


def _lightning(**kwargs: Any) -> Any:
    _need("lightning", "lightning")
    from ema_callbacks.lightning import EMACallback

    return EMACallback(**kwargs)


def _transformers(**kwargs: Any) -> Any:
    _need("transformers", "transformers")
    from ema_callbacks.transformers import EMATrainerCallback

    return EMATrainerCallback(**kwargs)


FRAMEWORKS = {
    "composer": ("mosaicml", "composer"),
    "lightning": ("lightning", "lightning"),
    "transformers": ("transformers", "transformers"),
}


def require(entry: str) -> None:
    """Skip where the entry point's framework is not installed."""
    if entry in FRAMEWORKS:
        _need(*FRAMEWORKS[entry])


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "plain": _plain,
    "composer": _composer,
    "lightning": _lightning,
    "transformers": _transformers,
}

TIME_OPTIONS = ["half_life", "update_interval", "start", "snapshot_every"]
NUMERIC_OPTIONS = [
    "smoothing",
    "sigma_rel",
    "warmup_gamma",
    "warmup_power",
    "rampup_ratio",
    "snapshot_keep",
]
PLAIN_ONLY = {"max_duration": "time", "steps_per_epoch": "number"}

# What the option needs beside it to be meaningful.
CONTEXT: dict[str, dict[str, Any]] = {
    "snapshot_every": {"sigma_rel": 0.1, "snapshot_folder": SNAPSHOTS},
    "snapshot_keep": {"sigma_rel": 0.1, "snapshot_every": "10ba", "snapshot_folder": SNAPSHOTS},
    "warmup_gamma": {"warmup": "power"},
    "warmup_power": {"warmup": "power"},
}


def option_name(entry: str, option: str) -> str:
    """The parameter as the entry point's user types it."""
    return "ema_start" if entry == "composer" and option == "start" else option


# -- strategies ----------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.integers(min_value=0, max_value=10**25).map(str),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "inf",
            "Infinity",
            "nan",
            "+0",
            "-0",
            "+5",
            "1e-400",
            "1e400",
            "1.0000000000000001",
            "9007199254740993",
            ".5",
            "5.",
            "",
            "e5",
            "1_0",
            "0x10",
            "\u0661",
        ]
    ),
)
UNIT_TEXT = st.sampled_from(
    ["ba", "BA", "ep", "Ep", "sp", "tok", "TOK", "dur", "s", "sec", "h", "iter", "", "to\u212a"]
)
TIME_TEXT = st.one_of(
    st.builds(lambda n, u: n + u, NUMBER_TEXT, UNIT_TEXT),
    st.text(max_size=10),
)
TIME_VALUES = st.one_of(
    TIME_TEXT,
    st.none(),
    st.integers(min_value=-10, max_value=10**6),
    st.floats(),
    st.booleans(),
    st.lists(TIME_TEXT, min_size=0, max_size=2),
)
NUMERIC_VALUES = st.one_of(
    st.floats(),
    st.floats(min_value=0.0, max_value=1.0),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=0, max_size=2),
)

_SPLIT = re.compile(
    r"\+?(?P<number>inf(?:inity)?|[0-9]*\.?[0-9]*(?:e[+-]?[0-9]+)?)(?P<unit>[a-z]+)"
)


def typed_time(text: str) -> tuple[str, Fraction | None]:
    """The unit and exact value (None: infinite) a time string spells, computed here with
    ``Decimal``, independently of the library's parser."""
    match = _SPLIT.fullmatch(text.lower())
    assert match is not None, text
    number = match.group("number")
    if number.startswith("inf"):
        return match.group("unit"), None
    return match.group("unit"), Fraction(Decimal(number))


def same_time(stored: Any, typed: Any) -> bool:
    if isinstance(typed, float):  # only float('inf') is taken as a number
        return isinstance(stored, Time) and math.isinf(stored.value) and math.isinf(typed)
    assert isinstance(stored, Time) and isinstance(typed, str)
    unit, value = typed_time(typed)
    if stored.unit.value != unit:
        return False
    if value is None:
        return math.isinf(stored.value)
    if math.isinf(stored.value):
        return False
    if isinstance(stored.value, int):
        return Fraction(stored.value) == value  # ba, sp, tok: exactly the integer typed
    # ep, dur: the float that holds what was typed (its exact value or its shortest decimal,
    # time_strings' rule), so str() gives back a string that means what was typed
    return value in (Fraction(stored.value), Fraction(repr(stored.value)))


def same_number(stored: Any, typed: Any) -> bool:
    return (
        not isinstance(typed, bool)
        and isinstance(typed, (int, float))
        and not math.isnan(typed)
        and stored == typed
    )


def stored_values(obj: Any, option: str) -> list[Any]:
    """What the constructed object holds for ``option``, one value per EMA profile."""
    controller = obj.controller
    schedules = [p.schedule for p in controller.profiles]
    if option == "snapshot_every":
        return [controller.snapshot_schedule.update_interval]
    if option == "snapshot_keep":
        return [controller.snapshot_keep]
    if option in ("max_duration", "steps_per_epoch"):
        return [getattr(obj, option)]
    return [getattr(s, option) for s in schedules]


def check(entry: str, option: str, kind: str, value: Any) -> None:
    name = option_name(entry, option)
    kwargs = {**CONTEXT.get(option, {}), name: value}
    try:
        obj = ENTRY_POINTS[entry](**kwargs)
    except (ValueError, TypeError) as err:
        assert name in str(err), (kwargs, str(err))
        return
    if value is None:
        return  # the documented default
    typed = value if isinstance(value, list) else [value]
    stored = stored_values(obj, option)
    if len(typed) != len(stored):  # one value shared by every profile
        typed = typed * len(stored)
    same = same_time if kind == "time" else same_number
    assert all(same(s, t) for s, t in zip(stored, typed, strict=True)), (kwargs, stored)


CASES = [(entry, option, "time") for entry in ENTRY_POINTS for option in TIME_OPTIONS]
CASES += [(entry, option, "number") for entry in ENTRY_POINTS for option in NUMERIC_OPTIONS]
CASES += [("plain", option, kind) for option, kind in PLAIN_ONLY.items()]

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("entry", "option", "kind"), CASES, ids=[f"{e}-{o}" for e, o, _ in CASES])
@SETTINGS
@given(data=st.data())
def test_option_is_refused_naming_it_or_kept_as_typed(
    entry: str, option: str, kind: str, data: st.DataObject
) -> None:
    require(entry)
    strategy = TIME_VALUES if kind == "time" else NUMERIC_VALUES
    check(entry, option, kind, data.draw(strategy, label=option))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("half_life", "9007199254740993ba"),
        ("half_life", "1.0000000000000001ba"),
        ("half_life", "2e6to\u212a"),
        ("update_interval", "+0ba"),
        ("start", "Infinityba"),
        ("smoothing", float("nan")),
        ("sigma_rel", 1e-160),
        ("warmup_gamma", float("inf")),
        ("snapshot_every", "0ba"),
    ],
)
def test_the_cases_of_issue_15(entry: str, option: str, value: Any) -> None:
    require(entry)
    check(entry, option, "number" if option in NUMERIC_OPTIONS else "time", value)
