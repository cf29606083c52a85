"""Composer-style time strings: ``'50ba'``, ``'1ep'``, ``'0.25ep'``, ``'2e6tok'``, ``'0.1dur'``.

Pure Python: nothing here imports torch, so a YAML config can be validated on a machine
without it.

Units (case-insensitive):

=======  ==========================================================================
``ba``   optimizer steps (batches after gradient accumulation); integer
``ep``   epochs; fractions allowed (``'0.25ep'``)
``sp``   samples; integer
``tok``  tokens; integer
``dur``  fraction of the planned run, between 0 and 1
=======  ==========================================================================

The value is a plain decimal number in ASCII, optionally in scientific notation
(``'3e4tok'``), or ``inf``. It is read exactly, never through a float: ``'9007199254740993ba'``
is that integer, and ``'1.0000000000000001ba'`` or ``'1e-400ba'`` are not whole numbers. A
fractional ``ep``/``dur`` value must be one a float holds as typed, that is the float's exact
value or the shortest decimal Python prints for it (``'0.1ep'``, ``'0.333ep'``), so
``str(Time.parse(s))`` means what ``s`` means; ``'1.0000000000000001ep'`` (a float rounds it
to 1) and ``'1e-400ep'`` (below every float) are refused rather than rounded; 15 significant
digits always fit.
Rejected, each with a ``ValueError`` that names the parameter and quotes the input: an empty,
non-numeric or non-ASCII value (``'2e6to\\u212a'``, a Kelvin sign), a negative value, NaN,
whitespace anywhere, an unknown unit, a wall-clock unit (``'30s'``, ``'2h'``: the EMA follows
training progress, not the clock), a non-integer ``ba``/``sp``/``tok``, a value beyond the
float range and a ``dur`` above 1. A value of the wrong type (a number,
``None``) raises ``TypeError``.

>>> t = Time.parse('3e4tok')
>>> t.value, t.unit
(30000, <TimeUnit.TOKEN: 'tok'>)
>>> str(t)
'30000tok'
>>> Time.parse(str(Time.parse('0.25EP'))) == Time.parse('0.25ep')
True
>>> Time.parse('9007199254740993ba').value
9007199254740993
>>> Time.parse('1.0000000000000001ba', 'half_life')
Traceback (most recent call last):
...
ValueError: half_life in 'ba' must be a whole number; got '1.0000000000000001ba'
"""

from __future__ import annotations

import enum
import math
import re
import sys
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Time",
    "TimeUnit",
]


class TimeUnit(str, enum.Enum):
    """A unit of training progress.

    >>> TimeUnit('ba') is TimeUnit.BATCH
    True
    """

    BATCH = "ba"
    EPOCH = "ep"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"

    def __str__(self) -> str:
        return self.value

    @property
    def integral(self) -> bool:
        """Whether values in this unit are whole numbers (``ba``, ``sp``, ``tok``)."""
        return self in (TimeUnit.BATCH, TimeUnit.SAMPLE, TimeUnit.TOKEN)


_UNITS = {u.value: u for u in TimeUnit}
_WALL_CLOCK = ("sec", "s", "ms", "m", "min", "h", "hr", "d")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf(?:inity)?")
_SPLIT = re.compile(r"(?P<number>[+-]?(?:inf(?:inity)?|[^a-z]*(?:e[+-]?[0-9]+)?))(?P<unit>[a-z]*)")
_EXAMPLE = "a time string like '1000ba', '1ep', '0.25ep', '2e6tok' or '0.1dur'"
_DECIMAL = re.compile(r"(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?:e(?P<exp>[+-]?[0-9]+))?")
_MAX_DIGITS = 800  # every float's exact decimal expansion has fewer significant digits


class _OutOfRange(Exception):
    """A decimal beyond every float: ``large``, or positive but too small or too finely
    spelled to be a whole number or a float."""

    def __init__(self, large: bool) -> None:
        super().__init__()
        self.large = large


def _exact_value(number: str) -> Fraction:
    """The exact value of a plain decimal ``number`` (``'2.5e3'``), computed without floats.

    Raises :class:`_OutOfRange` before building any big integer, so ``'1e999999999'`` costs
    nothing.
    """
    match = _DECIMAL.fullmatch(number)
    assert match is not None  # _NUMBER matched already
    frac = match.group("frac") or ""
    digits = ((match.group("int") or "") + frac).lstrip("0")
    if not digits:
        return Fraction(0)
    exp_text = (match.group("exp") or "0").lstrip("+")
    if len(exp_text.lstrip("-")) > 6:
        raise _OutOfRange(large=not exp_text.startswith("-"))
    significant = digits.rstrip("0")
    shift = int(exp_text) - len(frac) + (len(digits) - len(significant))
    order = len(significant) + shift  # 10 ** (order - 1) <= value < 10 ** order
    if order > 310:
        raise _OutOfRange(large=True)
    if order < -330 or len(significant) > _MAX_DIGITS:
        raise _OutOfRange(large=False)
    return Fraction(int(significant)) * Fraction(10) ** shift


def _float_spelled(exact: Fraction) -> float | None:
    """The float that ``exact`` spells: the float equal to it, or the one whose shortest
    decimal (``repr``) it is; ``None`` if there is none (too many digits, underflow)."""
    value = float(exact)
    if Fraction(value) == exact or Fraction(repr(value)) == exact:
        return value
    return None


