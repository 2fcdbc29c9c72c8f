"""SIGTERM / SIGINT during ``hishrst-run`` ("nothing silently wrong", item 3): the run report says
``interrupted`` for the slide in flight, the process exits with ``128 + signum`` (143 / 130), and ``--resume``
then gives exactly the uninterrupted X.

The child process signals itself at a fixed moment (right before the N-th progress record is renamed in),
so the case is deterministic. Torch-free: the tiny ONNX bundle on a small textured synthetic slide.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from tests.runtime.images import textured_disc  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
CHUNK_ROWS = 16

#: In the child: output chunks of CHUNK_ROWS rows; the process sends itself ``signum`` right before the
#: N-th ``os.replace`` of a progress record (``.bits``), then goes on as a real process would.
CHILD = textwrap.dedent("""
    import os, sys
    from hishrst_runtime.jobs import slide_run
    slide_run.MAX_CHUNK_ROWS = int(sys.argv[1])
    signum, nth = int(sys.argv[2]), int(sys.argv[3])
    seen = [0]
    real = os.replace
    def hooked(src, dst, *a, **k):
        if ".bits" in str(dst):
            seen[0] += 1
            if seen[0] == nth:
                os.kill(os.getpid(), signum)
        return real(src, dst, *a, **k)
    os.replace = hooked
    sys.argv = ["hishrst-run", *sys.argv[4:]]
    from hishrst_runtime.cli.main import run_main
    run_main()
""")




@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ome_zarr(textured_disc(), tmp_path_factory.mktemp("interrupt") / "disc.ome.zarr", mpp=0.5,
                          chunk=256)


def child(slide: Path, bundle: Path, out: Path, signum: int, nth: int, *extra: str) -> subprocess.CompletedProcess:
    args = [str(slide), "--bundle", str(bundle), "--out", str(out), "--provider", "cpu", "--pitch-um", "8",
            "--batch-size", "16", "--workers", "1", "--engine-threads", "1", "--no-progress", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY_")} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, str(CHUNK_ROWS), str(signum), str(nth), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def uninterrupted(slide: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    proc = child(slide, tiny_bundle, out, signal.SIGTERM, 10**9)
    assert proc.returncode == 0, proc.stderr
    return out / "disc.zarr"


def x_chunks(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (store / "X").iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_an_interrupted_report_and_resume_is_exact(signum: int, status: int, slide: Path,
                                                                 tiny_bundle: Path, uninterrupted: Path,
                                                                 tmp_path: Path) -> None:
    assert len(x_chunks(uninterrupted)) > 6  # several chunks: the signal comes mid-way
    proc = child(slide, tiny_bundle, tmp_path, signum, 3)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"interrupted by {signal.Signals(signum).name}" in proc.stderr and "--resume" in proc.stderr
    out = tmp_path / "disc.zarr"
    assert OutputStore.status(out) == "incomplete" and partial_path(out).is_dir()
    assert not (tmp_path / "disc.zarr.lock").exists()  # the lock was released
    report = json.loads((tmp_path / "hishrst_run.json").read_text())
    assert report["interrupted"] == signal.Signals(signum).name
    assert report["counts"]["interrupted"] == 1 and report["counts"]["slides"] == 1
    (entry,) = report["slides"]
    assert entry["status"] == "interrupted" and "--resume" in entry["reason"]
    assert "interrupted" in (tmp_path / "summary.md").read_text()
    done = OutputStore.open_incomplete(out).done_mask()
    assert 0 < done.sum() < done.size  # the rows finished before the signal were kept

    proc = child(slide, tiny_bundle, tmp_path, signum, 10**9, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert OutputStore.status(out) == "complete"
    assert x_chunks(out) == x_chunks(uninterrupted)
    report = json.loads((tmp_path / "hishrst_run.json").read_text())
    assert report["slides"][0]["status"] == "ok" and report["interrupted"] is None
