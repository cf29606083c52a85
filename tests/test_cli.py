"""The command line: halflife, posthoc, run/demo argument errors (export: tests/test_export.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ema_callbacks import EMA
from ema_callbacks.cli import main
from ema_callbacks.posthoc import save_snapshot


def test_halflife_both_ways(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["halflife", "--smoothing", "0.999", "--interval", "1ba"]) == 0
    assert capsys.readouterr().out.strip() == "smoothing 0.999 per 1ba = half_life 693ba"
    assert main(["halflife", "--smoothing", "0.5", "--interval", "0.25ep"]) == 0
    assert capsys.readouterr().out.strip() == "smoothing 0.5 per 0.25ep = half_life 0.25ep"
    assert main(["halflife", "--half-life", "10ba", "--interval", "10ba"]) == 0
    assert capsys.readouterr().out.strip().endswith("smoothing 0.500000")
    assert main(["halflife", "--half-life", "10ba", "--interval", "1ep"]) == 2
    assert "same unit" in capsys.readouterr().err
    assert main(["halflife", "--smoothing", "0.9", "--interval=-1ba"]) == 2
    assert "--interval must not be negative" in capsys.readouterr().err


def test_posthoc_reconstructs_a_tracked_profile(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    tracked = {s: EMA(model, sigma_rel=s) for s in (0.05, 0.10)}
    target = EMA(model, sigma_rel=0.07)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 401):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen) + 0.01)
        for ema in (*tracked.values(), target):
            ema.step(model)
        if step % 50 == 0:
            for s, ema in tracked.items():
                save_snapshot(
                    tmp_path / f"snap-{step}-{s}.safetensors",
                    ema.shadow,
                    time=step,
                    sigma_rel=s,
                    dtype="float32",
                )
    out = tmp_path / "rec.safetensors"
    assert main(["posthoc", str(tmp_path), "--sigma-rel", "0.07", "-o", str(out)]) == 0
    rebuilt = load_file(out)
    torch.nn.Linear(4, 4).load_state_dict(rebuilt, strict=True)
    err = max(float((rebuilt[k] - target.shadow[k]).abs().max()) for k in rebuilt)
    gap = max(
        float((tracked[0.05].shadow[k] - tracked[0.10].shadow[k]).abs().max()) for k in rebuilt
    )
    assert err < 0.02 * gap  # far closer to the tracked 0.07 than the inputs are to each other
    assert main(["posthoc", str(tmp_path / "missing"), "--sigma-rel", "0.07"]) == 2


def test_run_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_module_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ema_callbacks", "halflife", "--smoothing", "0.99"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "smoothing 0.99 per 1ba = half_life 69ba"
