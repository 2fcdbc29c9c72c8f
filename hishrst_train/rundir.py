"""Where the training commands write: ownership, locking and build-aside-then-swap of an output directory.

Every directory ``hishrst fit`` (a run), ``cv``, ``synth`` and ``demo`` create carries hishrst's
ownership marker (:func:`hishrst_runtime.core.owned.mark_owned`, kinds ``fit-run``, ``cv``, ``synth``,
``demo``); ``--overwrite`` replaces only a directory marked with the same kind
(:func:`~hishrst_runtime.core.owned.check_replaceable`) — a folder of the user's files is never deleted,
even if it holds a ``config.json``. Legacy outputs written before the marker are recognised by a strict
check per kind (a run: ``config.json`` parses as a :class:`~hishrst_train.runconfig.RunConfig` *and*
``model.safetensors`` exists; see :func:`is_legacy_run`).

:func:`claim_output` holds an exclusive lock for the whole command — ``.<name>.lock`` beside the output
(``O_EXCL``, holding host and pid; stale when that process is gone, see
:class:`hishrst_runtime.jobs.locks.SlideLock`) — so a second command writing the same output fails at
once naming the first; it also deletes the debris of killed runs beside the output (hidden
``.<name>.partial-PID-…`` / ``.tmp-…`` siblings whose process is gone). :func:`building_run` builds the
output in a hidden sibling and swaps it in only when complete, so a failed or interrupted command leaves
no (empty or partial) output behind and an existing one is replaced only after the new one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import clean_stale_siblings, remove_tree, swap_in, temp_sibling
from hishrst_runtime.core.owned import check_replaceable, mark_owned
from hishrst_runtime.jobs.locks import SlideLock

__all__ = ["RunLayout", "RunOutputError", "OutputLockedError", "DiskFullError", "check_run_out", "is_legacy_run",
           "claim_output", "building_run", "disk_errors"]

log = logging.getLogger("hishrst")

#: errno values meaning "the disk (or quota) is full / read-only", reported as :class:`DiskFullError`.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@dataclass(frozen=True)
class RunLayout:
    """The files of a run directory, named once: ``RunLayout(root).config`` etc. (paths; nothing is read).

    ``config`` (``config.json``, a versioned :class:`~hishrst_train.runconfig.RunConfig`), ``model``
    (``model.safetensors``), ``split`` (``split.json``), ``history`` (``history.json``), ``baseline``
    (``baseline.json``: each gene's training mean), ``predictions`` (``predictions.h5ad``, recovery),
    ``dense`` (``dense.h5ad``, generation), ``eval_dir(name)`` (``eval/<name>/`` of ``evaluate --on``).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def model(self) -> Path:
        return self.root / "model.safetensors"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def history(self) -> Path:
        return self.root / "history.json"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.h5ad"

    @property
    def dense(self) -> Path:
        return self.root / "dense.h5ad"

    def eval_dir(self, name: str) -> Path:
        """``eval/<name>/``: where ``hishrst evaluate RUN --on DATA --name NAME`` writes."""
        return self.root / "eval" / name


class RunOutputError(OutputStateError, FileExistsError):
    """``--out`` of ``hishrst fit`` exists, is not a run, is not writable or overlaps an input."""


class OutputLockedError(OutputStateError):
    """Another live hishrst process is writing the same output (its lock file is held)."""


class DiskFullError(OutputStateError):
    """The disk (or quota) filled up, or the file system is read-only, while writing an output."""


def is_legacy_run(path: Path) -> bool:
    """A run written before the ownership marker: ``config.json`` parses as a hishrst :class:`RunConfig`
    and ``model.safetensors`` exists (both, so a folder with some other ``config.json`` never qualifies)."""
    from hishrst_train.runconfig import RunConfig, RunConfigError

    layout = RunLayout(path)
    if not layout.model.is_file():
        return False
    try:
        RunConfig.from_json(layout.config)
    except (RunConfigError, OSError, TypeError, ValueError):
        return False
    return True


def check_run_out(out: Path, *, overwrite: bool, inputs: Iterable[Path | str | None] = ()) -> bool:
    """Refuse an ``out`` that would lose data, before anything is written; True when an existing run will
    be replaced. ``out`` may be missing or an empty directory; a run hishrst wrote (marker ``fit-run``, or
    :func:`is_legacy_run`) is replaced only with ``overwrite``; anything else is never replaced
    (:class:`~hishrst_runtime.core.owned.ForeignOutputError`). ``out`` must not overlap any of ``inputs``."""
    return check_replaceable(Path(out), kind="fit-run", overwrite=overwrite, what="a trained run", option="--out",
                             inputs=inputs, legacy=is_legacy_run)


def _lock_error(out: Path, lock: SlideLock, command: str, option: str) -> OutputLockedError:
    info = lock.holder()
    who = info.describe() if info is not None else "another process"
    return OutputLockedError(f"{out}: another `hishrst {command}` ({who}) is writing this {option}; wait for it to "
                             f"finish or choose another {option} (lock file {lock.path}; delete it only if that "
                             "process is gone)")


@contextlib.contextmanager
def claim_output(out: Path, *, command: str, option: str = "--out") -> Iterator[list[Path]]:
    """Hold ``.<name>.lock`` beside ``out`` for the block (a held lock: :class:`OutputLockedError` at once)
    and delete killed runs' debris beside ``out`` first; yields the removed paths."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunOutputError(f"{out.parent}: cannot be created ({e.strerror or e}); choose another {option} or fix "
                             "its permissions") from e
    lock = SlideLock(out.with_name(f".{out.name}"))  # the lock file: .<name>.lock
    if not lock.acquire():
        raise _lock_error(out, lock, command, option)
    try:
        removed = clean_stale_siblings(out)
        for p in removed:
            log.warning("removed %s, left by a killed hishrst process", p)
        yield removed
    finally:
        lock.release()


def _is_disk_full(e: OSError) -> bool:
    text = str(e).lower()
    return e.errno in _NO_SPACE or "no space left" in text or "disk quota" in text or "errno = 28" in text


@contextlib.contextmanager
def disk_errors(out: Path, *, option: str = "--out") -> Iterator[None]:
    """A full disk / quota / read-only file system while writing ``out`` (an ``OSError``, with or without an
    errno, e.g. from HDF5) becomes one :class:`DiskFullError` naming ``out``; other errors pass."""
    try:
        yield
    except OSError as e:
        if isinstance(e, OutputStateError) or not _is_disk_full(e):
            raise
        reason = e.strerror or " ".join(str(e).split())[:200]
        raise DiskFullError(f"{out}: the disk is full (or read-only) while writing it ({reason}); free space or "
                            f"choose another {option} — nothing was written there") from e


@contextlib.contextmanager
def building_run(out: Path, *, kind: str = "fit-run", option: str = "--out") -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``out`` (marked as hishrst's ``kind`` output) to write into; on
    success it replaces ``out`` (:func:`~hishrst_runtime.core.files.swap_in`), on any failure it is
    deleted and ``out`` is untouched. A full disk is a :class:`DiskFullError` (:func:`disk_errors`)."""
    out = Path(out).absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = temp_sibling(out, "partial")
        work.mkdir()
    except PermissionError as e:
        raise RunOutputError(f"{out.parent}: not writable ({e.strerror}); choose another {option} or fix its "
                             "permissions") from e
    try:
        with disk_errors(out, option=option):
            mark_owned(work, kind)  # type: ignore[arg-type]
            yield work
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # an empty directory the user made for the output
            swap_in(work, out)
    except BaseException:
        remove_tree(work)
        raise
