"""The bundled ``lightning.yaml`` (written out with ``ema-callbacks run lightning
--print-config``) through the real LightningCLI, jsonargparse building the callback from its
type hints, gives the same EMA and the same model as the callback built in Python."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.cli import LightningCLI

from ema_callbacks.cli import main
from ema_callbacks.examples.lightning_digits import DigitsClassifier, DigitsDataModule
from ema_callbacks.lightning import EMACallback
from tests.lightning.lightning_helpers import shadow


def test_lightning_cli_yaml_builds_and_runs_the_callback(tmp_path: Path) -> None:
    config = tmp_path / "lightning.yaml"
    assert main(["run", "lightning", "--print-config", "-o", str(config)]) == 0
    quick = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=8"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        cli = LightningCLI(
            args=["fit", "--config", str(config), *quick, f"--trainer.default_root_dir={tmp_path}"]
        )
        (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EMACallback)]
        assert cb.controller.schedule.describe() == "half_life=50ba"
        assert cb.checkpoint_weights == "ema" and cb.log_metrics is True
        assert cb.controller.num_updates == 7  # 8 steps, the first one initialises the EMA

        seed_everything(0)  # as the file's seed_everything: 0, before the model is built
        model = DigitsClassifier(hidden=32, lr=0.1)
        direct = EMACallback(half_life="50ba")
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=8,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path / "direct",
            callbacks=[direct],
        )
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    a, b = shadow(cb), shadow(direct)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert isinstance(cli.model, DigitsClassifier)
    mine, theirs = cli.model.state_dict(), model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)  # both end on the EMA
