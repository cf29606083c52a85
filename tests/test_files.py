"""``files.atomic_write``: the umask's mode, stale temporaries of ours cleaned up (and nothing
else), no folder left behind by a failed write; snapshots, exports and post-hoc results get the
same mode."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ema_callbacks import EMA
from ema_callbacks.files import STALE_AFTER_S, _host_tag, atomic_write, remove_stale_temporaries
from ema_callbacks.posthoc import posthoc_command, save_snapshot


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert _mode(tmp_path / "a.txt") == expected
    # the same as a file the trainers write next to it with plain open()
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(tmp_path / "plain.txt") == expected
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, half_life="2ba")
    ema.step(model)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    from ema_callbacks.export import export_ema

    export_ema(tmp_path / "ema.pt", tmp_path / "export.safetensors")
    assert _mode(tmp_path / "export.safetensors") == expected
    for t in (100, 200):
        save_snapshot(
            tmp_path / "snaps" / f"{t}.safetensors", model.state_dict(), time=t, sigma_rel=0.1
        )
        assert _mode(tmp_path / "snaps" / f"{t}.safetensors") == expected
    posthoc_command([str(tmp_path / "snaps")], str(tmp_path / "ph.safetensors"), sigma_rel=0.1)
    assert _mode(tmp_path / "ph.safetensors") == expected


def test_a_killed_writer_leaves_a_temporary_the_next_write_removes(tmp_path: Path) -> None:
    # A real process killed in the middle of a write (SIGKILL: no cleanup runs).
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from ema_callbacks.files import atomic_write\n"
        "def write(tmp):\n"
        "    Path(tmp).write_text('partial')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        f"atomic_write({str(tmp_path / 'a.safetensors')!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".a.safetensors.emacb-"), left
    # while the writer lives, nobody removes its file
    assert remove_stale_temporaries(tmp_path) == []
    proc.kill()
    proc.wait()
    (tmp_path / "mine.tmp").write_text("not ours")
    other_host = tmp_path / f".b.emacb-1-{'0' * 8}-ab.tmp"  # another host's fresh file
    other_host.write_text("")
    old_other_host = tmp_path / f".c.emacb-1-{'0' * 8}-ab.tmp"
    old_other_host.write_text("")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old_other_host, (past, past))
    atomic_write(tmp_path / "b.txt", lambda tmp: Path(tmp).write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b.txt", "mine.tmp", other_host.name]
    )


def test_live_temporaries_on_this_host_are_kept(tmp_path: Path) -> None:
    mine = tmp_path / f".x.emacb-{os.getpid()}-{_host_tag()}-00.tmp"  # this process: alive
    mine.write_text("")
    assert remove_stale_temporaries(tmp_path) == []
    assert mine.exists()


def test_a_failed_write_changes_nothing(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "keep.txt", fail)
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new" / "deeper" / "x.txt", fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "old"


def test_writing_without_numpy_says_so(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['numpy'] = None\n"
        "import torch\n"
        "from ema_callbacks.files import write_safetensors\n"
        "try:\n"
        f"    write_safetensors({str(tmp_path / 'w.safetensors')!r}, {{'w': torch.ones(2)}})\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "needs numpy" in done.stdout and "pip install numpy" in done.stdout, done
    assert list(tmp_path.iterdir()) == []  # nothing left behind
