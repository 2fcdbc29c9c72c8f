"""Whole-chunk reads (Level.read_chunk, the direct zarr fast path) and the pipeline's chunk cache.

Every path must give exactly the pixels that zarr + ``cut_patch`` give: a faster read that changed a
single pixel would silently change the predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr

from hishrst_runtime.slides.convert import write_ome_zarr
from hishrst_runtime.core.patches import cut_patch, cut_patches, patch_origin, resize_image
from hishrst_runtime.slides.cache import ChunkCache
from hishrst_runtime.slides.reader import open_slide
from hishrst_runtime.slides.chunks import ChunkDecodeError, DirectChunkReader


def _image(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _hand_store(path: Path, data: np.ndarray, axes: str, *, fmt: int, chunks: tuple[int, ...],
                **array_kw: Any) -> Path:
    """A one-level NGFF store written with plain zarr, with the given axis order, chunking and codecs."""
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    root.create_array("0", data=data, chunks=chunks, **array_kw)
    ax = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", "unit": "micrometer"}
          for a in axes]
    ms = {"axes": ax, "datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [1.0 if a == "c" else 0.5 for a in axes]}]}]}
    if fmt == 3:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [ms]}
    else:
        root.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    return path


def _all_chunks_equal(level: Any, img: np.ndarray) -> None:
    ch, cw = level.chunks
    h, w = level.shape
    for cy in range(-(-h // ch)):
        for cx in range(-(-w // cw)):
            got = np.asarray(level.read_chunk(cy, cx))
            np.testing.assert_array_equal(got, img[cy * ch : (cy + 1) * ch, cx * cw : (cx + 1) * cw])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["cyx", "yxc"])
def test_read_chunk_matches_image_on_project_stores(tmp_path: Path, version: str, axes: str) -> None:
    img = _image()
    p = write_ome_zarr(img, tmp_path / "s.zarr", mpp=0.5, chunk=64, n_levels=2, version=version, axes=axes)  # type: ignore[arg-type]
    with open_slide(p) as s:
        assert s.levels[0]._direct is not None  # our converter's stores take the fast path
        _all_chunks_equal(s.levels[0], img)
        s.levels[0]._direct = None  # and the zarr path gives the same pixels
        _all_chunks_equal(s.levels[0], img)


@pytest.mark.parametrize(("fmt", "axes", "chunks", "kw"), [
    (3, "cyx", (1, 64, 48), {"compressors": None}),  # one channel per chunk, uncompressed
    (3, "yxc", (70, 50, 4), {}),  # RGBA, interleaved
    (2, "cyx", (4, 64, 64), {"compressors": {"id": "blosc", "cname": "lz4", "shuffle": 1}}),
    (2, "cyx", (4, 64, 64), {"compressors": {"id": "zlib", "level": 1}}),
    (3, "cyx", (4, 64, 64), {"compressors": {"name": "gzip", "configuration": {"level": 1}}}),
])
def test_direct_reader_layouts(tmp_path: Path, fmt: int, axes: str, chunks: tuple[int, ...], kw: dict) -> None:
    img = _image(seed=1)
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 9, np.uint8)], axis=-1)
    data = rgba.transpose(2, 0, 1) if axes == "cyx" else rgba
    p = _hand_store(tmp_path / "h.zarr", data, axes, fmt=fmt, chunks=chunks, **kw)
    with open_slide(p) as s:
        assert s.levels[0]._direct is not None
        _all_chunks_equal(s.levels[0], img)
        np.testing.assert_array_equal(s.levels[0].read_region(13, 7, 400, 290), img[7:290, 13:400])


def test_sharded_and_filtered_arrays_use_zarr(tmp_path: Path) -> None:
    img = _image(seed=2)
    p = _hand_store(tmp_path / "sh.zarr", img.transpose(2, 0, 1), "cyx", fmt=3, chunks=(3, 32, 32), shards=(3, 128, 128))
    with open_slide(p) as s:
        assert s.levels[0]._direct is None
        _all_chunks_equal(s.levels[0], img)
    p = _hand_store(tmp_path / "f.zarr", img.transpose(2, 0, 1), "cyx", fmt=2, chunks=(3, 64, 64),
                    filters=[numcodecs.Delta(dtype="u1")])
    with open_slide(p) as s:
        assert s.levels[0]._direct is None
        _all_chunks_equal(s.levels[0], img)


def test_missing_chunks_are_the_fill_value_and_corrupt_chunks_fail(tmp_path: Path) -> None:
    img = _image(seed=3)
    p = write_ome_zarr(img, tmp_path / "m.zarr", mpp=0.5, chunk=64, n_levels=1)
    # A chunk lost inside the image (its neighbours are not fill) reads as the fill value only when missing
    # chunks are allowed, and is counted (the rule: tests/runtime/slides/test_missing_data.py).
    with open_slide(p, allow_missing_chunks=True) as s:
        lv = s.levels[0]
        reader: DirectChunkReader = lv._direct
        chunk_file = reader.root / reader._encode_key((0, 1, 2))
        assert chunk_file.is_file()
        chunk_file.unlink()
        zarr_view = lv.read_region(128, 64, 192, 128)
        np.testing.assert_array_equal(np.asarray(lv.read_chunk(1, 2)), zarr_view)
        assert (zarr_view == reader.fill_value).all()
        assert len(s.filled_chunks) == 1 and str(chunk_file) in s.filled_chunks[0]
    with open_slide(p) as s:
        lv = s.levels[0]
        (reader.root / reader._encode_key((0, 2, 2))).write_bytes(b"not zstd at all")
        with pytest.raises(ChunkDecodeError, match="corrupt") as ei:
            lv.read_chunk(2, 2)
        assert "m.zarr" in str(ei.value)
        with pytest.raises(IndexError, match="outside"):
            lv.read_chunk(50, 0)


def test_chunk_cache_patches_are_cut_patch_pixels(tmp_path: Path) -> None:
    """Patches inside one chunk, across chunk corners, over the level's edges and fully outside."""
    img = _image(seed=4)
    p = write_ome_zarr(img, tmp_path / "c.zarr", mpp=0.5, chunk=64, n_levels=1)
    rng = np.random.default_rng(0)
    centers = np.concatenate([rng.uniform([-40, -40], [460, 340], size=(150, 2)),
                              [[0, 0], [420, 300], [64, 64], [63.5, 127.5], [-500, 10], [419.9, 299.9]]])
    with open_slide(p) as s:
        lv = s.levels[0]
        cache = ChunkCache(lv, max_bytes=3 * 64 * 64 * 4)  # a few chunks: evictions happen
        for side in (1, 37, 64, 150):
            for c in centers:
                x0, y0 = patch_origin(c, side)
                np.testing.assert_array_equal(np.asarray(cache.patch(x0, y0, side)), cut_patch(lv.image, c, side))
        ref = cut_patches(lv.image, centers, side=50, out_size=24)
        got = np.stack([np.asarray(resize_image(cache.patch(*patch_origin(c, 50), 50), 24)) for c in centers])
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(cache.read(-5, 10, 500, 250), img[10:250, 0:420])
        assert cache.read(500, 0, 600, 10).size == 0
        assert cache.peak_bytes <= cache.max_bytes + 64 * 64 * 4


def test_corrupt_gzip_chunk_is_a_clear_error(tmp_path: Path) -> None:
    img = _image(seed=5)
    p = _hand_store(tmp_path / "g.zarr", img.transpose(2, 0, 1), "cyx", fmt=3, chunks=(3, 64, 64),
                    compressors={"name": "gzip", "configuration": {"level": 1}})
    with open_slide(p) as s:
        reader = s.levels[0]._direct
        (reader.root / reader._encode_key((0, 0, 1))).write_bytes(b"\x1f\x8b\x08 truncated")
        with pytest.raises(ChunkDecodeError, match="corrupt"):
            s.levels[0].read_chunk(0, 1)


def test_unusual_axis_order_reads_through_zarr(tmp_path: Path) -> None:
    img = _image(seed=6)
    p = _hand_store(tmp_path / "xyc.zarr", img.transpose(1, 0, 2), "xyc", fmt=3, chunks=(64, 64, 3))
    with open_slide(p) as s:
        assert s.levels[0]._direct is None
        _all_chunks_equal(s.levels[0], img)
