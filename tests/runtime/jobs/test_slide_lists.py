"""Slide lists (folders, ``--slides-from``), output names, the run report and runnable position modes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs.paths import slide_output_path
from hishrst_runtime.jobs.report import HISTORY_DIR, build_report, report_names, write_run_report
from hishrst_runtime.jobs.results import SlideResult
from hishrst_runtime.jobs.slide_lists import expand_slides, read_slide_list, slides_in_folder


def _tree(root: Path) -> None:
    for d in ("a.ome.zarr", "b.zarr", "sub/c.zarr", "sub/deep/d.zarr", "notes", ".hidden.zarr"):
        (root / d).mkdir(parents=True)
    (root / "a.ome.zarr" / "zarr.json").write_text("{}")
    for f in ("e.svs", "f.TIFF", "sub/g.ndpi", "readme.txt", "h.scn"):
        (root / f).write_text("x")


def test_folder_of_slides(tmp_path: Path) -> None:
    _tree(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in slides_in_folder(tmp_path)]
    assert names == ["a.ome.zarr", "b.zarr", "e.svs", "f.TIFF", "h.scn"]
    deep = [p.relative_to(tmp_path).as_posix() for p in slides_in_folder(tmp_path, recursive=True)]
    assert deep == ["a.ome.zarr", "b.zarr", "e.svs", "f.TIFF", "h.scn", "sub/c.zarr", "sub/deep/d.zarr", "sub/g.ndpi"]
    with pytest.raises(InputError, match="a folder without slides.*--recursive"):
        slides_in_folder(tmp_path / "notes")


def test_expand_slides_keeps_order_urls_and_drops_repeats(tmp_path: Path) -> None:
    _tree(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# slides\n\n  {tmp_path / 'b.zarr'}  \ns3://bucket/x.ome.zarr\n{tmp_path / 'sub'}\n")
    got = expand_slides([str(tmp_path / "sub" / "c.zarr"), str(tmp_path / "a.ome.zarr")], slides_from=[lst])
    assert got == [tmp_path / "sub" / "c.zarr", tmp_path / "a.ome.zarr", tmp_path / "b.zarr",
                   "s3://bucket/x.ome.zarr", tmp_path / "sub" / "g.ndpi"]
    assert isinstance(got[3], str)  # never a Path (s3:/bucket/...)
    # a store is one slide even without the .zarr suffix; a missing path is kept (the reader reports it)
    assert expand_slides([str(tmp_path / "a.ome.zarr"), "missing.zarr"]) == [tmp_path / "a.ome.zarr",
                                                                              Path("missing.zarr")]


def test_slide_list_problems(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="names no slides"):
        read_slide_list(tmp_path / "empty.txt")
    with pytest.raises(InputError, match="cannot read the slide list"):
        read_slide_list(tmp_path / "missing.txt")


@pytest.mark.parametrize("slide, name", [
    ("s.ome.zarr", "s.zarr"), ("s.zarr", "s.zarr"), ("dir/s.svs", "s.zarr"), ("s.ome.tiff", "s.zarr"),
    ("s.ndpi", "s.zarr"), ("https://host/a/s.ome.zarr?sig=x#f", "s.zarr"), ("s3://b/p/s.zarr/", "s.zarr"),
    ("sd.zarr::he_image", "sd_he_image.zarr"),
])
def test_output_names(slide: str, name: str) -> None:
    arg = slide if "://" in slide else Path(slide)
    assert slide_output_path(arg if "::" not in slide else slide, Path("out")) == Path("out") / name


def _results() -> list[SlideResult]:
    return [SlideResult(slide="a.zarr", output=Path("o/a.zarr"), status="ok", points=10, tiles_per_s=5.0,
                        seconds=1.5, timings={"encoder": 0.5}),
            SlideResult(slide="b.zarr", output=Path("o/b.zarr"), status="failed", reason="SlideError: b | bad")]


@pytest.mark.parametrize("shard", [None, (1, 4)])
def test_run_report_files(tmp_path: Path, shard: tuple[int, int] | None) -> None:
    rep = build_report(results=_results(), args={"bundle_dir": Path("/b"), "out_dir": tmp_path, "pitch_um": None},
                       started=1_700_000_000.0, finished=1_700_000_012.5, shard=shard)
    paths = write_run_report(tmp_path, rep)
    json_name, md_name = report_names(shard)
    assert [p.name for p in paths[1:]] == [json_name, md_name]
    assert (json_name, md_name) == (("hishrst_run.json", "summary.md") if shard is None else
                                    ("hishrst_run.shard-1-of-4.json", "summary.shard-1-of-4.md"))
    data = json.loads((tmp_path / json_name).read_text())
    assert data == json.loads(paths[0].read_text()) and paths[0].parent.name == HISTORY_DIR
    assert data["run_id"].startswith("20231114T221320Z-" + ("all" if shard is None else "shard-1-of-4"))
    assert data["counts"] == {"ok": 1, "skipped": 0, "failed": 1, "interrupted": 0, "slides": 2}
    assert data["seconds"] == 12.5 and data["interrupted"] is None
    assert set(data["versions"]) >= {"hishrst", "python", "onnxruntime", "numpy"}
    assert data["args"]["bundle_dir"] == "/b" and data["slides"][0]["timings"] == {"encoder": 0.5}
    assert data["errors"] == ["b.zarr: SlideError: b | bad"]
    md = (tmp_path / md_name).read_text()
    assert "1 ok, 0 skipped, 1 failed" in md and "| b.zarr | failed |" in md and "b \\| bad" in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("mode, ok", [("continuous", True), ("relative", True), ("none", True), ("grid", False)])
def test_runnable_position_modes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str, ok: bool) -> None:
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.bundle.manifest import BundleError

    fake = SimpleNamespace(spec=SimpleNamespace(position=SimpleNamespace(mode=mode)))
    monkeypatch.setattr(runner, "load_bundle", lambda d: fake)
    if ok:
        assert runner._load_run_bundle(tmp_path) is fake
    else:
        with pytest.raises(BundleError, match="grid .*positions.*--position relative"):
            runner._load_run_bundle(tmp_path)


@pytest.mark.parametrize("mode", ["relative", "none"])
def test_bundles_with_new_position_modes_load(make_tiny_bundle, tmp_path: Path, mode: str) -> None:
    """Once the bundle schema knows the mode, the runner takes such a bundle (skips until then)."""
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.bundle.manifest import BundleError

    root = make_tiny_bundle(tmp_path / "b", edit=lambda m: m["position"].update(mode=mode))
    try:
        bundle = runner._load_run_bundle(root)
    except BundleError as e:
        if "position.mode" in str(e):
            pytest.skip(f"the bundle schema does not know position mode {mode!r} yet")
        raise
    assert bundle.spec.position.mode == mode


def _hishrst_outputs(root: Path) -> None:
    """What hishrst-run leaves in a folder: a complete store, a partial, a SpatialData store (zarr v3)."""
    for name, status in (("a.zarr", "complete"), ("b.zarr.partial", "incomplete")):
        (root / name).mkdir(parents=True)
        (root / name / ".zgroup").write_text('{"zarr_format": 2}')
        (root / name / ".zattrs").write_text(json.dumps({"hishrst_status": status}))
    (root / "a.sdata.zarr").mkdir()
    (root / "a.sdata.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                                 "attributes": {"hishrst_status": "complete"}}))
    (root / "a.h5ad").write_text("x")
    (root / "a.zarr.lock").write_text("{}")


def test_folders_skip_hishrst_outputs_and_the_output_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "a.ome.zarr").mkdir(parents=True)
    (data / "a.ome.zarr" / "zarr.json").write_text("{}")
    (data / "s.svs").write_text("x")
    _hishrst_outputs(data)  # hishrst-run data/ --out data/ ran before
    assert slides_in_folder(data) == [data / "a.ome.zarr", data / "s.svs"]
    assert expand_slides([str(data)], out_dir=data) == [data / "a.ome.zarr", data / "s.svs"]
    out = data / "preds"  # --out inside the folder: never searched, even with --recursive
    out.mkdir()
    (out / "x.svs").write_text("x")
    (data / "sub").mkdir()
    (data / "sub" / "y.svs").write_text("x")
    got = expand_slides([str(data)], recursive=True, out_dir=out)
    assert got == [data / "a.ome.zarr", data / "s.svs", data / "sub" / "y.svs"]
    only = tmp_path / "only_outputs"
    only.mkdir()
    _hishrst_outputs(only)
    with pytest.raises(InputError, match=r"a folder without slides .*skipped 3 output\(s\) of hishrst-run"):
        slides_in_folder(only)


def test_file_urls_become_paths(tmp_path: Path) -> None:
    (tmp_path / "a.ome.zarr").mkdir()
    (tmp_path / "a.ome.zarr" / "zarr.json").write_text("{}")
    got = expand_slides([f"file://{tmp_path}/a.ome.zarr", str(tmp_path / "a.ome.zarr"), f"file://{tmp_path}"])
    assert got == [tmp_path / "a.ome.zarr"] and isinstance(got[0], Path)  # repeats of one slide dropped
