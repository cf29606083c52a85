"""``export`` output that loads where users load it: ``--strip-prefix`` for the module inside a
LightningModule (strict loads), ``--format hf`` for ``from_pretrained``, every name of a tied
tensor carrying the EMA, and the same keys from ``export`` and ``posthoc`` for one run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ema_callbacks import EMA
from ema_callbacks.cli import main

VOCAB, DIM = 13, 4


class Inner(nn.Module):
    """The model a user deploys: an embedding and an output head sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.norm = nn.BatchNorm1d(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(ids).mean(1)))


def _lightning_module() -> Any:
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch import LightningModule

    class Wrapped(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = Inner()
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(VOCAB))  # a buffer outside

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            g = torch.Generator().manual_seed(batch_idx)
            ids = torch.randint(0, VOCAB, (4, 3), generator=g)
            return self.criterion(self.model(ids), ids[:, 0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self) -> Any:
            return [0] * 4

    return Wrapped()


def test_lightning_strip_prefix_gives_the_inner_module(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _lightning_module()
    from lightning.pytorch import Trainer

    from ema_callbacks.lightning import EMACallback

    callback = EMACallback(half_life="2ba", final_weights="training")
    trainer = Trainer(
        max_steps=4,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    capsys.readouterr()
    out = tmp_path / "inner.safetensors"
    argv = ["export", str(tmp_path / "last.ckpt"), "-o", str(out), "--strip-prefix", "model."]
    assert main(argv) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert printed["left_out"] == "1"  # criterion.weight
    exported = load_file(out)
    inner = Inner()
    inner.load_state_dict(exported, strict=True)
    weights = callback.controller.weights
    assert weights is not None
    ema = weights.state_dict()
    assert torch.equal(exported["emb.weight"], ema["model.emb.weight"])
    assert torch.equal(exported["head.weight"], ema["model.emb.weight"])  # the tied name too
    assert not torch.equal(exported["emb.weight"], module.model.emb.weight.detach())
    # without the prefix: the LightningModule's own keys, strict too
    assert (
        main(["export", str(tmp_path / "last.ckpt"), "-o", str(tmp_path / "all.safetensors")]) == 0
    )
    _lightning_module().load_state_dict(load_file(tmp_path / "all.safetensors"), strict=True)


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=True
    )
    return GPT2LMHeadModel(config)


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def test_transformers_tied_gpt2_safetensors_and_hf_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers.trainer")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from ema_callbacks.transformers import EMATrainerCallback

    model = _tiny_gpt2()
    callback = EMATrainerCallback(half_life="2ba", final_weights="training")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=0.05,
        save_strategy="steps",
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback]).train()
    folder = tmp_path / "run" / "checkpoint-4"
    weights = callback.controller.weights
    assert weights is not None
    ema = weights.state_dict()
    wte = ema["transformer.wte.weight"]
    assert not torch.equal(wte, model.transformer.wte.weight.detach())

    out = tmp_path / "ema.safetensors"
    assert main(["export", str(folder), "-o", str(out)]) == 0
    exported = load_file(out)
    assert torch.equal(exported["lm_head.weight"], wte)  # the tied name HF's file leaves out
    _tiny_gpt2().load_state_dict(exported, strict=True)

    hf = tmp_path / "ema_model"
    assert main(["export", str(folder), "--format", "hf", "-o", str(hf)]) == 0
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert not (hf / "optimizer.pt").exists() and not (hf / "trainer_state.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(hf)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied weights tied
    for name, value in loaded.state_dict().items():
        tracked = weights.aliases.get(name, name)
        if tracked in ema:
            assert torch.equal(value, ema[tracked].to(value.dtype)), name
    # an existing folder is not replaced without --force; the input folder never
    assert main(["export", str(folder), "--format", "hf", "-o", str(hf)]) == 2
    assert main(["export", str(folder), "--format", "hf", "-o", str(hf), "--force"]) == 0
    for inside in (folder, folder / "sub"):
        assert main(["export", str(folder), "--format", "hf", "-o", str(inside), "--force"]) == 2

    # --force is all or nothing: a failure leaves the old folder as it was, byte for byte; a
    # success keeps the user's other files (a model card) and drops old weight shards.
    (hf / "README.md").write_text("model card")
    (hf / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (hf / "config.json").write_text((hf / "config.json").read_text().replace("gpt2", "gpt2 "))
    before = {p.name: p.read_bytes() for p in hf.iterdir()}

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr("ema_callbacks.export.write_safetensors", disk_full)
        assert main(["export", str(folder), "--format", "hf", "-o", str(hf), "--force"]) == 1
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert sorted(p.name for p in hf.parent.iterdir() if p.name.startswith(".")) == []
    assert main(["export", str(folder), "--format", "hf", "-o", str(hf), "--force"]) == 0
    assert (hf / "README.md").read_text() == "model card"
    assert not (hf / "model-00001-of-00002.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(hf)


def test_export_and_posthoc_give_the_same_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.DataParallel(Inner())  # a wrapper adds 'module.'
    ema = EMA(
        model, sigma_rel=[0.05, 0.10], snapshot_every="2ba", snapshot_folder=str(tmp_path / "snaps")
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(6):
        ids = torch.randint(0, VOCAB, (4, 3), generator=torch.Generator().manual_seed(step))
        nn.functional.cross_entropy(model(ids), ids[:, 0]).backward()
        opt.step()
        opt.zero_grad()
        ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    assert main(["export", str(tmp_path / "ema.pt"), "-o", str(tmp_path / "e.safetensors")]) == 0
    assert (
        main(
            [
                "posthoc",
                str(tmp_path / "snaps"),
                "--sigma-rel",
                "0.07",
                "-o",
                str(tmp_path / "p.safetensors"),
            ]
        )
        == 0
    )
    exported, rebuilt = load_file(tmp_path / "e.safetensors"), load_file(tmp_path / "p.safetensors")
    assert set(exported) == set(rebuilt)
    Inner().load_state_dict(exported, strict=True)
    Inner().load_state_dict(rebuilt, strict=True)
