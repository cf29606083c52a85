"""Odd inputs to the plain API and the core: each refused with a ValueError/TypeError that
names the parameter the user typed and quotes the value as typed (issue 15)."""

from __future__ import annotations

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
