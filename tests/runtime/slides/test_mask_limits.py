"""One size limit for every raster tissue mask (core/limits.py, ``kind="mask"``), checked on the header
before anything is decoded: a 1.7 MB TIFF declaring 40,000² px is an error, not gigabytes of memory."""

from __future__ import annotations

import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from hishrst_runtime.core.limits import RasterTooLargeError
from hishrst_runtime.slides import masks as masks_mod
from hishrst_runtime.slides.errors import MaskError
from hishrst_runtime.slides.masks import read_tissue_mask

LEVEL0 = (4000, 6000)
OUT = (100, 150)


def _huge_tiff_mask(path: Path, side: int = 40_000, tile: int = 4096) -> Path:
    """A grey TIFF declaring ``side²`` px with all tiles but the first absent (kilobytes on disk)."""
    n = (-(-side // tile)) ** 2
    first = np.zeros((tile, tile), np.uint8)  # tifffile needs one real tile to learn the layout
    tifffile.imwrite(path, (first if i == 0 else None for i in range(n)), shape=(side, side), dtype="uint8",
                     tile=(tile, tile), compression="zlib")
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG whose IHDR is patched to declare ``width × height`` (with a valid CRC)."""
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_tiff_mask_is_refused_before_decoding(tmp_path: Path) -> None:
    p = _huge_tiff_mask(tmp_path / "mask.tif")
    assert p.stat().st_size < 2_000_000
    before = _rss_mb()
    with pytest.raises(MaskError, match="mask limit") as ei:
        read_tissue_mask(p, level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    assert _rss_mb() - before < 500  # nothing of the 1.6 GB was allocated
    msg = str(ei.value)
    assert isinstance(ei.value, RasterTooLargeError)
    assert str(p) in msg and "40,000 × 40,000" in msg and "HISHRST_MAX_MASK_PIXELS" in msg and "\n" not in msg


def test_huge_png_mask_is_refused_by_the_same_limit(tmp_path: Path) -> None:
    p = _png_declaring(tmp_path / "mask.png", 40_000, 40_000)
    with pytest.raises(MaskError, match="mask limit") as ei:
        read_tissue_mask(p, level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    assert str(p) in str(ei.value) and "HISHRST_MAX_MASK_PIXELS" in str(ei.value)


def test_one_limit_for_png_and_tiff(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = np.zeros((20, 30), np.uint8)
    small[5:15, 10:20] = 255
    Image.fromarray(small).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tif", small)
    # Pillow's own decompression-bomb limit plays no part: only hishrst's limit decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("m.png", "m.tif"):
        assert read_tissue_mask(tmp_path / name, level0_shape_yx=LEVEL0, out_shape_yx=OUT).any()
    assert Image.MAX_IMAGE_PIXELS == 100  # left as it was
    monkeypatch.setenv("HISHRST_MAX_MASK_PIXELS", "500")  # 600 px masks are now too large, whatever the format
    for name in ("m.png", "m.tif"):
        with pytest.raises(MaskError, match="30 × 20|20 × 30"):
            read_tissue_mask(tmp_path / name, level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    assert not [n for n in dir(masks_mod) if "MAX" in n.upper() and "PIXEL" in n.upper()]  # no second limit


def test_multi_plane_tiff_mask_is_refused_before_decoding(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 20, 30), np.uint8))
    with pytest.raises(MaskError, match="2-D"):
        read_tissue_mask(tmp_path / "stack.tif", level0_shape_yx=LEVEL0, out_shape_yx=OUT)


def test_planar_rgb_tiff_mask(tmp_path: Path) -> None:
    """A planar (``SYX``) RGB TIFF: any nonzero channel is tissue."""
    rgb = np.zeros((3, 20, 30), np.uint8)
    rgb[2, 5:15, 10:20] = 200
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    m = read_tissue_mask(tmp_path / "planar.tif", level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    expected = np.zeros(OUT, bool)
    expected[25:75, 50:100] = True
    np.testing.assert_array_equal(m, expected)
