"""Tests of ``hishrst-run`` as a command: kill -9 + --resume, many slides, shards, locks, providers.

Uses the session fixtures of ``conftest.py`` (``small_section`` → ``small_run`` → ``small_bundle``).
Most tests run on 600 × 600-pixel crops of the synthetic section (≈ 50 query points); the
kill/resume test runs a denser grid over the whole section so the run lasts a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

ad = pytest.importorskip("anndata")

from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from hishrst_runtime.jobs.locks import SlideLock  # noqa: E402
from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.jobs.runner import run_slides  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def section_image(small_section: Path) -> tuple[np.ndarray, float]:
    from hishrst_train.data import image_mpp, open_fullres_image

    tif = next(small_section.parent.glob("image.tif*"))
    with open_fullres_image(tif) as im:
        return np.asarray(im), float(image_mpp(tif))


@pytest.fixture(scope="module")
def slide_dir(section_image: tuple[np.ndarray, float], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``crop.ome.zarr`` (600 × 600 px, tissue and glass) and ``section.ome.zarr`` (the whole section)."""
    img, mpp = section_image
    d = tmp_path_factory.mktemp("cli_slides")
    write_ome_zarr(img[600:1200, 600:1200], d / "crop.ome.zarr", mpp=mpp, chunk=256)
    write_ome_zarr(img, d / "section.ome.zarr", mpp=mpp)
    return d


def copy_crop(slide_dir: Path, dest: Path, name: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(slide_dir / "crop.ome.zarr", dest / name))


def invoke(args: list[Any], env: dict[str, str] | None = None) -> Result:
    """Run ``hishrst-run`` in process; Slurm array variables of the test's own job are hidden."""
    base: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    return CliRunner().invoke(run, [str(a) for a in args] + ["--no-progress"], env={**base, **(env or {})},
                              catch_exceptions=False)


def status_of(out: Path) -> str:
    return OutputStore.status(out)


@pytest.fixture
def noop_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    """``hishrst-run`` in this test loads zero-returning engines (``noop`` is not a --provider choice)."""
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines as make

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: make(bundle))


# ------------------------------------------------------------------------------------------ kill -9 and --resume


