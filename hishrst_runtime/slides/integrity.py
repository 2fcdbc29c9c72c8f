"""The one rule for chunks and tiles with no usable data, and its early check (torch-free).

**The rule** (every reader: local and remote OME-Zarr, SpatialData elements, TIFF / SVS):

* A chunk or tile *has no data* when its chunk file is absent (zarr), the server answers HTTP 404 (or
  S3 has no such key) for it, or its TIFF ``TileOffsets`` / ``TileByteCounts`` entry is 0. Any other
  HTTP error is an error, never fill.
* Such a chunk is **background**, and read as the fill value without a word, when the evidence shows
  uniform fill there: the same region of the next coarser *stored* level (a sparse store leaves out
  chunks that are all fill — zarr's ``write_empty_chunks=False`` — and its coarser levels are fill there
  too), or, on the coarsest stored level (the overview itself, e.g. a single-level store), the one-pixel
  ring of pixels around the chunk.
* Otherwise the data is **missing** (the overview shows something there that the chunk lost): reading
  it raises :class:`~hishrst_runtime.slides.errors.MissingChunkError` naming the chunk file or URL, the
  level and the chunk index, and the fix — unless missing chunks are allowed (``--allow-missing-chunks``,
  ``open_slide(..., allow_missing_chunks=True)``, ``Slide.allow_missing_chunks``): then it reads as the
  fill value and is listed once in ``Slide.filled_chunks``.
* A chunk or tile that does not decode (a failed checksum, a JPEG tile libjpeg would only warn about) is
  a :class:`~hishrst_runtime.slides.errors.ChunkDecodeError` naming it; with missing chunks allowed it is
  read as fill and counted the same way (for direct reads; box reads of remote stores always fail).

Not covered: missing inner chunks of sharded arrays (the shard index hides them), TIFF levels tifffile
reads through its own zarr view (NDPI, planar or non-RGB layouts), and OpenSlide formats (OpenSlide reads
areas without tiles as transparent, i.e. background).

:func:`check_missing_chunks` applies the rule early, before any work, to the chunks of the level to be
read that lie in the tissue of the slide's overview (one directory walk of a local store).
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.slides.chunks import local_store
from hishrst_runtime.slides.errors import MissingChunkError
from hishrst_runtime.slides.slide import Slide

__all__ = ["check_missing_chunks", "missing_chunks"]


def _local_root(arr: Any) -> Path | None:
    """The directory of a zarr array in a local, unsharded store; None when listing is not possible."""
    try:
        store = local_store(arr.store)
        if store is None or getattr(arr, "shards", None) is not None:
            return None
        root = Path(store.root)
        return root / arr.path if arr.path else root
    except (ImportError, AttributeError):
        return None


def _list_files(root: Path) -> set[str]:
    """Relative paths (``/``-separated) of every file below ``root`` — one directory walk."""
    out = set()
    for d, _, files in os.walk(root):
        rel = os.path.relpath(d, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out.update(prefix + f for f in files)
    return out


def missing_chunks(slide: Slide, level: int) -> tuple[list[tuple[int, int]], dict[tuple[int, int], str]] | None:
    """((cy, cx) chunks of ``level`` with a missing chunk file, their file paths), or None when the store
    cannot be listed (remote or sharded stores). A chunk split over several channel chunks is missing
    when any of its files is."""
    lv = slide.levels[level]
    arr = lv._array
    root = _local_root(arr) if arr is not None else None
    if root is None:
        return None
    axes = lv._axes
    grid = [-(-int(n) // int(c)) for n, c in zip(arr.shape, arr.chunks)]
    other = [range(g) if a == "c" else range(1) for a, g in zip(axes, grid)]
    encode = arr.metadata.encode_chunk_key
    present = _list_files(root)
    iy, ix = axes.index("y"), axes.index("x")
    missing: list[tuple[int, int]] = []
    paths: dict[tuple[int, int], str] = {}
    for cy, cx in product(range(grid[iy]), range(grid[ix])):
        for coords in product(*[range(cy, cy + 1) if i == iy else range(cx, cx + 1) if i == ix else r
                                for i, r in enumerate(other)]):
            key = encode(tuple(coords))
            if key not in present:
                missing.append((cy, cx))
                paths[(cy, cx)] = str(root / key)
                break
    return missing, paths


def _in_tissue(tissue: np.ndarray, shape: tuple[int, int], chunks: tuple[int, int], cy: int, cx: int,
               *, neighbours: bool) -> bool:
    """Whether the mask shows tissue over chunk (cy, cx) (and its 8 neighbours when ``neighbours``)."""
    (h, w), (ch, cw) = shape, chunks
    fy, fx = tissue.shape[0] / h, tissue.shape[1] / w
    r = 1 if neighbours else 0
    y0, y1 = max(cy - r, 0) * ch, min((cy + 1 + r) * ch, h)
    x0, x1 = max(cx - r, 0) * cw, min((cx + 1 + r) * cw, w)
    my0, my1 = int(np.floor(y0 * fy)), max(int(np.ceil(y1 * fy)), int(np.floor(y0 * fy)) + 1)
    mx0, mx1 = int(np.floor(x0 * fx)), max(int(np.ceil(x1 * fx)), int(np.floor(x0 * fx)) + 1)
    return bool(tissue[my0:my1, mx0:mx1].any())


def check_missing_chunks(slide: Slide, level: int, *, tissue: np.ndarray,
                         allow_missing: bool = False) -> list[tuple[int, int]]:
    """Apply the rule of this module now to the missing chunk files of ``level`` in tissue.

    ``tissue`` is the boolean tissue mask of ``slide.thumbnail()`` (same thumbnail geometry); a chunk is
    "in tissue" when the mask shows tissue over it or, when the overview was read from ``level`` itself,
    over one of its 8 neighbours. Such a chunk whose evidence is not uniform fill raises
    :class:`~hishrst_runtime.slides.errors.MissingChunkError` naming the first chunk file and the fix,
    unless ``allow_missing`` or the slide allows missing chunks. ``allow_missing`` also makes the slide
    allow them from now on (its later reads fill and count them). Returns the missing chunks (cy, cx) in
    tissue that were allowed (counted in ``slide.filled_chunks``; empty unless allowed).

    For stores that cannot be listed (remote stores, sharded arrays) nothing is checked here and ``[]``
    is returned; their chunks follow the rule when they are read.
    """
    mask = np.asarray(tissue, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue must be a non-empty 2-D boolean mask, got shape {mask.shape}")
    if allow_missing:
        slide.allow_missing_chunks = True
    found = missing_chunks(slide, level)
    if not found or not found[0]:
        return []
    missing, paths = found
    lv = slide.levels[level]
    same = slide.thumbnail_level(max(mask.shape)) == level
    near = [c for c in missing if _in_tissue(mask, lv.shape, lv.chunks, *c, neighbours=same)]
    return [c for c in near if lv._absent(c[0], c[1], paths[c])]
