"""The bundled ``transformers`` run config (a tiny GPT-2, a token half-life) runs through
``ema_callbacks.run_config`` as ``ema-callbacks run transformers`` does, and its EMA is the
reference EMA: in the callback, in the last checkpoint and in the exported EMA weights."""

from __future__ import annotations

from pathlib import Path

import yaml
from hf_tiny import Recorder, assert_close, reference_ema, shadow
from safetensors.torch import load_file

from ema_callbacks.run_config import bundled_configs, load_config, train
from ema_callbacks.transformers import EMATrainerCallback, load_ema_state

CONFIG = bundled_configs()["transformers"]


def test_yaml_config_runs(tmp_path: Path) -> None:
    (ema_entry,) = yaml.safe_load(CONFIG.read_text())["callbacks"]
    # a recorder of the training weights before the EMA callback (as hf_tiny.Recorder needs)
    config = load_config(
        "transformers", {"callbacks": [{"class_path": "hf_tiny.Recorder"}, ema_entry]}
    )
    result = train(config, tmp_path)
    callbacks = result.trainer.callback_handler.callbacks
    (rec,) = [c for c in callbacks if isinstance(c, Recorder)]
    (ema,) = [c for c in callbacks if isinstance(c, EMATrainerCallback)]
    # 48 samples, batch 8, accumulation 2: 3 steps of 256 tokens per epoch, 6 in all
    assert rec.tokens == {k: 256 * k for k in range(1, 7)}
    expected = reference_ema(rec.steps, {k: 256 for k in rec.steps}, 1000.0)
    expected = {k: v for k, v in expected.items() if k in shadow(ema)}
    assert_close(shadow(ema), expected)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (result.checkpoints, result.last_checkpoint) == (tmp_path, tmp_path / "checkpoint-6")
    assert_close(load_ema_state(tmp_path / "checkpoint-6")["shadow"], expected)
    exported = load_file(result.ema_weights)
    assert_close({k: exported[k] for k in expected}, expected)
    # the tied output layer is written under its own name too
    assert_close(
        {"lm_head.weight": exported["lm_head.weight"]},
        {"lm_head.weight": expected["transformer.wte.weight"]},
    )
    assert result.metrics["ema/num_updates"] == 5  # 6 steps, the first one initialises the EMA
    assert "eval_loss" in result.metrics
