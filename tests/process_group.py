"""Run a multi-process job (torchrun, Lightning's DDP launcher) so that nothing outlives it.

``subprocess.run(..., timeout=...)`` kills only the direct child; torchrun's workers would
linger (holding memory and ports) after a hang. Here the job gets its own process group, and
the whole group is killed on timeout and after the job ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any


def run_group(
    cmd: Sequence[str], timeout: float, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)``, but the
    job's whole process group is killed when it times out (then ``TimeoutExpired`` is raised)
    and when it returns."""
    proc = subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc.pid)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(list(cmd), timeout, out, err) from None
    finally:
        _kill(proc.pid)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
