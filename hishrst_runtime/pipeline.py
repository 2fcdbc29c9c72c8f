"""The streaming whole-slide pipeline: tiles → encoder → head over neighbour groups → output store.

For one slide:

1. open the OME-Zarr store and pick the pyramid level nearest the bundle's training resolution;
2. detect tissue on a low-resolution thumbnail and lay query points over tissue on a hexagonal or
   square grid at ``pitch_um`` (or take explicit points);
3. group the points with :func:`hishrst_runtime.grouping.group_points` — the same function, on the
   same level-0 pixel coordinates, that training used — and cut the groups into *work units* of at
   least ``batch_size`` points;
4. reader threads fetch each unit's chunk-aligned region (decoded chunks are shared through a small
   LRU cache), cut and resample the patches to exactly the bundle's physical patch size, and queue
   the uint8 tiles; a bounded queue keeps memory flat;
5. the main thread runs the encoder in batches of ``batch_size`` and the head over the unit's
   groups, and writes the rows to the output store as each unit finishes.

Peak memory is bounded by (workers + queue depth) work units and the chunk cache, independent of the
slide's size. The next slide is prepared (opened, tissue detected, points laid) in the background
while the current one runs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np

from hishrst_runtime.geometry import query_grid
from hishrst_runtime.grouping import group_points, pad_groups
from hishrst_runtime.manifest import Bundle
from hishrst_runtime.patches import cut_patch, patch_side_px, resize_patch

__all__ = ["PreparedSlide", "prepare_slide", "predict_slide", "ChunkCache", "NoopBackend", "StageTimer", "DEFAULT_PITCH_UM"]

#: 4× Visium density: a hexagonal grid at half of Visium's 100 µm pitch.
DEFAULT_PITCH_UM = 50.0


class StageTimer:
    """Thread-safe accumulated seconds per pipeline stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class ChunkCache:
    """LRU cache of decoded level chunks, so that neighbouring work units never decode a chunk twice."""

    def __init__(self, level: Any, *, max_bytes: int = 256 << 20, timer: StageTimer | None = None) -> None:
        self.level, self.max_bytes, self.timer = level, max_bytes, timer
        self._data: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _chunk(self, cy: int, cx: int) -> np.ndarray:
        with self._lock:
            arr = self._data.get((cy, cx))
            if arr is not None:
                self._data.move_to_end((cy, cx))
                self.hits += 1
                return arr
        ch, cw = self.level.chunks
        h, w = self.level.shape[:2]
        t0 = time.perf_counter()
        arr = self.level.read_region(cx * cw, cy * ch, min((cx + 1) * cw, w), min((cy + 1) * ch, h))
        if self.timer:
            self.timer.add("read_decode", time.perf_counter() - t0)
        with self._lock:
            self.misses += 1
            if (cy, cx) not in self._data:
                self._data[(cy, cx)] = arr
                self._bytes += arr.nbytes
            while self._bytes > self.max_bytes and len(self._data) > 1:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.nbytes
        return arr

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` of the level (clipped to it), assembled from whole chunks."""
        h, w = self.level.shape[:2]
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), dtype=np.uint8)
        if out.size == 0:
            return out
        ch, cw = self.level.chunks
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                c = self._chunk(cy, cx)
                oy, ox = cy * ch, cx * cw
                sy0, sx0 = max(y0, oy), max(x0, ox)
                sy1, sx1 = min(y1, oy + c.shape[0]), min(x1, ox + c.shape[1])
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = c[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
        return out


class _Region:
    """A region of a level with an origin, usable by ``cut_patch`` in level coordinates (clips; pads white)."""

    def __init__(self, data: np.ndarray, x0: int, y0: int, level_hw: tuple[int, int]) -> None:
        self.data, self.x0, self.y0 = data, x0, y0
        self.shape = (level_hw[0], level_hw[1], 3)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        return self.data[ys.start - self.y0 : ys.stop - self.y0, xs.start - self.x0 : xs.stop - self.x0]


class NoopBackend:
    """A stand-in engine that returns zeros instantly: measures the pipeline's ceiling in benchmarks."""

    def __init__(self, output_shape: Callable[[dict[str, np.ndarray]], tuple[int, ...]], name: str = "noop") -> None:
        self._shape, self.name, self.provider = output_shape, name, "noop"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.zeros(self._shape(feeds), dtype=np.float32)]

    def close(self) -> None:
        pass


@dataclass
class PreparedSlide:
    """Everything known about a slide before inference: level, points, groups, tissue, thumbnail."""

    path: Path
    slide: Any
    level_index: int
    points_px: np.ndarray  # [N, 2] level-0 pixels (x, y)
    grid_index: np.ndarray  # [N, 2] (row, col) on the query grid; -1 for explicit points
    tissue_fraction: np.ndarray  # [N]
    groups: list[np.ndarray]
    thumbnail: np.ndarray
    thumbnail_scale: float  # thumbnail pixels per level-0 pixel
    tissue_mask: np.ndarray
    pitch_um: float | None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _grid_points(shape0: tuple[int, int], mpp0: float, pitch_um: float, kind: str) -> tuple[np.ndarray, np.ndarray]:
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
    """Open a slide and lay out its query points and neighbour groups (no inference yet)."""
    from hishrst_runtime.slide import open_slide
    from hishrst_runtime.tissue import detect_tissue, tissue_fraction_at

    t0 = time.perf_counter()
    slide = open_slide(path, mpp=mpp)
    level_index = slide.level_for_mpp(bundle.train_mpp)
    thumb = slide.thumbnail(max_side=thumbnail_side)
    thumb_mpp = slide.thumbnail_mpp(thumb.shape)
    mask = detect_tissue(thumb)
    if points_px is None:
        pts, grid_index = _grid_points(slide.shape0, slide.mpp0, pitch_um, grid)
        frac = tissue_fraction_at(mask, thumb_mpp, pts * slide.mpp0, radius_um=bundle.patch_um / 2)
        keep = frac >= min_tissue
        pts, grid_index, frac = pts[keep], grid_index[keep], frac[keep]
    else:
        pts = np.asarray(points_px, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"points must be [N, 2] level-0 pixel (x, y), got shape {pts.shape}")
        grid_index = np.full((len(pts), 2), -1, dtype=np.int64)
        frac = tissue_fraction_at(mask, thumb_mpp, pts * slide.mpp0, radius_um=bundle.patch_um / 2)
        pitch_um = None  # type: ignore[assignment]
    groups = group_points(pts, max_size=bundle.max_group_size)
    return PreparedSlide(
        path=Path(path), slide=slide, level_index=level_index, points_px=pts, grid_index=grid_index,
        tissue_fraction=frac.astype(np.float32), groups=groups, thumbnail=thumb,
        thumbnail_scale=thumb.shape[1] / slide.shape0[1], tissue_mask=mask, pitch_um=pitch_um,
        seconds=time.perf_counter() - t0,
    )


def _units(groups: list[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Consecutive group indices whose point counts add up to at least ``batch_size``."""
    unit: list[int] = []
    n = 0
    for gi, g in enumerate(groups):
        unit.append(gi)
        n += len(g)
        if n >= batch_size:
            yield unit
            unit, n = [], 0
    if unit:
        yield unit


def predict_slide(
    prep: PreparedSlide,
    bundle: Bundle,
    *,
    encoder: Any,
    head: Any,
    write: Callable[[np.ndarray, np.ndarray], None],
    done: np.ndarray | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    timer: StageTimer | None = None,
) -> dict[str, Any]:
    """Run encoder + head over every group of ``prep`` not yet ``done``; ``write(rows, values)`` per unit.

    Returns counters (points, units, seconds, cache statistics). Groups are the unit of resumption:
    a group whose rows are all ``done`` is skipped; any other group is recomputed whole, so a
    resumed run produces exactly the rows an uninterrupted run would.
    """
    timer = timer or StageTimer()
    level = prep.slide.levels[prep.level_index]
    ds = float(level.downsample)
    side = patch_side_px(bundle.patch_um, float(level.mpp))
    size = int(bundle.encoder["input_size"])
    mpp0 = float(prep.slide.mpp0)
    cache = ChunkCache(level, timer=timer)
    todo = [g for g in range(len(prep.groups)) if done is None or not done[prep.groups[g]].all()]
    units = list(_units([prep.groups[g] for g in todo], batch_size))
    units = [[todo[i] for i in u] for u in units]

    def load(unit: list[int]) -> tuple[list[int], np.ndarray]:
        idx = np.concatenate([prep.groups[g] for g in unit])
        c = prep.points_px[idx] / ds
        half = side / 2.0 + 1
        x0, y0 = int(np.floor(c[:, 0].min() - half)), int(np.floor(c[:, 1].min() - half))
        x1, y1 = int(np.ceil(c[:, 0].max() + half)) + 1, int(np.ceil(c[:, 1].max() + half)) + 1
        region = _Region(cache.read(x0, y0, x1, y1), max(x0, 0), max(y0, 0), level.shape[:2])
        t0 = time.perf_counter()
        tiles = np.empty((len(idx), size, size, 3), dtype=np.uint8)
        for i, ci in enumerate(c):
            tiles[i] = resize_patch(cut_patch(region, ci, side), size)
        timer.add("cut_resample", time.perf_counter() - t0)
        return unit, tiles

    n_done = 0
    t_start = time.perf_counter()
    depth = max(2, 2 * workers)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="hishrst-read") as pool:
        pending: list[Future] = []
        it = iter(units)
        for u in it:
            pending.append(pool.submit(load, u))
            if len(pending) >= depth:
                break
        while pending:
            t0 = time.perf_counter()
            unit, tiles = pending.pop(0).result()
            timer.add("wait_for_tiles", time.perf_counter() - t0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            t0 = time.perf_counter()
            feats = np.concatenate([encoder.run({"tiles": tiles[i : i + batch_size]})[0] for i in range(0, len(tiles), batch_size)])
            timer.add("encoder", time.perf_counter() - t0)
            t0 = time.perf_counter()
            groups = [prep.groups[g] for g in unit]
            local, mask = pad_groups([np.arange(len(g)) + sum(len(x) for x in groups[:k]) for k, g in enumerate(groups)])
            safe = np.where(local < 0, 0, local)
            idx = np.concatenate(groups)
            pos_um = (prep.points_px[idx] * mpp0).astype(np.float32)
            out = head.run({"features": feats[safe].astype(np.float32), "positions": pos_um[safe], "mask": mask})[0]
            timer.add("head", time.perf_counter() - t0)
            t0 = time.perf_counter()
            write(idx, np.ascontiguousarray(out[local >= 0], dtype=np.float32))
            timer.add("write", time.perf_counter() - t0)
            n_done += len(idx)
            if progress:
                progress(len(idx))
    return {
        "points_computed": int(n_done),
        "units": len(units),
        "seconds": time.perf_counter() - t_start,
        "chunk_cache": {"hits": cache.hits, "misses": cache.misses},
        "level": prep.level_index,
        "level_mpp": float(level.mpp),
        "patch_side_px": side,
        "stages": dict(timer.seconds),
    }
