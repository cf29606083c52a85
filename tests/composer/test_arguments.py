"""Constructor validation, and the units Composer's timestamp counts (sp, tok, dur, fractional
epochs), each checked against an equivalent run in batches."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from composer import Trainer
from composer.core import DataSpec
from composer_runs import EMA, ComposerEMA, make_loader, make_model, run

pytestmark = [pytest.mark.composer]


def test_signature_starts_with_composers_arguments_and_defaults() -> None:
    ours = inspect.signature(EMA).parameters
    theirs = inspect.signature(ComposerEMA).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for name, param in theirs.items():
        assert ours[name].default == param.default, name
    assert ours["train_with_ema_weights"].default is False


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (
            {"half_life": "1000ba", "smoothing": 0.99},
            ValueError,
            ["half_life", "smoothing", "0.99"],
        ),
        ({"half_life": "5ba", "sigma_rel": 0.1}, ValueError, ["half_life", "sigma_rel"]),
        ({"half_life": None}, ValueError, ["half_life", "smoothing"]),
        ({"half_life": "-3ba"}, ValueError, ["half_life", "'-3ba'"]),
        ({"half_life": "1.5ba"}, ValueError, ["half_life", "'1.5ba'"]),
        ({"half_life": "10s"}, ValueError, ["half_life", "'10s'"]),
        ({"half_life": 10}, TypeError, ["half_life", "10"]),
        ({"smoothing": 1.5}, ValueError, ["smoothing", "1.5"]),
        ({"smoothing": "0.9"}, TypeError, ["smoothing", "'0.9'"]),
        ({"ema_start": "abc"}, ValueError, ["ema_start", "'abc'"]),
        ({"ema_start": 5}, TypeError, ["ema_start", "5"]),
        ({"update_interval": "0ba"}, ValueError, ["update_interval", "'0ba'"]),
        ({"update_interval": 2}, TypeError, ["update_interval", "2"]),
        ({"train_with_ema_weights": "yes"}, TypeError, ["train_with_ema_weights", "'yes'"]),
        ({"buffers": "mean"}, ValueError, ["buffers", "'mean'"]),
        ({"dtype": "int8"}, ValueError, ["dtype", "'int8'"]),
        ({"final_weights": "best"}, ValueError, ["final_weights", "'best'"]),
        ({"warmup": "linear"}, ValueError, ["warmup", "'linear'"]),
        ({"nonfinite": "raise"}, ValueError, ["nonfinite", "'raise'"]),
        # Issue 15: these were OverflowError, accepted-then-NotImplementedError, AssertionError
        # and RuntimeError.
        ({"sigma_rel": 1e-160}, ValueError, ["sigma_rel", "1e-160"]),
        ({"dtype": torch.int64}, ValueError, ["dtype", "torch.int64"]),
        ({"dtype": torch.bool}, ValueError, ["dtype", "torch.bool"]),
        ({"device": "meta"}, ValueError, ["device", "'meta'"]),
        ({"device": "cuda:99"}, ValueError, ["device", "'cuda:99'"]),
        ({"device": "xla"}, ValueError, ["device", "'xla'"]),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        EMA(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_composer_crashes_where_we_do_not() -> None:
    with pytest.raises(AttributeError):
        ComposerEMA(half_life=None, smoothing=0.99)
    assert EMA(half_life=None, smoothing=0.99).controller.schedule.smoothing == 0.99
    assert EMA(smoothing=0.99).controller.schedule.smoothing == 0.99


def test_half_life_zero_follows_the_model() -> None:
    # Composer: ZeroDivisionError at construction. Ours: the EMA equals the weights.
    with pytest.raises(ZeroDivisionError):
        ComposerEMA(half_life="0ba")
    _, rec = run(EMA(half_life="0ba"), "4ba", eval_interval=None)
    for ema, training in zip(rec.ema, rec.training, strict=True):
        assert ema is not None and all(torch.equal(ema[k], training[k]) for k in ema)


def final_ema(algo: EMA, **kw: Any) -> dict[str, torch.Tensor]:
    _, rec = run(algo, "12ba", eval_interval=None, **kw)
    assert rec.ema[-1] is not None
    return rec.ema[-1]


@pytest.fixture(scope="module")
def batches_reference() -> dict[str, torch.Tensor]:
    return final_ema(EMA(half_life="10ba"))


def test_sample_half_life(batches_reference: dict[str, torch.Tensor]) -> None:
    # 8 samples per batch: 80 samples is 10 batches, exactly (2 ** (-8/80) == 2 ** (-1/10)).
    ema = final_ema(EMA(half_life="80sp"))
    assert all(torch.equal(ema[k], batches_reference[k]) for k in ema)


def test_fractional_epoch_half_life(batches_reference: dict[str, torch.Tensor]) -> None:
    # 4 batches per epoch: '2.5ep' is 10 batches; the epoch clock is batch_in_epoch / 4.
    ema = final_ema(EMA(half_life="2.5ep", update_interval="1ba"))
    assert all(torch.allclose(ema[k], batches_reference[k], rtol=1e-6, atol=1e-7) for k in ema)
    different = final_ema(EMA(half_life="2.5ep"))  # default interval: once per epoch
    assert not torch.allclose(different["0.weight"], batches_reference["0.weight"])


def test_duration_half_life(batches_reference: dict[str, torch.Tensor]) -> None:
    # max_duration 12ba: '0.8333...dur' would be 10 batches; use 0.5dur = 6ba for exactness.
    reference = final_ema(EMA(half_life="6ba"))
    ema = final_ema(EMA(half_life="0.5dur"))
    assert all(torch.allclose(ema[k], reference[k], rtol=1e-6, atol=1e-7) for k in ema)


def test_token_half_life(batches_reference: dict[str, torch.Tensor]) -> None:
    model = make_model(0)
    spec = DataSpec(make_loader(0), get_num_tokens_in_batch=lambda batch: 5 * len(batch[0]))
    algo = EMA(half_life="400tok")
    trainer = Trainer(
        model=model,
        train_dataloader=spec,
        max_duration="12ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
        algorithms=[algo],
        device="cpu",
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    assert int(trainer.state.timestamp.token) == 12 * 40
    ema = {k: v for k, v in algo.controller.weights.state_dict().items() if v.is_floating_point()}
    assert all(torch.equal(ema[k], batches_reference[k]) for k in ema)


def test_tokens_not_counted_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="counts tokens.*get_num_tokens_in_batch"):
        run(EMA(half_life="400tok"), "2ba", eval_interval=None)


def test_yaml_config_builds_the_documented_ema() -> None:
    import pathlib

    import yaml

    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "composer_ema.yaml"
    options = yaml.safe_load(path.read_text())["algorithms"]["ema"]
    ema = EMA(**options)
    assert ema.controller.schedule.config()["half_life"] == "50ba"
    assert ema.controller.final_weights == "ema"


def test_train_with_ema_weights_trains_on_the_average() -> None:
    _, rec = run(EMA(half_life="4ba", train_with_ema_weights=True), "6ba", eval_interval=None)
    _, plain = run(EMA(half_life="4ba"), "6ba", eval_interval=None)
    for ema, training in zip(rec.ema[1:], rec.training[1:], strict=True):
        assert ema is not None and all(torch.equal(ema[k], training[k]) for k in ema)
    assert not torch.equal(rec.training[-1]["0.weight"], plain.training[-1]["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "name", "typed"),
    [
        ({"ema_start": "infba"}, "ema_start", "'infba'"),
        ({"ema_start": "Infinityba"}, "ema_start", "'Infinityba'"),
        ({"update_interval": "+0ba"}, "update_interval", "'+0ba'"),
        ({"sigma_rel": 0.1, "snapshot_every": "0ba"}, "snapshot_every", "'0ba'"),
        ({"sigma_rel": 0.1, "snapshot_every": "Infinityba"}, "snapshot_every", "'Infinityba'"),
    ],
)
def test_message_names_the_parameter_typed(kwargs: dict, name: str, typed: str) -> None:
    # Issue 15: snapshot_every was reported as update_interval, ema_start as start, and the
    # values quoted normalised ('0ba', 'infba') rather than as typed.
    with pytest.raises(ValueError) as info:
        EMA(**kwargs)
    assert str(info.value).startswith(f"{name} "), str(info.value)
    assert typed in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"exclude": "typo.*"}, "exclude pattern 'typo.*' matches no weight"),
        ({"include": ["*weight", "nomatch"]}, "include pattern 'nomatch' matches no weight"),
    ],
)
def test_pattern_matching_nothing_is_refused_when_the_model_is_bound(
    kwargs: dict, words: str
) -> None:
    with pytest.raises(ValueError, match=words.replace("*", r"\*").replace(".", r"\.")):
        run(EMA(half_life="4ba", **kwargs), "2ba", eval_interval=None)


def test_signature_takes_every_shared_option() -> None:
    from ema_callbacks.composer import _DEFAULT_HALF_LIFE
    from ema_callbacks.options import signature_differences

    assert (
        signature_differences(
            EMA,
            renamed={"start": "ema_start"},
            defaults={"start": "0.0dur", "half_life": _DEFAULT_HALF_LIFE},
        )
        == []
    )
