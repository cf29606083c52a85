"""The adapter with only ``pytorch_lightning`` importable (the package's old name, no
``lightning``): its base class comes from there, and resume and the several-EMA evaluation
work on that package's own Trainer (``pl_only_script.py``, in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("pl_only_script.py")


def test_only_pytorch_lightning_installed() -> None:
    pytest.importorskip("pytorch_lightning")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok"), result.stdout[-3000:]
