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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(
    script: str | os.PathLike[str],
    *args: str | os.PathLike[str],
    timeout: float,
    env: dict[str, str] | None = None,
    nproc: int = 2,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=N script args...`` through :func:`run_group`,
    with one CPU thread per process, the repository on ``PYTHONPATH`` and ``env`` added;
    fails the test with the end of its output unless every process succeeded."""
    import sys

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        os.fspath(script),
        *map(os.fspath, args),
    ]
    done = run_group(cmd, timeout=timeout, env=full_env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done
