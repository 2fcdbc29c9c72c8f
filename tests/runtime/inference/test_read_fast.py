"""The reader's fast paths (``read_tiles``): patches copied from cached chunk arrays straight into the batch, and
no resampling when the patch side already is the encoder's input size.

The tiles must equal, bit for bit, both training's ``cut_patches`` and the previous reader (Pillow chunk images
pasted into a unit box, each patch cropped, resized and pasted into one mosaic, converted once), on planar and
channel-last stores and a Pillow-image source, with evictions and several reader threads; the resize is skipped
exactly when it is the identity, and each chunk is decoded once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from hishrst_runtime.core.patches import cut_patches, patch_origins, resize_image, resize_patch
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.inference import stages
from hishrst_runtime.inference.stages import UnitPlan, read_tiles, work_units
from hishrst_runtime.slides.cache import ChunkCache
from hishrst_runtime.slides.convert import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide


def _slide(kind: str, tmp_path: Path) -> tuple[Path, int]:
    """(slide, level index): planar and channel-last OME-Zarr, and a JPEG TIFF's reduced-scale level."""
    rng = np.random.default_rng(0)
    if kind == "jpeg-tiff":
        img = rng.integers(0, 256, size=(1400, 1800, 3), dtype=np.uint8)
        p = tmp_path / "s.tif"
        tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb", compression="jpeg",
                         compressionargs={"level": 90}, description='{"mpp": 0.25}', metadata=None)
        return p, 1
    img = rng.integers(0, 256, size=(700, 900, 3), dtype=np.uint8)
    return write_ome_zarr(img, tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=1, axes=kind), 0  # type: ignore[arg-type]


def _plan(level: Any, points: np.ndarray, side: int, size: int, cache_bytes: int, layout: str = "NHWC") -> UnitPlan:
    groups = [np.arange(i, min(i + 5, len(points))) for i in range(0, len(points), 5)]
    prep = SimpleNamespace(points_px=points, groups=groups)
    return UnitPlan(prep=prep, bundle=None, level=level, cache=ChunkCache(level, max_bytes=cache_bytes),  # type: ignore[arg-type]
                    side=side, size=size, downsample=1.0, mpp0=0.5, pad_to=5, max_groups=4, batch_size=16,
                    timer=StageTimer(), layout=layout)


def _points(level: Any, side: int) -> np.ndarray:
    """A square grid of abutting patches over the level (as ``--grid square`` lays them) and points on and past
    its edges."""
    h, w = level.shape
    g = np.stack(np.meshgrid(np.arange(side / 2, w, side), np.arange(side / 2, h, side)), -1).reshape(-1, 2)
    edge = np.array([[0.0, 0.0], [w - 1.0, h - 1.0], [w / 2, -3.0], [w + 5.0, h / 2], [-side, 10.0], [3.5, 7.5]])
    return np.concatenate([g, edge])


def _previous_read_tiles(level: Any, centers: np.ndarray, side: int, size: int) -> np.ndarray:
    """The reader before the fast path: chunk images pasted into the unit's box, crop, resize, paste, one array."""
    (h, w), (ch, cw) = level.shape, level.chunks
    origins = patch_origins(centers, side)
    (rx0, ry0), (rx1, ry1) = origins.min(axis=0), origins.max(axis=0) + side
    region = Image.new("RGB", (int(rx1 - rx0), int(ry1 - ry0)), (255,) * 3)
    for cy in range(max(ry0, 0) // ch, (min(ry1, h) - 1) // ch + 1):
        for cx in range(max(rx0, 0) // cw, (min(rx1, w) - 1) // cw + 1):
            region.paste(level.read_chunk(cy, cx), (int(cx * cw - rx0), int(cy * ch - ry0)))
    mosaic = Image.new("RGB", (size, size * len(centers)))
    for i, (x0, y0) in enumerate((origins - (rx0, ry0)).tolist()):
        mosaic.paste(resize_image(region.crop((x0, y0, x0 + side, y0 + side)), size), (0, i * size))
    return np.array(mosaic).reshape(len(centers), size, size, 3)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("kind", ["cyx", "yxc", "jpeg-tiff"])
@pytest.mark.parametrize("side,size", [(48, 48), (48, 40), (37, 64)])
def test_tiles_equal_training_and_the_previous_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
                                                      side: int, size: int, layout: str) -> None:
    """... in either tile layout of the encoder (NCHW: the same pixels, channel planes first)."""
    path, li = _slide(kind, tmp_path)
    calls = []
    monkeypatch.setattr(stages, "resize_image", lambda im, s: calls.append(s) or resize_image(im, s))
    with open_slide(path) as s:
        level = s.levels[li]
        pts = _points(level, side)
        plan = _plan(level, pts, side, size, cache_bytes=4 * 64 * 64 * 3, layout=layout)  # a few chunks: evictions
        units = work_units(plan.prep.groups, 16)
        with ThreadPoolExecutor(3) as pool:  # reader threads share the cache
            got = np.concatenate(list(pool.map(lambda u: read_tiles(plan, u), units)))
        idx = np.concatenate([plan.prep.groups[g] for u in units for g in u])
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        if layout == "NCHW":
            assert got.shape == (len(pts), 3, size, size)
            got = got.transpose(0, 2, 3, 1)
        assert got.shape == (len(pts), size, size, 3)
        np.testing.assert_array_equal(got, cut_patches(level.image, pts[idx], side=side, out_size=size))
        if layout == "NHWC":  # (the previous reader made NHWC tiles only)
            np.testing.assert_array_equal(got, _previous_read_tiles(level, pts[idx], side, size))
    # The resize is skipped exactly when it is the identity, and nowhere else: once per tile otherwise.
    assert calls == ([] if side == size else [size] * len(pts))


def test_each_chunk_is_decoded_once_and_only_chunks_under_patches(tmp_path: Path) -> None:
    path, _ = _slide("cyx", tmp_path)
    with open_slide(path) as s:
        level = s.levels[0]
        pts = _points(level, 48)[::3]  # a sparse subset: the units' boxes hold chunks no patch touches
        plan = _plan(level, pts, 48, 48, cache_bytes=1 << 30)
        for u in work_units(plan.prep.groups, 16):
            read_tiles(plan, u)
        (h, w), o = level.shape, patch_origins(pts, 48)
        touched = {(cy, cx) for x0, y0 in o.tolist()
                   for cy in range(max(y0, 0) // 64, (min(y0 + 48, h) - 1) // 64 + 1)
                   for cx in range(max(x0, 0) // 64, (min(x0 + 48, w) - 1) // 64 + 1)}
        assert plan.cache.misses == len(touched) == len(plan.cache._data)
        assert all(planar for _, planar in plan.cache._data.values())  # planar chunks stay planar in the cache


@pytest.mark.parametrize("size", [1, 7, 224])
def test_same_size_resize_is_the_identity(size: int) -> None:
    """Why skipping the resize changes nothing: at the same size, training's resize and Pillow's own bilinear
    resize both return the patch's pixels unchanged."""
    a = np.random.default_rng(size).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    assert resize_image(im, size) is im
    np.testing.assert_array_equal(resize_patch(a, size), a)
    np.testing.assert_array_equal(np.asarray(im.resize((size, size), Image.BILINEAR)), a)
