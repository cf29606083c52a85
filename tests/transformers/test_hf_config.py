"""configs/transformers.yaml builds and trains, and its EMA is the reference EMA."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
import yaml
from hf_tiny import Recorder, assert_close, reference_ema, shadow

from ema_callbacks.transformers import EMATrainerCallback, load_ema_state

CONFIG = Path(__file__).parents[2] / "configs" / "transformers.yaml"


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, num_samples: int, seq_len: int, seed: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (num_samples, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_yaml_config_runs(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**cfg["model"]["config"])
    model = getattr(transformers, cfg["model"]["architecture"])(config)
    data = RandomTokens(vocab=config.vocab_size, **cfg["data"])
    args = transformers.TrainingArguments(**{**cfg["trainer_args"], "output_dir": str(tmp_path)})
    rec, ema = Recorder(), EMATrainerCallback(**cfg["callback"])
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=RandomTokens(8, 16, 1, config.vocab_size),
        callbacks=[rec, ema],
    )
    trainer.train()
    # 48 samples, batch 8, accumulation 2: 3 steps of 256 tokens per epoch, 6 in all
    assert rec.tokens == {k: 256 * k for k in range(1, 7)}
    expected = reference_ema(rec.steps, {k: 256 for k in rec.steps}, 1000.0)
    expected = {k: v for k, v in expected.items() if k in shadow(ema)}
    assert_close(shadow(ema), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert_close(load_ema_state(tmp_path / "checkpoint-6")["shadow"], expected)
