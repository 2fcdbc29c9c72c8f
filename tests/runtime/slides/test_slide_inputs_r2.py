"""Slide inputs, round 2 (issue "Nothing silently wrong"): Aperio MPP against AppMag, SpatialData Scale
transformations, unsupported URL schemes and TIFF headers declaring absurd sizes."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.limits import RasterTooLargeError
from hishrst_runtime.slides.errors import SlideError, SlidePixelSizeError
from hishrst_runtime.slides.pyramid import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide


def _svs(path: Path, desc: str) -> Path:
    img = np.random.default_rng(0).integers(100, 230, (128, 128, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", description=desc, metadata=None)
    return path


def _aperio(mag: str, mpp: str) -> str:
    return f"Aperio Image Library v12.0.15\r\n128x128 [0,0 128x128] (64x64) RAW|AppMag = {mag}|MPP = {mpp}"


# ---------------------------------------------------------------------------- case 5: Aperio MPP vs AppMag


def test_aperio_mpp_ten_times_off_appmag_is_refused(tmp_path: Path) -> None:
    p = _svs(tmp_path / "bad.svs", _aperio("20", "5.02"))
    with pytest.raises(SlidePixelSizeError, match=r"MPP = 5\.02 .*AppMag = 20 .*--mpp") as ei:
        open_slide(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value) and isinstance(ei.value, InputError)
    with open_slide(p, mpp=0.502) as s:  # the user states the true pixel size: no error
        assert s.mpp0 == pytest.approx(0.502) and s.mpp_source == "override"


@pytest.mark.parametrize(("mag", "mpp"), [("20", "0.4990"), ("40", "0.2527"), ("40", "0.18"), ("20", "0.75")])
def test_aperio_mpp_consistent_with_appmag_opens(tmp_path: Path, mag: str, mpp: str) -> None:
    with open_slide(_svs(tmp_path / "ok.svs", _aperio(mag, mpp))) as s:
        assert s.mpp0 == pytest.approx(float(mpp))


# ---------------------------------------------------------------------------- case 6: SpatialData Scale


def _sdata(path: Path, transform: dict, *, shape: tuple[int, int] = (96, 128)) -> str:
    """A SpatialData-layout store whose image element ``he`` has ``transform`` to the 'global' system."""
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    root.attrs["spatialdata_attrs"] = {"version": "0.2"}
    img = np.random.default_rng(1).integers(0, 256, (3, *shape), dtype=np.uint8)
    g = root.require_group("images").require_group("he")
    g.create_array("0", data=img, chunks=(3, 32, 32), chunk_key_encoding={"name": "v2", "separator": "/"})
    g.create_array("1", data=img[:, ::2, ::2], chunks=(3, 32, 32), chunk_key_encoding={"name": "v2", "separator": "/"})
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    cs = {"name": "global", "axes": [{"name": a, "type": "space", "unit": "unit"} for a in "cyx"]}
    g.attrs["multiscales"] = [{"version": "0.4", "name": "he", "axes": axes, "coordinateTransformations": [
        {**transform, "input": {"name": "he", "axes": axes}, "output": cs}], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]}]}]
    return f"{path}::he"


def test_spatialdata_scale_to_global_is_respected(tmp_path: Path) -> None:
    src = _sdata(tmp_path / "s.sdata.zarr", {"type": "scale", "scale": [1.0, 2.0, 2.0]})
    with open_slide(src, mpp=0.25) as s:  # --mpp: µm per global (level-0) pixel
        assert s.shape0 == (192, 256)  # was (96, 128): coordinates 2x off
        assert s.mpp0 == pytest.approx(0.25)
        assert s.levels[0].downsample == pytest.approx(2.0) and s.levels[1].downsample == pytest.approx(4.0)
        assert s.levels[0].mpp == pytest.approx(0.5)
        assert s.thumbnail_mpp(s.thumbnail(max_side=64).shape) == pytest.approx(0.25 * 256 / 64)
    seq = {"type": "sequence", "transformations": [{"type": "scale", "scale": [1.0, 2.0, 2.0]},
                                                   {"type": "identity"}]}
    with open_slide(_sdata(tmp_path / "q.sdata.zarr", seq), mpp=0.25) as s:
        assert s.shape0 == (192, 256)
    with open_slide(_sdata(tmp_path / "i.sdata.zarr", {"type": "identity"}), mpp=0.25) as s:
        assert s.shape0 == (96, 128) and s.levels[0].downsample == 1.0


@pytest.mark.parametrize("transform", [
    {"type": "affine", "affine": [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]]},  # rotation
    {"type": "affine", "affine": [[1, 0, 0, 0], [0, 1, 0.3, 0], [0, 0, 1, 0], [0, 0, 0, 1]]},  # shear
    {"type": "translation", "translation": [0, 10, 5]},
    {"type": "rotation", "rotation": [[0, 1], [-1, 0]]},
])
def test_spatialdata_transformations_that_cannot_be_honoured_are_refused(tmp_path: Path, transform: dict) -> None:
    src = _sdata(tmp_path / "r.sdata.zarr", transform)
    with pytest.raises(SlideError, match=r"transformation to coordinate system 'global' is .*cannot honour") as ei:
        open_slide(src, mpp=0.25)
    assert "r.sdata.zarr" in str(ei.value) and "\n" not in str(ei.value)


def test_spatialdata_diagonal_affine_is_a_scale(tmp_path: Path) -> None:
    aff = {"type": "affine", "affine": [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]}
    with open_slide(_sdata(tmp_path / "a.sdata.zarr", aff), mpp=0.25) as s:
        assert s.shape0 == (192, 256)


# ---------------------------------------------------------------------------- case 7: URL schemes


@pytest.mark.parametrize("url", ["ftp://example.org/slide.zarr", "sftp://host/s.zarr", "simplecache::ftp://h/s.zarr"])
def test_unsupported_url_scheme_is_one_line(url: str) -> None:
    with pytest.raises(SlideError, match=r"unsupported URL scheme 's?ftp'.*http\(s\)://.*s3://") as ei:
        open_slide(url)
    assert "\n" not in str(ei.value) and isinstance(ei.value, InputError)


# ---------------------------------------------------------------------------- case 8: absurd TIFF sizes


def _huge_tiff(path: Path, side: int = 10**6, tile: int = 1024) -> Path:
    """A classic TIFF declaring ``side`` × ``side`` RGB px in ``tile`` tiles that all share one small deflate tile."""
    n = (-(-side // tile)) ** 2
    data = zlib.compress(bytes(tile * tile * 3))
    head = 8
    bps_at = head
    data_at = bps_at + 8
    offs_at = data_at + len(data) + (len(data) % 2)
    counts_at = offs_at + 4 * n
    ifd_at = counts_at + 4 * n
    entries = [(256, 4, 1, side), (257, 4, 1, side), (258, 3, 3, bps_at), (259, 3, 1, 8), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, n, offs_at),
               (325, 4, n, counts_at)]
    with open(path, "wb") as f:
        f.write(b"II*\x00" + struct.pack("<I", ifd_at))
        f.write(struct.pack("<3H", 8, 8, 8) + b"\x00\x00")
        f.write(data + b"\x00" * (len(data) % 2))
        f.write(np.full(n, data_at, "<u4").tobytes())
        f.write(np.full(n, len(data), "<u4").tobytes())
        f.write(struct.pack("<H", len(entries)))
        for tag, typ, count, value in entries:
            packed = struct.pack("<HI", value, 0)[:4] if typ == 3 and count == 1 else struct.pack("<I", value)
            f.write(struct.pack("<HHI", tag, typ, count) + packed)
        f.write(struct.pack("<I", 0))
    return path


def test_tiff_declaring_a_trillion_pixels_is_refused_at_open(tmp_path: Path) -> None:
    p = _huge_tiff(tmp_path / "huge.tif")
    assert p.stat().st_size < 16e6
    t0 = time.perf_counter()
    with pytest.raises(SlideError, match=r"1,000,000 × 1,000,000 px .*slide limit.*HISHRST_MAX_SLIDE_PIXELS") as ei:
        open_slide(p, mpp=0.5)
    assert time.perf_counter() - t0 < 30 and isinstance(ei.value, RasterTooLargeError)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_slide_limit_is_the_limits_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hishrst_runtime.slides import reader

    assert reader.MAX_LEVEL_PIXELS == 10**11  # kept for older imports
    p = write_ome_zarr(np.full((64, 96, 3), 200, np.uint8), tmp_path / "s.zarr", mpp=0.5, chunk=32, n_levels=1)
    monkeypatch.setenv("HISHRST_MAX_SLIDE_PIXELS", "1000")
    with pytest.raises(RasterTooLargeError, match="slide limit"):
        open_slide(p)
    t = _svs(tmp_path / "t.svs", _aperio("20", "0.5"))
    with pytest.raises(RasterTooLargeError, match="slide limit"):
        open_slide(t)


def test_overview_is_checked_against_the_overview_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = write_ome_zarr(np.full((64, 96, 3), 200, np.uint8), tmp_path / "o.zarr", mpp=0.5, chunk=32, n_levels=1)
    with open_slide(p) as s:
        monkeypatch.setenv("HISHRST_MAX_OVERVIEW_PIXELS", "100")
        with pytest.raises(RasterTooLargeError, match="overview limit"):
            s.thumbnail(max_side=96)
