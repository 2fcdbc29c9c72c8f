"""``hishrst-run`` options: --points, folders and --slides-from, the run report, --version, -q / -v,
--progress auto, help text on every option, --tissue-mask / --tissue-geojson and --format.

Torch-free: the tiny ONNX bundle of ``tests/runtime/conftest.py`` on a small synthetic OME-Zarr slide (a
pink disc of "tissue" on white glass, 640 × 640 px at 0.5 µm/px).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

ad = pytest.importorskip("anndata")

from hishrst.cli import main  # noqa: E402
from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.jobs.runner import run_slides  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from tests.runtime.images import disc_image  # noqa: E402

SIDE = 640
#: Commands of the runtime (this package); the others belong to hishrst_train / hishrst_export.




@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("opt_slides")
    write_ome_zarr(disc_image(), d / "disc.ome.zarr", mpp=0.5, chunk=256)
    return d


def invoke(args: list[Any], **kw: Any) -> Result:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    return CliRunner().invoke(run, [str(a) for a in args], env=env, catch_exceptions=False, **kw)


def test_points_csv_names_rows_and_keeps_order(slides: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    slide = slides / "disc.ome.zarr"
    xy = np.array([[320.0, 320.0], [250.0, 300.0], [400.5, 380.0], [300.0, 200.0], [5.0, 5.0]])
    ids = ["spot_e", "spot_a", "spot_c", "spot_b", "glass"]
    f = tmp_path / "points.csv"
    f.write_text("id,x,y\n" + "".join(f"{i},{x},{y}\n" for i, (x, y) in zip(ids, xy)))
    out = tmp_path / "out"
    r = invoke([slide, "--bundle", tiny_bundle, "--out", out, "--points", f, "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    got = ad.read_zarr(out / "disc.zarr")
    assert list(got.obs_names) == ids
    np.testing.assert_array_equal(got.obsm["spatial"], xy)
    assert got.obs["tissue_fraction"].iloc[-1] == 0 and got.obs["tissue_fraction"].iloc[0] == 1
    ref = run_slides([slide], bundle_dir=tiny_bundle, out_dir=tmp_path / "ref", points_px={str(slide): xy},
                     provider="cpu", progress=False, echo=lambda s: None)[0]
    np.testing.assert_array_equal(got.X, ad.read_zarr(ref.output).X)  # the same rows as raw points
    report = json.loads((out / "hishrst_run.json").read_text())
    assert report["counts"]["ok"] == 1 and report["args"]["points_file"] == str(f)


def test_points_refusals(slides: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    slide = slides / "disc.ome.zarr"
    f = tmp_path / "points.csv"
    f.write_text("id,x,y\nin,100,100\nfar,700,20\nneg,-1,5\n")
    base = ["--bundle", tiny_bundle, "--out", tmp_path / "out", "--points", f, "--points-outside", "error"]
    r = invoke([slide, slide.parent, *base])  # two names, one slide after removing the repeat: fine
    assert r.exit_code == 1 and "2 of 3 point(s) lie outside the slide" in r.output, r.output
    assert "'far' at (700.0, 20.0)" in r.output and "'neg'" in r.output and "disc.ome.zarr" in r.output
    other = tmp_path / "other.ome.zarr"
    write_ome_zarr(disc_image(64), other, mpp=0.5)
    r = invoke([slide, other, *base])
    assert r.exit_code == 2 and "--points takes exactly one slide, got 2" in r.output
    f.write_text("a,b\n1,2\n")
    r = invoke([slide, *base])
    assert r.exit_code == 1 and f"{f}: missing column(s) x, y" in r.output  # the slide fails, naming the file


def test_folders_lists_and_report(slides: Path, tiny_bundle: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))
    lst = tmp_path / "list.txt"
    lst.write_text(f"# one slide\n\n{slides / 'disc.ome.zarr'}\n")
    out = tmp_path / "out"
    r = invoke([slides, "--slides-from", lst, "--bundle", tiny_bundle, "--out", out, "--shard", "0/1"])
    assert r.exit_code == 0 and "1 ok, 0 skipped, 0 failed (of 1 slides)" in r.output, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["disc.qc.png", "disc.zarr", "hishrst_run.shard-0-of-1.json", "hishrst_runs",
                     "summary.shard-0-of-1.md"]
    report = json.loads((out / "hishrst_run.shard-0-of-1.json").read_text())
    assert report["shard"] == {"index": 0, "count": 1} and report["slides"][0]["status"] == "ok"
    (tmp_path / "nothing").mkdir()
    r = invoke([tmp_path / "nothing", "--bundle", tiny_bundle, "--out", out])
    assert r.exit_code == 2 and "a folder without slides" in r.output
    r = invoke(["--bundle", tiny_bundle, "--out", out])
    assert r.exit_code == 2 and "no slides" in r.output
    # An invocation stopped by a bad bundle still leaves its report (the folder exists).
    r = invoke([slides / "disc.ome.zarr", "--bundle", tmp_path, "--out", out])
    assert r.exit_code == 1
    assert json.loads((out / "hishrst_run.json").read_text())["error"].startswith(str(tmp_path))
    assert len(list((out / "hishrst_runs").iterdir())) == 2


def test_version_quiet_and_progress_auto(slides: Path, tiny_bundle: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime import __version__
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    r = CliRunner().invoke(run, ["--version"], prog_name="hishrst-run")
    assert r.exit_code == 0 and r.output == f"hishrst-run {__version__}\n"
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output
    seen: list[bool] = []
    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))
    real = runner.RunOptions.from_settings

    def spy(options: Any, settings: Any) -> Any:
        seen.append(options.progress)
        return real(options, settings)

    monkeypatch.setattr(runner.RunOptions, "from_settings", staticmethod(spy))
    base = [slides / "disc.ome.zarr", "--bundle", tiny_bundle, "--out", tmp_path / "out"]
    r = invoke([*base, "-q"])
    assert r.exit_code == 0 and r.output == "", r.output  # quiet: nothing at all on success
    r = invoke([*base, "--progress"])
    assert r.exit_code == 0 and "already complete" in r.output
    assert seen == [False, True]  # auto: off when stderr is not a terminal; forced on


@pytest.mark.parametrize("name", ["run", "convert", "synth", "fit", "evaluate", "export", "demo"])
def test_every_option_has_help(name: str) -> None:
    """Every option of every command says what it does; the runtime's commands strictly, the training and
    export commands (other packages) are reported as expected failures until they do."""
    ctx = click.Context(main)
    assert all((p.help or "").strip() for p in main.params if isinstance(p, click.Option))
    try:
        cmd = main.get_command(ctx, name)
    except click.ClickException:  # a command whose extra (torch, onnx) is not installed
        pytest.skip(f"`hishrst {name}` cannot be imported here")
    missing = sorted(p.opts[-1] for p in cmd.params if isinstance(p, click.Option) and not p.hidden
                     and not (p.help or "").strip())
    assert not missing, f"`hishrst {name}` options without help text: {missing}"


def test_logging_is_configured_once_without_duplicates() -> None:
    import io

    from hishrst_runtime.cli.logs import configure_logging

    buf = io.StringIO()
    configure_logging(stream=io.StringIO())
    configure_logging(verbose=1, stream=buf)  # replaces the first handler
    log = logging.getLogger("hishrst_runtime.backends.test")
    for _ in range(3):
        log.warning("engine cache in %s", "/tmp/x")
    log.info("info line")
    log.debug("debug line")
    assert buf.getvalue() == "WARNING: engine cache in /tmp/x\nINFO: info line\n"
    assert sum(1 for h in logging.getLogger("hishrst_runtime").handlers if getattr(h, "_hishrst_cli_handler", 0)) == 1
    configure_logging(quiet=True, stream=buf)
    log.warning("hidden")
    assert "hidden" not in buf.getvalue()
    configure_logging()


def test_tissue_mask_and_geojson(slides: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    slide = slides / "disc.ome.zarr"
    mask = tmp_path / "mask.geojson"  # the left half of the slide only
    poly = [[0, 0], [SIDE / 2, 0], [SIDE / 2, SIDE], [0, SIDE], [0, 0]]
    mask.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [poly]}}))
    base = [slide, "--bundle", tiny_bundle, "--provider", "cpu", "--pitch-um", "20"]
    r = invoke([*base, "--out", tmp_path / "detected", "--tissue-geojson"])
    assert r.exit_code == 0, r.output
    r = invoke([*base, "--out", tmp_path / "masked", "--tissue-mask", mask])
    assert r.exit_code == 0, r.output
    det, got = ad.read_zarr(tmp_path / "detected" / "disc.zarr"), ad.read_zarr(tmp_path / "masked" / "disc.zarr")
    assert got.obsm["spatial"][:, 0].max() < SIDE / 2 + 40 < det.obsm["spatial"][:, 0].max()
    assert got.uns["hishrst"]["tissue_mask_file"] == str(mask.resolve())
    assert "tissue_mask_file" not in det.uns["hishrst"]
    for d in ("detected", "masked"):
        geo = json.loads((tmp_path / d / "disc.tissue.geojson").read_text())
        assert geo["type"] == "FeatureCollection" and geo["features"]
    xs = [x for f in geo["features"] for ring in f["geometry"]["coordinates"] for x, _ in ring]
    assert max(xs) <= SIDE / 2 + 2  # the given mask, in level-0 pixels
    other = write_ome_zarr(disc_image(64), tmp_path / "other.ome.zarr", mpp=0.5)
    r = invoke([*base, other, "--out", tmp_path / "two", "--tissue-mask", mask])
    assert r.exit_code == 2 and "--tissue-mask takes exactly one slide, got 2" in r.output
    # Without a mask and without --tissue-geojson nothing new is written beside the store.
    r = invoke([*base, "--out", tmp_path / "plain"])
    assert not (tmp_path / "plain" / "disc.tissue.geojson").exists()


def test_format_spatialdata_and_both(slides: Path, tiny_bundle: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("spatialdata")
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))
    base = [slides / "disc.ome.zarr", "--bundle", tiny_bundle]
    r = invoke([*base, "--out", tmp_path / "both", "--format", "both"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "both" / "disc.zarr").is_dir() and (tmp_path / "both" / "disc.sdata.zarr").is_dir()
    out = tmp_path / "sd"
    r = invoke([*base, "--out", out, "--format", "spatialdata"])
    assert r.exit_code == 0, r.output
    assert (out / "disc.sdata.zarr").is_dir() and not (out / "disc.zarr").exists()
    r = invoke([*base, "--out", out, "--format", "spatialdata"])
    assert r.exit_code == 0 and "already complete" in r.output  # the SpatialData store counts as done


@pytest.mark.parametrize("test_encoder", [True, False])
def test_a_test_encoder_bundle_is_marked_everywhere(slides: Path, make_tiny_bundle: Any, tmp_path: Path,
                                                    test_encoder: bool) -> None:
    """A bundle made from a random test encoder says so on the console, in the report, the summary and ``uns``."""
    def mark(m: dict[str, Any]) -> None:
        m["encoder"]["test_encoder"] = test_encoder

    bundle = make_tiny_bundle(tmp_path / "bundle", edit=mark)
    out = tmp_path / "out"
    r = invoke([slides / "disc.ome.zarr", "--bundle", bundle, "--out", out, "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert ("TEST ENCODER" in r.output) is test_encoder
    report = json.loads((out / "hishrst_run.json").read_text())
    assert report["test_encoder"] is test_encoder and report["slides"][0]["test_encoder"] is test_encoder
    assert ("TEST ENCODER" in (out / "summary.md").read_text()) is test_encoder
    assert bool(ad.read_zarr(out / "disc.zarr").uns["hishrst_run"]["test_encoder"]) is test_encoder
