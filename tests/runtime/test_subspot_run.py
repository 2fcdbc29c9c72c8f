"""Sub-spot runs (issue #17): bins on the token lattice, end to end through ``run_slides`` and ``hishrst-run``.

The fake bundle (``tests/runtime/subspot_bundle.py``) predicts each token from its own pixels only (mean RGB,
then a fixed linear map + ReLU), so every bin's value is known from the image: what the tests check is the
geometry (which tiles, which tokens, which bins, where) and the store (chunks, resume, dtype, formats).
Slides: 1 µm/px OME-Zarr, tissue a pink square inside a white frame; 64 µm tiles (8 × 8 tokens of 8 µm),
4 × 4 tokens kept per tile (a 32 µm tile stride).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
pytest.importorskip("onnx")

from hishrst_runtime.inference.engines import Engines, load_engines  # noqa: E402
from hishrst_runtime.bundle.manifest import load_bundle  # noqa: E402
from hishrst_runtime.jobs.runner import run_slides  # noqa: E402
from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from tests.runtime.subspot_bundle import build_subspot_bundle, expected_expression  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PINK = (200, 110, 170)
SIDE, FRAME = 1000, 80  # slide side and white frame (level-0 pixels at 1 µm/px)


def _slide(path: Path, colour: Any) -> Path:
    img = np.full((SIDE, SIDE, 3), 245, np.uint8)
    img[FRAME:SIDE - FRAME, FRAME:SIDE - FRAME] = colour
    return write_ome_zarr(img, path, mpp=1.0, n_levels=2)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_subspot_bundle(tmp_path_factory.mktemp("subspot") / "bundle")


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A constant pink square."""
    return _slide(tmp_path_factory.mktemp("flat") / "flat.ome.zarr", PINK)


