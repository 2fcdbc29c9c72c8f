"""Tests for hishrst_runtime.jobs.locks: slide sharding, Slurm array parsing and per-slide lock files."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hishrst_runtime.jobs.locks import (
    LockInfo,
    ShardSpecError,
    SlideLock,
    SlideLockedError,
    lock_path,
    parse_shard,
    shard_from_env,
    shard_items,
)

REPO = Path(__file__).resolve().parents[3]


# ------------------------------------------------------------------------------------ sharding


def check_partition(items: list, count: int) -> None:
    shards = [shard_items(items, index=i, count=count) for i in range(count)]
    flat = [x for shard in shards for x in shard]
    assert sorted(flat, key=str) == sorted(items, key=str)  # every item exactly once
    assert len(flat) == len(items)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1  # balanced
    shuffled = random.Random(count).sample(items, len(items))
    assert [shard_items(shuffled, index=i, count=count) for i in range(count)] == shards  # order-independent


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16, 33])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 8, 40])
def test_shards_partition_exactly(n: int, count: int) -> None:
    check_partition([Path(f"/data/slides/s{i:03d}.svs") for i in range(n)], count)


def test_shards_property() -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=100, deadline=None)
    @hypothesis.given(st.lists(st.text(max_size=6), max_size=30), st.integers(min_value=1, max_value=12))
    def prop(items: list[str], count: int) -> None:
        check_partition(items, count)

    prop()


def test_shard_items_sorts_by_path_string_and_validates() -> None:
    items = [Path("b.svs"), Path("a.svs"), Path("c.svs")]
    assert shard_items(items, index=0, count=2) == [Path("a.svs"), Path("c.svs")]
    assert shard_items(items, index=1, count=2) == [Path("b.svs")]
    for index, count in [(2, 2), (-1, 2), (0, 0), (True, 2)]:
        with pytest.raises(ShardSpecError):
            shard_items(items, index=index, count=count)


def test_parse_shard() -> None:
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard(" 3/4 ") == (3, 4)
    assert parse_shard("0/1") == (0, 1)
    for bad in ["4/4", "-1/4", "1", "a/b", "1/0", "1/2/3", "", "1.5/4"]:
        with pytest.raises(ShardSpecError, match="shard"):
            parse_shard(bad)
    with pytest.raises(ShardSpecError, match="3/4"):  # suggests the 0-based last shard
        parse_shard("4/4")


def test_shard_from_env() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    # --array=1-4: ids 1..4 with MIN=1
    got = [shard_from_env({"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "4",
                           "SLURM_ARRAY_TASK_MIN": "1"}) for i in range(1, 5)]
    assert got == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # --array=10-16:3: ids 10, 13, 16
    got = [shard_from_env({"SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
                           "SLURM_ARRAY_TASK_STEP": "3"}) for i in (10, 13, 16)]
    assert got == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ShardSpecError, match="SLURM_ARRAY_TASK_COUNT is not"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(ShardSpecError, match="SLURM_ARRAY_TASK_ID is not"):
        shard_from_env({"SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ShardSpecError, match="integers"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"})
    for env in [
        {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"},  # 1-based ids without MIN
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
        {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
         "SLURM_ARRAY_TASK_STEP": "3"},
        {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "0"},
    ]:
        with pytest.raises(ShardSpecError, match="SLURM"):
            shard_from_env(env)
    os_env = dict(os.environ)
    if "SLURM_ARRAY_TASK_ID" not in os_env and "SLURM_ARRAY_TASK_COUNT" not in os_env:
        assert shard_from_env() is None  # reads os.environ by default


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
