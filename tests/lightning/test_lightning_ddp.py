"""Lightning ``ddp`` on two CPU processes (gloo): the EMA is identical on both ranks, the
checkpoint is written once (by rank 0) and holds that EMA, a resumed run equals an
uninterrupted one bit for bit, and ``fused_optimizer=True`` gives the same EMA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.process_group import run_group

SCRIPT = Path(__file__).with_name("lightning_ddp_script.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_ranks_agree_and_resume_is_bit_identical(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = run_group([sys.executable, str(SCRIPT), str(tmp_path)], timeout=420, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def out(phase: str, rank: int) -> dict:
        return torch.load(tmp_path / f"{phase}_rank{rank}.pt", weights_only=False)

    for phase in ("full", "stop", "resumed", "fused"):
        r0, r1 = out(phase, 0), out(phase, 1)
        assert r0["world_size"] == 2
        assert all(torch.equal(r0["shadow"][k], r1["shadow"][k]) for k in r0["shadow"])
        assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in r0["model"])
        assert r0["schedule"] == r1["schedule"]
    # Samples are summed over ranks (4 + 6 per step): smoothing 2**(-10/40).
    full = out("full", 0)
    assert full["samples"] == 80
    assert full["schedule"]["smoothing"] == pytest.approx(2 ** (-10 / 40))
    assert full["schedule"]["num_updates"] == 7
    # One checkpoint file, holding the ranks' EMA at step 4.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=4.ckpt"]
    ckpt = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    stop = out("stop", 0)
    state = ckpt["callbacks"]["EMACallback"]
    assert all(torch.equal(state["shadow"][k], stop["shadow"][k]) for k in stop["shadow"])
    # Resumed == uninterrupted, bit for bit.
    resumed = out("resumed", 0)
    assert all(torch.equal(resumed["shadow"][k], full["shadow"][k]) for k in full["shadow"])
    assert all(torch.equal(resumed["model"][k], full["model"][k]) for k in full["model"])
    assert resumed["schedule"] == full["schedule"] and resumed["samples"] == 80
    # fused_optimizer=True: the same EMA, to float32 rounding (torch.compile's Adam differs
    # from the eager one by ~1e-6); the same counts and schedule
    fused = out("fused", 0)
    assert fused["samples"] == 80 and fused["schedule"] == full["schedule"]
    for k, v in full["shadow"].items():
        assert float((fused["shadow"][k] - v).abs().max()) < 1e-5, k
