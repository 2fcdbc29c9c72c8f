"""Training's full-resolution image reader is built on the runtime's lazy TIFF level view and pixel-size parser."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from hishrst_runtime.slides.tiff import TiffLevel, tiff_pixel_size
from hishrst_train.data import DataError, image_mpp, open_fullres_image


def _img(h: int = 300, w: int = 260) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_fullres_image_reads_through_tiff_level(tmp_path: Path) -> None:
    img = _img()
    tifffile.imwrite(tmp_path / "t.tif", img, photometric="rgb", tile=(64, 64), compression="zlib")
    with open_fullres_image(tmp_path / "t.tif", cache_mb=1) as im:
        assert isinstance(im._a, TiffLevel) and im._chunks == (64, 64)
        np.testing.assert_array_equal(im[10:200, 30:250], img[10:200, 30:250])
    with TiffLevel(tmp_path / "t.tif") as lv:
        assert lv.shape == (300, 260, 3) and lv.chunks == (64, 64)
        np.testing.assert_array_equal(lv[5:70, 60:130], img[5:70, 60:130])


def test_planar_and_greyscale_16bit(tmp_path: Path) -> None:
    img = _img()
    tifffile.imwrite(tmp_path / "p.tif", img.transpose(2, 0, 1), photometric="rgb", planarconfig="separate",
                     tile=(64, 64))
    with open_fullres_image(tmp_path / "p.tif") as im:  # SYX: channels untangled by the level view
        np.testing.assert_array_equal(im[40:90, 100:180], img[40:90, 100:180])
    grey = (img[..., 0].astype(np.uint16) << 8) | 7
    tifffile.imwrite(tmp_path / "g.tif", grey, tile=(64, 64))
    with open_fullres_image(tmp_path / "g.tif") as im:
        np.testing.assert_array_equal(im[0:50, 0:50], np.repeat(img[0:50, 0:50, :1], 3, axis=2))


def test_truncated_tiff_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    whole = tmp_path / "w.tif"
    tifffile.imwrite(whole, _img(600, 260), photometric="rgb", tile=(64, 64), compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with open_fullres_image(cut, cache_mb=1) as im:
        with pytest.raises(DataError, match="truncated or corrupt") as ei:
            im[500:600, 0:260]
    assert str(cut) in str(ei.value) and "\n" not in str(ei.value)


def test_image_mpp_uses_the_runtime_parser(tmp_path: Path) -> None:
    img = _img(64, 64)
    tifffile.imwrite(tmp_path / "r.tif", img, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                     resolutionunit="CENTIMETER")
    with tifffile.TiffFile(tmp_path / "r.tif") as tif:
        assert image_mpp(tmp_path / "r.tif") == tiff_pixel_size(tif)[0] == pytest.approx(0.25)
    # a missing ResolutionUnit records no pixel size (the one rule of hishrst_runtime.core.units)
    nounit = tmp_path / "nounit.tif"
    tifffile.imwrite(nounit, img, photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER", metadata=None)
    raw = nounit.read_bytes()
    entry = b"\x28\x01\x03\x00\x01\x00\x00\x00\x03\x00"  # ResolutionUnit (296), SHORT, 1 value: 3 (cm)
    assert raw.count(entry) == 1
    nounit.write_bytes(raw.replace(entry, b"\xe8\xfd" + entry[2:]))  # renumber it to a private tag: unit missing
    with tifffile.TiffFile(nounit) as tif:
        assert "ResolutionUnit" not in tif.pages[0].tags and "XResolution" in tif.pages[0].tags
    assert image_mpp(nounit) is None
    # OME PhysicalSize in nm, and an implausible Aperio value ignored in favour of nothing
    tifffile.imwrite(tmp_path / "o.ome.tif", img, ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm"})
    assert image_mpp(tmp_path / "o.ome.tif") == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb", description="Aperio Image |MPP = 0.0001", metadata=None)
    assert image_mpp(tmp_path / "a.tif") is None
