"""Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) on the real
transformers Trainer: ``trainer.save_model()`` after training and
``EMATrainerCallback.save_ema_model`` write ``save_pretrained`` folders that
``from_pretrained`` loads as the EMA, tied weights tied, checked against a hand-computed EMA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hf_tiny
import pytest
import torch
from hf_tiny import Recorder, reference_ema
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Trainer

from ema_callbacks.files import FileProblem
from ema_callbacks.transformers import EMATrainerCallback, load_ema_state, save_ema_state


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, tie_word_embeddings=True
    )
    return GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 32, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def train(tmp_path: Path, callback: EMATrainerCallback) -> tuple[Trainer, Recorder]:
    recorder = Recorder()
    trainer = Trainer(
        model=tiny_gpt2(),
        args=hf_tiny.args(tmp_path / "run", max_steps=4),
        train_dataset=Tokens(),
        callbacks=[recorder, callback],
    )
    trainer.train()
    return trainer, recorder


def expected_ema(recorder: Recorder) -> dict[str, torch.Tensor]:
    # The model's state dict names both tied keys; the reference averages each (same values).
    return reference_ema(recorder.steps, {k: 1.0 for k in recorder.steps}, half_life=2.0)


def check_loaded(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tied weights tied
    state = loaded.state_dict()
    assert "lm_head.weight" in state
    hf_tiny.assert_close(
        {k: v for k, v in state.items() if k in reference},
        {k: v for k, v in reference.items() if k in state},
    )
    torch.testing.assert_close(
        state["lm_head.weight"].double(), reference["transformer.wte.weight"], rtol=1e-6, atol=1e-7
    )


def test_save_model_after_training_writes_the_ema_tied(tmp_path: Path) -> None:
    trainer, recorder = train(tmp_path, EMATrainerCallback(half_life="2ba"))
    reference = expected_ema(recorder)
    assert not torch.equal(  # the EMA differs from the last training weights
        reference["transformer.wte.weight"].float(), recorder.steps[4]["transformer.wte.weight"]
    )
    trainer.save_model(str(tmp_path / "final"))
    check_loaded(tmp_path / "final", reference)


def test_save_ema_model_keeps_the_training_weights_in_the_model(tmp_path: Path) -> None:
    callback = EMATrainerCallback(half_life="2ba", final_weights="training")
    trainer, recorder = train(tmp_path, callback)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert torch.equal(
        before["transformer.wte.weight"], recorder.steps[4]["transformer.wte.weight"]
    )
    assert callback.save_ema_model(trainer, tmp_path / "ema") == str(tmp_path / "ema")
    check_loaded(tmp_path / "ema", expected_ema(recorder))
    hf_tiny.assert_equal(trainer.model.state_dict(), before)  # training weights back
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight


def test_save_ema_model_refuses_a_checkpoint_folder_and_restores_on_failure(
    tmp_path: Path, monkeypatch: Any
) -> None:
    callback = EMATrainerCallback(half_life="2ba", final_weights="training")
    trainer, _ = train(tmp_path, callback)
    checkpoint = tmp_path / "run" / "checkpoint-4"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="checkpoint folder"):
        callback.save_ema_model(trainer, checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["trainer_state.json"]
    with pytest.raises(TypeError, match="trainer must be the transformers Trainer"):
        callback.save_ema_model(object(), tmp_path / "x")

    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer, "save_model", disk_full)
    with pytest.raises(OSError, match="No space"):
        callback.save_ema_model(trainer, tmp_path / "y")
    hf_tiny.assert_equal(trainer.model.state_dict(), before)  # not left holding the EMA


def test_a_torn_ema_state_is_refused_not_mixed(tmp_path: Path) -> None:
    """A save interrupted between its two renames leaves a new tensors file beside the old
    JSON (or the reverse): the write ids differ and the load names both files."""
    from ema_callbacks.controller import EMAController

    first = EMAController.create(half_life="4ba")
    first.fit_start(torch.nn.Linear(2, 1))
    save_ema_state(first.state_dict(), tmp_path)
    old_json = (tmp_path / "ema_state.json").read_text()
    assert load_ema_state(tmp_path)["config"]["schedule"]["half_life"] == "4ba"
    save_ema_state(first.state_dict(), tmp_path)  # a second save ...
    (tmp_path / "ema_state.json").write_text(old_json)  # ... whose JSON rename never happened
    with pytest.raises(
        FileProblem, match="torn EMA state: ema_state.safetensors and ema_state.json"
    ):
        load_ema_state(tmp_path)
    (tmp_path / "ema_state.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(FileProblem, match="damaged or truncated EMA state file"):
        load_ema_state(tmp_path)
