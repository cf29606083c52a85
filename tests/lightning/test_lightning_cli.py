"""``configs/lightning.yaml`` through the real LightningCLI (jsonargparse builds the callback
from its type hints) gives the same EMA as the callback built in Python."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from ema_callbacks.lightning import EMACallback
from tests.lightning.lightning_helpers import fit, shadow
from tests.lightning.lightning_tiny import TinyData, TinyRegression

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lightning.yaml"


def test_lightning_cli_yaml_builds_and_runs_the_callback(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        cli = LightningCLI(
            args=[
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.max_epochs=1",
                f"--trainer.default_root_dir={tmp_path}",
            ],
        )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
    assert cb.controller.schedule.describe() == "half_life=50ba"
    assert cb.checkpoint_weights == "ema" and cb.log_metrics is True
    assert cb.controller.num_updates == 7

    direct = EMACallback(half_life="50ba")
    _, model = fit([direct], data=TinyData(8, 4), max_epochs=1, logger=CSVLogger(tmp_path))
    a, b = shadow(cb), shadow(direct)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert isinstance(cli.model, TinyRegression)
    assert torch.equal(cli.model.flat(), model.flat())  # both end on the EMA
