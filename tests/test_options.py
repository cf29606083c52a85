"""The shared options: one table, every entry point's signature and docs agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from ema_callbacks.controller import EMAController
from ema_callbacks.ema import EMA
from ema_callbacks.options import OPTIONS, markdown, signature_differences, yaml_reference

ROOT = Path(__file__).resolve().parents[1]
NOT_IN_THE_PLAIN_LOOP = (
    "final_weights",
    "eval_with_ema",
    "eval_all",
    "train_with_ema_weights",
    "update_bn_batches",  # ema.update_bn(loader) instead
    "fused_optimizer",  # ema.fused_step(optimizer) instead
)


def test_plain_ema_and_controller_take_every_option() -> None:
    assert signature_differences(EMA, absent=NOT_IN_THE_PLAIN_LOOP) == []
    assert (
        signature_differences(EMAController.create, absent=("snapshot_folder", "fused_optimizer"))
        == []
    )


def test_lightning_callback_takes_every_option() -> None:
    pytest.importorskip("lightning")
    from ema_callbacks.lightning import EMACallback

    assert signature_differences(EMACallback) == []


def test_transformers_callback_takes_every_option() -> None:
    pytest.importorskip("transformers")
    from ema_callbacks.transformers import EMATrainerCallback

    assert signature_differences(EMATrainerCallback) == []
    # trainer_state.json keeps every option by name, and the Trainer rebuilds the callback
    # from it (TrainerCallback state: cls(**args)).
    cb = EMATrainerCallback(ema_power=0.6, update_interval="2ba", stream=False)
    args = cb.state()["args"]
    assert set(OPTIONS) <= set(args)
    again = EMATrainerCallback(**args)
    assert again.state() == cb.state()
    assert again.controller.schedule.kind == "bema"


def test_every_option_is_documented_in_every_docstring() -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from ema_callbacks.lightning import EMACallback
    from ema_callbacks.transformers import EMATrainerCallback

    for obj, absent in (
        (EMA, NOT_IN_THE_PLAIN_LOOP),
        (EMACallback, ()),
        (EMATrainerCallback, ()),
    ):
        doc = inspect.getdoc(obj) or ""
        args = doc.split("Args:", 1)[1]
        for name in OPTIONS:
            if name not in absent:
                assert f"\n    {name}: " in args, (obj.__name__, name)


def test_docs_options_md_is_generated_from_the_table() -> None:
    assert (ROOT / "docs" / "options.md").read_text() == markdown()
    yaml_file = ROOT / "ema_callbacks" / "configs" / "ema_options.yaml"
    assert yaml_file.read_text() == yaml_reference()


def test_lightning_cli_sees_the_options_with_their_defaults_and_help() -> None:
    pytest.importorskip("lightning")
    jsonargparse = pytest.importorskip("jsonargparse")
    from ema_callbacks.lightning import EMACallback

    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(EMACallback, "ema")
    help_text = parser.format_help()
    for name in OPTIONS:
        assert f"--ema.{name}" in help_text, name
    assert "BEMA, the bias-corrected EMA" in help_text
    config = parser.parse_args(["--ema.ema_power=0.6", "--ema.update_bn_batches=3"])
    assert config.ema.buffers == "average"  # the default is there, as in --print_config
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)
    cb = instantiate(config).ema
    assert cb.controller.schedule.kind == "bema"
    assert cb.controller.update_bn_batches == 3
