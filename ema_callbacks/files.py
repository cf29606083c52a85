"""Atomic file writes: every file this library writes goes through :func:`atomic_write`.

A file is written under a temporary name in its folder, flushed to disk and renamed over the
final name, so a reader sees the old file or the whole new one, never a part. It gets the mode
the umask gives a new file (``0o644`` under the usual umask ``022``), like ``open(path, 'w')``
and like the checkpoints the trainers write next to it.

Temporary names are ``.NAME.emacb-PID-HOST-RANDOM.tmp`` (``HOST``: 8 hex digits of a hash of the
host name). A process killed mid-write leaves one behind; the next write into the same folder
removes it (:func:`remove_stale_temporaries`) when it is ours and can no longer be in use: its
process, on this host, is gone, or it is older than :data:`STALE_AFTER_S` (24 hours; writers on
other hosts of a shared folder are left alone until then). No other file is ever touched.

>>> import os, tempfile
>>> from pathlib import Path
>>> target = os.path.join(tempfile.mkdtemp(), 'sub', 'a.txt')
>>> atomic_write(target, lambda tmp: Path(tmp).write_text('done'))
>>> Path(target).read_text()
'done'
>>> oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~current_umask())
True
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "FileProblem",
    "STALE_AFTER_S",
    "atomic_write",
    "current_umask",
    "remove_stale_temporaries",
    "write_safetensors",
]

STALE_AFTER_S = 24 * 3600.0
"""A temporary file of ours older than this (seconds since its last change) is stale even when
its process may still exist (another host of a shared folder, a reused process id)."""

_TEMP = re.compile(r"^\..+\.emacb-(\d+)-([0-9a-f]{8})-[0-9a-f]+\.tmp$")


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


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux's
    ``/proc/self/status``); elsewhere set and restored at once.

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # it exists (someone else's), or we cannot tell: keep its file
    return True


def remove_stale_temporaries(
    folder: str | os.PathLike[str], older_than_s: float = STALE_AFTER_S
) -> list[str]:
    """Remove the temporary files :func:`atomic_write` left in ``folder`` (not in sub-folders)
    that no write can still be using: written on this host by a process that is gone, or last
    changed more than ``older_than_s`` seconds ago. Only names of the form
    ``.NAME.emacb-PID-HOST-RANDOM.tmp`` are considered. Returns the paths removed; errors (a
    file already gone, a read-only folder) are ignored.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> dead = f'.a.emacb-999999999-{_host_tag()}-00.tmp'        # no such process
    >>> for name in (dead, '.b.emacb-1-ffffffff-00.tmp', 'notes.tmp'):
    ...     open(os.path.join(d, name), 'w').close()
    >>> [os.path.basename(p) for p in remove_stale_temporaries(d)] == [dead]
    True
    >>> sorted(os.listdir(d))            # another host's fresh file, and not ours at all
    ['.b.emacb-1-ffffffff-00.tmp', 'notes.tmp']
    """
    removed: list[str] = []
    host = _host_tag()
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            old = now - entry.stat(follow_symlinks=False).st_mtime > older_than_s
            dead = match.group(2) == host and not _alive(int(match.group(1)))
            if old or dead:
                os.remove(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
    return removed


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    out = []
    current = os.path.abspath(folder)
    while not os.path.exists(current):
        out.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return out


def _why(err: OSError) -> str:
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (a read-only or protected folder)"
    if err.errno == errno.EROFS:
        return "the folder is on a read-only file system"
    if err.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    return err.strerror or type(err).__name__


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, flush it to disk, then
    rename it over ``path``: readers see the old file or the complete new one, never a part,
    even if the process dies mid-write. The file gets the umask's mode (``0o644`` under
    ``022``). The temporary name starts with a dot and ends in ``.tmp``, so globs for the final
    names never match it; it is removed if ``write`` fails, and so are folders this call
    created. Stale temporary files of earlier, killed writes in the folder are removed first
    (:func:`remove_stale_temporaries`).

    Raises :class:`FileProblem` naming ``path`` when it cannot be written there (it is a folder,
    a part of it is a file, the folder is read-only); errors raised by ``write`` propagate.

    >>> import tempfile
    >>> atomic_write(tempfile.mkdtemp(), lambda tmp: None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ema_callbacks.files.FileProblem: ...: is a folder; give a file name to write
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        raise FileProblem(f"{path}: is a folder; give a file name to write")
    folder = os.path.dirname(path) or "."
    created = _missing_folders(folder)
    existing = os.path.dirname(created[-1]) if created else folder
    if existing and not os.path.isdir(existing):
        raise FileProblem(
            f"{path}: cannot write: a part of the path is a file, not a folder ({existing})"
        )
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        tmp = os.path.join(
            folder,
            f".{os.path.basename(path)}.emacb-{os.getpid()}-{_host_tag()}-"
            f"{secrets.token_hex(4)}.tmp",
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        os.close(fd)
    except OSError as err:
        _remove_folders(created)
        raise FileProblem(f"{path}: cannot write: {_why(err)}") from err
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # in case ``write`` replaced the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        _remove_folders(created)
        raise


def _remove_folders(created: list[str]) -> None:
    for folder in created:  # deepest first; only if still empty
        try:
            os.rmdir(folder)
        except OSError:
            break


def _sync_folder(folder: str) -> None:
    """Flush the rename to disk too (best effort: not every system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to a safetensors file with :func:`atomic_write`. safetensors refuses
    tensors that share memory (tied weights under each of their names, views of one buffer):
    every tensor whose storage an earlier one already uses is written as its own copy, so no
    name is ever dropped. Tensors are moved to the CPU and made contiguous.

    >>> import tempfile, torch
    >>> from safetensors.torch import load_file
    >>> w = torch.ones(2)
    >>> path = tempfile.mkdtemp() + '/tied.safetensors'
    >>> write_safetensors(path, {'emb.weight': w, 'head.weight': w})
    >>> sorted(load_file(path))
    ['emb.weight', 'head.weight']
    """
    import torch

    try:
        from safetensors.torch import save_file
    except ImportError as err:  # pragma: no cover - safetensors is a base dependency
        raise ImportError(
            f"writing {os.fspath(path)} needs safetensors: pip install safetensors"
        ) from err
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        t = value.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        elif ptr:
            seen.add(ptr)
        out[key] = t.contiguous()

    def write(tmp: str) -> None:
        try:
            save_file(out, tmp, metadata=dict(metadata) if metadata else None)
        except ModuleNotFoundError as err:
            if err.name != "numpy":
                raise
            raise ImportError(
                f"writing {os.fspath(path)} needs numpy (safetensors uses it to save), which is "
                "not installed: pip install numpy"
            ) from err

    atomic_write(path, write)
