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
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.geometry import query_grid
from hishrst_runtime.core.grouping import group_points
from hishrst_runtime.core.urls import redact_url
from hishrst_runtime.core.vocab import (DEFAULT_GRID, DEFAULT_MASK_MODE, DEFAULT_POINTS_OUTSIDE, GRID_KINDS, MASK_MODES,
                                        GridKind, MaskMode, PointsOutside)
from hishrst_runtime.inference.points import QueryPoints, check_points_inside, points_inside
from hishrst_runtime.slides.sources import file_url_path, is_url

__all__ = ["DEFAULT_PITCH_UM", "GridKind", "PreparedSlide", "SlideSurvey", "check_layout_options", "prepare_slide",
           "slide_location", "survey_slide", "BACKGROUND_FRACTION", "mask_info"]

#: 4× Visium density: a hexagonal grid at half of Visium's 100 µm pitch (µm).
DEFAULT_PITCH_UM = 50.0
#: With ``mask_mode="replace"``, a point whose patch holds less detected tissue than this is ``background``.
BACKGROUND_FRACTION = 0.5


def slide_location(path: str | Path) -> str | Path:
    """A slide argument as it is kept: a URL (:func:`hishrst_runtime.slides.sources.is_url`, or a ``file://``
    URL) stays a string (``Path("s3://b/x")`` would be ``s3:/b/x``), anything else becomes a :class:`~pathlib.Path`."""
    text = str(path)
    return text if isinstance(path, str) and (is_url(text) or file_url_path(text)) else Path(path)


def check_layout_options(*, pitch_um: float, grid: str, min_tissue: float) -> None:
    """Raise :class:`InputError` naming the option when the query-grid settings are unusable.

    ``pitch_um``: grid pitch (µm, finite, > 0); ``grid``: ``hex`` or ``square``; ``min_tissue``: a
    fraction in [0, 1]. The one validation of these options (``RunOptions`` calls it too).
    """
    if not (isinstance(pitch_um, (int, float)) and np.isfinite(pitch_um) and pitch_um > 0):
        raise InputError(f"--pitch-um must be a positive number of µm, got {pitch_um!r}; e.g. --pitch-um 50")
    if grid not in GRID_KINDS:
        raise InputError(f"--grid must be one of {', '.join(GRID_KINDS)}, got {grid!r}")
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
    stays a string, see :func:`slide_location`); ``background``: ``[N]`` bool, points whose patch is mostly
    detected background (only with a tissue mask and ``mask_mode="replace"``, else None);
    ``points_dropped``: explicit points left out because they lie outside the slide; ``mask_file``: the
    tissue-mask file used (None: detected tissue only). Set by ``run_slides`` for the run: ``ahead``, the
    :class:`~hishrst_runtime.inference.pipeline.ReadAhead` of its first units, and ``on_read_all()``, called once
    every unit's read is under way (the next slide then reads ahead).
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
    background: np.ndarray | None = None
    points_dropped: int = 0
    mask_file: Path | None = None
    ahead: Any = field(default=None, repr=False, compare=False)
    on_read_all: Any = field(default=None, repr=False, compare=False)

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
        """Release the slide's array handles (and drop any tiles read ahead)."""
        if self.ahead is not None:
            self.ahead.close()
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


def _explicit_points(points: Any, slide: Any, where: str | Path, policy: str) -> tuple[QueryPoints, int]:
    """(the points of a file or :class:`QueryPoints` that lie on the slide, how many were dropped)."""
    from hishrst_runtime.inference.points import read_points

    qp = points if isinstance(points, QueryPoints) else read_points(points)
    where = redact_url(str(where))
    if policy == "error":
        check_points_inside(qp, shape0=tuple(slide.shape0), slide=where)
        return qp, 0
    return points_inside(qp, shape0=tuple(slide.shape0), slide=where)


