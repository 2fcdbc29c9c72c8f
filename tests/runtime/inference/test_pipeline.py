"""Tests of the whole-slide pipeline (hishrst_runtime.inference.pipeline) through ``run_slides``, in process.

Uses the session fixtures of ``conftest.py`` (``small_section`` → ``small_run`` → ``small_bundle``)
and writes the section's H&E image as OME-Zarr slides. Kept fast: explicit points or the default
50 µm grid (≈ 1,000 points) on a 2.8k × 2.8k-pixel slide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

ad = pytest.importorskip("anndata")

from hishrst_runtime.slides.convert import write_ome_zarr  # noqa: E402
from hishrst_runtime.bundle.manifest import load_bundle  # noqa: E402
from hishrst_runtime.output.store import OutputStore, partial_path  # noqa: E402
from hishrst_runtime.inference.pipeline import predict_slide, prepare_slide, work_units  # noqa: E402
from hishrst_runtime.slides.cache import ChunkCache  # noqa: E402
from hishrst_runtime.jobs.runner import run_slides, slide_output_path  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SVS = REPO.parent / "shared" / "data" / "cmu_small_region.svs"
#: The export parity tolerance: max |Δ| / max(1, max |reference|).
TOLERANCE = 1e-4


def section_image(section: Path) -> tuple[np.ndarray, float]:
    """The synthetic section's full-resolution H&E image (RGB uint8) and its µm / pixel."""
    from hishrst_train.data import image_mpp, open_fullres_image

    tif = next(section.parent.glob("image.tif*"))
    with open_fullres_image(tif) as im:
        return np.asarray(im), float(image_mpp(tif))


@pytest.fixture(scope="module")
def image(small_section: Path) -> tuple[np.ndarray, float]:
    return section_image(small_section)


