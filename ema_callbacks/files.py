"""Atomic file writes: every file this library writes goes through :func:`atomic_write`.

>>> import os, tempfile
>>> from pathlib import Path
>>> target = os.path.join(tempfile.mkdtemp(), 'sub', 'a.txt')
>>> atomic_write(target, lambda tmp: Path(tmp).write_text('done'))
>>> Path(target).read_text()
'done'
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["FileProblem", "atomic_write"]


class FileProblem(ValueError):
    """A file given to a command is damaged, unreadable or of the wrong kind, or an output path
    cannot be written. The message is one line naming the path and what is wrong; the command
    line reports it with exit status 1 (a failed run), while a plain ``ValueError`` or
    ``TypeError`` is bad usage (exit status 2).

    >>> raise FileProblem("ckpt.pt: empty file (0 bytes), not a checkpoint")
    Traceback (most recent call last):
    ...
    ema_callbacks.files.FileProblem: ckpt.pt: empty file (0 bytes), not a checkpoint
    """


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, flush it to disk, then
    rename it over ``path``: readers see the old file or the complete new one, never a part,
    even if the process dies mid-write. The temporary name starts with a dot and ends in
    ``.tmp``, so globs for the final names never match it; it is removed if ``write`` fails."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
