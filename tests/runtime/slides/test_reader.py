"""Tests of the OME-Zarr whole-slide reader (hishrst_runtime.slides.reader)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from hishrst_runtime.slides.convert import write_ome_zarr
from hishrst_runtime.core.patches import cut_patch
from hishrst_runtime.slides.reader import Level, SlideError, iter_chunk_regions, open_slide


def _image(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture()
def img() -> np.ndarray:
    return _image()


def _hand_store(path: Path, data: np.ndarray, axes: list[dict[str, Any]], scale: list[float] | None, *,
                version: str = "0.5", global_scale: list[float] | None = None) -> Path:
    """A single-level store written with plain zarr (for layouts our writer does not produce)."""
    fmt = 3 if version == "0.5" else 2
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    root.create_array("0", data=data, chunks=data.shape)
    ds: dict[str, Any] = {"path": "0"}
    if scale is not None:
        ds["coordinateTransformations"] = [{"type": "scale", "scale": scale}]
    ms: dict[str, Any] = {"axes": axes, "datasets": [ds]}
    if global_scale is not None:
        ms["coordinateTransformations"] = [{"type": "scale", "scale": global_scale}]
    if version == "0.5":
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        ms["version"] = "0.4"
        root.attrs["multiscales"] = [ms]
    return path


def _space(name: str, unit: str | None = "micrometer") -> dict[str, Any]:
    return {"name": name, "type": "space", **({"unit": unit} if unit else {})}


CYX = [{"name": "c", "type": "channel"}, _space("y"), _space("x")]


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["cyx", "yxc"])
def test_project_writer_round_trip(tmp_path: Path, img: np.ndarray, version: str, axes: str) -> None:
    p = write_ome_zarr(img, tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=3, version=version, axes=axes)  # type: ignore[arg-type]
    with open_slide(p) as s:
        assert s.mpp0 == pytest.approx(0.5)
        assert s.shape0 == img.shape[:2]
        assert [lv.shape for lv in s.levels] == [(300, 420), (150, 210), (75, 105)]
        assert [lv.downsample for lv in s.levels] == pytest.approx([1, 2, 4])
        assert [lv.mpp for lv in s.levels] == pytest.approx([0.5, 1.0, 2.0])
        assert s.levels[0].chunks == (64, 64)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 420, 300), img)
        np.testing.assert_array_equal(s.levels[0].read_region(17, 33, 200, 101), img[33:101, 17:200])
        lv1 = s.levels[1].read_region(0, 0, 210, 150).astype(np.float64)
        ref = img.astype(np.float64).reshape(150, 2, 210, 2, 3).mean(axis=(1, 3))
        assert np.abs(lv1 - ref).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("fmt_name", ["FormatV04", "FormatV05"])
def test_ome_zarr_writer_stores(tmp_path: Path, img: np.ndarray, fmt_name: str) -> None:
    ome_writer = pytest.importorskip("ome_zarr.writer")
    ome_format = pytest.importorskip("ome_zarr.format")
    fmt = getattr(ome_format, fmt_name)()
    path = tmp_path / "oz.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(img.transpose(2, 0, 1), group, axes="cyx", fmt=fmt, scale_factors=[2, 4],
                           scale={"c": 1.0, "y": 0.25, "x": 0.25}, axes_units={"y": "micrometer", "x": "micrometer"})
    with open_slide(path) as s:
        assert s.mpp0 == pytest.approx(0.25)
        assert len(s.levels) == 3
        assert s.levels[1].downsample == pytest.approx(2.0)
        assert s.levels[2].mpp == pytest.approx(1.0)
        np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 420, 300), img)
    # ome-zarr without units: no pixel size unless --mpp is given
    path2 = tmp_path / "nounit.zarr"
    group = zarr.open_group(str(path2), mode="w", zarr_format=fmt.zarr_format)
    ome_writer.write_image(img.transpose(2, 0, 1), group, axes="cyx", fmt=fmt, scale_factors=[2])
    with pytest.raises(SlideError, match="--mpp") as ei:
        open_slide(path2)
    assert str(path2) in str(ei.value)
    assert open_slide(path2, mpp=0.5).levels[1].mpp == pytest.approx(1.0)


def test_bioformats2raw_layout(tmp_path: Path, img: np.ndarray) -> None:
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=3)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(img, tmp_path / "b2r.zarr" / "0", mpp=0.5, chunk=64, n_levels=2)
    s = open_slide(tmp_path / "b2r.zarr")
    np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 420, 300), img)


def test_leading_singleton_axes_and_rgba(tmp_path: Path, img: np.ndarray) -> None:
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], axis=-1)
    data = rgba.transpose(2, 0, 1)[None, :, None]  # t c z y x
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}, _space("z"), _space("y"), _space("x")]
    p = _hand_store(tmp_path / "tczyx.zarr", data, axes, [1.0, 1.0, 1.0, 0.3, 0.3], version="0.4")
    s = open_slide(p)
    assert s.mpp0 == pytest.approx(0.3)
    np.testing.assert_array_equal(s.levels[0].read_region(0, 0, 420, 300), img)


@pytest.mark.parametrize(("unit", "value"), [("nanometer", 500.0), ("millimeter", 0.0005), ("micrometer", 0.5)])
def test_units(tmp_path: Path, img: np.ndarray, unit: str, value: float) -> None:
    axes = [{"name": "c", "type": "channel"}, _space("y", unit), _space("x", unit)]
    p = _hand_store(tmp_path / "u.zarr", img.transpose(2, 0, 1), axes, [1.0, value, value])
    assert open_slide(p).mpp0 == pytest.approx(0.5)


def test_global_scale_and_unknown_unit(tmp_path: Path, img: np.ndarray) -> None:
    p = _hand_store(tmp_path / "g.zarr", img.transpose(2, 0, 1), CYX, [1.0, 0.25, 0.25], global_scale=[1.0, 2.0, 2.0])
    assert open_slide(p).mpp0 == pytest.approx(0.5)
    axes = [{"name": "c", "type": "channel"}, _space("y", "parsec"), _space("x", "parsec")]
    p2 = _hand_store(tmp_path / "pc.zarr", img.transpose(2, 0, 1), axes, [1.0, 0.5, 0.5])
    with pytest.raises(SlideError, match="--mpp"):
        open_slide(p2)


def test_mpp_override(tmp_path: Path, img: np.ndarray) -> None:
    p = write_ome_zarr(img, tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=3)
    s = open_slide(p, mpp=0.25)
    assert s.mpp_source == "override"
    assert [lv.mpp for lv in s.levels] == pytest.approx([0.25, 0.5, 1.0])
    with pytest.raises(SlideError, match="positive"):
        open_slide(p, mpp=-1.0)


# ---------------------------------------------------------------------------- levels & reads


@pytest.fixture()
def slide3(tmp_path: Path, img: np.ndarray):  # noqa: ANN201
    p = write_ome_zarr(img, tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=3)
    with open_slide(p) as s:
        yield s


@pytest.mark.parametrize(("target", "expected"), [
    (0.1, 0), (0.5, 0), (0.54, 0), (0.9, 0), (0.95, 1), (1.0, 1), (1.5, 1), (2.0, 2), (2.1, 2), (100.0, 2)])
def test_level_for_mpp(slide3, target: float, expected: int) -> None:  # noqa: ANN001
    assert slide3.level_for_mpp(target) == expected


def test_region_reads_at_edges(slide3, img: np.ndarray) -> None:  # noqa: ANN001
    lv: Level = slide3.levels[0]
    np.testing.assert_array_equal(lv.read_region(-10, -5, 20, 30), img[0:30, 0:20])
    np.testing.assert_array_equal(lv.read_region(400, 290, 500, 400), img[290:300, 400:420])
    assert lv.read_region(500, 500, 600, 600).shape == (0, 0, 3)
    np.testing.assert_array_equal(lv[10:20, 30:45], img[10:20, 30:45])
    np.testing.assert_array_equal(lv[-5:, -7:], img[-5:, -7:])
    with pytest.raises(TypeError):
        lv[::2, 0:10]  # noqa: B018


def test_level_works_with_cut_patch(slide3, img: np.ndarray) -> None:  # noqa: ANN001
    lv = slide3.levels[0]
    assert lv.image.shape == (300, 420, 3)
    for center in [(0, 0), (210.3, 150.7), (419, 299), (-20, 100), (415, 5)]:
        ref = cut_patch(img, center, 48)
        np.testing.assert_array_equal(cut_patch(lv, center, 48), ref)
        np.testing.assert_array_equal(cut_patch(lv.image, center, 48), ref)


@pytest.mark.parametrize("region", [None, 100, 64])
def test_iter_chunk_regions_cover_once(slide3, region: int | None) -> None:  # noqa: ANN001
    for lv in slide3.levels:
        cover = np.zeros(lv.shape, np.int32)
        for x0, y0, x1, y1 in iter_chunk_regions(lv, region):
            assert x0 % lv.chunks[1] == 0 and y0 % lv.chunks[0] == 0
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
    boxes = list(slide3.levels[0].iter_regions(100))
    assert boxes[0] == (0, 0, 128, 128) and len(boxes) == 4 * 3


def test_thumbnail(slide3, img: np.ndarray, tmp_path: Path) -> None:  # noqa: ANN001
    t = slide3.thumbnail(max_side=100)
    assert t.dtype == np.uint8 and t.shape == (71, 100, 3)
    assert slide3.thumbnail_mpp(t.shape) == pytest.approx(0.5 * 4.2, rel=0.02)
    assert slide3.thumbnail(max_side=1000).shape == (300, 420, 3)  # never upsampled
    # a single huge level is decimated chunk row by chunk row
    big = np.zeros((1200, 1600, 3), np.uint8)
    big[:, :800] = 200
    p = write_ome_zarr(big, tmp_path / "big.zarr", mpp=1.0, chunk=128, n_levels=1)
    t2 = open_slide(p).thumbnail(max_side=64)
    assert t2.shape == (48, 64, 3)
    assert t2[:, :30].min() == 200 and t2[:, 34:].max() == 0


def test_threaded_reads(slide3, img: np.ndarray) -> None:  # noqa: ANN001
    lv = slide3.levels[0]
    boxes = list(iter_chunk_regions(lv, 32)) * 3
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda b: lv.read_region(*b), boxes))
    for (x0, y0, x1, y1), o in zip(boxes, outs):
        np.testing.assert_array_equal(o, img[y0:y1, x0:x1])


# ---------------------------------------------------------------------------- bad inputs


def _assert_slide_error(path: Path, match: str, **kw: Any) -> None:
    with pytest.raises(SlideError, match=match) as ei:
        open_slide(path, **kw)
    assert str(path) in str(ei.value)


def test_not_a_store(tmp_path: Path) -> None:
    _assert_slide_error(tmp_path / "missing.zarr", "no such file")
    f = tmp_path / "slide.svs"
    f.write_bytes(b"II*\x00")
    _assert_slide_error(f, "hishrst convert")
    (tmp_path / "empty").mkdir()
    _assert_slide_error(tmp_path / "empty", "not a zarr store")


def test_no_multiscales(tmp_path: Path, img: np.ndarray) -> None:
    root = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    root.create_array("0", data=img)
    _assert_slide_error(tmp_path / "plain.zarr", "not an OME-Zarr image")


def test_no_pixel_size(tmp_path: Path, img: np.ndarray) -> None:
    p = write_ome_zarr(img, tmp_path / "nopx.zarr", mpp=None, chunk=64, n_levels=2)
    _assert_slide_error(p, "--mpp")
    s = open_slide(p, mpp=0.7)
    assert [lv.mpp for lv in s.levels] == pytest.approx([0.7, 1.4])


def test_wrong_dtype_and_channels(tmp_path: Path, img: np.ndarray) -> None:
    p = _hand_store(tmp_path / "f.zarr", img.transpose(2, 0, 1).astype(np.float32), CYX, [1.0, 0.5, 0.5])
    _assert_slide_error(p, "float32")
    p2 = _hand_store(tmp_path / "c2.zarr", img.transpose(2, 0, 1)[:2], CYX, [1.0, 0.5, 0.5])
    _assert_slide_error(p2, "2 channel")
    p3 = _hand_store(tmp_path / "gray.zarr", img[..., 0], [_space("y"), _space("x")], [0.5, 0.5])
    _assert_slide_error(p3, "1 channel")
    axes = [{"name": "z", "type": "space"}, _space("y"), _space("x"), {"name": "c", "type": "channel"}]
    p4 = _hand_store(tmp_path / "z.zarr", np.stack([img, img]), axes, [1.0, 0.5, 0.5, 1.0])
    _assert_slide_error(p4, "axis 'z' has size 2")
