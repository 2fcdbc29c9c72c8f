"""The streaming whole-slide pipeline: tiles → encoder → head over neighbour groups → output rows.

For one slide:

1. :func:`prepare_slide` opens the OME-Zarr store, picks the pyramid level nearest the bundle's
   training resolution, detects tissue on a low-resolution thumbnail and lays query points over
   tissue on a hexagonal or square grid at ``pitch_um`` (or takes explicit points). The points are
   grouped with :func:`hishrst_runtime.core.grouping.group_points` — the same function, on the same
   level-0 pixel coordinates, that training used. Grid points are then *renumbered in group order*
   (group ``k`` holds rows ``start_k .. start_k + n_k - 1``), so output rows arrive in increasing
   order and every X chunk of the output store fills up, is written once and leaves memory.
   Explicit points keep their order (row ``i`` is point ``i``).
2. :func:`predict_slide` cuts the groups into *work units* of at least ``batch_size`` points (a
   fixed function of the groups, so a resumed run forms exactly the units, encoder batches and head
   batches of an uninterrupted one). Reader threads cut each unit's patches from the chosen level
   through a bounded LRU cache of decoded whole chunks (:class:`ChunkCache`; a read is never bigger
   than one chunk, never the whole slide): the unit's bounding box is assembled once, each patch is
   cropped from it and resampled to the encoder's input size (Pillow, as in training); the patch
   side is ``round(patch_um / level_mpp)`` pixels, i.e. the trained physical size.
3. The calling thread runs the encoder in batches of ``batch_size`` tiles; one more thread runs the
   head over the unit's groups (padded to the bundle's ``max_group_size``) and hands the rows to
   ``write``, one unit at a time in unit order, while the encoder goes on with the next unit.

Peak memory is bounded independently of the slide's size: the chunk cache (``cache_bytes``), one
unit box per reader thread (at most ``MAX_UNIT_REGION_PX`` pixels), at most ``max(2, 2 * workers)``
units of tiles in flight, and the per-point arrays (points, groups, done mask). The next slide is
prepared in the background while the current one runs (:func:`hishrst_runtime.jobs.runner.run_slides`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from hishrst_runtime.core.geometry import query_grid
from hishrst_runtime.core.grouping import group_points, local_groups, safe_index
from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.patches import patch_origins, patch_side_px, resize_image
from hishrst_runtime.core.timing import StageTimer
from hishrst_runtime.slides.cache import DEFAULT_CACHE_BYTES, ChunkCache

__all__ = [
    "DEFAULT_PITCH_UM",
    "DEFAULT_CACHE_BYTES",
    "PreparedSlide",
    "prepare_slide",
    "work_units",
    "predict_slide",
]

#: 4× Visium density: a hexagonal grid at half of Visium's 100 µm pitch (µm).
DEFAULT_PITCH_UM = 50.0
#: Largest box (pixels; 4 bytes each) a reader assembles for one work unit; sparser units go patch by patch.
MAX_UNIT_REGION_PX = 1 << 24


@dataclass
class PreparedSlide:
    """Everything known about a slide before inference: level, points, groups, tissue, thumbnail.

    ``points_px``: ``[N, 2]`` float64 level-0 pixel (x, y); ``grid_index``: ``[N, 2]`` int64 (row, col)
    on the query grid (``-1`` for explicit points); ``tissue_fraction``: ``[N]`` float32 in [0, 1];
    ``groups``: int64 index arrays partitioning ``range(N)``; ``thumbnail`` / ``tissue_mask``: RGB uint8
    overview and its boolean tissue mask, ``thumbnail_scale`` overview pixels per level-0 pixel;
    ``pitch_um``: grid pitch in µm (``None`` for explicit points); ``seconds``: preparation wall time.
    """

    path: Path
    slide: Any
    level_index: int
    points_px: np.ndarray
    grid_index: np.ndarray
    tissue_fraction: np.ndarray
    groups: list[np.ndarray]
    thumbnail: np.ndarray
    thumbnail_scale: float
    tissue_mask: np.ndarray
    pitch_um: float | None
    grid: str | None = None
    min_tissue: float | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Release the slide's array handles."""
        close = getattr(self.slide, "close", None)
        if close is not None:
            close()