def test_kill9_then_resume_gives_exactly_the_uninterrupted_x(slide_dir: Path, small_bundle: Path,
                                                             tmp_path: Path) -> None:
    slide = slide_dir / "section.ome.zarr"
    opts = ["--bundle", small_bundle, "--pitch-um", "40", "--batch-size", "16", "--provider", "cpu"]
    ref = run_slides([slide], bundle_dir=small_bundle, out_dir=tmp_path / "ref", pitch_um=40, batch_size=16,
                     provider="cpu", progress=False, echo=lambda s: None)[0]
    assert ref.status == "ok", ref
    x_ref = ad.read_zarr(ref.output)

    out_dir = tmp_path / "killed"
    out = out_dir / "section.zarr"
    progress_dir = partial_path(out) / ".hishrst_progress"
    cmd = [sys.executable, "-c", "from hishrst_runtime.cli.main import run_main; run_main()", str(slide),
           "--out", str(out_dir), "--no-progress", *map(str, opts)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (progress_dir.is_dir() and any(progress_dir.glob("chunk-*.bits"))):
            assert proc.poll() is None, f"hishrst-run ended before writing rows: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no rows were written within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()  # type: ignore[union-attr]

    # Killed: an incomplete output, marked as such, and no complete-looking store.
    assert status_of(out) == "incomplete" and not out.exists()
    attrs = json.loads((partial_path(out) / ".zattrs").read_text())
    assert attrs["hishrst_status"] == "incomplete"
    # Without --resume the incomplete output is refused with the fix; resuming with other points too.
    r = invoke([slide, "--out", out_dir, *opts])
    assert r.exit_code == 1 and "--resume" in r.output
    r = invoke([slide, "--out", out_dir, "--resume", *opts, "--pitch-um", "45"])
    assert r.exit_code == 1 and "different query points" in r.output and "--overwrite" in r.output
    # --resume finishes it (the dead job's lock is stale and broken) with exactly the same X.
    r = invoke([slide, "--out", out_dir, "--resume", *opts])
    assert r.exit_code == 0, r.output
    assert status_of(out) == "complete" and not partial_path(out).exists()
    got = ad.read_zarr(out)
    assert got.uns["hishrst_run"]["resumed"]
    assert got.uns["hishrst_run"]["points_computed"] < got.n_obs  # the rows on disk were kept
    np.testing.assert_array_equal(got.obsm["spatial"], x_ref.obsm["spatial"])
    assert np.array_equal(got.X, x_ref.X)
    # A finished output is skipped.
    r = invoke([slide, "--out", out_dir, *opts])
    assert r.exit_code == 0 and "already complete" in r.output


# ------------------------------------------------------------------------------------------ many slides


def test_one_broken_slide_does_not_stop_the_others(slide_dir: Path, small_bundle: Path, tmp_path: Path) -> None:
    good = copy_crop(slide_dir, tmp_path / "in", "good.ome.zarr")
    broken = copy_crop(slide_dir, tmp_path / "in", "broken.ome.zarr")
    (broken / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    out = tmp_path / "out"
    r = invoke([broken, good, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 1, r.output
    assert "engine: cpu (auto-selected)" in r.output  # auto says which provider it picked
    lines = r.output.splitlines()
    row = {name: next(ln for ln in lines if ln.startswith(name)) for name in ("good.ome.zarr", "broken.ome.zarr")}
    assert " ok " in row["good.ome.zarr"] and " failed " in row["broken.ome.zarr"]
    assert "not an OME-Zarr image" in r.output and "1 ok, 0 skipped, 1 failed" in r.output
    assert status_of(out / "good.zarr") == "complete"
    assert status_of(out / "broken.zarr") == "missing" and not partial_path(out / "broken.zarr").exists()
    assert sorted(p.name for p in out.iterdir()) == ["good.qc.png", "good.zarr", "hishrst_run.json", "hishrst_runs",
                                                     "summary.md"]
    # Re-running skips the finished slide unless --overwrite.
    before = json.loads((out / "good.zarr" / ".zattrs").read_text())["hishrst_completed_at"]
    r = invoke([good, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 0 and "already complete" in r.output
    r = invoke([good, "--bundle", small_bundle, "--out", out, "--overwrite", "--h5ad"])
    assert r.exit_code == 0 and "1 ok" in r.output
    assert json.loads((out / "good.zarr" / ".zattrs").read_text())["hishrst_completed_at"] > before
    assert (out / "good.h5ad").is_file()


def test_shards_partition_the_slides(slide_dir: Path, small_bundle: Path, tmp_path: Path, noop_engines: None) -> None:
    slides = [copy_crop(slide_dir, tmp_path / "in", f"s{i}.ome.zarr") for i in range(3)]
    done: list[set[str]] = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        r = invoke([*slides, "--bundle", small_bundle, "--out", out, "--shard", f"{i}/2"])
        assert r.exit_code == 0, r.output
        done.append({p.name for p in out.glob("*.zarr") if status_of(p) == "complete"})
    assert done[0].isdisjoint(done[1]) and done[0] | done[1] == {"s0.zarr", "s1.zarr", "s2.zarr"}
    # The default comes from a Slurm job array (--array=1-2: task 2 is the second shard); its slide is
    # the one the second shard finished, so it is skipped.
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "1"}
    r = invoke([*slides, "--bundle", small_bundle, "--out", tmp_path / "shard1"], env=env)
    assert r.exit_code == 0 and "shard 1/2: 1 of 3 slides" in r.output, r.output
    (only,) = done[1]
    assert "0 ok, 1 skipped" in r.output and f"{only[:-len('.zarr')]}.ome.zarr" in r.output
    r = invoke([*slides, "--bundle", small_bundle, "--out", tmp_path / "x", "--shard", "2/2"])
    assert r.exit_code == 2 and "0-based" in r.output


def test_next_slide_is_prepared_while_the_current_one_runs(monkeypatch: pytest.MonkeyPatch, small_bundle: Path,
                                                           tmp_path: Path) -> None:
    """Prefetch: the next slides are prepared in the background while slide i is prepared and runs; finished slides
    are never prepared."""
    import threading

    import hishrst_runtime.jobs.runner as run_cli
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.inference.engines import noop_engines
    from hishrst_runtime.jobs.results import SlideResult

    events: list[tuple[str, str, str]] = []
    closed: list[str] = []

    class FakePrep:
        def __init__(self, path: Path) -> None:
            self.path = path

        def close(self) -> None:
            closed.append(self.path.name)

    def fake_prepare(path: Path, *args: Any, **kw: Any) -> FakePrep:
        events.append(("prepare-start", Path(path).name, threading.current_thread().name))
        time.sleep(0.05)
        events.append(("prepare-end", Path(path).name, threading.current_thread().name))
        return FakePrep(Path(path))

    def fake_run_one(prep: FakePrep, out: Path, ctx: Any, lock: Any) -> SlideResult:
        events.append(("run-start", prep.path.name, ""))
        time.sleep(0.3)
        events.append(("run-end", prep.path.name, ""))
        return SlideResult(slide=str(prep.path), output=out, status="ok", points=1)

    monkeypatch.setattr(run_cli, "prepare_slide", fake_prepare)
    monkeypatch.setattr(run_cli, "run_prepared", fake_run_one)
    out = tmp_path / "out"
    (out / "b.zarr").mkdir(parents=True)
    (out / "b.zarr" / ".zattrs").write_text(json.dumps({"hishrst_status": "complete"}))
    slides = [tmp_path / f"{n}.ome.zarr" for n in "abc"]
    res = run_slides(slides, bundle_dir=small_bundle, out_dir=out, engines=noop_engines(load_bundle(small_bundle)),
                     progress=False, echo=lambda s: None)
    assert [r.status for r in res] == ["ok", "skipped", "ok"]
    assert [e[1] for e in events if e[0] == "prepare-start"] == ["a.ome.zarr", "c.ome.zarr"]  # b: complete
    assert all(e[2].startswith("hishrst-prefetch") for e in events if e[0] == "prepare-start")
    order = [(e[0], e[1]) for e in events]
    # c is prepared (on a second prefetch thread) while a is prepared, and before a's run ends.
    assert order.index(("prepare-start", "c.ome.zarr")) < order.index(("run-start", "a.ome.zarr"))
    assert order.index(("prepare-start", "c.ome.zarr")) < order.index(("run-end", "a.ome.zarr"))
    assert order.index(("prepare-end", "c.ome.zarr")) < order.index(("run-end", "a.ome.zarr"))
    assert sorted(closed) == ["a.ome.zarr", "c.ome.zarr"]


def test_engine_failure_before_any_row_leaves_no_output(monkeypatch: pytest.MonkeyPatch, slide_dir: Path,
                                                        small_bundle: Path, tmp_path: Path) -> None:
    from hishrst_runtime.backends.noop import NoopBackend
    from hishrst_runtime.inference.engines import Engines

    class Failing(NoopBackend):
        def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            raise RuntimeError("simulated engine failure")

    engines = Engines(Failing(lambda f: (0,)), NoopBackend(lambda f: (0,)), "cpu")
    out = tmp_path / "out"
    (r,) = run_slides([slide_dir / "crop.ome.zarr"], bundle_dir=small_bundle, out_dir=out, progress=False,
                      engines=engines, echo=lambda s: None)
    assert r.status == "failed" and "simulated engine failure" in r.reason
    assert list(out.iterdir()) == []


def test_held_lock_skips_the_slide(slide_dir: Path, small_bundle: Path, tmp_path: Path, noop_engines: None) -> None:
    slide = copy_crop(slide_dir, tmp_path / "in", "held.ome.zarr")
    out = tmp_path / "out"
    with SlideLock(out / "held.zarr"):  # held by this (live) process: another job is on it
        r = invoke([slide, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and f"locked by pid {os.getpid()}" in r.output
    assert status_of(out / "held.zarr") == "missing" and not partial_path(out / "held.zarr").exists()


def test_slides_writing_the_same_output_are_refused(slide_dir: Path, small_bundle: Path, tmp_path: Path) -> None:
    a = copy_crop(slide_dir, tmp_path / "a", "same.ome.zarr")
    b = copy_crop(slide_dir, tmp_path / "b", "same.zarr")
    r = invoke([a, b, "--bundle", small_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 2 and "same output" in r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ providers


def test_cuda_without_gpu_is_a_clear_error(slide_dir: Path, small_bundle: Path, tmp_path: Path) -> None:
    from hishrst_runtime.backends import provider_report

    if provider_report().get("cuda") is None:
        pytest.skip("CUDA is available on this machine")
    out = tmp_path / "out"
    r = invoke([slide_dir / "crop.ome.zarr", "--bundle", small_bundle, "--out", out, "--provider", "cuda"])
    assert r.exit_code == 1
    assert "provider 'cuda' is not available" in r.output and "Fix" in r.output
    assert not out.exists() or not any(out.iterdir())


def test_bad_options_are_usage_errors(slide_dir: Path, small_bundle: Path, tmp_path: Path) -> None:
    base = [slide_dir / "crop.ome.zarr", "--bundle", small_bundle, "--out", tmp_path / "out"]
    for extra, needle in ((["--pitch-um", "0"], "--pitch-um"), (["--min-tissue", "2"], "--min-tissue"),
                          (["--batch-size", "0"], "--batch-size"), (["--mpp", "-1"], "--mpp")):
        r = invoke([*base, *extra])
        assert r.exit_code == 2 and needle in r.output, (extra, r.output)
    assert not (tmp_path / "out").exists()


def test_engine_threads_option(small_bundle, tmp_path):
    """--engine-threads reaches ONNX Runtime; a bad value is a clear error before anything is written."""
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.core.errors import InputError
    from hishrst_runtime.inference.engines import load_engines
    from hishrst_runtime.jobs.runner import run_slides

    with pytest.raises(InputError, match="--engine-threads"):
        run_slides([tmp_path / "x.zarr"], bundle_dir=small_bundle, out_dir=tmp_path / "o", engine_threads=0, progress=False)
    assert not (tmp_path / "o").exists()
    enc, head, chosen = load_engines(load_bundle(small_bundle), "cpu", cache_dir=None, threads=1)
    try:
        assert chosen == "cpu"
        assert enc._session.get_session_options().intra_op_num_threads == 1
    finally:
        enc.close()
        head.close()


def test_default_threads_leave_cores_to_the_readers(monkeypatch):
    """ONNX Runtime gets the physical cores the reader threads leave free, at least one."""
    from hishrst_runtime.backends import base
    from hishrst_runtime.inference.engines import default_engine_threads
    from hishrst_runtime.jobs.runner import DEFAULT_WORKERS

    assert DEFAULT_WORKERS == 2
    for cores, threads in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 14)):
        monkeypatch.setattr(base, "default_threads", lambda c=cores: c)
        assert default_engine_threads(DEFAULT_WORKERS) == threads
    assert default_engine_threads(0) == 16 and default_engine_threads(40) == 1
