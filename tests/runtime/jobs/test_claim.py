"""``--claim`` (work stealing over one shared output folder), lock leases and heartbeats, and the shard
defaults of array-job engines (Slurm, Kubernetes Indexed Jobs, AWS Batch array jobs).

Claiming workers run as real processes (``hishrst-run --claim`` in subprocesses) on small synthetic OME-Zarr
discs with the tiny bundle; one is SIGKILLed mid-slide and another finishes its partial output exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hishrst_runtime.jobs.locks import LockHeartbeat, SlideLock, lock_path, refresh_interval
from hishrst_runtime.jobs.shards import SHARD_ENGINES, ShardSpecError, shard_choice_from_env, shard_from_env

REPO = Path(__file__).resolve().parents[3]
ENGINE_VARS = {v for e in SHARD_ENGINES for v in (e.index_var, e.count_var, e.min_var, e.step_var) if v}


# ------------------------------------------------------------------------------------ shard defaults


@pytest.mark.parametrize(("env", "want"), [
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4, "slurm")),
    ({"JOB_COMPLETION_INDEX": "3", "HISHRST_SHARD_COUNT": "5"}, (3, 5, "kubernetes")),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "0", "AWS_BATCH_JOB_ARRAY_SIZE": "10"}, (0, 10, "aws-batch")),
    # the first engine with its variables set wins (a Slurm job with a stray Kubernetes variable)
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "JOB_COMPLETION_INDEX": "0"}, (1, 2, "slurm")),
])
def test_shard_defaults_from_each_engine(env: dict[str, str], want: tuple[int, int, str]) -> None:
    choice = shard_choice_from_env(env)
    assert choice is not None and (choice.index, choice.count, choice.source) == want
    assert shard_from_env(env) == want[:2]
    assert choice.record()["source"] == want[2] and choice.record()["variables"]
    engine = next(e for e in SHARD_ENGINES if e.name == want[2])
    assert set(choice.variables) == {engine.index_var, engine.count_var}  # only the chosen engine's
    assert choice.describe() == f"{want[2]}: " + ", ".join(f"{k}={env[k]}" for k in choice.variables)


@pytest.mark.parametrize(("env", "match"), [
    ({"JOB_COMPLETION_INDEX": "1"}, "HISHRST_SHARD_COUNT is not.*spec.completions"),
    ({"HISHRST_SHARD_COUNT": "4"}, "JOB_COMPLETION_INDEX is not"),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "1"}, "AWS_BATCH_JOB_ARRAY_SIZE is not"),
    ({"JOB_COMPLETION_INDEX": "4", "HISHRST_SHARD_COUNT": "4"}, "Kubernetes Indexed Job.*0..HISHRST_SHARD_COUNT-1"),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "x", "AWS_BATCH_JOB_ARRAY_SIZE": "4"}, "AWS Batch array job variables"),
    ({"JOB_COMPLETION_INDEX": "0", "HISHRST_SHARD_COUNT": "0"}, "HISHRST_SHARD_COUNT=0"),
])
def test_bad_engine_variables_are_one_line(env: dict[str, str], match: str) -> None:
    with pytest.raises(ShardSpecError, match=match) as e:
        shard_choice_from_env(env)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------ lock leases


def write_lock(out: Path, *, hostname: str, pid: int, age_s: float = 0.0, lease: float | None = None) -> Path:
    p = lock_path(out)
    body: dict[str, Any] = {"hostname": hostname, "pid": pid, "started": time.time() - age_s, "token": "theirs"}
    if lease is not None:
        body["stale_after"] = lease
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(body))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_a_lease_decides_on_every_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.jobs.locks as locks

    out = tmp_path / "s.zarr"
    here = socket.gethostname()
    write_lock(out, hostname="other-node", pid=1, age_s=30, lease=60)
    assert not SlideLock(out, stale_after_s=1).acquire()  # refreshed within its lease: the reader's 1 s is moot
    write_lock(out, hostname="other-node", pid=1, age_s=90, lease=60)
    assert SlideLock(out).acquire()  # not refreshed for its lease, though the reader's default is 24 h
    monkeypatch.setattr(locks, "_pid_alive", lambda pid, started: True)  # a live holder on this host
    write_lock(out, hostname=here, pid=os.getpid(), age_s=90, lease=60)  # ... that stopped refreshing (frozen)
    assert SlideLock(out).acquire()
    write_lock(out, hostname=here, pid=os.getpid(), age_s=30, lease=60)
    assert not SlideLock(out).acquire()
    assert refresh_interval(600) == 60 and refresh_interval(8) == 2


def test_heartbeat_refreshes_and_notices_a_lost_lock(tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    lock = SlideLock(out, lease_s=0.4)
    assert lock.acquire()
    assert json.loads(lock.path.read_text())["stale_after"] == 0.4
    with LockHeartbeat(lock) as beat:
        assert beat.interval_s == pytest.approx(0.1)
        time.sleep(0.8)  # twice the lease: only the heartbeat keeps it fresh
        assert not SlideLock(out).acquire()
        beat.refresh()  # still ours: no error
        write_lock(out, hostname="other-node", pid=1, lease=600)  # broken as stale and retaken elsewhere
        deadline = time.monotonic() + 10
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        from hishrst_runtime.jobs.locks import LockLostError

        with pytest.raises(LockLostError, match="other-node"):
            beat.refresh()
    lock.release()
    assert lock_path(out).exists()  # the other job's lock stays


# ------------------------------------------------------------------------------------ claiming workers

ad = pytest.importorskip("anndata")
SIDE = 320

#: A ``hishrst-run`` child. ``slow SECONDS BARRIER N``: no-op engines, each slide SECONDS longer, starting once
#: N children have reached BARRIER; ``kill ROWS NTH``: output chunks of ROWS rows, SIGKILL of itself right
#: before its NTH progress record (``.bits`` replace); ``plain ROWS``: chunks of ROWS rows.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from hishrst_runtime.jobs import runner, slide_run
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "slow":
        from hishrst_runtime.inference.engines import noop_engines
        delay, barrier, n = float(rest[0]), rest[1], int(rest[2])
        rest = rest[3:]
        runner.load_engines = lambda bundle, provider, **kw: noop_engines(bundle)
        real = runner.run_prepared
        def slow(*a, **k):
            time.sleep(delay)
            return real(*a, **k)
        runner.run_prepared = slow
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        while len(os.listdir(barrier)) < n:
            time.sleep(0.01)
    else:
        slide_run.MAX_CHUNK_ROWS = int(rest[0])
        rest = rest[1:]
    if mode == "kill":
        nth, seen, real_replace = int(rest[0]), [0], os.replace
        rest = rest[1:]
        def replace(src, dst, *a, **k):
            if ".bits" in str(src) + str(dst):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *a, **k)
        os.replace = replace
    sys.argv = ["hishrst-run", *rest]
    from hishrst_runtime.cli.main import run_main
    run_main()
""")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENGINE_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_child(*args: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def make_slides(folder: Path, n: int, side: int = SIDE) -> list[Path]:
    from hishrst_runtime.slides.pyramid import write_ome_zarr
    from tests.runtime.images import disc_image

    folder.mkdir(parents=True, exist_ok=True)
    return [write_ome_zarr(disc_image(side), folder / f"s{i}.ome.zarr", mpp=0.5, chunk=256) for i in range(n)]


def history(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "hishrst_runs").glob("*.json"))]


