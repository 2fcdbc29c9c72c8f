"""Direct reading of TIFF-family slides (no conversion), pooled levels, source addressing and OpenSlide errors.

The reference is always the same slide after ``hishrst convert``: levels, µm/px, pixels, whole chunks and
thumbnails must be identical.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.slides.convert import convert_slide, write_ome_zarr
from hishrst_runtime.slides.errors import SlideError, SlideExtraMissing
from hishrst_runtime.slides.reader import open_slide, parse_source
from hishrst_runtime.slides.slide import Slide

tifffile = pytest.importorskip("tifffile")

SHARED_SVS = Path(__file__).resolve().parents[4] / "shared" / "data" / "cmu_small_region.svs"


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with texture (compresses well, no flat regions)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), (xx + yy) % 256], axis=-1)
    return (base + rng.integers(0, 24, size=(h, w, 3))).clip(0, 255).astype(np.uint8)


def _assert_same_slides(a: Slide, b: Slide, *, boxes: int = 6) -> None:
    """Same level count, shapes, µm/px, downsamples; same pixels in random boxes, whole levels when small."""
    assert len(a.levels) == len(b.levels)
    rng = np.random.default_rng(1)
    for la, lb in zip(a.levels, b.levels):
        assert la.shape == lb.shape and la.downsample == lb.downsample
        assert la.mpp == pytest.approx(lb.mpp, rel=1e-12)
        h, w = la.shape
        if h * w <= 4_000_000:
            np.testing.assert_array_equal(la.read_region(0, 0, w, h), lb.read_region(0, 0, w, h))
        for _ in range(boxes):
            x0, y0 = int(rng.integers(-20, w)), int(rng.integers(-20, h))
            x1, y1 = x0 + int(rng.integers(1, 300)), y0 + int(rng.integers(1, 300))
            np.testing.assert_array_equal(la.read_region(x0, y0, x1, y1), lb.read_region(x0, y0, x1, y1))
    np.testing.assert_array_equal(a.thumbnail(max_side=512), b.thumbnail(max_side=512))


def _chunks_match(direct: Slide, ref: Slide, n: int = 12) -> None:
    """Whole-chunk reads (the pipeline's primitive) equal box reads of the reference."""
    lv, rl = direct.levels[0], ref.levels[0]
    ch, cw = lv.chunks
    rows, cols = -(-lv.shape[0] // ch), -(-lv.shape[1] // cw)
    for k in range(n):
        cy, cx = (k * 7) % rows, (k * 5) % cols
        got = np.asarray(lv.read_chunk(cy, cx))
        y0, x0 = cy * ch, cx * cw
        np.testing.assert_array_equal(got, rl.read_region(x0, y0, x0 + got.shape[1], y0 + got.shape[0]))


# --------------------------------------------------------------------------------------- the real SVS


@pytest.fixture(scope="module")
def svs_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not SHARED_SVS.is_file():
        pytest.skip(f"the shared SVS is missing ({SHARED_SVS}); see shared/README.md")
    out = tmp_path_factory.mktemp("svs") / "cmu.ome.zarr"
    return SHARED_SVS, convert_slide(SHARED_SVS, out, progress=False)


def test_svs_direct_equals_converted(svs_pair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # Exact 2 × 2-mean levels: by default the computed levels of a JPEG-tiled TIFF are decoded at reduced scale,
    # within a few grey levels of these (tests/runtime/slides/test_jpeg_scaled.py).
    monkeypatch.setenv("HISHRST_JPEG_SCALED", "0")
    svs, zarr_path = svs_pair
    with open_slide(svs) as direct, open_slide(zarr_path) as ref:
        assert direct.kind == "tiff" and ref.kind == "ome-zarr"
        assert direct.mpp0 == pytest.approx(0.499) and direct.mpp_source == "metadata"
        assert direct.levels[0].chunks == (240, 240)  # the file's JPEG tiles are the chunk grid
        _assert_same_slides(direct, ref)
        _chunks_match(direct, ref)
        assert direct.level_for_mpp(1.0) == ref.level_for_mpp(1.0) == 1


def test_svs_direct_run_equals_converted_run(svs_pair: tuple[Path, Path], tiny_bundle: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``hishrst-run`` on the SVS gives exactly the X (and points) of a run on its converted store when the computed
    levels are exact 2 × 2 means (``HISHRST_JPEG_SCALED=0``; by default the overview the tissue mask comes from is
    decoded at reduced scale, so a few boundary points may differ)."""
    import anndata as ad

    monkeypatch.setenv("HISHRST_JPEG_SCALED", "0")

    from hishrst_runtime.jobs.runner import run_slides

    results = {}
    for tag, slide in zip(("direct", "converted"), svs_pair):
        (r,) = run_slides([slide], bundle_dir=tiny_bundle, out_dir=tmp_path / tag, provider="cpu", workers=2,
                          pitch_um=60.0, progress=False, echo=lambda _m: None)
        assert r.status == "ok", r.reason
        results[tag] = ad.read_zarr(r.output)
    a, b = results["direct"], results["converted"]
    assert a.n_obs > 100
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))


def test_mpp_override_and_missing_pixel_size(tmp_path: Path) -> None:
    p = tmp_path / "nopx.tif"
    tifffile.imwrite(p, _image(64, 80), photometric="rgb")
    with pytest.raises(SlideError, match="--mpp") as ei:
        open_slide(p)
    assert str(p) in str(ei.value)
    with open_slide(p, mpp=0.25) as s:
        assert s.mpp0 == 0.25 and s.mpp_source == "override" and s.kind == "tiff"


# ------------------------------------------------------------------------------------ pyramidal TIFFs


def test_pyramidal_tiff_subifds_equals_its_ome_zarr(tmp_path: Path) -> None:
    """A tiled, zlib pyramidal TIFF (SubIFDs, odd sizes) written from an OME-Zarr pyramid reads as that pyramid."""
    img = _image(301, 419)
    ref_path = write_ome_zarr(img, tmp_path / "ref.ome.zarr", mpp=0.5, chunk=64, n_levels=3)
    with open_slide(ref_path) as ref:
        levels = [lv.read_region(0, 0, lv.shape[1], lv.shape[0]) for lv in ref.levels]
    tif = tmp_path / "pyr.ome.tif"
    with tifffile.TiffWriter(tif) as tw:
        kw = dict(photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
        tw.write(levels[0], tile=(64, 64), subifds=2, resolution=(1e4 / 0.5, 1e4 / 0.5), **kw)
        for lv in levels[1:]:
            tw.write(lv, tile=(32, 32), subfiletype=1, **kw)
    with open_slide(tif) as direct, open_slide(ref_path) as ref:
        assert [lv.shape for lv in direct.levels] == [(301, 419), (151, 210), (76, 105)]
        _assert_same_slides(direct, ref)
        _chunks_match(direct, ref)
    converted = convert_slide(tif, tmp_path / "conv.ome.zarr", chunk=64, progress=False)
    with open_slide(tif) as direct, open_slide(converted) as conv:
        np.testing.assert_array_equal(direct.levels[0].read_region(0, 0, 419, 301), conv.levels[0].read_region(0, 0, 419, 301))
        assert direct.mpp0 == conv.mpp0 == 0.5


def test_single_level_stripped_tiff_gets_the_converted_pyramid(tmp_path: Path) -> None:
    """An uncompressed, stripped, single-level TIFF (memory-mapped) gains exactly ``hishrst convert``'s 2×2-mean levels."""
    tif = tmp_path / "flat.tif"
    tifffile.imwrite(tif, _image(2100, 1100, seed=3), photometric="rgb", rowsperstrip=64,
                     description='{"mpp": 0.25}', metadata=None)
    converted = convert_slide(tif, tmp_path / "flat.ome.zarr", chunk=256, progress=False)
    with open_slide(tif) as direct, open_slide(converted) as conv:
        assert len(direct.levels) == 2 and type(direct.levels[1].source).__name__ == "PooledBoxes"
        _assert_same_slides(direct, conv)


def test_corrupt_tile_names_the_file(tmp_path: Path) -> None:
    tif = tmp_path / "bad.tif"
    img = _image(128, 128)
    tifffile.imwrite(tif, img, photometric="rgb", tile=(64, 64), compression="zlib",
                     description='{"mpp": 0.5}', metadata=None)
    with tifffile.TiffFile(tif) as t:
        off, n = t.pages[0].dataoffsets[3], t.pages[0].databytecounts[3]
    raw = bytearray(tif.read_bytes())
    raw[off : off + n] = b"\x00" * n
    tif.write_bytes(bytes(raw))
    with open_slide(tif) as s:
        for cy, cx in ((0, 0), (0, 1), (1, 0)):  # the good tiles still read, with their own pixels
            np.testing.assert_array_equal(np.asarray(s.levels[0].read_chunk(cy, cx)),
                                          img[cy * 64 : (cy + 1) * 64, cx * 64 : (cx + 1) * 64])
        with pytest.raises(SlideError, match="corrupt") as ei:
            s.levels[0].read_chunk(1, 1)
    assert str(tif) in str(ei.value) and "\n" not in str(ei.value)


def test_non_rgb_tiff_is_refused(tmp_path: Path) -> None:
    tif = tmp_path / "gray16.tif"
    tifffile.imwrite(tif, np.zeros((64, 64), np.uint16))
    with pytest.raises(SlideError, match="RGB") as ei:
        open_slide(tif, mpp=0.5)
    assert str(tif) in str(ei.value)


# ---------------------------------------------------------------------------- addressing / OpenSlide


def test_parse_source(tmp_path: Path) -> None:
    svs = tmp_path / "a.svs"
    svs.write_bytes(b"II*\x00rest")
    other = tmp_path / "a.mrxs"
    other.write_bytes(b"not tiff")
    assert parse_source(svs).kind == "tiff"
    assert parse_source(other).kind == "openslide"
    assert parse_source(tmp_path).kind == "zarr"
    s = parse_source("https://host/x.ome.zarr/")
    assert (s.kind, s.location, s.element) == ("remote", "https://host/x.ome.zarr", None)
    s = parse_source("s3://b/sdata.zarr::he_image")
    assert (s.kind, s.location, s.element) == ("remote", "s3://b/sdata.zarr", "he_image")
    s = parse_source(f"{tmp_path}/sdata.zarr::img1")
    assert (s.kind, s.location, s.element) == ("zarr", f"{tmp_path}/sdata.zarr", "img1")
    assert parse_source("simplecache::s3://b/x.zarr").location == "simplecache::s3://b/x.zarr"


def test_openslide_missing_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openslide", None)  # import openslide -> ImportError
    f = tmp_path / "slide.mrxs"
    f.write_bytes(b"MIRAX-ish")
    with pytest.raises(SlideExtraMissing, match=r'pip install "hishrst\[openslide\]"') as ei:
        open_slide(f)
    assert str(f) in str(ei.value) and "\n" not in str(ei.value)


def test_missing_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")


def test_openslide_reads_what_tifffile_reads(svs_pair: tuple[Path, Path]) -> None:
    """With the ``openslide`` extra installed, the OpenSlide reader gives the same levels and pixels (runs only then)."""
    pytest.importorskip("openslide", reason='needs pip install "hishrst[openslide]"')
    from hishrst_runtime.slides.openslide_slide import open_openslide_slide

    with open_openslide_slide(svs_pair[0]) as osl, open_slide(svs_pair[0]) as direct:
        assert osl.kind == "openslide" and osl.mpp0 == pytest.approx(direct.mpp0)
        _assert_same_slides(osl, direct, boxes=3)
