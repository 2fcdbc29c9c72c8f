"""Spot geometry shared by training and the runtime (torch-free).

Units are explicit in every name: ``*_um`` is micrometres, ``*_px`` is pixels of a given image
(level 0 unless stated), ``array_*`` are Visium integer array indices.

Visium lattice: spots sit on a hexagonal lattice with a 100 µm centre-to-centre pitch. Space Ranger
indexes them by ``array_row`` (0..77) and ``array_col`` (0..127), where a row only holds columns of
the same parity (``array_row % 2 == array_col % 2``). Neighbouring columns are half a pitch apart
horizontally and neighbouring rows ``pitch * sqrt(3) / 2`` apart vertically.
"""

from __future__ import annotations

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.vocab import DEFAULT_GRID, GRID_KINDS, GridKind

__all__ = [
    "MAX_GRID_POINTS",
    "VISIUM_PITCH_UM",
    "VISIUM_SPOT_DIAMETER_UM",
    "visium_array_to_um",
    "visium_lattice",
    "fit_affine",
    "apply_affine",
    "dense_array_grid",
    "query_grid",
    "mpp_from_spot_diameter",
]

VISIUM_PITCH_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0
_ROW_STEP = np.sqrt(3.0) / 2.0  # vertical distance between rows, in pitches
#: Default bound on the points of one :func:`query_grid` (50 million; 16 bytes each as float64 pairs).
MAX_GRID_POINTS = 50_000_000


def mpp_from_spot_diameter(spot_diameter_fullres: float, *, spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM) -> float:
    """Micrometres per full-resolution pixel from Space Ranger's ``spot_diameter_fullres`` (pixels)."""
    if not np.isfinite(spot_diameter_fullres) or spot_diameter_fullres <= 0:
        raise ValueError(f"spot_diameter_fullres must be a positive number of pixels, got {spot_diameter_fullres!r}")
    return float(spot_diameter_um) / float(spot_diameter_fullres)


def visium_array_to_um(array_row, array_col, *, pitch_um: float = VISIUM_PITCH_UM) -> np.ndarray:
    """Ideal lattice position (x, y) in µm of Visium array indices; returns ``[N, 2]`` float64.

    Works for fractional indices too (used by the generation task's denser grids).
    """
    r = np.asarray(array_row, dtype=np.float64)
    c = np.asarray(array_col, dtype=np.float64)
    return np.stack([c * pitch_um / 2.0, r * pitch_um * _ROW_STEP], axis=-1)


def visium_lattice(n_rows: int = 78, n_cols: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """All (array_row, array_col) of a Visium-style lattice with ``n_rows`` × ``n_cols // 2`` spots."""
    rows, cols = [], []
    for r in range(n_rows):
        cs = np.arange(r % 2, n_cols, 2)
        rows.append(np.full(cs.shape, r))
        cols.append(cs)
    return np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64)


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares affine ``A`` (2×3) with ``dst ≈ A @ [src, 1]``; needs ≥ 3 non-collinear points."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape:
        raise ValueError(f"fit_affine needs two [N, 2] arrays of equal shape, got {src.shape} and {dst.shape}")
    design = np.concatenate([src, np.ones((len(src), 1))], axis=1)
    if len(src) < 3 or np.linalg.matrix_rank(design) < 3:
        raise ValueError("fit_affine needs at least 3 spots that are not all on one line")
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return coef.T.copy()