def test_two_claiming_workers_share_the_slides_exactly_once(tmp_path: Path, tiny_bundle: Path) -> None:
    slides, out, barrier = make_slides(tmp_path / "slides", 4), tmp_path / "out", tmp_path / "barrier"
    barrier.mkdir()
    common = [*slides, "--bundle", tiny_bundle, "--out", out, "--claim", "--pitch-um", "40", "--no-progress"]
    procs = [start_child("slow", 0.6, barrier, 2, *common) for _ in range(2)]
    for proc in procs:
        rc, text = finish(proc)
        assert rc == 0, text
        assert "claim: 4 slides" in text
    reports = history(out)
    assert len(reports) == 2
    ran = [[s["slide"] for s in r["slides"] if s["status"] == "ok"] for r in reports]
    assert all(len(r) >= 1 for r in ran), ran  # both workers did work
    assert sorted(sum(ran, [])) == sorted(map(str, slides))  # together every slide, exactly once
    for r in reports:
        assert {s["status"] for s in r["slides"]} <= {"ok", "skipped"} and len(r["slides"]) == 4
        assert r["shard"] is None
    assert not list(out.glob("*.lock"))


@pytest.fixture
def noop(monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))


def test_stale_locks_are_taken_over_and_live_ones_left(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    from hishrst_runtime.jobs.runner import run_slides

    slides, out = make_slides(tmp_path / "slides", 3), tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    write_lock(out / "s0.zarr", hostname=socket.gethostname(), pid=dead.pid)  # dead pid on this host
    write_lock(out / "s1.zarr", hostname="other-node", pid=1, age_s=120, lease=60)  # not refreshed for its lease
    write_lock(out / "s2.zarr", hostname="other-node", pid=1, age_s=10, lease=60)  # alive elsewhere
    results = run_slides(slides, bundle_dir=tiny_bundle, out_dir=out, claim=True, stale_after=30, progress=False,
                         pitch_um=40, echo=lambda s: None)
    assert [r.status for r in results] == ["ok", "ok", "skipped"]
    assert "other-node" in results[2].reason
    assert json.loads(lock_path(out / "s2.zarr").read_text())["token"] == "theirs"


def test_claim_with_shard_or_overwrite_is_refused(tmp_path: Path, tiny_bundle: Path) -> None:
    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run

    slide = make_slides(tmp_path / "slides", 1)[0]
    base = [str(slide), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "out"), "--claim", "--no-progress"]
    r = CliRunner().invoke(run, [*base, "--shard", "0/2"])
    assert r.exit_code == 2 and "--claim and --shard are exclusive" in r.output
    r = CliRunner().invoke(run, [*base, "--overwrite"])
    assert r.exit_code == 2 and "--claim cannot be combined with --overwrite" in r.output
    r = CliRunner().invoke(run, [*base, "--stale-after", "0"])
    assert r.exit_code == 2 and "--stale-after" in r.output


