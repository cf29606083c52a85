"""``ema-callbacks export``: real Lightning and transformers checkpoints, a saved plain EMA,
and refusal of anything that would need pickled code. (Composer: tests/composer.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ema_callbacks import EMA
from ema_callbacks.cli import main
from ema_callbacks.export import UnsafeCheckpointError, export_ema, read_ema


def _check(
    exported: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    training: dict[str, torch.Tensor],
) -> None:
    for name, value in ema.items():
        assert torch.equal(exported[name], value), name
    assert any(not torch.equal(exported[n], training[n]) for n in ema)  # the EMA, not the weights


def test_plain_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)  # frozen: not tracked, but still exported
    ema = EMA(model, half_life="2ba")
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    assert main(["export", str(tmp_path / "ema.pt"), "-o", str(tmp_path / "out.safetensors")]) == 0
    out = load_file(tmp_path / "out.safetensors")
    assert set(out) == set(ema.shadow)  # a plain EMA state has no model slot: the EMA only
    assert torch.equal(out["0.weight"], ema.shadow["0.weight"])


def test_one_profile_of_several(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, half_life=["2ba", "20ba"])
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    for profile in (None, "ema_2ba", "ema_20ba"):
        out = tmp_path / f"{profile}.safetensors"
        export_ema(tmp_path / "ema.pt", out, profile=profile)
        expected = ema.shadow_of(profile)
        assert all(torch.equal(load_file(out)[k], v) for k, v in expected.items())
    assert not torch.equal(ema.shadow_of("ema_2ba")["weight"], ema.shadow_of("ema_20ba")["weight"])
    with pytest.raises(
        ValueError, match=r"no EMA profile 'ema_3ba'; the profiles are \['ema_2ba', 'ema_20ba'\]"
    ):
        export_ema(tmp_path / "ema.pt", tmp_path / "x.safetensors", profile="ema_3ba")
    # a single-EMA state knows its own name
    single = EMA(model, half_life="5ba")
    single.step(model)
    torch.save(single.state_dict(), tmp_path / "single.pt")
    export_ema(tmp_path / "single.pt", tmp_path / "s.safetensors", profile="ema_5ba")


def test_bema_and_uniform_export_their_evaluated_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, profiles=[{"name": "bema", "ema_power": 0.5}, {"uniform": True}])
    for _ in range(4):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    bema = ema.controller.profile("bema").weights
    assert bema is not None
    running = bema.extra["ema"]["weight"]
    for profile in ("bema", "uniform"):
        out = tmp_path / f"{profile}.safetensors"
        assert main(["export", str(tmp_path / "ema.pt"), "-o", str(out), "--profile", profile]) == 0
        exported = load_file(out)
        for k, v in ema.shadow_of(profile).items():
            assert torch.equal(exported[k], v), (profile, k)
    # BEMA's evaluated weights (ema + alpha * (theta - theta0)), not its running EMA
    assert not torch.equal(load_file(tmp_path / "bema.safetensors")["weight"], running)


def test_lightning_checkpoint(tmp_path: Path) -> None:
    from ema_callbacks.lightning import EMACallback
    from tests.lightning.lightning_helpers import fit
    from tests.lightning.lightning_tiny import TinyRegression

    callback = EMACallback(half_life="3ba", final_weights="training")
    trainer, model = fit([callback], max_steps=6)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    summary = export_ema(tmp_path / "last.ckpt", tmp_path / "ema.safetensors")
    assert summary["kind"] == "lightning"
    exported = load_file(tmp_path / "ema.safetensors")
    TinyRegression().load_state_dict(exported, strict=True)
    weights = callback.controller.weights
    assert weights is not None
    _check(exported, weights.state_dict(), dict(model.state_dict()))


def test_transformers_checkpoint_folder(tmp_path: Path) -> None:
    from ema_callbacks.transformers import EMATrainerCallback
    from tests.transformers.hf_tiny import TinyRegressor, trainer

    callback = EMATrainerCallback(half_life="3ba", final_weights="training")
    hf = trainer(tmp_path, [callback], save_strategy="steps", save_steps=4, max_steps=4)
    hf.train()
    folder = tmp_path / "checkpoint-4"
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(folder), "-o", str(out), "--dtype", "float64"]) == 0
    exported = load_file(out)
    TinyRegressor().load_state_dict(exported, strict=True)
    weights = callback.controller.weights
    assert weights is not None
    ema = {k: v.double() for k, v in weights.state_dict().items()}
    training = {k: v.double() for k, v in hf.model.state_dict().items()}
    assert all(v.dtype == torch.float64 for v in exported.values())
    _check(exported, ema, training)
    assert read_ema(folder / "ema_state.safetensors").kind == "transformers"


def test_transformers_folder_with_several_profiles(tmp_path: Path) -> None:
    from ema_callbacks.transformers import EMATrainerCallback
    from tests.transformers.hf_tiny import TinyRegressor, trainer

    callback = EMATrainerCallback(half_life=["2ba", "20ba"], final_weights="training")
    hf = trainer(tmp_path, [callback], save_strategy="steps", save_steps=4, max_steps=4)
    hf.train()
    folder = tmp_path / "checkpoint-4"
    training = dict(hf.model.state_dict())
    for profile in ("ema_2ba", "ema_20ba"):
        out = tmp_path / f"{profile}.safetensors"
        assert main(["export", str(folder), "-o", str(out), "--profile", profile]) == 0
        exported = load_file(out)
        TinyRegressor().load_state_dict(exported, strict=True)
        weights = callback.controller.profile(profile).weights
        assert weights is not None
        _check(exported, weights.state_dict(), training)
    with pytest.raises(ValueError, match="no EMA profile 'ema_5ba'"):
        export_ema(folder, tmp_path / "x.safetensors", profile="ema_5ba")


class _Payload:
    """Unpickling this would run code (it writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path(self.marker).write_text, ("pwned",))


def test_refuses_checkpoints_that_need_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(str(marker))}, tmp_path / "bad.ckpt"
    )
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        export_ema(tmp_path / "bad.ckpt", tmp_path / "out.safetensors")
    assert not marker.exists()  # nothing was executed
    assert not (tmp_path / "out.safetensors").exists()
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump({"x": _Payload(str(marker))}, f)
    # a file that would need pickled code is a bad input file: exit 1 (the CLI error contract)
    assert main(["export", str(tmp_path / "raw.pkl"), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert not marker.exists()


def test_unknown_and_missing_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    # an existing file or folder of the wrong kind is a bad input file (exit 1); a path that
    # does not exist is bad usage (exit 2)
    assert main(["export", str(tmp_path / "other.pt")]) == 1
    assert "not a checkpoint this command knows" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.ckpt")]) == 2
    assert "no such file" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["export", str(tmp_path / "empty")]) == 1
    assert "no *_state.json written by ema_callbacks" in capsys.readouterr().err
