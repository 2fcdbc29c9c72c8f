"""Chunk integrity: refuse a slide whose level has chunk files missing where there is tissue (torch-free).

zarr reads a missing chunk file as the array's fill value. That is how converters leave out empty
background (``write_empty_chunks=False``), but inside tissue it means a lost file: the pixels would be
predicted as white glass. :func:`check_missing_chunks` lists the chunk files of the level once and
compares the missing ones with the tissue mask of the slide's overview.
"""

from __future__ import annotations

import os
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.slides.errors import MissingChunkError
from hishrst_runtime.slides.slide import Slide

__all__ = ["check_missing_chunks", "missing_chunks"]


def _local_root(arr: Any) -> Path | None:
    """The directory of a zarr array in a local, unsharded store; None when listing is not possible."""
    try:
        from zarr.storage import LocalStore

        if not isinstance(arr.store, LocalStore) or getattr(arr, "shards", None) is not None:
            return None
        root = Path(arr.store.root)
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
    """Refuse missing chunk files of ``level`` where the overview shows tissue.

    ``tissue`` is the boolean tissue mask of ``slide.thumbnail()`` (same thumbnail geometry,
    ``slide.thumbnail_mpp(tissue.shape)``); it covers the whole slide. A chunk of ``level`` whose file
    is missing is "in tissue" when the mask shows tissue over it. When the overview was read from
    ``level`` itself (always so on a single-level slide) a missing chunk looks like fill there too, so it
    counts as in tissue when any of its 8 neighbouring chunks shows tissue. Raises
    :class:`~hishrst_runtime.slides.errors.MissingChunkError` naming the first such chunk file and the
    fix (restore the chunk, or pass ``--allow-missing-chunks`` to read it as the fill value), unless
    ``allow_missing``. Missing chunks in background are always allowed (converters leave empty chunks
    out). Returns the missing chunk coordinates (cy, cx) in tissue that were allowed (empty unless
    ``allow_missing``).

    Listing is one directory walk of the level's local store; for stores that cannot be listed
    (remote stores, sharded arrays) nothing is checked and ``[]`` is returned.
    """
    mask = np.asarray(tissue, dtype=bool)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"tissue must be a non-empty 2-D boolean mask, got shape {mask.shape}")
    found = missing_chunks(slide, level)
    if not found or not found[0]:
        return []
    missing, paths = found
    lv = slide.levels[level]
    same = slide.thumbnail_level(max(mask.shape)) == level
    bad = [c for c in missing if _in_tissue(mask, lv.shape, lv.chunks, *c, neighbours=same)]
    if bad and not allow_missing:
        cy, cx = bad[0]
        raise MissingChunkError(
            f"{paths[bad[0]]}: chunk ({cy}, {cx}) of pyramid level {level} of {slide.path} is missing where the "
            f"overview shows tissue ({len(bad)} such chunk(s) in all); restore the chunk file (or convert the slide "
            f"again), or pass --allow-missing-chunks to read missing chunks as the fill value")
    return bad