def test_engine_shard_is_printed_and_recorded(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run

    slides, out = make_slides(tmp_path / "slides", 2), tmp_path / "out"
    env: dict[str, str | None] = {k: None for k in ENGINE_VARS}
    env.update({"JOB_COMPLETION_INDEX": "1", "HISHRST_SHARD_COUNT": "2"})
    r = CliRunner().invoke(run, [*map(str, slides), "--bundle", str(tiny_bundle), "--out", str(out), "--pitch-um",
                                 "40", "--no-progress"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "shard 1/2: 1 of 2 slides (from kubernetes: JOB_COMPLETION_INDEX=1, HISHRST_SHARD_COUNT=2)" in r.output
    shard = json.loads((out / "hishrst_run.shard-1-of-2.json").read_text())["shard"]
    assert shard == {"index": 1, "count": 2, "source": "kubernetes",
                     "variables": {"JOB_COMPLETION_INDEX": "1", "HISHRST_SHARD_COUNT": "2"}}


def test_killed_worker_slide_is_finished_exactly_by_a_claiming_one(tmp_path: Path, tiny_bundle: Path) -> None:
    from hishrst_runtime.output.store import OutputStore, partial_path

    slide = make_slides(tmp_path / "slides", 1)[0]
    args = ["--bundle", tiny_bundle, "--pitch-um", "8", "--provider", "cpu", "--batch-size", "16", "--no-progress"]
    rc, text = finish(start_child("plain", 32, slide, "--out", tmp_path / "ref", *args))
    assert rc == 0, text
    ref = ad.read_zarr(tmp_path / "ref" / "s0.zarr")
    assert ref.n_obs > 4 * 32  # several chunks, so the kill is mid-slide
    out = tmp_path / "out"
    rc, text = finish(start_child("kill", 32, 2, slide, "--out", out, "--claim", *args))  # after its 1st record
    assert rc == -signal.SIGKILL, text
    store = out / "s0.zarr"
    assert OutputStore.status(store) == "incomplete" and lock_path(store).exists()  # left by the dead worker
    rc, text = finish(start_child("plain", 32, slide, "--out", out, "--claim", *args))
    assert rc == 0, text
    assert OutputStore.status(store) == "complete" and not partial_path(store).exists()
    report = history(out)[-1]
    assert report["slides"][0]["status"] == "ok" and report["slides"][0]["resumed"] is True
    assert 0 < report["slides"][0]["computed"] < ref.n_obs  # the dead worker's rows were kept
    got = ad.read_zarr(store)
    assert got.X.dtype == ref.X.dtype and got.X.tobytes() == ref.X.tobytes()
    np.testing.assert_array_equal(got.obsm["spatial"], ref.obsm["spatial"])
    assert not lock_path(store).exists()


def test_run_slide_is_the_public_one_slide_entry_point(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    import hishrst_runtime

    slide, out = make_slides(tmp_path / "slides", 1)[0], tmp_path / "out"
    r = hishrst_runtime.run_slide(slide, bundle=tiny_bundle, out=out, pitch_um=40)
    assert r.status == "ok" and r.output == out / "s0.zarr" and r.points and r.points > 0
    again = hishrst_runtime.run_slide(str(slide), bundle=str(tiny_bundle), out=str(out), pitch_um=40)
    assert again.status == "skipped" and "already complete" in again.reason
    assert "run_slide" in hishrst_runtime.__all__
