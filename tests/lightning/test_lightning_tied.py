"""Tied weights (``head.weight = emb.weight``) on the real Lightning Trainer: the checkpoint's
``state_dict`` holds the EMA under both names, ``load_from_checkpoint`` and strict loads give
it, and a resume continues bit-identically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ema_callbacks.lightning import CHECKPOINT_KEY, EMACallback
from tests.lightning.lightning_helpers import StepRecorder, assert_close, fit, reference_ema

VOCAB, DIM = 13, 4
BETA = 2 ** (-1 / 2)


class TiedLit(LightningModule):
    """A language-model-like module: embedding and output head share one weight."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * self.current_epoch + batch_idx)
        ids = torch.randint(0, VOCAB, (4, 3), generator=g)
        return nn.functional.cross_entropy(self(ids).reshape(-1, VOCAB), ids.reshape(-1))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class Batches:
    def __len__(self) -> int:
        return 4

    def __iter__(self) -> Any:
        return iter([torch.zeros(1)] * 4)


def _fit(callbacks: list[Any], **kwargs: Any) -> tuple[Any, TiedLit]:
    model = TiedLit()
    trainer, _ = fit(callbacks, model=model, data=Batches(), **kwargs)  # type: ignore[arg-type]
    return trainer, model


def _every_step(path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=path, every_n_train_steps=1, save_top_k=-1, filename="{step}")


def test_checkpoint_state_dict_holds_the_ema_under_both_tied_names(tmp_path: Path) -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="2ba")
    _fit([rec, cb, _every_step(tmp_path)], max_steps=4, enable_checkpointing=True)
    path = tmp_path / "step=4.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt[CHECKPOINT_KEY]["state_dict_holds"] == "ema"
    ema = reference_ema([w for _, w in rec.steps], [None] + [BETA] * 3)
    assert_close(ckpt["state_dict"], ema)
    assert torch.equal(ckpt["state_dict"]["head.weight"], ckpt["state_dict"]["emb.weight"])
    state = ckpt["callbacks"][ckpt[CHECKPOINT_KEY]["callback"]]
    assert state["aliases"] == {"head.weight": "emb.weight"}
    assert sorted(state["shadow"]) == ["emb.weight", "mid.bias", "mid.weight"]
    # load_from_checkpoint (strict) gives the EMA under both names, still tied.
    loaded = TiedLit.load_from_checkpoint(path)
    assert loaded.head.weight is loaded.emb.weight
    assert_close(loaded.state_dict(), ema)
    fresh = TiedLit()
    fresh.load_state_dict(ckpt["state_dict"], strict=True)
    assert_close(fresh.state_dict(), ema)


def test_training_weights_slot_during_a_swap_carries_both_names(tmp_path: Path) -> None:
    rec, cb = StepRecorder(), EMACallback(half_life="2ba", checkpoint_weights="training")
    trainer, model = _fit([rec, cb], max_steps=3)
    assert cb.controller.weights_active == "ema"  # the final EMA is in the model
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    ckpt = torch.load(tmp_path / "after.ckpt", map_location="cpu", weights_only=True)
    training = {k: v.double() for k, v in rec.steps[-1][1].items()}
    assert_close(ckpt["state_dict"], training, atol=0)
    ema = reference_ema([w for _, w in rec.steps], [None] + [BETA] * 2)
    assert_close(model.state_dict(), ema)  # both names of the model left after fit


def test_resume_from_a_tied_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    full = EMACallback(half_life="2ba", final_weights="training")
    _, model_full = _fit([full], max_steps=6)
    first = EMACallback(half_life="2ba", final_weights="training")
    _fit([first, _every_step(tmp_path)], max_steps=3, enable_checkpointing=True)
    resumed = EMACallback(half_life="2ba", final_weights="training")
    _, model_resumed = _fit([resumed], max_steps=6, ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert model_resumed.head.weight is model_resumed.emb.weight
    for name, value in model_full.state_dict().items():
        assert torch.equal(model_resumed.state_dict()[name], value), name
    assert full.controller.weights is not None and resumed.controller.weights is not None
    for name, value in full.controller.weights.state_dict().items():
        assert torch.equal(resumed.controller.weights.state_dict()[name], value), name
