"""File-system helpers shared by every stage: durable atomic writes, directory swaps, hashing.

One implementation each, used by training (feature caches, checkpoints), export (bundles, engines),
conversion (OME-Zarr stores) and the runtime (output stores).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["fsync_path", "atomic_write", "read_json", "remove_tree", "swap_in", "sha256_file", "temp_sibling",
           "stale_siblings", "restore_stale_old", "clean_stale_siblings"]


def temp_sibling(path: Path, tag: str) -> Path:
    """A unique hidden name beside ``path`` (same directory, so a rename onto ``path`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """fsync a file (or a directory's entries); a missing path or a refusing filesystem is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except FileNotFoundError:
        return
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Callable[[IO[bytes]], Any], *, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function writing to a binary file) via a temporary
    sibling and ``os.replace``; fsync'd file and directory if asked. A failure leaves ``path`` as it was."""
    path = Path(path)
    tmp = temp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        fsync_path(path.parent, directory=True)


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def remove_tree(path: Path) -> None:
    """Delete a directory tree (or a file): first renamed away atomically, so no half-deleted store is ever seen."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = temp_sibling(path, "trash")
    os.rename(path, trash)
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink()


def swap_in(new: Path, dest: Path) -> Path:
    """Move the finished file or directory ``new`` to ``dest`` (same file system), replacing an old
    ``dest`` only once ``new`` is complete: the old one is renamed aside, ``new`` renamed in, then the
    old one deleted. At every instant ``dest`` is either the complete old or the complete new item
    (or, for an instant between the two renames, absent)."""
    new, dest = Path(new), Path(dest)
    if not os.path.lexists(dest):
        os.rename(new, dest)
        return dest
    old = temp_sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)  # put the old one back
        raise
    remove_tree(old)
    return dest


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_siblings(path: Path, tag: str) -> list[Path]:
    """Hidden siblings :func:`temp_sibling` made for ``path`` with ``tag`` whose process is gone (a killed
    run's debris: ``.<name>.<tag>-<pid>-<hex>``). Siblings of live processes are never listed."""
    path = Path(path)
    prefix = f".{path.name}.{tag}-"
    found: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return found
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            found.append(entry)
    return found


def restore_stale_old(path: Path) -> Path | None:
    """Put back the previous ``path`` that a run killed inside :func:`swap_in` left renamed aside: when
    ``path`` is missing and a dead process's ``old`` sibling exists, the newest such sibling is renamed to
    ``path`` (it is the only copy of the earlier output). Returns ``path`` when restored, else None."""
    path = Path(path)
    if os.path.lexists(path):
        return None
    aside = stale_siblings(path, "old")
    if not aside:
        return None
    try:
        os.rename(max(aside, key=lambda p: p.lstat().st_mtime), path)
    except OSError:  # another process put it back (or replaced it) meanwhile
        return None
    return path


def clean_stale_siblings(path: Path, *tags: str) -> list[Path]:
    """Delete the debris of killed runs beside ``path`` (:func:`stale_siblings` for each tag, default
    ``partial``, ``tmp``, ``old``, ``trash``); returns what was removed. Errors removing one are ignored.
    An ``old`` sibling that is the only copy of ``path`` (``path`` missing) is first put back
    (:func:`restore_stale_old`), never deleted."""
    restore_stale_old(path)
    removed: list[Path] = []
    for tag in tags or ("partial", "tmp", "old", "trash"):
        for entry in stale_siblings(path, tag):
            with contextlib.suppress(OSError):
                remove_tree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
    return removed
