"""Import behaviour: ``import ema_callbacks`` loads no trainer; without Lightning the adapter
raises ImportError naming the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
import ema_callbacks
assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)
for name in ('lightning', 'lightning.pytorch', 'lightning.pytorch.callbacks',
             'pytorch_lightning', 'pytorch_lightning.callbacks'):
    sys.modules[name] = None  # an import of these now raises ImportError
try:
    import ema_callbacks.lightning
except ImportError as err:
    print(err)
"""


def test_missing_lightning_names_the_extra() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert 'pip install "ema-callbacks[lightning]"' in result.stdout


OLD = """
import pytorch_lightning
pytorch_lightning.__version__ = '2.4.0'  # as installed without the extra's lightning>=2.5
try:
    import ema_callbacks.lightning
except ImportError as err:
    print(err)
"""


def test_lightning_older_than_the_floor_is_refused() -> None:
    pytest.importorskip("pytorch_lightning")
    result = subprocess.run(
        [sys.executable, "-c", OLD], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "needs Lightning >= 2.5; pytorch_lightning 2.4.0 is installed" in result.stdout