def _ramp_red(x_px: np.ndarray) -> np.ndarray:
    """The ramp's red channel at level-0 column ``x_px`` (inside the pink square)."""
    return np.rint(150 + 80 * (x_px - FRAME) / (SIDE - 2 * FRAME - 1))


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pink square whose red channel rises smoothly from left to right (150 → 230)."""
    colour = np.zeros((SIDE - 2 * FRAME, SIDE - 2 * FRAME, 3), np.uint8)
    colour[..., 0] = _ramp_red(np.arange(FRAME, SIDE - FRAME)).astype(np.uint8)[None, :]
    colour[..., 1], colour[..., 2] = 110, 170
    return _slide(tmp_path_factory.mktemp("ramp") / "ramp.ome.zarr", colour)


def run(slide: Path, bundle: Path, out: Path, **kw: Any) -> Any:
    kw.setdefault("progress", False)
    kw.setdefault("provider", "cpu")
    res = run_slides([slide], bundle_dir=bundle, out_dir=out, echo=lambda s: None, **kw)[0]
    return res


@pytest.fixture(scope="module")
def flat8(flat: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    res = run(flat, bundle, tmp_path_factory.mktemp("flat8"))
    assert res.status == "ok", res
    return res


def _inner(a: Any, margin_px: float) -> np.ndarray:
    """Bins whose whole square lies at least ``margin_px`` inside the pink square."""
    xy, half = np.asarray(a.obsm["spatial"]), a.uns["bins"]["size_um"] / a.uns["bins"]["mpp"] / 2
    lo, hi = FRAME + margin_px + half, SIDE - FRAME - margin_px - half
    return ((xy >= lo) & (xy <= hi)).all(axis=1)


# ------------------------------------------------------------------------------------------ shapes, coordinates


def test_the_output_is_an_anndata_of_bins(flat8: Any, bundle: Path) -> None:
    a = ad.read_zarr(flat8.output)
    assert a.n_obs == flat8.points > 10_000 and list(a.var_names) == load_bundle(bundle).genes
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all()
    assert a.obs["array_row"].dtype == np.int32 and a.obs["array_col"].dtype == np.int32
    xy = np.asarray(a.obsm["spatial"])
    assert xy.dtype == np.float64 and xy.shape == (a.n_obs, 2)
    bins = a.uns["bins"]
    assert {"size_um", "pitch_um", "origin_px", "mpp", "resolution"} <= set(bins)
    assert (bins["size_um"], bins["pitch_um"], bins["mpp"], bins["resolution"]) == (8.0, 8.0, 1.0, "8um")
    # bin (r, c) is centred at origin + ((c, r) + 0.5) × size / mpp, on a lattice anchored at pixel (0, 0)
    rc = np.stack([a.obs["array_row"], a.obs["array_col"]], axis=1)
    np.testing.assert_allclose(xy, np.asarray(bins["origin_px"]) + (rc[:, ::-1] + 0.5) * 8.0)
    assert len({tuple(v) for v in rc}) == a.n_obs and str(a.obs_names[0]).startswith("s_008um_")
    # every bin centre in tissue, the tissue covered: (1000 - 2 × 80) / 8 = 105 bins a side
    assert (xy > FRAME - 4).all() and (xy < SIDE - FRAME + 4).all() and abs(a.n_obs - 105**2) < 3 * 105
    assert a.uns["hishrst"]["points"] == "bins" and flat8.resolution == "8um"
    assert flat8.encoder_passes == flat8.tiles == a.uns["bins"]["tiles"]


def test_values_follow_each_bins_own_pixels(flat8: Any) -> None:
    a = ad.read_zarr(flat8.output)
    inner = _inner(a, 4)
    np.testing.assert_allclose(np.asarray(a.X)[inner], np.broadcast_to(expected_expression(np.array(PINK)),
                                                                       (int(inner.sum()), 5)), atol=1e-5)


def test_rows_come_in_tile_order_and_fill_chunks(flat8: Any) -> None:
    """Bins of one tile are consecutive rows, the tiles in row-major lattice order."""
    a = ad.read_zarr(flat8.output)
    r, c = np.asarray(a.obs["array_row"]), np.asarray(a.obs["array_col"])
    k, (r0, c0) = a.uns["bins"]["tile_stride_bins"], a.uns["bins"]["tile_origin_rc"]
    assert k == 4 and r0 % 2 == 0 and c0 % 2 == 0  # 4 kept tokens a tile; the lattice starts at an even bin
    tile = np.stack([(r - r0) // k, (c - c0) // k], axis=1)
    change = np.flatnonzero((np.diff(tile, axis=0) != 0).any(axis=1)) + 1
    starts = tile[np.r_[0, change]]
    assert len({tuple(t) for t in starts}) == len(starts)  # each tile's bins in one run of rows
    assert (np.diff(starts[:, 0] * 10_000 + starts[:, 1]) > 0).all()


# ------------------------------------------------------------------------------------------ tile seams


def test_constant_slide_has_no_seams(flat8: Any) -> None:
    a = ad.read_zarr(flat8.output)
    x = np.asarray(a.X)[_inner(a, 4)]
    assert np.ptp(x, axis=0).max() < 1e-5  # one value, whichever tile a bin came from


def _grid(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """Gene 0 of the inner bins on their lattice (NaN elsewhere), and each grid column's place in its tile."""
    inner = _inner(a, 4)
    r, c = np.asarray(a.obs["array_row"])[inner], np.asarray(a.obs["array_col"])[inner]
    grid = np.full((r.max() - r.min() + 1, c.max() - c.min() + 1), np.nan)
    grid[r - r.min(), c - c.min()] = np.asarray(a.X)[inner, 0]
    k, c0 = a.uns["bins"]["tile_stride_bins"], a.uns["bins"]["tile_origin_rc"][1]
    return grid, (c.min() + np.arange(grid.shape[1]) - c0) % k


def test_smooth_slide_is_smooth_across_tile_borders(ramp: Path, bundle: Path, tmp_path: Path) -> None:
    res = run(ramp, bundle, tmp_path)
    assert res.status == "ok", res
    grid, in_tile = _grid(ad.read_zarr(res.output))
    dx = np.diff(grid, axis=1)  # neighbours along the ramp: ~ constant steps
    border = (in_tile[:-1] == 3)[None, :] & np.isfinite(dx)  # the pair (c, c + 1) lies across two tiles
    inside = ~border & np.isfinite(dx)
    assert border.sum() > 1000 and inside.sum() > 1000
    assert np.abs(dx[border]).max() <= 1.2 * np.abs(dx[inside]).max()
    assert abs(np.abs(dx[border]).mean() / np.abs(dx[inside]).mean() - 1) < 0.1  # no jump, no duplicated bins
    assert np.nanmin(dx) > 0  # the ramp rises in every step
    dy = np.diff(grid, axis=0)  # across the ramp: flat, inside tiles and across their borders alike
    assert np.nanmax(np.abs(dy)) < 1e-5
    a = ad.read_zarr(res.output)  # and each bin shows its own pixels (no shift by a token)
    inner = _inner(a, 4)
    cols = np.asarray(a.obs["array_col"])[inner]
    red = _ramp_red(cols[:, None] * 8 + np.arange(8)[None, :]).mean(axis=1)
    want = expected_expression(np.stack([red, np.full_like(red, 110), np.full_like(red, 170)], axis=1))[:, 0]
    step = np.abs(dx[inside]).mean()
    assert np.abs(np.asarray(a.X)[inner, 0] - want).max() < 0.25 * step