@pytest.fixture(scope="module")
def slide(image: tuple[np.ndarray, float], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The section as an NGFF 0.5 (zarr v3), cyx slide with 3 levels."""
    img, mpp = image
    return write_ome_zarr(img, tmp_path_factory.mktemp("rt_slide") / "section.ome.zarr", mpp=mpp, n_levels=3)


@pytest.fixture(scope="module")
def heldout(small_run: Path) -> Any:
    return ad.read_h5ad(small_run / "predictions.h5ad")


def run(slides: list[Path], bundle: Path, out: Path, **kw: Any) -> list[Any]:
    kw.setdefault("progress", False)
    kw.setdefault("provider", "cpu")
    return run_slides(slides, bundle_dir=bundle, out_dir=out, echo=lambda s: None, **kw)


def assert_within_tolerance(got: np.ndarray, ref: np.ndarray) -> None:
    scaled = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
    assert scaled <= TOLERANCE, f"scaled max |Δ| {scaled:.3g} > {TOLERANCE}"


def no_output_left(out_dir: Path, slide: Path) -> None:
    out = slide_output_path(slide, out_dir)
    assert not out.exists(), f"{out} exists after an error"
    assert not partial_path(out).exists(), f"{partial_path(out)} exists after an error before inference"
    assert not out.with_name(out.name + ".lock").exists()


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("layout", [("0.5", "cyx"), ("0.4", "yxc")])
def test_heldout_spots_match_fit(layout: tuple[str, str], slide: Path, image: tuple[np.ndarray, float],
                                 heldout: Any, small_bundle: Path, tmp_path: Path) -> None:
    """At the held-out spots of the fit, the runtime predicts what `hishrst fit` predicted."""
    version, axes = layout
    if layout != ("0.5", "cyx"):
        img, mpp = image
        slide = write_ome_zarr(img, tmp_path / "s04.ome.zarr", mpp=mpp, version=version, axes=axes, n_levels=2)  # type: ignore[arg-type]
    xy = np.asarray(heldout.obsm["spatial"], dtype=np.float64)
    res = run([slide], small_bundle, tmp_path / "out", points_px={str(slide): xy}, min_tissue=0)[0]
    assert res.status == "ok", res
    out = ad.read_zarr(res.output)
    np.testing.assert_array_equal(out.obsm["spatial"], xy)  # explicit points keep their order
    assert list(out.var_names) == list(heldout.var_names)
    assert_within_tolerance(np.asarray(out.X), np.asarray(heldout.X))
    assert (out.obs["grid_row"] == -1).all() and out.uns["hishrst"]["points"] == "explicit"


# ------------------------------------------------------------------------------------------ grid output


def test_grid_output_is_a_complete_anndata(slide: Path, small_bundle: Path, tmp_path: Path) -> None:
    bundle = load_bundle(small_bundle)
    res = run([slide], small_bundle, tmp_path, h5ad=True)[0]
    assert res.status == "ok", res
    out_path = Path(res.output)
    assert out_path == tmp_path / "section.zarr" and OutputStore.status(out_path) == "complete"
    assert not partial_path(out_path).exists() and not (tmp_path / "section.zarr.lock").exists()
    a = ad.read_zarr(out_path)
    n = a.n_obs
    assert 500 < n < 2000 and res.points == n
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all() and a.X.std() > 0
    assert list(a.var_names) == bundle.genes
    # Points: level-0 pixels inside the slide, over tissue, on a 50 µm hexagonal grid.
    xy = np.asarray(a.obsm["spatial"])
    assert xy.shape == (n, 2) and xy.min() >= 0 and xy.max() < 2900
    assert (a.obs["tissue_fraction"] >= 0.25).all() and a.obs["tissue_fraction"].dtype == np.float32
    assert len({(r, c) for r, c in zip(a.obs["grid_row"], a.obs["grid_col"])}) == n
    um = xy * 0.6
    nn = np.sort(np.linalg.norm(um[:200, None] - um[None], axis=-1), axis=1)[:, 1]
    np.testing.assert_allclose(np.median(nn), 50.0, rtol=1e-6)
    # Metadata.
    h = a.uns["hishrst"]
    assert h["bundle_hash"] == bundle.sha256 and h["mpp"] == pytest.approx(0.6) and h["pitch_um"] == 50.0
    assert h["grid"] == "hex" and h["level"] == 0 and h["patch_um"] == 64.0
    mask = h["tissue_mask"]
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and 0.05 < mask.mean() < 0.95
    run_meta = a.uns["hishrst_run"]
    assert run_meta["engine"] == "cpu" and not run_meta["resumed"]
    assert {"encoder", "head", "cut_resample", "prepare"} <= set(run_meta["timings"])
    lib = a.uns["spatial"]["section"]
    assert lib["images"]["lowres"].shape[:2] == mask.shape
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(mask.shape[1] / 2766, rel=1e-3)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(50 / 0.6)
    # --h5ad: the same data.
    b = ad.read_h5ad(tmp_path / "section.h5ad")
    np.testing.assert_array_equal(b.X, a.X)
    # scanpy can plot it.
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    sc.pl.spatial(a, color=bundle.genes[0], library_id="section", show=False)
    # A second run skips the complete output.
    again = run([slide], small_bundle, tmp_path)[0]
    assert again.status == "skipped" and "already complete" in again.reason


# ------------------------------------------------------------------------------------------ level, reads, memory


class _Spy:
    """Wraps a Level and records every region read."""

    def __init__(self, level: Any) -> None:
        self.level, self.reads = level, []
        self.shape, self.chunks = level.shape, level.chunks

    def read_chunk(self, cy: int, cx: int) -> Any:
        self.reads.append((cy, cx))
        return self.level.read_chunk(cy, cx)

    def close(self) -> None:
        self.level.close()


def test_level_choice_patch_size_and_chunk_aligned_reads(slide: Path, small_bundle: Path, heldout: Any) -> None:
    """Claiming 0.3 µm/px makes level 1 (0.6 µm/px) the training resolution: read it, 64 µm = 107 px."""
    bundle = load_bundle(small_bundle)
    xy = np.asarray(heldout.obsm["spatial"])[:40]  # level-0 pixels (now "0.3 µm" pixels)
    prep = prepare_slide(slide, bundle, mpp=0.3, points_px=xy)
    assert prep.level_index == 1 and prep.slide.mpp_source == "override"
    spy = _Spy(prep.slide.levels[1])
    prep.slide.levels[1] = spy
    spy.mpp, spy.downsample = spy.level.mpp, spy.level.downsample
    rows: dict[int, np.ndarray] = {}

    def write(idx: np.ndarray, values: np.ndarray) -> None:
        rows.update(zip(idx.tolist(), values))

    from hishrst_runtime.backends import load_backend

    enc, head = (load_backend(bundle.path(k), provider="cpu") for k in ("encoder", "head"))
    stats = predict_slide(prep, bundle, encoder=enc, head=head, write=write, batch_size=16, workers=2)
    assert stats.level == 1 and stats.patch_side_px == 107 and sorted(rows) == list(range(40))
    # Every read of the level is one whole chunk, and no chunk is read twice.
    assert len(spy.reads) == len(set(spy.reads)) == stats.chunk_cache["misses"] > 0
    # Pixels and positions differ from the fit's (another level, claimed µm), so check finiteness only.
    assert np.isfinite(np.stack([rows[i] for i in range(40)])).all()
    prep.close()


def test_chunk_cache_is_bounded_and_results_do_not_depend_on_it(slide: Path, small_bundle: Path, heldout: Any) -> None:
    bundle = load_bundle(small_bundle)
    xy = np.asarray(heldout.obsm["spatial"])
    from hishrst_runtime.backends import load_backend

    enc, head = (load_backend(bundle.path(k), provider="cpu") for k in ("encoder", "head"))
    results = []
    for cache_bytes, workers in ((1, 2), (64 << 20, 0)):
        prep = prepare_slide(slide, bundle, points_px=xy)
        got = np.zeros((len(xy), len(bundle.genes)), np.float32)
        stats = predict_slide(prep, bundle, encoder=enc, head=head, write=got.__setitem__, batch_size=32,
                              workers=workers, cache_bytes=cache_bytes)
        chunk_bytes = int(np.prod(prep.slide.levels[0].chunks)) * 4  # Pillow RGB: 4 bytes per pixel
        assert stats.chunk_cache["peak_bytes"] <= max(cache_bytes, chunk_bytes) + chunk_bytes
        results.append(got)
        prep.close()
    np.testing.assert_array_equal(results[0], results[1])


class _Recorder:
    """An encoder stand-in that keeps every tile batch it is fed."""

    def __init__(self, dim: int) -> None:
        self.dim, self.batches = dim, []

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.batches.append(np.array(feeds["tiles"]))
        return [np.zeros((len(feeds["tiles"]), self.dim), np.float32)]


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_tiles_are_exactly_cut_patches(slide: Path, small_bundle: Path, workers: int) -> None:
    """The streaming reader (chunk images, unit regions, one mosaic per unit) feeds the encoder exactly
    the uint8 tiles that training's ``cut_patches`` makes — including patches over the slide's edges."""
    from hishrst_runtime.core.patches import cut_patches, patch_side_px, to_tile_layout
    from hishrst_runtime.backends.noop import NoopBackend

    bundle = load_bundle(small_bundle)
    prep = prepare_slide(slide, bundle, pitch_um=70.0)
    h, w = prep.slide.shape0
    edge = np.array([[3.0, 4.0], [w - 2.0, h - 1.5], [w / 2, 0.0], [w + 20.0, h / 2]])  # explicit points, edges
    prep_edge = prepare_slide(slide, bundle, points_px=np.concatenate([prep.points_px[:50], edge]))
    for p in (prep, prep_edge):
        level = p.slide.levels[p.level_index]
        side = patch_side_px(bundle.patch_um, float(level.mpp))
        size = int(bundle.encoder["input_size"])
        rec = _Recorder(int(bundle.encoder["feature_dim"]))
        head = NoopBackend(lambda f: (*f["features"].shape[:2], len(bundle.genes)))
        order: list[np.ndarray] = []
        predict_slide(p, bundle, encoder=rec, head=head, write=lambda idx, v: order.append(idx), batch_size=16,
                      workers=workers)
        got = np.concatenate(rec.batches)
        idx = np.concatenate([np.concatenate([p.groups[g] for g in u]) for u in work_units(p.groups, 16)])
        ref = cut_patches(level.image, p.points_px[idx] / float(level.downsample), side=side, out_size=size)
        np.testing.assert_array_equal(got, to_tile_layout(ref, bundle.spec.encoder.layout))  # the encoder's layout
        p.close()


def test_a_failing_write_stops_the_head_thread(slide: Path, small_bundle: Path) -> None:
    """After a head/write failure no later unit is written: the error surfaces, in order, and nothing else runs."""
    from hishrst_runtime.backends.noop import NoopBackend

    bundle = load_bundle(small_bundle)
    prep = prepare_slide(slide, bundle, pitch_um=70.0)
    enc = NoopBackend(lambda f: (len(f["tiles"]), int(bundle.encoder["feature_dim"])))
    head = NoopBackend(lambda f: (*f["features"].shape[:2], len(bundle.genes)))
    calls: list[int] = []

    def write(idx: np.ndarray, values: np.ndarray) -> None:
        calls.append(len(idx))
        if len(calls) == 2:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        predict_slide(prep, bundle, encoder=enc, head=head, write=write, batch_size=8, workers=2)
    assert len(calls) == 2 and len(work_units(prep.groups, 8)) > 4
    prep.close()


def test_chunk_cache_reads_each_chunk_once_across_threads(slide: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from hishrst_runtime.slides.reader import open_slide

    with open_slide(slide) as s:
        spy = _Spy(s.levels[0])
        cache = ChunkCache(spy, max_bytes=1 << 30)
        boxes = [(x, y, x + 300, y + 300) for x in range(0, 2400, 250) for y in range(0, 2400, 250)]
        with ThreadPoolExecutor(4) as pool:
            regions = list(pool.map(lambda b: cache.read(*b), boxes))
        assert len(spy.reads) == len(set(spy.reads))
        for (x0, y0, x1, y1), r in zip(boxes[:5], regions[:5]):
            np.testing.assert_array_equal(r, s.levels[0].read_region(x0, y0, x1, y1))


@pytest.mark.parametrize("kind", ["hex", "square"])
def test_query_grid_over_tissue(kind: str, slide: Path, small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    prep = prepare_slide(slide, bundle, pitch_um=80.0, grid=kind)  # type: ignore[arg-type]
    um = prep.points_px * 0.6
    rows, cols = prep.grid_index[:, 0], prep.grid_index[:, 1]
    dy = 80.0 * (np.sqrt(3) / 2 if kind == "hex" else 1.0)
    np.testing.assert_allclose(um[:, 1], 40.0 + rows * dy, atol=1e-6)  # a grid row is one y
    offset = np.where((rows % 2 == 1) & (kind == "hex"), 40.0, 0.0)
    np.testing.assert_allclose(um[:, 0], 40.0 + offset + cols * 80.0, atol=1e-6)
    assert (prep.tissue_fraction >= 0.25).all() and 100 < len(um) < 600
    # Rows are numbered in group order: each group is a contiguous range.
    assert all(np.array_equal(g, np.arange(g[0], g[0] + len(g))) for g in prep.groups)
    assert np.array_equal(np.concatenate(prep.groups), np.arange(len(um)))
    prep.close()


def test_work_units_are_fixed_by_the_groups() -> None:
    groups = [np.arange(n) for n in (30, 40, 10, 60, 5)]
    assert work_units(groups, 64) == [[0, 1], [2, 3], [4]]
    assert work_units(groups, 1) == [[0], [1], [2], [3], [4]]
    assert work_units([], 8) == []


# ------------------------------------------------------------------------------------------ input errors


def _hand_store(path: Path, data: np.ndarray, *, unit: str | None = "micrometer", multiscales: bool = True) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("0", data=data, chunks=data.shape)
    space = {"type": "space", **({"unit": unit} if unit else {})}
    axes = [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}]
    if multiscales:
        ds = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.6, 0.6]}]}
        root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [ds]}]}
    return path


def test_input_errors_name_the_store_and_leave_no_output(image: tuple[np.ndarray, float], small_bundle: Path,
                                                         tmp_path: Path) -> None:
    img = np.moveaxis(image[0][:256, :256], -1, 0)
    file_slide = tmp_path / "slide.svs"
    file_slide.write_bytes(b"II*\x00not really")
    cases = {
        "missing": (tmp_path / "missing.ome.zarr", "no such file"),
        # a broken TIFF: "convert it first" (OME-Zarr-only reader) or the TIFF reader's own complaint
        "file": (file_slide, "hishrst convert|no 2-D image|not a TIFF"),
        "no_multiscales": (_hand_store(tmp_path / "plain.zarr", img, multiscales=False), "not an OME-Zarr image"),
        "no_pixel_size": (_hand_store(tmp_path / "nounit.zarr", img, unit=None), "--mpp"),
        "dtype": (_hand_store(tmp_path / "u16.zarr", img.astype(np.uint16)), "uint8"),
        "channels": (_hand_store(tmp_path / "gray.zarr", img[:1]), "channel"),
    }
    out = tmp_path / "out"
    res = run([p for p, _ in cases.values()], small_bundle, out)
    for (name, (path, needle)), r in zip(cases.items(), res):
        assert r.status == "failed", (name, r)
        assert str(path) in r.reason and any(n in r.reason for n in needle.split("|")), (name, r.reason)
        no_output_left(out, path)
    assert sorted(os.listdir(out)) == []
    # --mpp supplies the missing pixel size.
    ok = run([cases["no_pixel_size"][0]], small_bundle, out, mpp=0.6, min_tissue=0.0, pitch_um=60.0)[0]
    assert ok.status == "ok", ok
    assert ad.read_zarr(ok.output).uns["hishrst"]["mpp_source"] == "override"


def test_blank_slide_fails_with_no_tissue(small_bundle: Path, tmp_path: Path) -> None:
    blank = write_ome_zarr(np.full((600, 600, 3), 240, np.uint8), tmp_path / "blank.ome.zarr", mpp=0.6)
    r = run([blank], small_bundle, tmp_path / "out")[0]
    assert r.status == "failed" and "no tissue" in r.reason
    no_output_left(tmp_path / "out", blank)


# ------------------------------------------------------------------------------------------ torch-free


def test_runtime_never_imports_torch(image: tuple[np.ndarray, float], small_bundle: Path, tmp_path: Path) -> None:
    """Import every runtime module, run run_slides and the CLI end to end: torch/timm never imported."""
    crop = write_ome_zarr(image[0][600:1200, 600:1200], tmp_path / "crop.ome.zarr", mpp=image[1], chunk=256)
    code = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        from pathlib import Path
        attempted = []

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "timm"):
                    attempted.append(name)
                    raise ImportError(f"{{name}} is blocked in the torch-free runtime test")
                return None

        sys.meta_path.insert(0, Block())
        import hishrst_runtime
        for m in pkgutil.walk_packages(hishrst_runtime.__path__, "hishrst_runtime."):
            importlib.import_module(m.name)
        from hishrst_runtime.cli.run import run
        from hishrst_runtime.jobs.runner import run_slides
        res = run_slides([Path({str(crop)!r})], bundle_dir=Path({str(small_bundle)!r}),
                         out_dir=Path({str(tmp_path)!r}), provider="auto", progress=False)
        assert res[0].status == "ok", res
        try:  # the command too (the finished output is skipped: no second inference)
            run.main([{str(crop)!r}, "--bundle", {str(small_bundle)!r}, "--out", {str(tmp_path)!r},
                      "--no-progress"], prog_name="hishrst-run")
        except SystemExit as e:
            assert e.code in (0, None), e.code
        bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "timm")]
        assert not bad and not attempted, (bad, attempted)
        print("TORCH-FREE OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
                          check=False)
    assert proc.returncode == 0 and "TORCH-FREE OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert OutputStore.status(tmp_path / "crop.zarr") == "complete" and "already complete" in proc.stdout


# ------------------------------------------------------------------------------------------ real SVS


@pytest.mark.skipif(not SVS.is_file(), reason=f"shared test slide {SVS} is not present")
def test_real_svs_converted_and_run(small_bundle: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from hishrst_runtime.cli.convert import convert_cmd
    from hishrst_runtime.cli.run import run as run_cmd

    store = tmp_path / "cmu_small_region.zarr"
    r = CliRunner().invoke(convert_cmd, [str(SVS), str(store), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(run_cmd, [str(store), "--bundle", str(small_bundle), "--out", str(tmp_path / "out"),
                                     "--no-progress", "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out" / "cmu_small_region.zarr"
    assert OutputStore.status(out) == "complete" and not partial_path(out).exists()
    a = ad.read_zarr(out)
    h = a.uns["hishrst"]
    assert h["mpp"] == pytest.approx(0.499, abs=1e-3) and h["mpp_source"] == "metadata"
    # A sensible number of points: about the tissue area over one hexagon's area (50 µm pitch).
    with_tissue_um2 = h["tissue_mask"].mean() * 2220 * 2967 * 0.499**2
    expected = with_tissue_um2 / (50.0**2 * np.sqrt(3) / 2)
    assert 0.6 * expected < a.n_obs < 1.6 * expected, (a.n_obs, expected)
    assert np.isfinite(a.X).all() and a.X.shape == (a.n_obs, 300)
