"""Preparing a slide for inference: open it, choose the level, find tissue, lay out and group points.

:func:`prepare_slide` opens the OME-Zarr store, picks the pyramid level nearest the bundle's training
resolution, detects tissue on a low-resolution thumbnail and lays query points over tissue on a
hexagonal or square grid at ``pitch_um`` (or takes explicit points, e.g. read from a file by
:func:`hishrst_runtime.inference.points.read_points`). The points are grouped with
:func:`hishrst_runtime.core.grouping.group_points` — the same function, on the same level-0 pixel
coordinates, that training used. Grid points are then *renumbered in group order* (group ``k``
holds rows ``start_k .. start_k + n_k - 1``), so output rows arrive in increasing order and every X
chunk of the output store fills up, is written once and leaves memory. Explicit points keep their
order (row ``i`` is point ``i``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.geometry import query_grid
from hishrst_runtime.core.grouping import group_points
from hishrst_runtime.core.urls import redact_url
from hishrst_runtime.inference.points import QueryPoints, check_points_inside

__all__ = ["DEFAULT_PITCH_UM", "GridKind", "PreparedSlide", "check_layout_options", "prepare_slide", "slide_location"]

#: 4× Visium density: a hexagonal grid at half of Visium's 100 µm pitch (µm).
DEFAULT_PITCH_UM = 50.0
GridKind = Literal["hex", "square"]


def slide_location(path: str | Path) -> str | Path:
    """A slide argument as it is kept: a URL stays a string (``Path("s3://b/x")`` would be ``s3:/b/x``),
    anything else becomes a :class:`~pathlib.Path`."""
    text = str(path)
    return text if isinstance(path, str) and "://" in text else Path(path)


def check_layout_options(*, pitch_um: float, grid: str, min_tissue: float) -> None:
    """Raise :class:`InputError` naming the option when the query-grid settings are unusable.

    ``pitch_um``: grid pitch (µm, finite, > 0); ``grid``: ``hex`` or ``square``; ``min_tissue``: a
    fraction in [0, 1]. The one validation of these options (``RunOptions`` calls it too).
    """
    if not (isinstance(pitch_um, (int, float)) and np.isfinite(pitch_um) and pitch_um > 0):
        raise InputError(f"--pitch-um must be a positive number of µm, got {pitch_um!r}; e.g. --pitch-um 50")
    if grid not in ("hex", "square"):
        raise InputError(f"--grid must be 'hex' or 'square', got {grid!r}")
    if not (isinstance(min_tissue, (int, float)) and 0.0 <= min_tissue <= 1.0):
        raise InputError(f"--min-tissue must be a fraction in [0, 1], got {min_tissue!r}; e.g. --min-tissue 0.25")


@dataclass
class PreparedSlide:
    """Everything known about a slide before inference: level, points, groups, tissue, thumbnail.

    ``points_px``: ``[N, 2]`` float64 level-0 pixel (x, y); ``grid_index``: ``[N, 2]`` int64 (row, col)
    on the query grid (``-1`` for explicit points); ``tissue_fraction``: ``[N]`` float32 in [0, 1];
    ``groups``: int64 index arrays partitioning ``range(N)``; ``thumbnail`` / ``tissue_mask``: RGB uint8
    overview and its boolean tissue mask, ``thumbnail_scale`` overview pixels per level-0 pixel;
    ``pitch_um``: grid pitch in µm (``None`` for explicit points); ``seconds``: preparation wall time;
    ``obs_names``: the explicit points' names (``None``: rows are numbered); ``path``: the slide (a URL
    stays a string, see :func:`slide_location`).
    """

    path: Path | str
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
    obs_names: list[str] | None = None

    @property
    def name(self) -> str:
        """The slide's file name (a URL's last path segment, without credentials or query), for progress
        bars and messages."""
        return redact_url(str(self.path)).rstrip("/").rsplit("/", 1)[-1]

    @property
    def location(self) -> str:
        """The slide as an absolute path (or its URL without credentials or query), for the output's metadata."""
        return redact_url(self.path) if isinstance(self.path, str) else str(self.path.resolve())

    def close(self) -> None:
        """Release the slide's array handles."""
        close = getattr(self.slide, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class _Layout:
    """Points over one slide: level-0 pixel (x, y), grid (row, col), tissue fraction, groups, settings."""

    points_px: np.ndarray
    grid_index: np.ndarray
    tissue_fraction: np.ndarray
    groups: list[np.ndarray]
    pitch_um: float | None
    grid: str | None
    min_tissue: float | None


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


def _grid_layout(slide: Any, fraction_at: Any, *, max_group: int, pitch_um: float, grid: str,
                 min_tissue: float) -> _Layout:
    """Grid points kept over tissue, grouped and renumbered in group order (rows then arrive in order)."""
    pts, grid_index = _grid_points(slide.shape0, slide.mpp0, pitch_um, grid)
    frac = fraction_at(pts)
    keep = frac >= min_tissue
    pts, grid_index, frac = pts[keep], grid_index[keep], frac[keep]
    groups = group_points(pts, max_size=max_group)
    if groups:
        order = np.concatenate(groups)
        pts, grid_index, frac = pts[order], grid_index[order], frac[order]
        starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
        groups = [np.arange(s, s + len(g), dtype=np.int64) for s, g in zip(starts, groups)]
    return _Layout(pts, grid_index, frac, groups, float(pitch_um), str(grid), float(min_tissue))


def _explicit_layout(path: Path | str, points_px: np.ndarray, fraction_at: Any, *, max_group: int) -> _Layout:
    """Caller's points, all kept in their order (row ``i`` is point ``i``)."""
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise InputError(f"{path}: explicit points must be a finite [N, 2] array of level-0 pixel (x, y), "
                         f"got shape {pts.shape}")
    grid_index = np.full((len(pts), 2), -1, dtype=np.int64)
    return _Layout(pts, grid_index, fraction_at(pts), group_points(pts, max_size=max_group), None, None, None)


def prepare_slide(
    path: str | Path,
    bundle: Bundle,
    *,
    mpp: float | None = None,
    pitch_um: float = DEFAULT_PITCH_UM,
    grid: GridKind = "hex",
    min_tissue: float = 0.25,
    points_px: np.ndarray | None = None,
    points: QueryPoints | None = None,
    thumbnail_side: int = 1024,
    allow_missing_chunks: bool = False,
    tissue_mask: str | Path | None = None,
) -> PreparedSlide:
    """Open a slide and lay out its query points and neighbour groups (no inference yet).

    ``mpp`` (µm per level-0 pixel) overrides or supplies the store's pixel size. Grid points lie
    ``pitch_um`` µm apart and are kept where the tissue fraction of their ``patch_um`` window is at
    least ``min_tissue``; they are numbered in group order. Explicit ``points_px`` (``[N, 2]``
    level-0 pixel (x, y)) are all kept, in their order. ``points`` (read from a file by
    :func:`~hishrst_runtime.inference.points.read_points`) are explicit points too, with their names;
    any of them outside the slide is an :class:`InputError` naming the first few. ``thumbnail_side`` is
    the overview's longer side in pixels. ``allow_missing_chunks`` accepts chunk files missing where the
    overview shows tissue (read as fill). ``tissue_mask``: a mask file (GeoJSON in level-0 pixels, or
    a raster stretched over the slide; :func:`~hishrst_runtime.slides.masks.read_tissue_mask`) used
    instead of the tissue detected on the overview, for the query grid and every tissue fraction.
    Raises :class:`hishrst_runtime.slides.reader.SlideError` for unusable stores.
    """
    from hishrst_runtime.slides.reader import open_slide

    check_layout_options(pitch_um=pitch_um, grid=grid, min_tissue=min_tissue)
    if points is not None and points_px is not None:
        raise TypeError("give either points= or points_px=, not both")
    t0 = time.perf_counter()
    where = slide_location(path)
    slide = open_slide(path, mpp=mpp, allow_missing_chunks=allow_missing_chunks)
    try:
        if points is not None:
            check_points_inside(points, shape0=tuple(slide.shape0), slide=redact_url(str(where)))
            points_px = points.xy_px
        level_index, thumb, mask, fraction_at = _survey(slide, bundle, thumbnail_side, allow_missing_chunks,
                                                        tissue_mask)
        if points_px is None:
            lay = _grid_layout(slide, fraction_at, max_group=bundle.max_group_size, pitch_um=pitch_um, grid=grid,
                               min_tissue=min_tissue)
        else:
            lay = _explicit_layout(where, points_px, fraction_at, max_group=bundle.max_group_size)
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(
        path=where, slide=slide, level_index=level_index, points_px=lay.points_px, grid_index=lay.grid_index,
        tissue_fraction=lay.tissue_fraction.astype(np.float32), groups=lay.groups, thumbnail=thumb,
        thumbnail_scale=thumb.shape[1] / slide.shape0[1], tissue_mask=mask, pitch_um=lay.pitch_um, grid=lay.grid,
        min_tissue=lay.min_tissue, seconds=time.perf_counter() - t0,
        obs_names=None if points is None else points.names,
        info={} if tissue_mask is None else {"tissue_mask_file": str(Path(tissue_mask).resolve())},
    )


def _survey(slide: Any, bundle: Bundle, thumbnail_side: int, allow_missing_chunks: bool,
            mask_file: str | Path | None = None) -> tuple[int, np.ndarray, np.ndarray, Any]:
    """(level index, thumbnail, tissue mask, ``fraction_at(points_px) -> [N]``) of an open slide; the mask
    is read from ``mask_file`` at the thumbnail's resolution when given, else detected on the thumbnail."""
    from hishrst_runtime.slides.tissue import detect_tissue, tissue_fraction_at

    level_index = slide.level_for_mpp(bundle.train_mpp)
    thumb = slide.thumbnail(max_side=thumbnail_side)
    thumb_mpp = slide.thumbnail_mpp(thumb.shape)
    if mask_file is None:
        mask = detect_tissue(thumb)
    else:
        from hishrst_runtime.slides.masks import read_tissue_mask

        mask = read_tissue_mask(mask_file, level0_shape_yx=tuple(slide.shape0), out_shape_yx=thumb.shape[:2])
    _check_chunks(slide, level_index, mask, allow_missing_chunks)
    radius = bundle.patch_um / 2.0

    def fraction_at(pts: np.ndarray) -> np.ndarray:
        return tissue_fraction_at(mask, thumb_mpp, pts * slide.mpp0, radius_um=radius)

    return level_index, thumb, mask, fraction_at


def _check_chunks(slide: Any, level_index: int, mask: np.ndarray, allow_missing: bool) -> None:
    """Missing chunk files where the overview shows tissue are an error naming the chunk (issue 10, BAD #4)."""
    from hishrst_runtime.slides.integrity import check_missing_chunks

    check_missing_chunks(slide, level_index, tissue=mask, allow_missing=allow_missing)