# ------------------------------------------------------------------------------------------ 16 µm


def test_16um_is_the_8um_bins_pooled_in_count_space(flat8: Any, ramp: Path, bundle: Path, tmp_path: Path) -> None:
    b8 = ad.read_zarr(run(ramp, bundle, tmp_path / "8").output)
    res = run(ramp, bundle, tmp_path / "16", resolution="16um")
    assert res.status == "ok" and res.resolution == "16um", res
    b16 = ad.read_zarr(res.output)
    assert b16.uns["bins"]["size_um"] == 16.0 and str(b16.obs_names[0]).startswith("s_016um_")
    assert b16.uns["hishrst_run"]["encoder_passes"] == res.encoder_passes
    x8 = {(r, c): v for r, c, v in zip(b8.obs["array_row"], b8.obs["array_col"], np.asarray(b8.X))}
    checked = 0
    for r, c, v in zip(b16.obs["array_row"], b16.obs["array_col"], np.asarray(b16.X)):
        kids = [x8.get((2 * r + i, 2 * c + j)) for i in (0, 1) for j in (0, 1)]
        if any(k is None for k in kids):
            continue  # a 16 µm bin on the tissue's edge: some of its 8 µm bins are not written
        np.testing.assert_allclose(v, np.log1p(np.expm1(np.asarray(kids, np.float64)).mean(axis=0)), rtol=1e-5)
        checked += 1
    assert checked > 0.9 * b16.n_obs
    np.testing.assert_allclose(np.asarray(b16.obsm["spatial"]),
                               (np.stack([b16.obs["array_col"], b16.obs["array_row"]], axis=1) + 0.5) * 16.0)


def test_16um_needs_an_even_stride(bundle: Path, flat: Path, tmp_path: Path) -> None:
    odd = build_subspot_bundle(tmp_path / "odd", grid=7, input_size=28, margin=2)  # keep 3
    res = run(flat, odd, tmp_path / "out", resolution="16um")
    assert res.status == "failed" and "16um" in res.reason and "keep 3" in res.reason


# ------------------------------------------------------------------------------------------ resume, dtype


class _FailAfter:
    """A head that fails on its ``n``-th call (a run killed half way)."""

    def __init__(self, head: Any, n: int) -> None:
        self.head, self.n, self.calls = head, n, 0
        self.output_names = head.output_names

    def run(self, feeds: Any) -> Any:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("simulated crash")
        return self.head.run(feeds)

    def close(self) -> None:
        self.head.close()


def test_resume_after_an_interrupted_run_gives_identical_x(flat8: Any, ramp: Path, bundle: Path,
                                                           tmp_path: Path) -> None:
    ref = ad.read_zarr(run(ramp, bundle, tmp_path / "ref", batch_size=16).output)
    b = load_bundle(bundle)
    eng = load_engines(b, "cpu", cache_dir=None, threads=1)
    broken = Engines(eng.encoder, _FailAfter(eng.head, 30), "cpu")
    out = tmp_path / "out"
    res = run_slides([ramp], bundle_dir=bundle, out_dir=out, engines=broken, progress=False, batch_size=16,
                     echo=lambda s: None)[0]
    assert res.status == "failed" and "simulated crash" in res.reason
    partial = out / "ramp.zarr.partial"
    assert partial.is_dir() and any((partial / ".hishrst_progress").iterdir())
    again = run(ramp, bundle, out, batch_size=16, resume=True)
    assert again.status == "ok" and again.resumed and 0 < again.computed < again.points, again
    assert again.encoder_passes < again.tiles
    got = ad.read_zarr(again.output)
    np.testing.assert_array_equal(np.asarray(got.X), np.asarray(ref.X))
    np.testing.assert_array_equal(np.asarray(got.obsm["spatial"]), np.asarray(ref.obsm["spatial"]))


def test_float16_x(flat8: Any, flat: Path, bundle: Path, tmp_path: Path) -> None:
    res = run(flat, bundle, tmp_path, dtype="float16")
    assert res.status == "ok", res
    a16, a32 = ad.read_zarr(res.output), ad.read_zarr(flat8.output)
    assert a16.X.dtype == np.float16
    np.testing.assert_allclose(np.asarray(a16.X, np.float32), np.asarray(a32.X), rtol=1e-3)
    assert (res.qc is not None) and res.qc.is_file()


