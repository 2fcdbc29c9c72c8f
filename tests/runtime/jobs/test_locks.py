"""Tests for hishrst_runtime.jobs.locks: per-slide lock files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hishrst_runtime.jobs.locks import (
    LockInfo,
    SlideLock,
    SlideLockedError,
    lock_path,
)

REPO = Path(__file__).resolve().parents[3]
REPO = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------- locks


HOLDER = textwrap.dedent(
    """
    import sys, time
    from hishrst_runtime.jobs.locks import SlideLock
    out, ready, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    lock = SlideLock(out)
    got = lock.acquire(timeout=0)
    with open(ready, "w") as f:
        f.write("1" if got else "0")
    time.sleep(hold)
    if got:
        lock.release()
    """
)


def start_holder(out: Path, ready: Path, hold: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready), str(hold)], env=env)


def wait_for(path: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return path.read_text()


def write_lock(out: Path, *, hostname: str, pid: int, started: float, age_s: float = 0.0) -> Path:
    p = lock_path(out)
    p.write_text(json.dumps({"hostname": hostname, "pid": pid, "started": started, "token": "theirs"}))
    if age_s:
        t = time.time() - age_s
        os.utime(p, (t, t))
    return p


def test_lock_basic_and_context_manager(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    lock = SlideLock(out)
    assert lock.path == tmp_path / "slide.zarr.lock"
    assert lock.acquire() and lock.held
    info = json.loads(lock.path.read_text())
    assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname() and info["started"] <= time.time()
    assert lock.acquire()  # re-acquiring our own lock is a no-op
    other = SlideLock(out)
    assert not other.acquire(timeout=0)  # same host, live pid: held
    holder = other.holder()
    assert isinstance(holder, LockInfo) and holder.pid == os.getpid()
    with pytest.raises(SlideLockedError, match=f"pid {os.getpid()}"), SlideLock(out):
        pass
    lock.release()
    assert not lock.path.exists() and not lock.held
    with SlideLock(out) as held:
        assert held.held and held.path.exists()
    assert not lock.path.exists()


def test_lock_mutual_exclusion_between_processes(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    procs = [start_holder(out, tmp_path / f"ready{i}", hold=1.5) for i in range(2)]
    results = sorted(wait_for(tmp_path / f"ready{i}") for i in range(2))
    assert results == ["0", "1"]  # exactly one of two racing processes got it
    assert not SlideLock(out).acquire(timeout=0)  # and the parent cannot take it either
    t0 = time.monotonic()
    assert SlideLock(out, poll_interval_s=0.05).acquire(timeout=20)  # free once the holder releases
    assert time.monotonic() - t0 < 20
    for p in procs:
        p.wait(timeout=30)


def test_lock_of_killed_process_is_broken(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    proc = start_holder(out, tmp_path / "ready", hold=60)
    assert wait_for(tmp_path / "ready") == "1"
    proc.kill()
    proc.wait(timeout=30)
    assert lock_path(out).exists()  # left behind by the SIGKILL
    lock = SlideLock(out)
    assert lock.acquire(timeout=0)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_stale_dead_pid_same_host(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    out = tmp_path / "slide.zarr"
    write_lock(out, hostname=socket.gethostname(), pid=dead.pid, started=time.time())
    lock = SlideLock(out)
    assert lock.acquire()
    assert json.loads(lock.path.read_text())["token"] != "theirs"
    lock.release()


def test_pid_reuse_is_stale(tmp_path: Path) -> None:
    pytest.importorskip("psutil")
    out = tmp_path / "slide.zarr"
    # our pid is alive, but our process started long after this lock was taken: the pid was reused
    write_lock(out, hostname=socket.gethostname(), pid=os.getpid(), started=time.time() - 10 * 365 * 86400)
    assert SlideLock(out).acquire()


def test_other_host_locks_go_stale_with_age(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    write_lock(out, hostname="other-node-17", pid=1, started=time.time())
    assert not SlideLock(out).acquire()  # can't check another host's pid: fresh means held
    write_lock(out, hostname="other-node-17", pid=1, started=time.time() - 2 * 3600, age_s=2 * 3600)
    assert not SlideLock(out).acquire()  # 2 h < default 24 h
    assert SlideLock(out, stale_after_s=3600).acquire()  # configurable age
    write_lock(out, hostname="other-node-17", pid=1, started=time.time() - 25 * 3600, age_s=25 * 3600)
    assert SlideLock(out).acquire()
    # a refreshed (touched) lock is not stale even if it was started long ago
    write_lock(out, hostname="other-node-17", pid=1, started=time.time() - 25 * 3600)
    assert not SlideLock(out).acquire()


def test_unreadable_lock_file(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    p = lock_path(out)
    p.write_text("")  # a holder between O_EXCL create and its write
    assert not SlideLock(out).acquire()
    t = time.time() - 3600
    os.utime(p, (t, t))
    assert SlideLock(out).acquire()


def test_release_keeps_someone_elses_lock(tmp_path: Path) -> None:
    out = tmp_path / "slide.zarr"
    lock = SlideLock(out)
    assert lock.acquire()
    write_lock(out, hostname="other-node", pid=1, started=time.time())  # our lock was broken and retaken
    lock.release()
    assert lock_path(out).exists() and not lock.held
