"""Tissue masks from GeoJSON (QuPath exports) and PNG / TIFF, and masks written back as GeoJSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hishrst_runtime.slides.errors import MaskError
from hishrst_runtime.slides.masks import mask_to_geojson, read_tissue_mask, write_mask_geojson

LEVEL0 = (4000, 6000)  # (H, W) level-0 pixels
OUT = (100, 150)  # overview (h, w): 40 level-0 px per overview px


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_geojson_polygon_with_hole_and_multipolygon(tmp_path: Path) -> None:
    """QuPath's FeatureCollection: a polygon with a hole plus a MultiPolygon; coordinates in level-0 px."""
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
         "geometry": {"type": "Polygon", "coordinates": [_square(400, 400, 2400, 2400), _square(800, 800, 1200, 1200)]}},
        {"type": "Feature", "properties": {},
         "geometry": {"type": "MultiPolygon", "coordinates": [[_square(4000, 400, 4400, 800)],
                                                              [_square(4800, 2000, 5200, 3600)]]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [10, 10]}},
    ]}
    mask = read_tissue_mask(_write(tmp_path / "t.geojson", fc), level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    expected = np.zeros(OUT, bool)
    expected[10:60, 10:60] = True
    expected[20:30, 20:30] = False  # the hole
    expected[10:20, 100:110] = True
    expected[50:90, 120:130] = True
    np.testing.assert_array_equal(mask, expected)


def test_geojson_feature_list_and_bare_geometry(tmp_path: Path) -> None:
    """Older QuPath exports: a JSON list of features; a bare Polygon works too; overlapping polygons never cancel."""
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 2000, 2000)]}},
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(1000, 1000, 3000, 3000)]}}]
    m = read_tissue_mask(_write(tmp_path / "l.json", feats), level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    assert m[:50, :50].all() and m[25:75, 25:75].all() and not m[60:, :20].any()
    bare = {"type": "Polygon", "coordinates": [_square(0, 0, 6000, 4000)]}
    assert read_tissue_mask(_write(tmp_path / "b.geojson", bare), level0_shape_yx=LEVEL0, out_shape_yx=OUT).all()


def test_png_and_tiff_masks_are_stretched(tmp_path: Path) -> None:
    small = np.zeros((20, 30), np.uint8)
    small[5:15, 10:20] = 1  # nonzero (not only 255) is tissue
    Image.fromarray(small).save(tmp_path / "m.png")
    m = read_tissue_mask(tmp_path / "m.png", level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    expected = np.zeros(OUT, bool)
    expected[25:75, 50:100] = True
    np.testing.assert_array_equal(m, expected)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha is not tissue
    rgba[5:15, 10:20, 0] = 200
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_tissue_mask(tmp_path / "rgba.png", level0_shape_yx=LEVEL0, out_shape_yx=OUT), expected)
    tifffile = pytest.importorskip("tifffile")
    big = np.kron(small, np.ones((10, 10), np.uint8)) * 255  # a mask larger than the output: area-averaged
    tifffile.imwrite(tmp_path / "m.tif", big)
    np.testing.assert_array_equal(read_tissue_mask(tmp_path / "m.tif", level0_shape_yx=LEVEL0, out_shape_yx=OUT), expected)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a readable GeoJSON"),
    (json.dumps({"type": "FeatureCollection", "features": []}), "no Polygon"),
    (json.dumps({"type": "Polygon", "coordinates": [_square(90000, 90000, 91000, 91000)]}), "marks no tissue"),
    (json.dumps({"type": "Polygon", "coordinates": 5}), "malformed"),
])
def test_bad_geojson_names_the_file(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "bad.geojson"
    p.write_text(content)
    with pytest.raises(MaskError, match=needle) as ei:
        read_tissue_mask(p, level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_bad_raster_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "m.png"
    p.write_bytes(b"\x89PNG broken")
    with pytest.raises(MaskError, match="not a readable mask image"):
        read_tissue_mask(p, level0_shape_yx=LEVEL0, out_shape_yx=OUT)
    with pytest.raises(MaskError, match="no such tissue-mask file"):
        read_tissue_mask(tmp_path / "none.png", level0_shape_yx=LEVEL0, out_shape_yx=OUT)


def test_mask_to_geojson_round_trips_exactly(tmp_path: Path) -> None:
    """Tracing then rasterising gives the mask back, pixel for pixel: holes, diagonal touches, edges of the image."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    masks = [ndimage.binary_opening(rng.random((50, 75)) > 0.4), rng.random((30, 45)) > 0.5]
    ring = np.zeros((30, 45), bool)
    ring[5:25, 5:40] = True
    ring[10:20, 10:20] = False
    ring[14, 14] = True  # an island in the hole
    masks.append(ring)
    for m in masks:
        level0 = (m.shape[0] * 8, m.shape[1] * 6)
        path = write_mask_geojson(m, tmp_path / "qc.geojson", scale_px=(8.0, 6.0))
        back = read_tissue_mask(path, level0_shape_yx=level0, out_shape_yx=m.shape)
        np.testing.assert_array_equal(back, m)
    fc = json.loads(path.read_text())
    polys = [f["geometry"]["coordinates"] for f in fc["features"]]
    assert len(polys) == 2 and sorted(len(p) for p in polys) == [1, 2]  # the ring with its hole, and the island
    assert fc["features"][0]["properties"]["classification"]["name"] == "Tissue"
    assert all(p[0][0] == p[0][-1] for p in polys)  # closed rings


def test_empty_mask_gives_an_empty_collection() -> None:
    assert mask_to_geojson(np.zeros((4, 4), bool), scale_px=2.0) == {"type": "FeatureCollection", "features": []}
