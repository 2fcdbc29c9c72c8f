"""Per-slide lock files, so many jobs (Slurm arrays, several hosts) can share one output folder.

:class:`SlideLock` guards one output ``OUT.zarr`` with the lock file ``OUT.zarr.lock``, created
atomically with ``os.open(O_CREAT | O_EXCL)`` (atomic on local filesystems and NFSv3+) and holding
JSON ``{hostname, pid, started, token, stale_after}``. A job that cannot take a slide's lock skips the slide.
A lock is *stale*, and is broken, when its process is gone:

- a lock with a lease (``stale_after``: the holder's ``--stale-after``, written by ``SlideLock(lease_s=...)``):
  when the lock file was not refreshed for that many seconds, on any host — its holder promises to refresh
  it (:class:`LockHeartbeat`, a thread touching it every ``min(60 s, lease / 4)``), so a lock that stays
  unrefreshed belongs to a dead (or frozen) job, also on another host where its pid cannot be checked;
- any lock on the same host, when its pid is dead (or was reused by a process started after the lock);
- a lock without a lease (older hishrst) from another host, when the lock file was not refreshed
  (:meth:`SlideLock.refresh` touches it) for the reader's ``stale_after_s`` (default 24 h).

The holder's own lease decides, not the reader's setting, so no reader can break a lock that is being
refreshed; keep the lease well above the clock skew between the hosts and the file server. Breaking
is serialised by a second ``O_EXCL`` file (``OUT.zarr.lock.break``) and re-checks that the lock
is still the same stale one, so two jobs never break each other's fresh locks. A lock file that
cannot be created at all (read-only folder, permissions) raises :class:`LockUnavailableError`
naming the path, and so does a lock path that exists but is not a readable file (a directory, a symlink
loop).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.output.names import SlideOutputs

__all__ = ["LockInfo", "SlideLockedError", "LockUnavailableError", "LockLostError", "SlideLock", "LockHeartbeat",
           "lock_path", "refresh_interval", "DEFAULT_LEASE_S"]

DEFAULT_STALE_AFTER_S = 24 * 3600.0
_UNREADABLE_GRACE_S = 60.0  # a lock file still being written (empty/partial JSON) counts as held this long
_BREAK_TIMEOUT_S = 60.0  # a breaker file older than this was left by a killed process
#: Default lease of ``hishrst-run``'s locks (``--stale-after``, seconds).
DEFAULT_LEASE_S = 600.0
#: A leased lock is refreshed at least this often (seconds), and at least 4 times per lease.
MAX_REFRESH_S = 60.0


def refresh_interval(lease_s: float) -> float:
    """Seconds between the heartbeats of a lock with lease ``lease_s``: ``min(60, lease / 4)``."""
    return min(MAX_REFRESH_S, float(lease_s) / 4.0)


def lock_path(out_path: str | os.PathLike[str]) -> Path:
    """The lock file guarding an output: ``OUT.zarr`` -> ``OUT.zarr.lock``."""
    return SlideOutputs.of(Path(out_path)).lock


@dataclass(frozen=True)
class LockInfo:
    """Who holds a lock: host, pid, start time (epoch s), a unique token, the file's mtime, and the holder's
    lease (seconds it may go unrefreshed; None for a lock without one)."""

    hostname: str
    pid: int
    started: float
    token: str
    mtime: float
    lease_s: float | None = None

    def describe(self) -> str:
        """Human-readable holder, for logs and error messages."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.hostname}, since {stamp}"


class SlideLockedError(OutputStateError):
    """The slide's lock is held by another live job."""


class LockUnavailableError(OutputStateError, PermissionError):
    """The lock file cannot be created (read-only or not-writable folder, permissions, disk full)."""


