"""Time strings: an exact table of valid and invalid inputs, and a property test."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ema_callbacks.time_strings import Time, TimeUnit

BA, EP, SP, TOK, DUR = (
    TimeUnit.BATCH,
    TimeUnit.EPOCH,
    TimeUnit.SAMPLE,
    TimeUnit.TOKEN,
    TimeUnit.DURATION,
)

VALID = [
    ("50ba", 50, BA, "50ba"),
    ("1ba", 1, BA, "1ba"),
    ("0ba", 0, BA, "0ba"),
    ("1000BA", 1000, BA, "1000ba"),
    ("1ep", 1.0, EP, "1ep"),
    ("1EP", 1.0, EP, "1ep"),
    ("0.25ep", 0.25, EP, "0.25ep"),
    (".5ep", 0.5, EP, "0.5ep"),
    ("5.ep", 5.0, EP, "5ep"),
    ("1.5Ep", 1.5, EP, "1.5ep"),
    ("2e6tok", 2_000_000, TOK, "2000000tok"),
    ("3e4tok", 30_000, TOK, "30000tok"),
    ("1E3SP", 1000, SP, "1000sp"),
    ("128sp", 128, SP, "128sp"),
    ("2.5e3sp", 2500, SP, "2500sp"),
    ("0.1dur", 0.1, DUR, "0.1dur"),
    ("1dur", 1.0, DUR, "1dur"),
    ("0.0dur", 0.0, DUR, "0dur"),
    ("infba", math.inf, BA, "infba"),
    ("INFep", math.inf, EP, "infep"),
    ("infinitytok", math.inf, TOK, "inftok"),
    ("+5ba", 5, BA, "5ba"),
    ("1e-05ep", 1e-05, EP, "1e-05ep"),
    ("1e0ba", 1, BA, "1ba"),
    # Read exactly, not through a float (issue 15).
    ("9007199254740993ba", 9007199254740993, BA, "9007199254740993ba"),
    ("12345678901234567890123tok", 12345678901234567890123, TOK, "12345678901234567890123tok"),
    ("1.0000000000000001e16sp", 10000000000000001, SP, "10000000000000001sp"),
    ("0.333ep", 0.333, EP, "0.333ep"),
    ("5e-324ep", 5e-324, EP, "5e-324ep"),
    ("0e999999999ba", 0, BA, "0ba"),
]

INVALID = [
    ("", ValueError, "empty string"),
    ("ba", ValueError, "needs a number"),
    ("50", ValueError, "needs a unit"),
    ("-3ba", ValueError, "must not be negative"),
    ("-0.5ep", ValueError, "must not be negative"),
    ("1.5ba", ValueError, "whole number"),
    ("0.5sp", ValueError, "whole number"),
    ("2.5tok", ValueError, "whole number"),
    ("1.2dur", ValueError, "between 0 and 1"),
    ("2dur", ValueError, "between 0 and 1"),
    ("infdur", ValueError, "between 0 and 1"),
    ("50 ba", ValueError, "whitespace"),
    (" 50ba", ValueError, "whitespace"),
    ("50ba\n", ValueError, "whitespace"),
    ("30s", ValueError, "wall-clock"),
    ("2h", ValueError, "wall-clock"),
    ("5sec", ValueError, "wall-clock"),
    ("10m", ValueError, "wall-clock"),
    ("3iter", ValueError, "unknown unit"),
    ("5epochs", ValueError, "unknown unit"),
    ("abc", ValueError, "unknown unit"),
    ("5e", ValueError, "unknown unit"),
    ("nanba", ValueError, "NaN"),
    ("1_000ba", ValueError, "time string like"),
    ("1.2.3ba", ValueError, "time string like"),
    ("５０ba", ValueError, "time string like"),
    ("50ba!", ValueError, "time string like"),
    ("0x10ba", ValueError, "time string like"),
    ("1e400ba", ValueError, "too large"),
    # Issue 15: ASCII only, and no value silently rounded.
    ("2e6to\u212a", ValueError, "ASCII"),  # a Kelvin sign, which lower() makes 'k'
    ("1e-400ba", ValueError, "whole number"),
    ("1.0000000000000001ba", ValueError, "whole number"),
    ("1.0000000000000001ep", ValueError, "a float holds as typed"),
    ("0.10000000000000001ep", ValueError, "a float holds as typed"),
    ("1e-400ep", ValueError, "a float holds as typed"),
    ("1.0000000000000001dur", ValueError, "between 0 and 1"),
    ("1e99999999ba", ValueError, "too large"),
    ("1e-99999999ep", ValueError, "a float holds as typed"),
    ("1e309ep", ValueError, "too large"),
    (50, TypeError, "time string like"),
    (1.5, TypeError, "time string like"),
    (None, TypeError, "time string like"),
    (True, TypeError, "time string like"),
    (["50ba"], TypeError, "time string like"),
]


def test_table_has_forty_rows() -> None:
    assert len(VALID) + len(INVALID) >= 40


@pytest.mark.parametrize(("text", "value", "unit", "canonical"), VALID)
def test_valid(text: str, value: float, unit: TimeUnit, canonical: str) -> None:
    t = Time.parse(text)
    assert t.unit is unit
    assert t.value == value
    assert type(t.value) is (int if unit.integral and not math.isinf(value) else float)
    assert str(t) == canonical
    assert Time.parse(str(t)) == t  # round trip


@pytest.mark.parametrize(("text", "error", "fragment"), INVALID)
def test_invalid(text: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        Time.parse(text, name="half_life")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("half_life"), message
    assert fragment in message, message
    if isinstance(text, str) and text:
        assert repr(text) in message  # the input is quoted


def test_parse_passes_time_through() -> None:
    t = Time(3, BA)
    assert Time.parse(t) is t


def test_constructor_validates() -> None:
    assert Time(2.0, "ba") == Time(2, BA)
    with pytest.raises(ValueError, match="whole number"):
        Time(2.5, BA)
    with pytest.raises(ValueError, match="non-negative"):
        Time(-1, EP)
    with pytest.raises(ValueError, match="unit"):
        Time(1, "sec")
    with pytest.raises(TypeError):
        Time("1", BA)  # type: ignore[arg-type]


@given(st.text(max_size=20))
def test_arbitrary_text_parses_or_raises_cleanly(text: str) -> None:
    try:
        t = Time.parse(text, name="x")
    except (ValueError, TypeError) as err:
        assert str(err).startswith("x ")
    else:
        assert isinstance(t, Time)
        assert Time.parse(str(t)) == t


@given(
    st.one_of(
        st.integers(min_value=0, max_value=10**12).map(
            lambda v: (f"{v}", ["ba", "sp", "tok", "ep"])
        ),
        st.floats(min_value=0, max_value=1, allow_nan=False).map(
            lambda v: (repr(v), ["dur", "ep"])
        ),
    ),
    st.data(),
)
def test_generated_valid_strings_round_trip(
    pair: tuple[str, list[str]], data: st.DataObject
) -> None:
    number, units = pair
    unit = data.draw(st.sampled_from(units))
    t = Time.parse(number + unit)
    assert t.value == float(number)
    assert Time.parse(str(t)) == t


@given(st.integers(min_value=0, max_value=10**300), st.sampled_from(["ba", "sp", "tok"]))
def test_integers_are_read_exactly(value: int, unit: str) -> None:
    assert Time.parse(f"{value}{unit}").value == value
    # the same integer in scientific notation, with the digits moved behind the point
    digits = str(value)
    spelled = f"{digits[0]}.{digits[1:]}e{len(digits) - 1}" if len(digits) > 1 else digits
    assert Time.parse(f"{spelled}{unit}").value == value


@given(st.integers(min_value=1, max_value=10**20), st.integers(min_value=1, max_value=40))
def test_a_fraction_is_never_a_whole_number(whole: int, places: int) -> None:
    # whole + 10**-places is not an integer however close it is
    text = f"{whole}.{'0' * (places - 1)}1ba"
    with pytest.raises(ValueError, match="whole number"):
        Time.parse(text)


@given(st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_every_float_spelled_by_repr_is_taken(value: float) -> None:
    assert Time.parse(f"{value!r}ep").value == value
