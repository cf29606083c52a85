"""The Lightning adapter where only the old ``pytorch_lightning`` package can be imported.

Run by ``test_lightning_pl_only.py`` in a fresh interpreter: ``lightning`` is made unimportable
before ``ema_callbacks.lightning`` is imported, so the adapter takes its ``pytorch_lightning``
branch (its base class and helpers). Then, on ``pytorch_lightning``'s own Trainer: a run that
crashes mid-epoch and resumes from its last checkpoint ends bit-identical to an uninterrupted
one (training weights and both EMAs), and a validation evaluates every EMA under its prefix.
Prints ``ok`` when every check passed.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # not when pytest imports this file for its doctests
    for _name in ("lightning", "lightning.pytorch", "lightning.pytorch.callbacks"):
        sys.modules[_name] = None  # type: ignore[assignment]  # importing these raises ImportError

import pytorch_lightning as pl
import torch
from torch import nn

from ema_callbacks.lightning import EMACallback

PROFILES = [{"name": "fast", "half_life": "2ba"}, {"name": "slow", "half_life": "6ba"}]
QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": 2,
    "num_sanity_val_steps": 0,
}


def batch(epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(epoch * 10_007 + index)
    x = torch.randn(4, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class Batches:
    def __init__(self, n: int, epoch: int | None = None) -> None:
        self.n, self.epoch = n, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        return iter([batch(999 if self.epoch is None else self.epoch, i) for i in range(self.n)])


class Tiny(pl.LightningModule):
    def __init__(self, crash_at_step: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.crash_at_step = crash_at_step

    def training_step(self, b: Any, batch_idx: int) -> torch.Tensor:
        if self.crash_at_step is not None and self.global_step >= self.crash_at_step:
            raise RuntimeError("crash")
        x, y = batch(self.current_epoch, batch_idx)  # the same data whatever the loader did
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, b: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self.net(b[0]), b[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def flat(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).float() for t in self.state_dict().values()])


def fit(
    cb: EMACallback, model: Tiny, extra: tuple[Any, ...] = (), ckpt_path: str | None = None
) -> pl.Trainer:
    trainer = pl.Trainer(
        callbacks=[cb, *extra], limit_val_batches=0, enable_checkpointing=bool(extra), **QUIET
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, Batches(4), ckpt_path=ckpt_path)
    return trainer


def shadows(cb: EMACallback) -> list[torch.Tensor]:
    return [
        t.clone()
        for p in cb.controller.profiles
        for t in (p.weights.state_dict().values() if p.weights is not None else ())
    ]


def main() -> None:
    assert "lightning" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}
    assert isinstance(EMACallback(half_life="2ba"), pl.Callback)
    assert EMACallback.__mro__[1] is pl.Callback  # the old package's own class, no blend

    options = {"profiles": PROFILES, "final_weights": "training"}
    full_cb, full = EMACallback(**options), Tiny()
    fit(full_cb, full)

    folder = Path(tempfile.mkdtemp())
    every = pl.callbacks.ModelCheckpoint(
        dirpath=folder, every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    crashed = EMACallback(**options)
    try:
        fit(crashed, Tiny(crash_at_step=3), (every,))
        raise AssertionError("the crashing run did not crash")
    except RuntimeError as err:
        assert str(err) == "crash", err
    resumed_cb, resumed = EMACallback(**options), Tiny()
    fit(resumed_cb, resumed, ckpt_path=str(folder / "step=3.ckpt"))
    assert torch.equal(resumed.flat(), full.flat())
    a, b = shadows(resumed_cb), shadows(full_cb)
    assert len(a) == len(b) > 0 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert resumed_cb.controller.num_updates == full_cb.controller.num_updates > 0

    # Several EMAs evaluated: the training weights under the plain name, each EMA prefixed.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(callbacks=[resumed_cb], **QUIET)
        (metrics,) = trainer.validate(resumed, Batches(2), verbose=False)
    assert sorted(metrics) == ["fast/val_loss", "slow/val_loss", "val_loss"], metrics
    assert len({round(v, 8) for v in metrics.values()}) == 3, metrics
    assert torch.equal(resumed.flat(), full.flat())  # training weights back after validate
    print("ok")


if __name__ == "__main__":
    main()