def _grid_points(shape0: tuple[int, int], mpp0: float, pitch_um: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Grid over the whole slide: (level-0 pixel (x, y) ``[N, 2]``, (row, col) ``[N, 2]`` int64)."""
    h, w = shape0
    half = pitch_um / 2.0
    pts_um = query_grid(half, half, w * mpp0 - half, h * mpp0 - half, pitch_um=pitch_um, kind=kind)  # type: ignore[arg-type]
    dy = pitch_um * (np.sqrt(3.0) / 2.0 if kind == "hex" else 1.0)
    rows = np.rint((pts_um[:, 1] - half) / dy).astype(np.int64)
    off = np.where((rows % 2 == 1) & (kind == "hex"), pitch_um / 2.0, 0.0)
    cols = np.rint((pts_um[:, 0] - half - off) / pitch_um).astype(np.int64)
    return pts_um / mpp0, np.stack([rows, cols], axis=1)


def prepare_slide(
    path: str | Path,
    bundle: Bundle,
    *,
    mpp: float | None = None,
    pitch_um: float = DEFAULT_PITCH_UM,
    grid: Literal["hex", "square"] = "hex",
    min_tissue: float = 0.25,
    points_px: np.ndarray | None = None,
    thumbnail_side: int = 1024,
) -> PreparedSlide:
    """Open a slide and lay out its query points and neighbour groups (no inference yet).

    ``mpp`` (µm per level-0 pixel) overrides or supplies the store's pixel size. Grid points lie
    ``pitch_um`` µm apart and are kept where the tissue fraction of their ``patch_um`` window is at
    least ``min_tissue``; they are numbered in group order. Explicit ``points_px`` (``[N, 2]``
    level-0 pixel (x, y)) are all kept, in their order. ``thumbnail_side`` is the overview's longer
    side in pixels. Raises :class:`hishrst_runtime.slides.reader.SlideError` for unusable stores.
    """
    from hishrst_runtime.slides.reader import open_slide
    from hishrst_runtime.slides.tissue import detect_tissue, tissue_fraction_at

    if not (np.isfinite(pitch_um) and pitch_um > 0):
        raise ValueError(f"pitch must be a positive number of µm, got {pitch_um!r}")
    if grid not in ("hex", "square"):
        raise ValueError(f"grid must be 'hex' or 'square', got {grid!r}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be a fraction in [0, 1], got {min_tissue!r}")
    t0 = time.perf_counter()
    slide = open_slide(path, mpp=mpp)
    try:
        level_index = slide.level_for_mpp(bundle.train_mpp)
        thumb = slide.thumbnail(max_side=thumbnail_side)
        thumb_mpp = slide.thumbnail_mpp(thumb.shape)
        mask = detect_tissue(thumb)
        radius = bundle.patch_um / 2.0
        pitch: float | None
        if points_px is None:
            pts, grid_index = _grid_points(slide.shape0, slide.mpp0, pitch_um, grid)
            frac = tissue_fraction_at(mask, thumb_mpp, pts * slide.mpp0, radius_um=radius)
            keep = frac >= min_tissue
            pts, grid_index, frac = pts[keep], grid_index[keep], frac[keep]
            groups = group_points(pts, max_size=bundle.max_group_size)
            if groups:  # renumber in group order: output rows then arrive in increasing order
                order = np.concatenate(groups)
                pts, grid_index, frac = pts[order], grid_index[order], frac[order]
                starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
                groups = [np.arange(s, s + len(g), dtype=np.int64) for s, g in zip(starts, groups)]
            pitch, kind, min_t = float(pitch_um), str(grid), float(min_tissue)
        else:
            pts = np.asarray(points_px, dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
                raise ValueError(f"{path}: explicit points must be a finite [N, 2] array of level-0 pixel (x, y), "
                                 f"got shape {pts.shape}")
            grid_index = np.full((len(pts), 2), -1, dtype=np.int64)
            frac = tissue_fraction_at(mask, thumb_mpp, pts * slide.mpp0, radius_um=radius)
            groups = group_points(pts, max_size=bundle.max_group_size)
            pitch, kind, min_t = None, None, None
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(
        path=Path(path), slide=slide, level_index=level_index, points_px=pts, grid_index=grid_index,
        tissue_fraction=frac.astype(np.float32), groups=groups, thumbnail=thumb,
        thumbnail_scale=thumb.shape[1] / slide.shape0[1], tissue_mask=mask, pitch_um=pitch, grid=kind,
        min_tissue=min_t, seconds=time.perf_counter() - t0,
    )


def work_units(groups: list[np.ndarray], batch_size: int) -> list[list[int]]:
    """Consecutive group indices whose point counts add up to at least ``batch_size`` (the last may be short).

    A fixed function of the groups: a resumed run forms exactly the units of an uninterrupted one.
    """
    units: list[list[int]] = []
    unit: list[int] = []
    n = 0
    for gi, g in enumerate(groups):
        unit.append(gi)
        n += len(g)
        if n >= batch_size:
            units.append(unit)
            unit, n = [], 0
    if unit:
        units.append(unit)
    return units


def predict_slide(
    prep: PreparedSlide,
    bundle: Bundle,
    *,
    encoder: Any,
    head: Any,
    write: Callable[[np.ndarray, np.ndarray], None],
    done: np.ndarray | None = None,
    batch_size: int = 64,
    head_batch: int | None = None,
    workers: int = 2,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
) -> dict[str, Any]:
    """Run encoder + head over every work unit of ``prep`` not yet ``done``; ``write(rows, values)`` per unit.

    ``rows`` are int64 point indices, ``values`` float32 ``[len(rows), genes]``; ``write`` and
    ``progress`` are called from one thread at a time, in unit order. ``batch_size`` is the
    encoder batch (tiles), ``head_batch`` the most groups per head call (default: the bundle's
    ``max_batch``), ``workers`` the reader threads (0: read in the calling thread), ``cache_bytes`` the
    chunk cache bound (bytes). ``progress(n)`` is called after each unit with its rows that were not
    ``done`` before.

    A unit whose rows are all ``done`` is skipped; any other unit is recomputed whole (rows already
    on disk are rewritten with identical values), so a resumed run computes exactly the batches an
    uninterrupted run does and writes exactly its values. Returns counters and stage timings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 tiles, got {batch_size!r}")
    timer = timer or StageTimer()
    level = prep.slide.levels[prep.level_index]
    ds = float(level.downsample)
    side = patch_side_px(bundle.patch_um, float(level.mpp))
    size = int(bundle.encoder["input_size"])
    mpp0 = float(prep.slide.mpp0)
    pad_to = max([bundle.max_group_size, *(len(g) for g in prep.groups)])
    max_groups = max(1, int(head_batch or bundle.manifest.get("max_batch", 64)))
    cache = ChunkCache(level, max_bytes=cache_bytes, timer=timer)
    all_units = work_units(prep.groups, batch_size)
    units = [u for u in all_units if done is None or not done[np.concatenate([prep.groups[g] for g in u])].all()]

    def load(unit: list[int]) -> tuple[list[int], np.ndarray]:
        idx = np.concatenate([prep.groups[g] for g in unit])
        centers = prep.points_px[idx] / ds
        t0 = time.perf_counter()
        origins = patch_origins(centers, side)
        mosaic = Image.new("RGB", (size, size * len(idx)))  # the unit's tiles stacked: one conversion
        (rx0, ry0), (rx1, ry1) = origins.min(axis=0), origins.max(axis=0) + side
        if (rx1 - rx0) * (ry1 - ry0) <= min(max(4 * len(idx) * side * side, 1 << 20), MAX_UNIT_REGION_PX):
            # A compact unit (neighbour groups): assemble its bounding box once, then crop each patch.
            region = cache.patch(int(rx0), int(ry0), int(rx1 - rx0), int(ry1 - ry0))
            for i, (x0, y0) in enumerate((origins - (rx0, ry0)).tolist()):
                mosaic.paste(resize_image(region.crop((x0, y0, x0 + side, y0 + side)), size), (0, i * size))
        else:  # scattered explicit points: patch by patch
            for i, (x0, y0) in enumerate(origins.tolist()):
                mosaic.paste(resize_image(cache.patch(x0, y0, side), size), (0, i * size))
        tiles = np.array(mosaic).reshape(len(idx), size, size, 3)
        timer.add("cut_resample", time.perf_counter() - t0)  # includes chunk reads (also in read_decode)
        return unit, tiles

    def encode(tiles: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        feats = np.concatenate([np.asarray(encoder.run({"tiles": tiles[i : i + batch_size]})[0], dtype=np.float32)
                                for i in range(0, len(tiles), batch_size)])
        timer.add("encoder", time.perf_counter() - t0)
        if feats.ndim != 2 or feats.shape[0] != len(tiles):
            raise RuntimeError(f"{bundle.root}: the encoder returned features of shape {feats.shape} for "
                               f"{len(tiles)} tiles; re-export the bundle")
        return feats

    failed = threading.Event()  # set by the first failing finish(): queued ones then do nothing

    def finish(unit: list[int], feats: np.ndarray) -> None:
        """Head over the unit's groups, write its rows, report progress (one thread at a time, in unit order)."""
        if failed.is_set():
            return
        try:
            _finish(unit, feats)
        except BaseException:
            failed.set()
            raise

    def _finish(unit: list[int], feats: np.ndarray) -> None:
        t0 = time.perf_counter()
        groups = [prep.groups[g] for g in unit]
        idx, local, mask = local_groups(groups, size=pad_to)
        safe = safe_index(local)
        pos_um = (prep.points_px[idx] * mpp0).astype(np.float32)
        outs = []
        for s in range(0, len(groups), max_groups):
            sl = slice(s, s + max_groups)
            outs.append(np.asarray(head.run({"features": feats[safe[sl]], "positions": pos_um[safe[sl]],
                                             "mask": mask[sl]})[0], dtype=np.float32))
        out = np.concatenate(outs)
        valid = local >= 0
        timer.add("head", time.perf_counter() - t0)
        t0 = time.perf_counter()
        write(idx[local[valid]], np.ascontiguousarray(out[valid]))
        timer.add("write", time.perf_counter() - t0)
        finished(unit)

    n_done = 0
    t_start = time.perf_counter()
    def finished(unit: list[int]) -> None:
        nonlocal n_done
        idx = np.concatenate([prep.groups[g] for g in unit])
        n_done += len(idx)
        if progress:  # rows new to the output (a resumed unit may rewrite rows already on disk)
            progress(len(idx) if done is None else int((~done[idx]).sum()))

    if workers <= 0:
        for u in units:
            unit, tiles = load(u)
            finish(unit, encode(tiles))
    else:
        # Reader threads cut tiles, this thread runs the encoder, one more thread runs head + write for
        # the previous unit, so the encoder never waits for the head or the output store.
        depth = max(2, 2 * workers)  # units of tiles in flight: bounds memory
        pending: deque[Future] = deque()
        finishing: deque[Future] = deque()
        it = iter(units)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hishrst-read") as pool, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="hishrst-head") as post:
            try:
                for u in it:
                    pending.append(pool.submit(load, u))
                    if len(pending) >= depth:
                        break
                while pending:
                    t0 = time.perf_counter()
                    unit, tiles = pending.popleft().result()
                    timer.add("wait_for_tiles", time.perf_counter() - t0)
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(load, nxt))
                    feats = encode(tiles)
                    while finishing and (len(finishing) >= 2 or finishing[0].done()):
                        finishing.popleft().result()  # raises a head / write error here, in order
                    finishing.append(post.submit(finish, unit, feats))
                while finishing:
                    finishing.popleft().result()
            finally:
                for f in (*pending, *finishing):  # on an error: drop queued work instead of finishing it
                    f.cancel()
    return {
        "points_computed": int(n_done),
        "units": len(all_units),
        "units_computed": len(units),
        "seconds": time.perf_counter() - t_start,
        "chunk_cache": {"hits": cache.hits, "misses": cache.misses, "peak_bytes": cache.peak_bytes},
        "level": prep.level_index,
        "level_mpp": float(level.mpp),
        "patch_side_px": side,
        "stages": dict(timer.seconds),
    }