def apply_affine(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2×3 affine to ``[N, 2]`` points."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ affine[:, :2].T + affine[:, 2]


def dense_array_grid(array_row, array_col, *, factor: float = 4.0) -> np.ndarray:
    """Fractional (array_row, array_col) of a grid ``factor`` times denser than the measured spots.

    The measured hexagonal lattice is scaled by ``1 / sqrt(factor)`` in both directions and kept where a
    point lies within half a pitch of a measured spot (so the grid covers the measured tissue only). For
    ``factor=4`` this is exactly the measured spots plus the midpoints between neighbours. Returns
    ``[M, 2]`` float64 ``(row, col)`` pairs, sorted row-major.
    """
    if not np.isfinite(factor) or factor < 1:
        raise ValueError(f"densify factor must be a number ≥ 1, got {factor!r}")
    r = np.asarray(array_row, dtype=np.float64)
    c = np.asarray(array_col, dtype=np.float64)
    s = 1.0 / np.sqrt(factor)
    r0 = np.floor(r.min())
    base = np.floor(c.min())
    if (base - r0) % 2:  # Visium parity: a row only holds columns of its own parity
        base -= 1
    rows = np.arange(r0, np.ceil(r.max()) + 1e-9, s)
    pts = []
    for i, row in enumerate(rows):
        cols = np.arange(base + (i % 2) * s, np.ceil(c.max()) + 1e-9, 2 * s)
        pts.append(np.stack([np.full(cols.shape, row), cols], axis=1))
    cand = np.concatenate(pts) if pts else np.zeros((0, 2))
    # Keep candidates near measured spots (in µm, so that the hex anisotropy is handled).
    measured_um = visium_array_to_um(r, c)
    cand_um = visium_array_to_um(cand[:, 0], cand[:, 1])
    keep = _min_dist(cand_um, measured_um) <= VISIUM_PITCH_UM * 0.5 + 1e-6
    return cand[keep]


def _min_dist(a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Distance from each point of ``a`` to its nearest point of ``b`` (brute force, chunked)."""
    out = np.empty(len(a))
    for i in range(0, len(a), chunk):
        d = ((a[i : i + chunk, None, :] - b[None, :, :]) ** 2).sum(-1)
        out[i : i + chunk] = np.sqrt(d.min(axis=1))
    return out


def _check_grid_size(width_um: float, height_um: float, pitch_um: float, dy: float, max_points: int) -> None:
    """Raise :class:`InputError` when a grid over ``width_um × height_um`` would exceed ``max_points``."""
    if not (np.isfinite(width_um) and np.isfinite(height_um)):
        raise InputError(f"query grid box {width_um!r} × {height_um!r} µm is not finite; check the slide's pixel size")
    n = (max(height_um, 0.0) / dy + 1.0) * (max(width_um, 0.0) / pitch_um + 1.0)
    if n > max_points:
        raise InputError(f"a query grid of pitch {pitch_um:g} µm over {width_um:.4g} × {height_um:.4g} µm would have "
                         f"about {n:.3g} points, more than the limit of {max_points:,}; check the slide's pixel size "
                         "(--mpp), use a larger --pitch, or pass explicit points")


def query_grid(
    x0_um: float,
    y0_um: float,
    x1_um: float,
    y1_um: float,
    *,
    pitch_um: float,
    kind: GridKind = DEFAULT_GRID,
    max_points: int = MAX_GRID_POINTS,
) -> np.ndarray:
    """Points (x, y) in µm covering the box ``[x0, x1] × [y0, y1]`` at ``pitch_um`` spacing.

    ``hex`` rows are ``pitch * sqrt(3) / 2`` apart with every other row offset by half a pitch (Visium's
    layout); ``square`` is a plain grid. Row-major order; returns ``[N, 2]`` float64. The number of
    points is checked before anything is allocated: more than ``max_points`` raises
    :class:`~hishrst_runtime.core.errors.InputError` (usually a wrong pixel size or pitch).
    """
    if not np.isfinite(pitch_um) or pitch_um <= 0:
        raise ValueError(f"pitch must be a positive number of µm, got {pitch_um!r}")
    if kind not in GRID_KINDS:
        raise ValueError(f"grid kind must be one of {', '.join(GRID_KINDS)}, got {kind!r}")
    dy = pitch_um * (_ROW_STEP if kind == "hex" else 1.0)
    _check_grid_size(x1_um - x0_um, y1_um - y0_um, pitch_um, dy, max_points)
    ys = np.arange(y0_um, y1_um + 1e-9, dy)
    out = []
    for i, y in enumerate(ys):
        off = pitch_um / 2.0 if (kind == "hex" and i % 2) else 0.0
        xs = np.arange(x0_um + off, x1_um + 1e-9, pitch_um)
        out.append(np.stack([xs, np.full(xs.shape, y)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2))
