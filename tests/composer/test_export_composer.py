"""``ema-callbacks export`` on real Composer checkpoints: this library's EMA algorithm and
``composer.algorithms.EMA`` (users switching over can export their old runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.algorithms import EMA as ComposerEMA
from composer_runs import make_loader, make_model
from safetensors.torch import load_file

from ema_callbacks.cli import main
from ema_callbacks.composer import EMA
from ema_callbacks.weights import normalize_name


def _train(tmp_path: Path, algorithm: object) -> tuple[Trainer, Path]:
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(0),
        max_duration="4ba",
        algorithms=[algorithm],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        save_folder=str(tmp_path),
        save_interval="4ba",
        progress_bar=False,
    )
    trainer.fit()
    return trainer, tmp_path / "ep0-ba4-rank0.pt"


@pytest.mark.parametrize("final_weights", ["ema", "training"])
def test_export_our_composer_checkpoint(tmp_path: Path, final_weights: str) -> None:
    algorithm = EMA(half_life="2ba", final_weights=final_weights)
    _, checkpoint = _train(tmp_path, algorithm)
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    exported = load_file(out)
    # keys are the EMA's names: the ComposerClassifier's 'module.' is a wrapper prefix, so the
    # export loads into the torch module it wraps (what a user deploys), as posthoc's does
    make_model().module.load_state_dict(exported, strict=True)
    weights = algorithm.controller.weights
    assert weights is not None
    ema = weights.state_dict()
    training = weights.training_state_dict()
    for key, value in exported.items():
        name = normalize_name(key)
        if name in ema:
            assert torch.equal(value, ema[name]), key
    assert any(not torch.equal(ema[n], training[n]) for n in ema if ema[n].is_floating_point())


def test_export_composer_algorithms_ema_checkpoint(tmp_path: Path) -> None:
    algorithm = ComposerEMA(half_life="2ba")
    trainer, checkpoint = _train(tmp_path, algorithm)
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    exported = load_file(out)
    make_model().module.load_state_dict(exported, strict=True)
    ema = algorithm.ema_model.named_parameters_dict if not algorithm.ema_weights_active else None
    reference = ema or {k: v for k, v in trainer.state.model.named_parameters()}
    for key, value in reference.items():
        assert torch.equal(exported[normalize_name(key)], value.detach()), key


def test_export_loads_with_timms_load_checkpoint(tmp_path: Path) -> None:
    import timm
    from composer.metrics import CrossEntropy
    from composer.models import ComposerClassifier

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=8)
    model = ComposerClassifier(net, num_classes=3, val_metrics=CrossEntropy())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 8, 16, 16), torch.randint(0, 3, (8,))),
        batch_size=4,
    )
    algorithm = EMA(half_life="1ba", final_weights="training")
    Trainer(
        model=model,
        train_dataloader=loader,
        max_duration="2ba",
        algorithms=[algorithm],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        save_folder=str(tmp_path),
        save_interval="2ba",
        progress_bar=False,
    ).fit()
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(tmp_path / "ep0-ba2-rank0.pt"), "-o", str(out)]) == 0
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=8)
    timm.models.load_checkpoint(fresh, str(out), strict=True)
    ema = algorithm.controller.weights.state_dict()
    for name, value in fresh.state_dict().items():
        if name in ema:
            assert torch.equal(value, ema[name]), name
    assert not torch.equal(fresh.fc.weight, net.fc.weight.detach())


def test_numpy_missing_is_not_reported_as_pickled_code(tmp_path: Path) -> None:
    import subprocess
    import sys

    _, checkpoint = _train(tmp_path, EMA(half_life="2ba"))
    script = (
        "import sys; sys.modules['numpy'] = None\n"
        "from ema_callbacks.cli import main\n"
        f"sys.exit(main(['export', {str(checkpoint)!r}, '-o', {str(tmp_path / 'o.safetensors')!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert "numpy" in done.stderr and "pip install numpy" in done.stderr
    assert "pickled" not in done.stderr and "Traceback" not in done.stderr
