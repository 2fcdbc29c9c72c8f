"""Cohorts as first-class input: every registered slide format in folder scans, output names that mirror
sub-folders, slide sheets (``--slides-from`` with ``slide[,points][,mask][,name]``), ``--points-outside``,
``--mask-mode`` and the QC thumbnail linked from the summary.

The end-to-end runs use the tiny ONNX bundle with no-op engines on small synthetic OME-Zarr discs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs.inputs import SlideInput
from hishrst_runtime.jobs.paths import default_output_name, output_collisions, slide_output_path
from hishrst_runtime.jobs.slide_lists import expand_inputs, read_slide_list, slides_in_folder
from hishrst_runtime.slides.formats import scan_suffixes


def test_folder_scan_takes_every_registered_file_format(tmp_path: Path) -> None:
    for name in ("a.bif", "b.qptiff", "c.svs", "d.btf", "e.mrxs", "notes.txt", "f.csv"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in slides_in_folder(tmp_path)] == ["a.bif", "b.qptiff", "c.svs", "d.btf", "e.mrxs"]
    assert {".bif", ".qptiff", ".mrxs", ".svs"} <= set(scan_suffixes(directory=False))
    for slide, name in (("a.bif", "a"), ("b.qptiff", "b"), ("d.btf", "d"), ("e.mrxs", "e"), ("x.ome.tiff", "x")):
        assert default_output_name(Path(slide)) == name
        assert slide_output_path(Path(slide), Path("out")) == Path("out") / f"{name}.zarr"


def test_recognised_directories_are_slides_not_folders(tmp_path: Path) -> None:
    dicom = tmp_path / "case1"  # a DICOM WSI folder: no suffix, recognised by content
    dicom.mkdir()
    (dicom / "level0.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (dicom / "inner.svs").write_text("x")  # never searched: the folder is one slide
    store = tmp_path / "plain"  # a zarr store without the .zarr ending
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.svs").write_text("x")
    assert [p.name for p in slides_in_folder(tmp_path, recursive=True)] == ["case1", "plain", "s.svs"]
    got = expand_inputs([str(dicom)])
    assert [i.slide for i in got] == [dicom]  # named directly: one slide, not a folder to expand


def test_recursive_outputs_mirror_the_sub_folders(tmp_path: Path) -> None:
    cohort = tmp_path / "cohort"
    for p in ("p1/slide.svs", "p2/slide.svs", "top.bif"):
        (cohort / p).parent.mkdir(parents=True, exist_ok=True)
        (cohort / p).write_text("x")
    items = expand_inputs([str(cohort)], recursive=True)
    assert [(i.slide, i.output_name) for i in items] == [
        (cohort / "p1" / "slide.svs", "p1/slide"), (cohort / "p2" / "slide.svs", "p2/slide"),
        (cohort / "top.bif", "top")]
    out = tmp_path / "OUT"
    assert [i.outputs(out).store for i in items] == [out / "p1" / "slide.zarr", out / "p2" / "slide.zarr",
                                                     out / "top.zarr"]
    assert [i.outputs(out).qc for i in items][0] == out / "p1" / "slide.qc.png"
    assert output_collisions(items, out) == {}
    # Real collisions are still found: the same name from two folder arguments, or two named files.
    other = tmp_path / "other"
    (other / "p1").mkdir(parents=True)
    (other / "p1" / "slide.svs").write_text("x")
    both = expand_inputs([str(cohort), str(other)], recursive=True)
    assert list(output_collisions(both, out)) == [out / "p1" / "slide.zarr"]
    named = expand_inputs([str(cohort / "p1" / "slide.svs"), str(cohort / "p2" / "slide.svs")])
    assert list(output_collisions(named, out)) == [out / "slide.zarr"]


def test_slide_sheet(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "pts").mkdir(parents=True)
    for f in ("a.svs", "b.svs", "pts/a.csv", "a_mask.geojson"):
        (data / f).write_text("x")
    sheet = data / "cohort.csv"
    sheet.write_text("# the cohort\nslide,points,mask,name\n"
                     "a.svs,pts/a.csv,a_mask.geojson,patient1/a\n"
                     "\n"
                     f"{data / 'b.svs'},,,\n"
                     "s3://bucket/c.ome.zarr,,,\n")
    items = read_slide_list(sheet)
    assert items[0] == SlideInput(data / "a.svs", points=data / "pts" / "a.csv", mask=data / "a_mask.geojson",
                                  name="patient1/a")
    assert (items[1].slide, items[1].points, items[1].mask, items[1].output_name) == (data / "b.svs", None, None, "b")
    assert items[2].slide == "s3://bucket/c.ome.zarr" and items[2].output_name == "c"
    # Command-line --points / --tissue-mask are the defaults of rows without their own.
    default = tmp_path / "default.csv"
    default.write_text("x,y\n1,1\n")
    got = expand_inputs([], slides_from=[sheet], points=default)
    assert [i.points for i in got] == [data / "pts" / "a.csv", default, default]
    # The old one-path-per-line list keeps working (relative to the current directory).
    lst = tmp_path / "list.txt"
    lst.write_text(f"{data / 'a.svs'}\n# c\n{data / 'b.svs'}\n")
    assert [i.slide for i in read_slide_list(lst)] == [data / "a.svs", data / "b.svs"]


@pytest.mark.parametrize("text, match", [
    ("slide,points,colour\na.svs,,red\n", "unknown or repeated column.*colour"),
    ("slide,points\na.svs,missing.csv\n", r"line 2: the points file .*missing.csv does not exist"),
    ("slide,name\na.svs,../escape\n", r"line 2: .*output name '../escape'"),
    ("slide,name\n,x\n", "line 2: the slide cell is empty"),
    ("slide,points\nfolder,a.csv\n", "a folder of slides cannot take one points file"),
    ("slide\n# nothing\n", "names no slides"),
])
def test_slide_sheet_problems(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "a.svs").write_text("x")
    (tmp_path / "a.csv").write_text("x,y\n1,1\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "s.svs").write_text("x")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(text)
    with pytest.raises(InputError, match=match):
        expand_inputs([], slides_from=[sheet])


# ------------------------------------------------------------------------------ end to end (tiny bundle)

ad = pytest.importorskip("anndata")
SIDE = 320


def _disc(path: Path, side: int = SIDE) -> Path:
    from hishrst_runtime.slides.convert import write_ome_zarr
    from tests.runtime.images import disc_image

    return write_ome_zarr(disc_image(side), path, mpp=0.5, chunk=256)


@pytest.fixture
def noop(monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))


def invoke(args: list[Any]) -> Any:
    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run

    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    return CliRunner().invoke(run, [str(a) for a in args], env=env, catch_exceptions=False)


def test_recursive_cohort_runs_into_mirrored_folders(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    cohort, out = tmp_path / "cohort", tmp_path / "OUT"
    for p in ("p1", "p2"):
        _disc(cohort / p / "slide.ome.zarr")
    r = invoke([cohort, "--recursive", "--bundle", tiny_bundle, "--out", out, "--pitch-um", "40"])
    assert r.exit_code == 0 and "2 ok, 0 skipped, 0 failed" in r.output, r.output
    for p in ("p1", "p2"):
        assert (out / p / "slide.zarr").is_dir() and (out / p / "slide.qc.png").is_file()
    md = (out / "summary.md").read_text()
    assert "[p1/slide.qc.png](p1/slide.qc.png)" in md and "highest variance across points" in md
    report = json.loads((out / "hishrst_run.json").read_text())
    assert report["slides"][0]["qc"]["rule"] == "highest variance across points"
    r = invoke([cohort, "--recursive", "--bundle", tiny_bundle, "--out", out])  # outputs are not new slides
    assert r.exit_code == 0 and "0 ok, 2 skipped" in r.output, r.output


def test_sheet_gives_each_slide_its_points_and_name(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    a, b = _disc(tmp_path / "a.ome.zarr"), _disc(tmp_path / "b.ome.zarr")
    (tmp_path / "a.csv").write_text("id,x,y\nfirst,100,100\nfar,5000,10\nlast,200,150\n")
    (tmp_path / "b.csv").write_text("x,y\n50,60\n-3,4\n70,80\n")
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide,points,name\n{a.name},a.csv,case_a\n{b.name},b.csv,\n")
    out = tmp_path / "out"
    r = invoke(["--slides-from", sheet, "--bundle", tiny_bundle, "--out", out])
    assert r.exit_code == 0 and "2 ok" in r.output, r.output
    got_a, got_b = ad.read_zarr(out / "case_a.zarr"), ad.read_zarr(out / "b.zarr")
    assert list(got_a.obs_names) == ["first", "last"]  # the point outside is dropped, names kept
    assert list(got_b.obs_names) == ["p0", "p2"]  # numbered rows keep the file's numbers
    np.testing.assert_array_equal(got_b.obsm["spatial"], [[50, 60], [70, 80]])
    report = json.loads((out / "hishrst_run.json").read_text())
    assert [s["points_dropped"] for s in report["slides"]] == [1, 1]
    assert "1 point(s) outside the slide dropped" in (out / "summary.md").read_text()
    r = invoke(["--slides-from", sheet, "--bundle", tiny_bundle, "--out", tmp_path / "strict",
                "--points-outside", "error"])
    assert r.exit_code == 1 and "1 of 3 point(s) lie outside the slide" in r.output and "'far'" in r.output


def test_mask_mode_intersect_and_replace(tmp_path: Path, tiny_bundle: Path, noop: None) -> None:
    slide = _disc(tmp_path / "disc.ome.zarr")
    mask = tmp_path / "all.geojson"  # the whole slide, glass included
    ring = [[0, 0], [SIDE, 0], [SIDE, SIDE], [0, SIDE], [0, 0]]
    mask.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}))
    base = [slide, "--bundle", tiny_bundle, "--tissue-mask", mask, "--pitch-um", "20"]
    assert invoke([*base, "--out", tmp_path / "detected"]).exit_code == 0  # intersect (default)
    r = invoke([*base, "--out", tmp_path / "replaced", "--mask-mode", "replace"])
    assert r.exit_code == 0, r.output
    inter, repl = ad.read_zarr(tmp_path / "detected" / "disc.zarr"), ad.read_zarr(tmp_path / "replaced" / "disc.zarr")
    assert "background" not in inter.obs and inter.uns["hishrst"]["mask_mode"] == "intersect"
    assert repl.n_obs > inter.n_obs  # the mask alone covers the glass too
    bg = repl.obs["background"].to_numpy()
    assert bg.dtype == bool and bg.any() and not bg.all()
    centre = np.hypot(*(repl.obsm["spatial"] - SIDE / 2).T) < SIDE / 6
    assert not bg[centre].any()  # the disc's middle is tissue by the detector too
