"""Sharding slides over jobs, and per-slide lock files, so many Slurm jobs can share one output folder.

Sharding
--------
:func:`shard_items` sorts the items by a stable key (by default ``str(item)``, i.e. the path
string) and deals them round-robin: shard ``i`` of ``n`` gets sorted items ``i, i + n, i + 2n, ...``.
The ``n`` shards partition the list exactly (every item in exactly one shard, for any ``n``, also
``n > len(items)``, when some shards are empty), and round-robin balances shards better than
contiguous blocks when slide sizes drift with their names. :func:`parse_shard` reads ``"I/N"``
(0-based ``I``); :func:`shard_from_env` reads a Slurm job array.

Locks
-----
:class:`SlideLock` guards one output ``OUT.zarr`` with the lock file ``OUT.zarr.lock``, created
atomically with ``os.open(O_CREAT | O_EXCL)`` (atomic on local filesystems and NFSv3+) and holding
JSON ``{hostname, pid, started, token}``. A job that cannot take a slide's lock skips the slide. A
lock is *stale*, and is broken, when its process is gone: on the same host, when its pid is dead
(or was reused by a process started after the lock); from another host, when the lock file was
not refreshed (:meth:`SlideLock.refresh` touches it) for ``stale_after_s`` (default 24 h). Breaking
is serialised by a second ``O_EXCL`` file (``OUT.zarr.lock.break``) and re-checks that the lock
is still the same stale one, so two jobs never break each other's fresh locks.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from hishrst_runtime.core.errors import InputError, OutputStateError

__all__ = [
    "ShardSpecError",
    "shard_items",
    "parse_shard",
    "shard_from_env",
    "LockInfo",
    "SlideLockedError",
    "SlideLock",
    "lock_path",
]

T = TypeVar("T")

DEFAULT_STALE_AFTER_S = 24 * 3600.0
_UNREADABLE_GRACE_S = 60.0  # a lock file still being written (empty/partial JSON) counts as held this long
_BREAK_TIMEOUT_S = 60.0  # a breaker file older than this was left by a killed process


class ShardSpecError(InputError):
    """A shard specification (``--shard I/N`` or Slurm array variables) is malformed or inconsistent."""


def shard_items(items: Sequence[T], *, index: int, count: int, key: Callable[[T], Any] = str) -> list[T]:
    """Shard ``index`` (0-based) of ``count``: sorted by ``key`` (default ``str``), then every
    ``count``-th item starting at ``index``. Over all indices the shards partition ``items`` exactly."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ShardSpecError(f"shard count must be an integer >= 1, got {count!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ShardSpecError(f"shard index must be an integer in [0, {count}), got {index!r}")
    return sorted(items, key=key)[index::count]


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (shard ``I`` of ``N``, 0-based, ``0 <= I < N``) into ``(I, N)``."""
    parts = str(spec).strip().split("/")
    if len(parts) != 2:
        raise ShardSpecError(f"shard {spec!r}: expected 'I/N' such as '0/4' (0-based index I of N shards)")
    try:
        index, count = int(parts[0]), int(parts[1])
    except ValueError as e:
        raise ShardSpecError(f"shard {spec!r}: I and N must be integers, as in '0/4'") from e
    if count < 1:
        raise ShardSpecError(f"shard {spec!r}: N must be >= 1")
    if not 0 <= index < count:
        raise ShardSpecError(f"shard {spec!r}: I must be in 0..{count - 1} (0-based); "
                             f"for the last of {count} shards write '{count - 1}/{count}'")
    return index, count


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(index, count)`` from a Slurm job array, or ``None`` outside one.

    ``index = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) // SLURM_ARRAY_TASK_STEP`` (MIN defaults to
    0, STEP to 1), so ``--array=1-8`` and ``--array=0-14:2`` both give indices ``0..count-1``;
    ``count = SLURM_ARRAY_TASK_COUNT``. Arrays with irregular ids (``--array=1,5,9``) cannot be mapped
    to shards: use ``--shard I/N`` there.
    """
    env = os.environ if environ is None else environ
    task_id, task_count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if task_id is None and task_count is None:
        return None
    if task_id is None or task_count is None:
        have, miss = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
        if task_id is None:
            have, miss = miss, have
        raise ShardSpecError(f"{have} is set but {miss} is not; run inside a Slurm job array or pass --shard I/N")
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
    raw = (task_id, task_count, env.get("SLURM_ARRAY_TASK_MIN", "0"), env.get("SLURM_ARRAY_TASK_STEP", "1"))
    try:
        tid, count, tmin, step = (int(str(v).strip()) for v in raw)
    except ValueError as e:
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, raw, strict=True))
        raise ShardSpecError(f"Slurm array variables must be integers ({shown})") from e
    if count < 1 or step < 1:
        raise ShardSpecError(f"SLURM_ARRAY_TASK_COUNT={count} and SLURM_ARRAY_TASK_STEP={step} must be >= 1")
    offset = tid - tmin
    if offset < 0 or offset % step or not 0 <= offset // step < count:
        raise ShardSpecError(
            f"Slurm array task {tid} does not map to a shard of {count} (SLURM_ARRAY_TASK_MIN={tmin}, "
            f"STEP={step}): the array ids must be MIN, MIN+STEP, ... ; use --shard I/N for irregular arrays")
    return offset // step, count


