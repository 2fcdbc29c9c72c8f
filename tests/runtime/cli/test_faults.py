"""Fault tests of ``hishrst-run`` (issue 10): outputs never touch inputs, ``--overwrite`` keeps the old
output until the new one is complete, per-slide lock failures, unwritable outputs, URL arguments, bad
option values, and the kill -9 / ``--resume`` matrix (early, mid, inside finalize).

Runs on a 600 × 600-pixel crop of the synthetic section (``conftest.py``: ``small_section`` →
``small_bundle``); every case takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

ad = pytest.importorskip("anndata")

from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
#: Output X chunks of this many rows in every run here, so a slide spans several chunks.
CHUNK_ROWS = 64


@pytest.fixture(scope="module")
def crop(small_section: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``crop.ome.zarr``: 600 × 600 pixels of the section (tissue and glass), 256-pixel chunks."""
    from hishrst_train.data import image_mpp, open_fullres_image

    tif = next(small_section.parent.glob("image.tif*"))
    with open_fullres_image(tif) as im:
        img, mpp = np.asarray(im), float(image_mpp(tif))
    return write_ome_zarr(img[600:1200, 600:1200], tmp_path_factory.mktemp("faults") / "crop.ome.zarr", mpp=mpp,
                          chunk=256)


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file below ``path`` (or of the file), by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def invoke(args: list[Any]) -> Result:
    """``hishrst-run`` in process, one-line errors expected (no traceback)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    r = CliRunner().invoke(run, [str(a) for a in args] + ["--no-progress"], env=env, catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


def error_line(r: Result) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.fixture
def noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero-returning engines for cases whose values do not matter."""
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))


# ------------------------------------------------------------------------------------------ outputs vs inputs


@pytest.mark.parametrize("case", ["output_is_slide", "out_is_bundle", "out_inside_slide", "output_above_slide"])
def test_outputs_never_touch_inputs(case: str, crop: Path, small_bundle: Path, tmp_path: Path, noop: None) -> None:
    """BAD #1: an output resolving to, inside or above an input slide or the bundle is refused up front."""
    data = tmp_path / "data"
    bundle = Path(shutil.copytree(small_bundle, tmp_path / "bundle"))
    if case == "output_is_slide":  # hishrst-run DIR/name.zarr --out DIR --overwrite
        slide, out = Path(shutil.copytree(crop, data / "name.zarr")), data
    elif case == "out_is_bundle":
        slide, out = Path(shutil.copytree(crop, data / "a.ome.zarr")), bundle
    elif case == "out_inside_slide":
        slide = Path(shutil.copytree(crop, data / "a.ome.zarr"))
        out = slide / "preds"
    else:  # the slide lives inside the output store's path: OUT/a.zarr/x.ome.zarr
        slide = Path(shutil.copytree(crop, data / "a.zarr" / "a.ome.zarr"))
        out = data
    before = {"slide": tree_digest(slide), "bundle": tree_digest(bundle)}
    r = invoke([slide, "--bundle", bundle, "--out", out, "--overwrite"])
    assert r.exit_code == 1, r.output
    line = error_line(r)
    assert "input" in line or "bundle" in line
    assert str(out) in line or str(slide) in line
    assert {"slide": tree_digest(slide), "bundle": tree_digest(bundle)} == before
    assert not (out / "preds").exists() and not list(data.rglob("*.lock"))