def test_noop_engines_run_a_subspot_bundle(flat: Path, bundle: Path, tmp_path: Path) -> None:
    from hishrst_runtime.inference.engines import noop_engines

    res = run_slides([flat], bundle_dir=bundle, out_dir=tmp_path, engines=noop_engines(load_bundle(bundle)),
                     progress=False, qc=False, echo=lambda s: None)[0]
    assert res.status == "ok" and res.encoder_passes == res.tiles, res
    assert not np.asarray(ad.read_zarr(res.output).X).any()


def test_spot_bundles_take_float16_too(flat: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    res = run(flat, tiny_bundle, tmp_path, dtype="float16")
    assert res.status == "ok" and res.resolution is None and res.encoder_passes is None, res
    a = ad.read_zarr(res.output)
    assert a.X.dtype == np.float16 and "bins" not in a.uns and "grid_row" in a.obs


def test_a_slide_without_tissue_fails_and_leaves_nothing(bundle: Path, tmp_path: Path) -> None:
    blank = write_ome_zarr(np.full((400, 400, 3), 240, np.uint8), tmp_path / "blank.ome.zarr", mpp=1.0)
    res = run(blank, bundle, tmp_path / "out")
    assert res.status == "failed" and "no tissue" in res.reason
    assert not list((tmp_path / "out").glob("blank.zarr*"))


# ------------------------------------------------------------------------------------------ formats


def test_spatialdata_and_h5ad_of_bins(flat: Path, bundle: Path, tmp_path: Path) -> None:
    sd = pytest.importorskip("spatialdata")
    res = run(flat, bundle, tmp_path, resolution="16um", output_format="anndata,spatialdata,h5ad")
    assert res.status == "ok", res
    sdata = sd.read_zarr(tmp_path / "flat.sdata.zarr")
    shapes = sdata.shapes["flat_square_016um"]
    assert len(shapes) == res.points and (shapes.geometry.geom_type == "Polygon").all()
    np.testing.assert_allclose(shapes.geometry.area, 16.0**2)
    table = sdata.tables["table"]
    assert table.uns["spatialdata_attrs"]["region"] == "flat_square_016um"
    assert ad.read_h5ad(tmp_path / "flat.h5ad").n_obs == res.points


# ------------------------------------------------------------------------------------------ options and CLI


def test_cli_bins_report_and_wrong_options(flat: Path, bundle: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hishrst_runtime.cli.run import run as run_cmd

    base = [str(flat), "--out", str(tmp_path / "out"), "--no-progress", "--provider", "cpu", "--no-qc"]
    r = CliRunner().invoke(run_cmd, [*base, "--bundle", str(bundle), "--resolution", "16um", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "hishrst_run.json").read_text())
    entry = report["slides"][0]
    assert entry["resolution"] == "16um" and entry["encoder_passes"] == entry["tiles"] > 0
    assert "16um bins from" in (tmp_path / "out" / "summary.md").read_text()
    assert ad.read_zarr(tmp_path / "out" / "flat.zarr").X.dtype == np.float16
    for extra, words in ((["--pitch-um", "40"], "--pitch-um"), (["--grid", "square"], "--grid"),
                         (["--points", str(tmp_path / "pts.csv")], "--points")):
        (tmp_path / "pts.csv").write_text("x,y\n500,500\n")
        r = CliRunner().invoke(run_cmd, [*base, "--bundle", str(bundle), "--overwrite", *extra])
        assert r.exit_code == 1 and words in r.output and "sub-spot" in r.output, r.output
    r = CliRunner().invoke(run_cmd, [*base, "--bundle", str(tiny_bundle), "--resolution", "8um"])
    assert r.exit_code == 1 and "--resolution" in r.output and "spot bundle" in r.output, r.output


def test_runtime_never_imports_torch(flat: Path, bundle: Path, tmp_path: Path) -> None:
    """A sub-spot run and every runtime module (bins included) with torch and timm blocked."""
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        from pathlib import Path

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "timm"):
                    raise ImportError(f"{{name}} is blocked in the torch-free runtime test")
                return None

        sys.meta_path.insert(0, Block())
        import hishrst_runtime
        for m in pkgutil.walk_packages(hishrst_runtime.__path__, "hishrst_runtime."):
            importlib.import_module(m.name)
        from hishrst_runtime.jobs.runner import run_slides
        res = run_slides([Path({str(flat)!r})], bundle_dir=Path({str(bundle)!r}), out_dir=Path({str(tmp_path)!r}),
                         provider="auto", progress=False, resolution="16um")
        assert res[0].status == "ok" and res[0].resolution == "16um", res
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "timm")]
        print("TORCH-FREE OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                          check=False)
    assert proc.returncode == 0 and "TORCH-FREE OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