def lock_path(out_path: str | os.PathLike[str]) -> Path:
    """The lock file guarding an output: ``OUT.zarr`` -> ``OUT.zarr.lock``."""
    p = Path(out_path)
    return p.with_name(p.name + ".lock")


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: host, pid, start time (epoch s), a unique token, and the file's mtime."""

    hostname: str
    pid: int
    started: float
    token: str
    mtime: float

    def describe(self) -> str:
        """Human-readable holder, for logs and error messages."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.hostname}, since {stamp}"


class SlideLockedError(OutputStateError):
    """The slide's lock is held by another live job."""


def _pid_alive(pid: int, started: float) -> bool:
    """True if ``pid`` runs on this host and is (plausibly) the process that took the lock at ``started``."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        import psutil
    except ImportError:
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:
        return True
    return created <= started + 1.0  # a process created after the lock reused the dead holder's pid


class SlideLock:
    """Exclusive, stale-aware lock for one output (``OUT.zarr.lock``), usable as a context manager.

    ``with SlideLock(out):`` acquires (waiting up to ``timeout`` seconds) or raises
    :class:`SlideLockedError`; :meth:`acquire` returns a bool instead. Releasing removes the file only if
    it is still this lock's (same token).
    """

    def __init__(self, out_path: str | os.PathLike[str], *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 timeout: float = 0.0, poll_interval_s: float = 1.0) -> None:
        self.path = lock_path(out_path)
        self.stale_after_s = float(stale_after_s)
        self.timeout = float(timeout)
        self.poll_interval_s = float(poll_interval_s)
        self.hostname = socket.gethostname()
        self._token: str | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._token is not None

    def holder(self) -> LockInfo | None:
        """The current lock file's holder, or None when there is no (readable) lock file."""
        return self._read()[0]

    def _read(self) -> tuple[LockInfo | None, bytes | None, float | None]:
        """(parsed info, raw bytes, mtime); info is None when the file is missing or not (yet) valid."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None, None, None
        try:
            d = json.loads(raw.decode("utf-8"))
            info = LockInfo(str(d["hostname"]), int(d["pid"]), float(d["started"]), str(d["token"]), mtime)
        except (ValueError, KeyError, TypeError):
            return None, raw, mtime
        return info, raw, mtime

    def is_stale(self, info: LockInfo | None, *, mtime: float | None = None, now: float | None = None) -> bool:
        """Whether a lock (``info``; None = unreadable file with ``mtime``) belongs to a gone process."""
        now = time.time() if now is None else now
        if info is None:
            return mtime is not None and now - mtime > _UNREADABLE_GRACE_S
        if info.hostname == self.hostname:
            return not _pid_alive(info.pid, info.started)
        return now - max(info.started, info.mtime) > self.stale_after_s

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting up to ``timeout`` s (default: the constructor's, 0 = one try).

        Stale locks are broken on the way. Returns True when held, False when another live job holds it.
        """
        if self.held:
            return True
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            token = uuid.uuid4().hex
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, raw, mtime = self._read()
                if raw is None or (self.is_stale(info, mtime=mtime) and self._break(raw)):
                    continue  # vanished or broken just now: try again at once
                if time.monotonic() >= deadline:
                    return False
                time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
                continue
            body = {"hostname": self.hostname, "pid": os.getpid(), "started": time.time(), "token": token}
            try:
                os.write(fd, json.dumps(body).encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
            self._token = token
            return True

    def _break(self, stale_raw: bytes) -> bool:
        """Remove the lock file if it still holds ``stale_raw``, serialised with other breakers.

        Returns False when another process is breaking it right now (then wait and look again).
        """
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > _BREAK_TIMEOUT_S:  # its breaker was killed
                    breaker.unlink()
            return False
        try:
            if self._read()[1] == stale_raw:  # still the same stale lock, not a fresh one taken meanwhile
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()
        return True

    def refresh(self) -> None:
        """Touch the lock file (a heartbeat for jobs that may run longer than ``stale_after_s``)."""
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still ours; no-op when not held."""
        if not self.held:
            return
        info = self._read()[0]
        if info is not None and info.token == self._token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._token = None

    def __enter__(self) -> SlideLock:
        if not self.acquire():
            info = self.holder()
            who = info.describe() if info is not None else "another job"
            raise SlideLockedError(f"{self.path}: locked by {who}; it is being processed elsewhere "
                                   f"(delete the lock file if that job is gone)")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SlideLock({str(self.path)!r}, held={self.held})"