class LockLostError(OutputStateError):
    """This job's lock was broken as stale and taken by another job (this job was frozen past its lease)."""


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
                 timeout: float = 0.0, poll_interval_s: float = 1.0, lease_s: float | None = None) -> None:
        self.path = lock_path(out_path)
        self.stale_after_s = float(stale_after_s)
        self.lease_s = None if lease_s is None else float(lease_s)  # written into the lock: keep it refreshed
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
        except OSError as e:  # a directory, a symlink loop, no permission: not a lock hishrst can use
            what = "is a directory, not a lock file" if self.path.is_dir() else f"cannot be read ({e.strerror or e})"
            raise LockUnavailableError(f"{self.path}: the slide's lock path {what}; remove it if no job is "
                                       "running this slide, or choose another --out") from e
        try:
            d = json.loads(raw.decode("utf-8"))
            lease = d.get("stale_after")
            info = LockInfo(str(d["hostname"]), int(d["pid"]), float(d["started"]), str(d["token"]), mtime,
                            None if lease is None else float(lease))
        except (ValueError, KeyError, TypeError):
            return None, raw, mtime
        return info, raw, mtime

    def is_stale(self, info: LockInfo | None, *, mtime: float | None = None, now: float | None = None) -> bool:
        """Whether a lock (``info``; None = unreadable file with ``mtime``) belongs to a gone process."""
        now = time.time() if now is None else now
        if info is None:
            return mtime is not None and now - mtime > _UNREADABLE_GRACE_S
        age = now - max(info.started, info.mtime)
        if info.lease_s is not None and age > info.lease_s:  # its holder stopped refreshing it
            return True
        if info.hostname == self.hostname:
            return not _pid_alive(info.pid, info.started)
        return info.lease_s is None and age > self.stale_after_s

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock, waiting up to ``timeout`` s (default: the constructor's, 0 = one try).

        Stale locks are broken on the way. Returns True when held, False when another live job holds it.
        """
        if self.held:
            return True
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        while True:
            token = uuid.uuid4().hex
            try:
                fd = self._create()
            except FileExistsError:
                info, raw, mtime = self._read()
                if raw is None or (self.is_stale(info, mtime=mtime) and self._break(raw)):
                    continue  # vanished or broken just now: try again at once
                if time.monotonic() >= deadline:
                    return False
                time.sleep(max(0.0, min(self.poll_interval_s, deadline - time.monotonic())))
                continue
            body: dict[str, object] = {"hostname": self.hostname, "pid": os.getpid(), "started": time.time(),
                                       "token": token}
            if self.lease_s is not None:
                body["stale_after"] = self.lease_s
            try:
                os.write(fd, json.dumps(body).encode("utf-8"))
                os.fsync(fd)
            except OSError as e:  # disk full, quota: leave no half-written lock behind
                with contextlib.suppress(OSError):
                    self.path.unlink()
                raise LockUnavailableError(f"{self.path}: cannot write the lock file ({e.strerror or e}); "
                                           "free space in the output folder or choose another --out") from e
            finally:
                os.close(fd)
            self._token = token
            return True

    def _create(self) -> int:
        """``O_EXCL``-create the lock file; raises FileExistsError when it exists, or
        :class:`LockUnavailableError` naming the path when it cannot be created at all."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise
        except OSError as e:
            raise LockUnavailableError(f"{self.path}: cannot create the lock file ({e.strerror or e}); make "
                                       "the output folder writable or choose another --out") from e

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

    def refresh(self) -> bool:
        """Touch the lock file (a heartbeat for jobs that may run longer than ``stale_after_s``); False when
        the file is no longer this lock's (broken as stale and perhaps taken by another job) or not held."""
        if not self.held:
            return False
        info = self._read()[0]
        if info is None or info.token != self._token:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.path)
        return True

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


class LockHeartbeat:
    """Refresh a held lock on a daemon thread every ``interval_s`` (default :func:`refresh_interval` of its
    lease), while in the ``with`` block, so other jobs (on any host) see its holder alive.

    :meth:`refresh` (called by the slide loop as it makes progress) raises :class:`LockLostError` once the lock
    was found broken and taken over, so the job stops writing a slide that is no longer its own.
    """

    def __init__(self, lock: SlideLock, interval_s: float | None = None) -> None:
        self.lock = lock
        lease = lock.lease_s if lock.lease_s is not None else lock.stale_after_s
        self.interval_s = float(interval_s) if interval_s is not None else refresh_interval(lease)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.lock.refresh():
                    self.lost = self.lock.held
                    return
            except OSError:  # a file-server hiccup: try again at the next beat
                continue

    def refresh(self) -> None:
        """Raise :class:`LockLostError` when the lock was taken over; the thread does the refreshing."""
        if self.lost:
            info = self.lock.holder()
            who = info.describe() if info is not None else "nobody now"
            raise LockLostError(f"{self.lock.path}: this job's lock went stale (not refreshed for its lease) and was "
                                f"broken (holder: {who}); the slide is left to the job that holds it now")

    def __enter__(self) -> LockHeartbeat:
        self._thread = threading.Thread(target=self._beat, name="hishrst-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
