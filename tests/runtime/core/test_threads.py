"""The thread rule: affinity, cgroup quota, busy cores, explicit values."""

from __future__ import annotations

import os

import pytest

from hishrst_runtime.core import threads
from hishrst_runtime.core.errors import InputError


def test_cgroup_v2_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.cgroup_cpu_limit(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_usable_cores_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda *a: 2.5)
    assert threads.usable_cores() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda *a: None)
    assert threads.usable_cores() == 8


def test_default_leaves_out_busy_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "_sampled_busy", lambda cores, interval: 2.2)
    assert threads.busy_cores(4) == 2
    monkeypatch.setattr(threads, "_sampled_busy", lambda cores, interval: None)  # no psutil: the load average
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 0, 0))
    assert threads.busy_cores(4) == 1
    monkeypatch.setattr(threads, "busy_cores", lambda cores: 2)
    assert threads.default_threads() == 2
    assert threads.default_threads(reserve=5) == 1  # never below one


def test_busy_cores_never_takes_every_core(monkeypatch):
    monkeypatch.setattr(threads, "_sampled_busy", lambda cores, interval: 50.0)
    assert threads.busy_cores(4) == 3


def test_a_busy_process_is_seen_at_once():
    """Two cores kept busy by another process are measured within the sampling interval (no 1-minute lag)."""
    import subprocess
    import sys

    if threads.usable_cores() < 2:
        pytest.skip("needs two cores")
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        import time

        time.sleep(0.3)
        assert threads._sampled_busy(threads.usable_cores(), 0.5) >= 1.2
    finally:
        for p in spin:
            p.kill()


def test_explicit_and_environment(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "3")
    assert threads.resolve_threads(None) == 3
    assert threads.resolve_threads(5) == 5
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(InputError, match="HISHRST_THREADS"):
        threads.resolve_threads(None)
    with pytest.raises(InputError, match="at least 1"):
        threads.resolve_threads(0)
