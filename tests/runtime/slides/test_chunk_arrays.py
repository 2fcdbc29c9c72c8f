"""Whole chunks as arrays (``Level.read_chunk_array``) and the chunk cache's copies into a caller's array.

The reader side copies patches from cached chunk arrays straight into the encoder's batch; every store
layout must give exactly the pixels of ``Level.read_chunk`` and ``cut_patch`` (a changed pixel would
silently change predictions), planar ``c, y, x`` chunks must stay planar (no interleaved copy is kept)
and every other layout must come as ``(h, w, 3)``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from hishrst_runtime.core.patches import cut_patch, patch_origin
from hishrst_runtime.slides.cache import ChunkCache
from hishrst_runtime.slides.convert import write_ome_zarr
from hishrst_runtime.slides.reader import open_slide


def _image(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _hand_store(path: Path, data: np.ndarray, axes: str, *, chunks: tuple[int, ...], **kw: Any) -> Path:
    """A one-level zarr v3 NGFF store with the given axis order and chunking."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("0", data=data, chunks=chunks, **kw)
    ax = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"}
          for a in axes]
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": ax, "datasets": [{"path": "0",
                         "coordinateTransformations": [{"type": "scale", "scale": [1.0 if a == "c" else 0.5
                                                                                   for a in axes]}]}]}]}
    return path


def _store(kind: str, tmp_path: Path, img: np.ndarray) -> tuple[Path, int, bool, bool]:
    """(slide, level index, planar chunks expected, direct reads expected) of each layout under test."""
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, np.uint8)], axis=2)
    if kind == "cyx":
        return write_ome_zarr(img, tmp_path / "a.zarr", mpp=0.5, chunk=64, n_levels=1), 0, True, True
    if kind == "yxc-v2":
        return write_ome_zarr(img, tmp_path / "b.zarr", mpp=0.5, chunk=64, n_levels=1, version="0.4",
                              axes="yxc"), 0, False, True
    if kind == "cyx-sharded":
        return _hand_store(tmp_path / "c.zarr", img.transpose(2, 0, 1), "cyx", chunks=(3, 32, 32),
                           shards=(3, 128, 128)), 0, True, False
    if kind == "cyx-rgba-c1":
        return _hand_store(tmp_path / "d.zarr", rgba.transpose(2, 0, 1), "cyx", chunks=(1, 64, 64)), 0, True, True
    if kind == "yxc-rgba":
        return _hand_store(tmp_path / "e.zarr", rgba, "yxc", chunks=(64, 64, 4)), 0, False, True
    if kind == "xyc":
        return _hand_store(tmp_path / "f.zarr", img.transpose(1, 0, 2), "xyc", chunks=(64, 64, 3)), 0, False, False
    p = tmp_path / "g.tif"  # a 40x JPEG TIFF: level 1 is decoded at reduced scale (a source giving Pillow images)
    tifffile.imwrite(p, img, tile=(128, 128), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                     description='{"mpp": 0.25}', metadata=None)
    return p, 1, False, False


KINDS = ["cyx", "yxc-v2", "cyx-sharded", "cyx-rgba-c1", "yxc-rgba", "xyc", "jpeg-tiff-scaled"]


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_arrays_are_the_chunk_images(tmp_path: Path, kind: str) -> None:
    img = _image(1100 if kind.startswith("jpeg") else 300, 1300 if kind.startswith("jpeg") else 420, seed=1)
    path, li, planar, direct = _store(kind, tmp_path, img)
    with open_slide(path) as s:
        lv = s.levels[li]
        assert (lv._direct is not None) == direct
        assert hasattr(lv.source, "read_image") == kind.startswith("jpeg")  # the Pillow-image source is covered
        (ch, cw), (h, w) = lv.chunks, lv.shape
        for cy in range(-(-h // ch)):
            for cx in range(-(-w // cw)):
                data, is_planar = lv.read_chunk_array(cy, cx)
                assert is_planar == planar and data.dtype == np.uint8
                hwc = data.transpose(1, 2, 0) if planar else data
                np.testing.assert_array_equal(hwc, np.asarray(lv.read_chunk(cy, cx)))
        with pytest.raises(IndexError):
            lv.read_chunk_array(-(-h // ch), 0)


@pytest.mark.parametrize("kind", KINDS)
def test_copy_box_is_cut_patch_with_evictions(tmp_path: Path, kind: str) -> None:
    img = _image(1100 if kind.startswith("jpeg") else 300, 1300 if kind.startswith("jpeg") else 420, seed=2)
    path, li, planar, _ = _store(kind, tmp_path, img)
    rng = np.random.default_rng(3)
    with open_slide(path) as s:
        lv = s.levels[li]
        h, w = lv.shape
        chunk_bytes = lv.chunks[0] * lv.chunks[1] * 3
        cache = ChunkCache(lv, max_bytes=3 * chunk_bytes)  # a few chunks: evictions happen
        centers = np.concatenate([rng.uniform([-40, -40], [w + 40, h + 40], size=(16, 2)),
                                  [[0, 0], [w, h], [64, 64], [63.5, 127.5], [-500, 10], [w - 0.1, h - 0.1]]])
        for side in (1, 37, 64, 150):
            for c in centers:
                x0, y0 = patch_origin(c, side)
                out = np.full((side, side, 3), 99, np.uint8)  # whatever was there before is overwritten
                assert cache.copy_box(out, x0, y0) is out
                np.testing.assert_array_equal(out, cut_patch(lv.image, c, side))
                np.testing.assert_array_equal(np.asarray(cache.patch(x0, y0, side)), out)
        assert cache.peak_bytes <= cache.max_bytes + chunk_bytes  # 3 bytes per pixel, planar or not
        assert all(p == planar for _, p in cache._data.values())


def test_copy_box_from_threads_decodes_each_chunk_once(tmp_path: Path) -> None:
    img = _image(seed=4)
    path, _, _, _ = _store("cyx", tmp_path, img)
    with open_slide(path) as s:
        lv = s.levels[0]
        cache = ChunkCache(lv, max_bytes=1 << 30)
        boxes = [(x, y) for x in range(-30, 420, 45) for y in range(-30, 300, 45)]

        def work(b: tuple[int, int]) -> np.ndarray:
            return cache.copy_box(np.empty((70, 70, 3), np.uint8), *b)

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(work, boxes))
        assert cache.misses == len(cache._data) == 5 * 7  # every chunk of the 300 x 420 level, once
        for (x0, y0), g in zip(boxes, got):
            np.testing.assert_array_equal(g, cut_patch(lv.image, (x0 + 35, y0 + 35), 70))
