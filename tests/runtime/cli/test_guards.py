"""Guards of ``hishrst-run`` around shared output folders and inputs: complete slides locked by another job are
left alone, points / tissue-mask files and files hishrst did not write are never replaced, a folder run
twice into itself, ``--format spatialdata`` without the package, ``file://`` slides, ``--resume`` with
changed point ids, and URLs with credentials in reports.

Torch-free and fast: the tiny ONNX bundle of ``tests/runtime/conftest.py`` and zero-returning engines on a
small synthetic OME-Zarr slide (a pink disc on white glass, 640 × 640 px at 0.5 µm/px).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

ad = pytest.importorskip("anndata")

from hishrst_runtime.bundle.manifest import load_bundle  # noqa: E402
from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.core.errors import OutputStateError  # noqa: E402
from hishrst_runtime.inference.engines import noop_engines  # noqa: E402
from hishrst_runtime.jobs.locks import SlideLock  # noqa: E402
from hishrst_runtime.jobs.runner import run_slides  # noqa: E402
from hishrst_runtime.output.errors import MissingExtraError  # noqa: E402
from hishrst_runtime.output.h5ad import h5ad_written_by_hishrst  # noqa: E402
from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from hishrst_runtime.slides.masks import written_by_hishrst as geojson_by_hishrst  # noqa: E402

SIDE = 640
HAS_SPATIALDATA = importlib.util.find_spec("spatialdata") is not None


def disc_image(side: int = SIDE) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    img = np.full((side, side, 3), 245, np.uint8)
    inside = (xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / 3) ** 2
    img[inside] = (200, 110, 170)
    return img


@pytest.fixture(scope="module")
def disc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ome_zarr(disc_image(), tmp_path_factory.mktemp("guards") / "disc.ome.zarr", mpp=0.5, chunk=256)


@pytest.fixture
def slide(disc: Path, tmp_path: Path) -> Path:
    """A private copy of the disc slide in ``tmp_path/data``."""
    return Path(shutil.copytree(disc, tmp_path / "data" / "disc.ome.zarr"))


@pytest.fixture
def noop(monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.jobs.runner as runner

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))


def invoke(args: list[Any]) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    r = CliRunner().invoke(run, [str(a) for a in args] + ["--no-progress"], env=env, catch_exceptions=False)
    assert "Traceback" not in r.output, r.output
    return r


def digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def lib_run(slide: Any, bundle_dir: Path, out: Path, **settings: Any) -> Any:
    return run_slides([slide], bundle_dir=bundle_dir, out_dir=out, engines=noop_engines(load_bundle(bundle_dir)),
                      progress=False, echo=lambda s: None, **settings)[0]


def error_line(r: Result) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


# ------------------------------------------------------------------ 1. complete slides under another job's lock


def test_complete_slide_locked_by_another_job_is_left_alone(slide: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert lib_run(slide, tiny_bundle, out).status == "ok"
    store = out / "disc.zarr"
    before = digest(store)
    fmt = "both" if HAS_SPATIALDATA else "anndata"
    with SlideLock(store) as held:  # another job (here: this live process) holds the slide
        res = lib_run(slide, tiny_bundle, out, h5ad=True, output_format=fmt)
        assert res.status == "skipped" and f"locked by pid {os.getpid()}" in res.reason, res.reason
        assert not (out / "disc.h5ad").exists() and not (out / "disc.sdata.zarr").exists()
        assert not partial_path(out / "disc.sdata.zarr").exists() and digest(store) == before
        assert held.held and held.path.is_file()  # its lock is untouched
        plain = lib_run(slide, tiny_bundle, out)  # nothing to finish: skipped as complete, lock not needed
        assert plain.status == "skipped" and plain.reason.startswith("already complete"), plain.reason
    res = lib_run(slide, tiny_bundle, out, h5ad=True, output_format=fmt)  # the lock is free: finish now
    assert res.status == "skipped" and res.reason.startswith("already complete"), res.reason
    assert h5ad_written_by_hishrst(out / "disc.h5ad") and digest(store) == before
    assert (out / "disc.sdata.zarr").is_dir() == HAS_SPATIALDATA
    assert not (out / "disc.zarr.lock").exists()


# ------------------------------------------------------------------ 2. inputs and files hishrst did not write


def test_points_file_at_an_output_path_is_refused(slide: Path, tiny_bundle: Path, noop: None) -> None:
    data = slide.parent
    pts = ad.AnnData(np.zeros((2, 1), np.float32))
    pts.obsm["spatial"] = np.array([[320.0, 320.0], [300.0, 340.0]])
    pts.write_h5ad(data / "disc.h5ad")
    before = digest(data / "disc.h5ad")
    r = invoke([slide, "--bundle", tiny_bundle, "--points", data / "disc.h5ad", "--out", data, "--h5ad"])
    assert r.exit_code == 1
    line = error_line(r)
    assert str(data / "disc.h5ad") in line and "points file" in line and "choose another --out" in line, line
    assert digest(data / "disc.h5ad") == before
    assert not (data / "disc.zarr").exists() and not partial_path(data / "disc.zarr").exists()


def test_tissue_mask_files_are_inputs(slide: Path, tiny_bundle: Path, tmp_path: Path, noop: None) -> None:
    data = slide.parent
    poly = [[0, 0], [SIDE, 0], [SIDE, SIDE], [0, SIDE], [0, 0]]
    text = json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [poly]}})
    inside = tmp_path / "out" / "disc.zarr" / "mask.geojson"  # a mask inside what would be the output store
    inside.parent.mkdir(parents=True)
    inside.write_text(text)
    r = invoke([slide, "--bundle", tiny_bundle, "--tissue-mask", inside, "--out", tmp_path / "out"])
    assert r.exit_code == 1 and "tissue-mask file" in error_line(r) and inside.read_text() == text
    mask = data / "disc.tissue.geojson"  # the mask given is the GeoJSON hishrst would write: used, never rewritten
    mask.write_text(text)
    r = invoke([slide, "--bundle", tiny_bundle, "--tissue-mask", mask, "--out", data])
    assert r.exit_code == 0, r.output
    assert mask.read_text() == text and OutputStore.status(data / "disc.zarr") == "complete"


@pytest.mark.parametrize("name, flag", [("disc.h5ad", "--h5ad"), ("disc.tissue.geojson", "--tissue-geojson")])
def test_files_hishrst_did_not_write_are_never_replaced(name: str, flag: str, slide: Path, tiny_bundle: Path,
                                                        tmp_path: Path, noop: None) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if name.endswith(".h5ad"):
        user = ad.AnnData(np.ones((3, 2), np.float32))
        user.write_h5ad(out / name)
    else:
        (out / name).write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    before = digest(out / name)
    base = [slide, "--bundle", tiny_bundle, "--out", out, flag]
    r = invoke(base)
    assert r.exit_code == 1 and "1 failed" in r.output
    assert f"{out / name}: exists and was not written by hishrst-run" in r.output
    assert "move it away or choose another --out" in r.output
    assert digest(out / name) == before and not (out / "disc.zarr").exists()  # refused before predicting
    (out / name).unlink()
    assert invoke(base).exit_code == 0
    assert invoke([*base, "--overwrite"]).exit_code == 0  # its own file is replaced
    mine = h5ad_written_by_hishrst if name.endswith(".h5ad") else geojson_by_hishrst
    assert mine(out / name)


# ------------------------------------------------------------------ 3. a folder run into itself, twice


def test_a_folder_run_into_itself_twice(slide: Path, tiny_bundle: Path, noop: None) -> None:
    data = slide.parent
    flags = ["--bundle", tiny_bundle, "--out", data, "--h5ad", "--tissue-geojson"]
    r = invoke([data, *flags])
    assert r.exit_code == 0 and "1 ok, 0 skipped, 0 failed (of 1 slides)" in r.output, r.output
    r = invoke([data, *flags])
    assert r.exit_code == 0 and "0 ok, 1 skipped, 0 failed (of 1 slides)" in r.output, r.output
    assert "already complete" in r.output


# ------------------------------------------------------------------ 4. --format spatialdata without the package


def test_missing_spatialdata_is_reported_before_any_slide(slide: Path, tiny_bundle: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, noop: None) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **kw: None if name == "spatialdata" else real(name, *a, **kw))
    out = tmp_path / "out"
    with pytest.raises(MissingExtraError, match=r'hishrst\[spatialdata\]'):
        lib_run(slide, tiny_bundle, out, output_format="both")
    assert not out.exists()
    r = invoke([slide, "--bundle", tiny_bundle, "--out", out, "--format", "spatialdata"])
    assert r.exit_code == 1 and "'spatialdata' package" in error_line(r) and not out.exists()


# ------------------------------------------------------------------ 5. URLs with credentials


def test_url_credentials_never_reach_the_report(slide: Path, tiny_bundle: Path, tmp_path: Path, noop: None) -> None:
    url = "https://alice:s3cr3t@127.0.0.1:9/S1.ome.zarr?X-Amz-Signature=deadbeef"
    out = tmp_path / "out"
    r = invoke([url, slide, "--bundle", tiny_bundle, "--out", out])
    assert r.exit_code == 1 and "1 ok" in r.output and "1 failed" in r.output, r.output
    texts = [r.output, (out / "hishrst_run.json").read_text(), (out / "summary.md").read_text()]
    for text in texts:
        assert "s3cr3t" not in text and "alice" not in text and "deadbeef" not in text and "X-Amz" not in text
    report = json.loads(texts[1])
    assert report["slides"][0]["slide"] == "https://127.0.0.1:9/S1.ome.zarr"
    meta = ad.read_zarr(out / "disc.zarr").uns["hishrst_run"]
    assert meta["slide"] == str(slide.resolve())


# ------------------------------------------------------------------ 6. file:// slides are local paths


def test_file_url_slides_are_checked_as_paths(slide: Path, tiny_bundle: Path, tmp_path: Path, noop: None) -> None:
    with pytest.raises(OutputStateError, match="is inside the input slide"):
        lib_run(f"file://{slide}", tiny_bundle, slide / "preds")
    assert not (slide / "preds").exists()
    r = invoke([f"file://{slide}", "--bundle", tiny_bundle, "--out", tmp_path / "out"])
    assert r.exit_code == 0 and OutputStore.status(tmp_path / "out" / "disc.zarr") == "complete", r.output


# ------------------------------------------------------------------ 7. --resume with changed point ids


def test_resume_refuses_changed_point_ids(slide: Path, tiny_bundle: Path, tmp_path: Path, noop: None) -> None:
    pts, out = tmp_path / "points.csv", tmp_path / "out"
    xy = [(320, 320), (250, 300), (400, 380)]
    pts.write_text("id,x,y\n" + "".join(f"s{i},{x},{y}\n" for i, (x, y) in enumerate(xy)))
    base = [slide, "--bundle", tiny_bundle, "--out", out, "--points", pts]
    assert invoke(base).exit_code == 0
    store = out / "disc.zarr"
    os.rename(store, partial_path(store))  # as if killed inside finalize: every row is on disk
    before = digest(partial_path(store))
    pts.write_text("id,x,y\n" + "".join(f"t{i},{x},{y}\n" for i, (x, y) in enumerate(xy)))  # same xy, new ids
    r = invoke([*base, "--resume"])
    assert r.exit_code == 1 and "OutputMismatchError" in r.output and "uns['hishrst']" in r.output, r.output
    assert digest(partial_path(store)) == before
    pts.write_text("id,x,y\n" + "".join(f"s{i},{x},{y}\n" for i, (x, y) in enumerate(xy)))
    r = invoke([*base, "--resume"])
    assert r.exit_code == 0, r.output
    assert list(ad.read_zarr(store).obs_names) == ["s0", "s1", "s2"]
