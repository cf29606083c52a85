"""Constructor arguments of every entry point run in this environment (plain EMA, Lightning's
EMACallback, transformers' EMATrainerCallback; Composer's in tests/composer): an odd value is
refused at construction with a ValueError/TypeError naming the parameter as the user typed it,
the value quoted as typed (issue 15)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from ema_callbacks import EMA


def _plain(**kwargs: Any) -> Any:
    return EMA(nn.Linear(2, 2), **kwargs)


def _lightning(**kwargs: Any) -> Any:
    pytest.importorskip("lightning")
    from ema_callbacks.lightning import EMACallback

    return EMACallback(**kwargs)


def _transformers(**kwargs: Any) -> Any:
    pytest.importorskip("transformers")
    from ema_callbacks.transformers import EMATrainerCallback

    return EMATrainerCallback(**kwargs)


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "plain": _plain,
    "lightning": _lightning,
    "transformers": _transformers,
}
entry_points = pytest.mark.parametrize("make", list(ENTRY_POINTS.values()), ids=list(ENTRY_POINTS))


@entry_points
@pytest.mark.parametrize("every", ["0ba", "+0ba", "Infinityba", "-2ba", "1.5ba"])
def test_bad_snapshot_every_is_named_snapshot_every(
    make: Callable[..., Any], every: str, tmp_path: Any
) -> None:
    with pytest.raises(ValueError) as info:
        make(sigma_rel=0.1, snapshot_every=every, snapshot_folder=str(tmp_path))
    assert str(info.value).startswith("snapshot_every "), str(info.value)
    assert repr(every) in str(info.value)


@entry_points
@pytest.mark.parametrize(
    ("option", "typed"),
    [("update_interval", "+0ba"), ("update_interval", "Infinityba"), ("start", "Infinityba")],
)
def test_value_quoted_as_typed(make: Callable[..., Any], option: str, typed: str) -> None:
    with pytest.raises(ValueError) as info:
        make(**{option: typed})
    assert str(info.value).startswith(f"{option} "), str(info.value)
    assert repr(typed) in str(info.value)


@entry_points
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sigma_rel": 1e-160}, "sigma_rel"),
        ({"sigma_rel": [0.1, 1e-300]}, "sigma_rel"),
        ({"device": "meta"}, "device"),
        ({"device": "cuda:99"}, "device"),
        ({"device": "xla"}, "device"),
        ({"dtype": "int64"}, "dtype"),
    ],
)
def test_value_errors_not_overflow_or_assertion(
    make: Callable[..., Any], kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("name", ["ema\n", "..", ".", ".hidden", "-x", "a/b", "e" * 101, "", "ém"])
def test_transformers_callback_name_is_a_safe_file_name_component(name: str) -> None:
    with pytest.raises(ValueError, match=r"^name must be a file-name component"):
        _transformers(name=name)


@pytest.mark.parametrize("name", ["ema", "ema.fast", "EMA_2", "e" * 100])
def test_transformers_callback_names_that_are_safe(name: str) -> None:
    assert _transformers(name=name).name == name


@entry_points
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"warmup": "power", "warmup_gamma": float("inf")}, "warmup_gamma")],
)
def test_silently_accepted_values_refused(
    make: Callable[..., Any], kwargs: dict[str, Any], name: str
) -> None:
    with pytest.raises(ValueError) as info:
        make(**kwargs)
    assert str(info.value).startswith(name), str(info.value)