@dataclass(frozen=True)
class Time:
    """An amount of training progress: a non-negative ``value`` in a ``unit``.

    Build one with :meth:`Time.parse`. ``value`` is an ``int`` for the integral units
    (``ba``, ``sp``, ``tok``) unless it is infinite, a ``float`` otherwise.

    >>> Time.parse('50ba')
    Time(value=50, unit=<TimeUnit.BATCH: 'ba'>)
    >>> Time.parse('infba').is_infinite
    True
    >>> Time(0.5, TimeUnit.DURATION)
    Time(value=0.5, unit=<TimeUnit.DURATION: 'dur'>)
    """

    value: float
    unit: TimeUnit

    def __post_init__(self) -> None:
        unit = self.unit
        if not isinstance(unit, TimeUnit):
            if isinstance(unit, str) and unit.lower() in _UNITS:
                unit = _UNITS[unit.lower()]
                object.__setattr__(self, "unit", unit)
            else:
                raise ValueError(f"Time unit must be one of {sorted(_UNITS)}; got {self.unit!r}")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Time value must be a number; got {value!r}")
        if isinstance(value, int) and value > sys.float_info.max:
            raise ValueError(f"Time value is too large to represent; got {value!r}")
        if math.isnan(value) or value < 0:
            raise ValueError(f"Time value must be a non-negative number; got {value!r}")
        if unit.integral and not math.isinf(value):
            if value != int(value):
                raise ValueError(
                    f"Time value in '{unit.value}' must be a whole number; got {value!r}"
                )
            value = int(value)
        elif not unit.integral:
            value = float(value)
        if unit is TimeUnit.DURATION and value > 1:
            raise ValueError(f"Time value in 'dur' must be between 0 and 1; got {value!r}")
        object.__setattr__(self, "value", value)

    @classmethod
    def parse(cls, text: Time | str, name: str = "time") -> Time:
        """Parse ``text`` (or return it unchanged if it is already a :class:`Time`).

        ``name`` is the parameter the value came from; every error message names it.

        >>> Time.parse('1.5EP')
        Time(value=1.5, unit=<TimeUnit.EPOCH: 'ep'>)
        >>> Time.parse('-3ba', name='half_life')
        Traceback (most recent call last):
        ...
        ValueError: half_life must not be negative; got '-3ba'
        """
        if isinstance(text, Time):
            return text
        if not isinstance(text, str):
            raise TypeError(f"{name} must be {_EXAMPLE}; got {text!r} ({type(text).__name__})")
        if text == "":
            raise ValueError(f"{name} must be {_EXAMPLE}; got an empty string")
        if any(ch.isspace() for ch in text):
            raise ValueError(f"{name} must not contain whitespace; got {text!r}")
        if not text.isascii():
            raise ValueError(f"{name} must be {_EXAMPLE}, in ASCII characters; got {text!r}")
        lower = text.lower()
        if lower.lstrip("+-").startswith("nan"):
            raise ValueError(f"{name} must be a number, not NaN; got {text!r}")
        match = _SPLIT.fullmatch(lower)
        if match is None:
            raise ValueError(f"{name} must be {_EXAMPLE}; got {text!r}")
        number, unit_text = match.group("number"), match.group("unit").lower()
        if unit_text == "":
            raise ValueError(
                f"{name} needs a unit (one of 'ba', 'ep', 'sp', 'tok', 'dur'); got {text!r}"
            )
        if unit_text in _WALL_CLOCK:
            raise ValueError(
                f"{name} must measure training progress ('ba', 'ep', 'sp', 'tok', 'dur'), "
                f"not wall-clock time; got {text!r}"
            )
        if unit_text not in _UNITS:
            raise ValueError(
                f"{name} has an unknown unit {unit_text!r} (expected one of 'ba', 'ep', 'sp', "
                f"'tok', 'dur'); got {text!r}"
            )
        if number.startswith("-"):
            raise ValueError(f"{name} must not be negative; got {text!r}")
        if number.startswith("+"):
            number = number[1:]
        if number == "":
            raise ValueError(f"{name} needs a number before the unit; got {text!r}")
        if not _NUMBER.fullmatch(number):
            raise ValueError(f"{name} must be {_EXAMPLE}; got {text!r}")
        unit = _UNITS[unit_text]
        if number.startswith("inf"):
            if unit is TimeUnit.DURATION:
                raise ValueError(f"{name} in 'dur' must be between 0 and 1; got {text!r}")
            return cls(math.inf, unit)
        inexact = (
            f"{name} must be a number a float holds as typed (a float would round it; 15 "
            f"significant digits always fit); got {text!r}"
        )
        try:
            exact = _exact_value(number)
        except _OutOfRange as err:
            if err.large:
                raise ValueError(f"{name} is too large to represent; got {text!r}") from None
            if unit.integral:
                raise ValueError(
                    f"{name} in '{unit.value}' must be a whole number; got {text!r}"
                ) from None
            raise ValueError(inexact) from None
        if exact > sys.float_info.max:
            raise ValueError(f"{name} is too large to represent; got {text!r}")
        if unit.integral:
            if exact.denominator != 1:
                raise ValueError(f"{name} in '{unit.value}' must be a whole number; got {text!r}")
            return cls(int(exact), unit)
        if unit is TimeUnit.DURATION and exact > 1:
            raise ValueError(f"{name} in 'dur' must be between 0 and 1; got {text!r}")
        value = _float_spelled(exact)
        if value is None:
            raise ValueError(inexact)
        return cls(value, unit)

    @property
    def is_infinite(self) -> bool:
        """Whether the value is infinite (``'infba'``)."""
        return math.isinf(self.value)

    def __str__(self) -> str:
        value = self.value
        if math.isinf(value):
            text = "inf"
        elif isinstance(value, int) or float(value).is_integer():
            text = str(int(value))
        else:
            text = repr(float(value))
        return f"{text}{self.unit.value}"
