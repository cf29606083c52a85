"""Two processes (torchrun, gloo, CPU): every rank holds the same EMA, equal to the reference;
with ``fused_optimizer=True`` too, equal to the separate update."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_tiny import assert_close, assert_equal, reference_ema

from ema_callbacks.transformers import load_ema_state
from tests.process_group import torchrun

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_ranks_hold_the_same_ema(tmp_path):
    torchrun(HERE / "hf_ddp_run.py", tmp_path, timeout=240)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == 2
    assert_equal(r0["ema"], r1["ema"])
    # 16 samples over 2 ranks x batch 2: 4 steps per epoch, 8 in all
    assert sorted(r0["steps"]) == list(range(1, 9))
    expected = reference_ema(r0["steps"], {k: 0.25 for k in r0["steps"]}, 0.5)
    assert_close(r0["ema"], expected)
    for rank in (r0, r1):  # the evaluations (steps 3, 6 and the last) ran on the EMA
        assert sorted(rank["eval"]) == [3, 6, 8]
        upto = {k: v for k, v in r0["steps"].items() if k <= 6}
        assert_close(rank["eval"][6], reference_ema(upto, {k: 0.25 for k in upto}, 0.5))
    # written once, by rank 0, into the checkpoint folder
    assert_close(load_ema_state(tmp_path / "checkpoint-8")["shadow"], expected)
    # fused_optimizer=True under DDP: the ranks agree, and equal the separate update to float32
    # rounding (torch.compile's AdamW differs from the eager one by ~1e-6)
    assert_equal(r0["fused"], r1["fused"])
    for k, v in r0["separate"].items():
        assert float((r0["fused"][k] - v).abs().max()) < 1e-5, k