def test_foreign_store_at_the_output_is_left_alone(crop: Path, small_bundle: Path, tmp_path: Path, noop: None) -> None:
    """A store hishrst did not write is never replaced, and the hint does not suggest --overwrite."""
    out = tmp_path / "out"
    foreign = Path(shutil.copytree(crop, out / "crop.zarr"))  # someone else's zarr where the output would go
    before = tree_digest(foreign)
    for flags in ([], ["--overwrite"], ["--resume"]):
        r = invoke([crop, "--bundle", small_bundle, "--out", out, *flags])
        assert r.exit_code == 1, r.output
        assert f"{foreign}: exists and was not written by hishrst-run" in r.output
        assert "--overwrite" not in r.output.split("was not written", 1)[1].splitlines()[0]
    assert tree_digest(foreign) == before


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(
        crop: Path, small_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """BAD #2: --overwrite that fails mid-way leaves the earlier complete output exactly as it was."""
    from hishrst_runtime.jobs import slide_run

    monkeypatch.setattr(slide_run, "MAX_CHUNK_ROWS", CHUNK_ROWS)
    out = tmp_path / "out"
    r = invoke([crop, "--bundle", small_bundle, "--out", out, "--provider", "cpu", "--pitch-um", "25"])
    assert r.exit_code == 0, r.output
    before = tree_digest(out / "crop.zarr")
    calls = []
    write_rows = OutputStore.write_rows

    def failing(self: OutputStore, rows: np.ndarray, values: np.ndarray) -> None:
        calls.append(len(rows))
        if len(calls) == 3:
            raise OSError(28, "No space left on device (simulated)")
        write_rows(self, rows, values)

    monkeypatch.setattr(OutputStore, "write_rows", failing)
    r = invoke([crop, "--bundle", small_bundle, "--out", out, "--provider", "cpu", "--pitch-um", "25", "--overwrite",
                "--batch-size", "16"])
    assert r.exit_code == 1 and "No space left" in r.output, r.output
    assert OutputStore.status(out / "crop.zarr") == "complete"
    assert tree_digest(out / "crop.zarr") == before


# ------------------------------------------------------------------------------------------ locks, folders, URLs


def test_a_lock_that_cannot_be_created_fails_only_that_slide(crop: Path, small_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, noop: None) -> None:
    import hishrst_runtime.jobs.locks as locks

    bad = Path(shutil.copytree(crop, tmp_path / "in" / "bad.ome.zarr"))
    good = Path(shutil.copytree(crop, tmp_path / "in" / "good.ome.zarr"))
    real_open = os.open

    def deny(path: Any, flags: int, *a: Any) -> int:
        if str(path).endswith("bad.zarr.lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(locks.os, "open", deny)
    out = tmp_path / "out"
    r = invoke([bad, good, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 1, r.output
    assert "1 ok, 0 skipped, 1 failed" in r.output
    reason = next(ln for ln in r.output.splitlines() if "bad.zarr.lock" in ln)
    assert f"{out / 'bad.zarr.lock'}: cannot create the lock file" in reason and "--out" in reason
    assert OutputStore.status(out / "good.zarr") == "complete" and OutputStore.status(out / "bad.zarr") == "missing"


def test_unwritable_output_location_is_one_line(crop: Path, small_bundle: Path, tmp_path: Path, noop: None) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, code in ((blocker, 2), (blocker / "sub", 1)):  # 2: click's own check of --out
        r = invoke([crop, "--bundle", small_bundle, "--out", out])
        assert r.exit_code == code, r.output
        assert str(out) in error_line(r) and "--out" in error_line(r)
    assert blocker.read_text() == "not a folder"


def test_read_only_output_folder_fails_each_slide(crop: Path, small_bundle: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, noop: None) -> None:
    """An --out folder that refuses new entries (``chmod a-w``): each slide fails on its lock naming the
    lock file, the run report is only warned about, nothing is written, no traceback; an --out that would
    have to be created inside it is one ``Error:`` line. Simulated at the OS calls (also holds as root)."""
    from tests.runtime.output.test_reliability import refuse_writes_in

    slides = [Path(shutil.copytree(crop, tmp_path / "in" / f"{name}.ome.zarr")) for name in ("a", "b")]
    out = tmp_path / "ro"
    out.mkdir()
    refused = refuse_writes_in(monkeypatch, out)
    r = invoke([*slides, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 1, r.output
    for name in ("a", "b"):
        lock = out / f"{name}.zarr.lock"
        reason = next((ln for ln in r.output.splitlines() if str(lock) in ln), None)
        assert reason is not None and f"{lock}: cannot create the lock file (Permission denied)" in reason, r.output
        assert "--out" in reason
    assert "0 ok, 0 skipped, 2 failed" in r.output, r.output
    assert any("run report" in ln and str(out) in ln for ln in r.output.splitlines()), r.output
    assert str(out / "a.zarr.lock") in refused
    new = out / "new"
    r = invoke([slides[0], "--bundle", small_bundle, "--out", new])
    assert r.exit_code == 1, r.output
    assert f"{new}: cannot create the output folder (Permission denied)" in error_line(r) and "--out" in error_line(r)
    monkeypatch.undo()
    assert list(out.iterdir()) == []  # no lock, store, partial or report left behind


@pytest.mark.parametrize("url", ["s3://bucket/slides/x.ome.zarr", "https://example.org/x.ome.zarr"])
def test_url_slides_are_not_mangled_into_paths(url: str, crop: Path, small_bundle: Path, tmp_path: Path,
                                               noop: None) -> None:
    out = tmp_path / "out"
    r = invoke([url, crop, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 1, r.output
    # Passed to the slide reader as given (remote OME-Zarr): here it cannot be reached (no network, no
    # credentials, or no remote extra), which fails this slide only, naming the URL.
    assert url in r.output and ("remote" in r.output or "not supported yet" in r.output), r.output
    assert url.replace("://", ":/") not in r.output.replace(url, "")  # never mangled into s3:/bucket/...
    assert "1 ok, 0 skipped, 1 failed" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["crop.qc.png", "crop.zarr", "hishrst_run.json", "hishrst_runs", "summary.md"]


@pytest.mark.parametrize("extra, needle, code", [
    (["--provider", "noop"], "--provider", 2), (["--grid", "hexa"], "--grid", 2),
    (["--workers", "-1"], "--workers", 2), (["--engine-threads", "0"], "--engine-threads", 2),
    (["--mpp", "nan"], "--mpp", 2), (["--batch-size", "x"], "--batch-size", 2),
])
def test_bad_option_values_are_one_line(extra: list[str], needle: str, code: int, crop: Path, small_bundle: Path,
                                        tmp_path: Path) -> None:
    r = invoke([crop, "--bundle", small_bundle, "--out", tmp_path / "out", *extra])
    assert r.exit_code == code and needle in error_line(r), r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ kill -9 matrix

#: In the child: output chunks of CHUNK_ROWS rows, and SIGKILL of itself right before the N-th
#: ``os.replace`` / ``os.rename`` whose source or target matches the moment's pattern.
CHILD = textwrap.dedent("""
    import os, signal, sys
    from hishrst_runtime.jobs import slide_run
    slide_run.MAX_CHUNK_ROWS = int(sys.argv[1])
    pattern, nth = sys.argv[2], int(sys.argv[3])
    seen = [0]
    def hook(real):
        def wrapped(src, dst, *a, **k):
            if pattern in str(src) + "|" + str(dst):
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)
        return wrapped
    os.replace, os.rename = hook(os.replace), hook(os.rename)
    sys.argv = ["hishrst-run", *sys.argv[4:]]
    from hishrst_runtime.cli.main import run_main
    run_main()
""")

#: moment -> (pattern, n): early (before the first chunk's progress bits), mid (before the third),
#: inside finalize (before the consolidated metadata; before the final rename of ``.partial``).
MOMENTS = {
    "early": (".bits", 1),
    "mid": (".bits", 3),
    "finalize_metadata": (".zmetadata", 1),
    "finalize_rename": (".partial|", 1),
}


@pytest.fixture(scope="module")
def uninterrupted(crop: Path, small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    _child(crop, small_bundle, out, "never-matches", 1)
    assert OutputStore.status(out / "crop.zarr") == "complete"
    return out / "crop.zarr"


def _child(slide: Path, bundle: Path, out: Path, pattern: str, nth: int) -> int:
    args = [str(slide), "--bundle", str(bundle), "--out", str(out), "--provider", "cpu", "--pitch-um", "20",
            "--batch-size", "16", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(CHUNK_ROWS), pattern, str(nth), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_kill9_matrix_resumes_byte_identical(moment: str, crop: Path, small_bundle: Path, uninterrupted: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.jobs import slide_run

    ref = ad.read_zarr(uninterrupted)
    assert ref.n_obs > 3 * CHUNK_ROWS  # several chunks: "mid" is mid-way
    pattern, nth = MOMENTS[moment]
    rc = _child(crop, small_bundle, tmp_path, pattern, nth)
    assert rc == -signal.SIGKILL, f"the child was not killed at {moment} (exit {rc})"
    out = tmp_path / "crop.zarr"
    assert OutputStore.status(out) == "incomplete" and not out.exists() and partial_path(out).is_dir()
    monkeypatch.setattr(slide_run, "MAX_CHUNK_ROWS", CHUNK_ROWS)
    r = invoke([crop, "--bundle", small_bundle, "--out", tmp_path, "--provider", "cpu", "--pitch-um", "20",
                "--batch-size", "16", "--resume"])
    assert r.exit_code == 0, r.output
    assert OutputStore.status(out) == "complete" and not partial_path(out).exists()
    got = ad.read_zarr(out)
    assert got.X.dtype == ref.X.dtype and got.X.tobytes() == ref.X.tobytes()
    np.testing.assert_array_equal(got.obsm["spatial"], ref.obsm["spatial"])
    assert tree_digest(out / "X") == tree_digest(uninterrupted / "X")  # the stored chunks too, byte for byte
    assert json.loads((out / ".zattrs").read_text())["hishrst_status"] == "complete"


# ------------------------------------------------------------------------------------------ missing chunks


def test_missing_chunk_in_tissue_fails_unless_allowed(crop: Path, small_bundle: Path, tmp_path: Path,
                                                      noop: None) -> None:
    """BAD #4 (run side): a chunk file missing inside tissue fails the slide naming the chunk;
    ``--allow-missing-chunks`` keeps reading it as fill."""
    slide = Path(shutil.copytree(crop, tmp_path / "in" / "holes.ome.zarr"))
    level0 = slide / "0"
    chunks = sorted(p for p in level0.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs"))
    assert len(chunks) >= 4, chunks
    victim = chunks[len(chunks) // 2]  # an inner chunk of the tissue crop
    victim.unlink()
    before = tree_digest(slide)
    out = tmp_path / "out"
    r = invoke([slide, "--bundle", small_bundle, "--out", out])
    assert r.exit_code == 1, r.output
    reason = next(ln for ln in r.output.splitlines() if "--allow-missing-chunks" in ln)
    assert str(slide) in reason and OutputStore.status(out / "holes.zarr") == "missing"
    r = invoke([slide, "--bundle", small_bundle, "--out", out, "--allow-missing-chunks"])
    assert r.exit_code == 0 and "1 ok" in r.output, r.output
    assert tree_digest(slide) == before