def prepare_slide(
    path: str | Path,
    bundle: Bundle,
    *,
    mpp: float | None = None,
    pitch_um: float = DEFAULT_PITCH_UM,
    grid: GridKind = DEFAULT_GRID,
    min_tissue: float = 0.25,
    points_px: np.ndarray | None = None,
    points: QueryPoints | str | Path | None = None,
    thumbnail_side: int = 1024,
    allow_missing_chunks: bool = False,
    tissue_mask: str | Path | None = None,
    mask_mode: MaskMode = DEFAULT_MASK_MODE,
    points_outside: PointsOutside = DEFAULT_POINTS_OUTSIDE,
) -> PreparedSlide:
    """Open a slide and lay out its query points and neighbour groups (no inference yet).

    ``mpp`` (µm per level-0 pixel) overrides or supplies the store's pixel size. Grid points lie
    ``pitch_um`` µm apart and are kept where the tissue fraction of their ``patch_um`` window is at
    least ``min_tissue``; they are numbered in group order. Explicit ``points_px`` (``[N, 2]``
    level-0 pixel (x, y)) are all kept, in their order. ``points``: a points file (read here by
    :func:`~hishrst_runtime.inference.points.read_points`) or points already read: explicit points with
    their names; those outside the slide are dropped with a warning (``points_outside="drop"``, the kept
    ones keep their names and order) or make an :class:`InputError` naming the first few (``"error"``).
    ``thumbnail_side``: the overview's longer side (px). ``allow_missing_chunks``: read chunk files missing
    under tissue as fill. ``tissue_mask``: a mask file (:func:`~hishrst_runtime.slides.masks.read_tissue_mask`)
    intersected with detected tissue (``mask_mode="intersect"``) or instead of it (``"replace"``: points over
    detected background marked in ``background``). Raises :class:`~hishrst_runtime.slides.reader.SlideError`.
    """
    from hishrst_runtime.slides.reader import open_slide

    check_layout_options(pitch_um=pitch_um, grid=grid, min_tissue=min_tissue)
    if points is not None and points_px is not None:
        raise TypeError("give either points= or points_px=, not both")
    t0 = time.perf_counter()
    where = slide_location(path)
    slide = open_slide(path, mpp=mpp, allow_missing_chunks=allow_missing_chunks)
    try:
        qp, dropped = (None, 0) if points is None else _explicit_points(points, slide, where, points_outside)
        points_px = points_px if qp is None else qp.xy_px
        sv = survey_slide(slide, bundle, thumbnail_side, allow_missing_chunks, tissue_mask, mask_mode)
        if points_px is None:
            lay = _grid_layout(slide, sv.fraction_at, max_group=bundle.max_group_size, pitch_um=pitch_um, grid=grid,
                               min_tissue=min_tissue)
        else:
            lay = _explicit_layout(where, points_px, sv.fraction_at, max_group=bundle.max_group_size)
        background = None if sv.background_at is None else sv.background_at(lay.points_px)
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(
        path=where, slide=slide, level_index=sv.level_index, points_px=lay.points_px, grid_index=lay.grid_index,
        tissue_fraction=lay.tissue_fraction.astype(np.float32), groups=lay.groups, thumbnail=sv.thumbnail,
        thumbnail_scale=sv.thumbnail.shape[1] / slide.shape0[1], tissue_mask=sv.mask, pitch_um=lay.pitch_um,
        grid=lay.grid, min_tissue=lay.min_tissue, seconds=time.perf_counter() - t0,
        obs_names=None if qp is None else qp.names, info=mask_info(tissue_mask, mask_mode, dropped),
        background=background,
        points_dropped=int(dropped), mask_file=None if tissue_mask is None else Path(tissue_mask),
    )


def mask_info(tissue_mask: str | Path | None, mask_mode: str, dropped: int) -> dict[str, Any]:
    """What besides the layout determines the rows (recorded in the output, compared on ``--resume``)."""
    info: dict[str, Any] = {}
    if tissue_mask is not None:
        info = {"tissue_mask_file": str(Path(tissue_mask).resolve()), "mask_mode": str(mask_mode)}
    if dropped:
        info["points_dropped"] = int(dropped)
    return info


@dataclass(frozen=True)
class SlideSurvey:
    """An open slide's level index, overview, tissue mask used, ``fraction_at(points_px) -> [N]`` and, with
    ``mask_mode="replace"``, ``background_at(points_px) -> [N] bool`` (else None)."""

    level_index: int
    thumbnail: np.ndarray
    mask: np.ndarray
    fraction_at: Any
    background_at: Any = None


def survey_slide(slide: Any, bundle: Bundle, thumbnail_side: int, allow_missing_chunks: bool,
                 mask_file: str | Path | None = None, mask_mode: str = DEFAULT_MASK_MODE) -> SlideSurvey:
    """The tissue of an open slide: detected on the thumbnail, or from ``mask_file`` (read at the thumbnail's
    resolution) intersected with it (``intersect``) or alone (``replace``)."""
    from hishrst_runtime.slides.tissue import detect_tissue, tissue_fraction_at

    if mask_mode not in MASK_MODES:
        raise InputError(f"--mask-mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    level_index = slide.level_for_mpp(bundle.train_mpp)
    thumb = slide.thumbnail(max_side=thumbnail_side)
    thumb_mpp = slide.thumbnail_mpp(thumb.shape)
    detected = mask = detect_tissue(thumb)
    if mask_file is not None:
        from hishrst_runtime.slides.masks import read_tissue_mask

        given = read_tissue_mask(mask_file, level0_shape_yx=tuple(slide.shape0), out_shape_yx=thumb.shape[:2])
        mask = given & detected if mask_mode == "intersect" else given
    _check_chunks(slide, level_index, mask, allow_missing_chunks)
    radius = bundle.patch_um / 2.0

    def fraction_at(pts: np.ndarray, of: np.ndarray = mask) -> np.ndarray:
        return tissue_fraction_at(of, thumb_mpp, pts * slide.mpp0, radius_um=radius)

    def background_at(pts: np.ndarray) -> np.ndarray:
        return np.asarray(fraction_at(pts, detected) < BACKGROUND_FRACTION, dtype=bool)

    replace = mask_file is not None and mask_mode == "replace"
    return SlideSurvey(level_index, thumb, mask, fraction_at, background_at if replace else None)


def _check_chunks(slide: Any, level_index: int, mask: np.ndarray, allow_missing: bool) -> None:
    """Missing chunk files where the overview shows tissue are an error naming the chunk (issue 10, BAD #4)."""
    from hishrst_runtime.slides.integrity import check_missing_chunks

    check_missing_chunks(slide, level_index, tissue=mask, allow_missing=allow_missing)
