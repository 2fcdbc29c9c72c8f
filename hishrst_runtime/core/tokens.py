"""Token geometry of sub-spot models (torch-free, shared by training, export, scoring and the runtime).

A ViT encoder cuts its ``input_size``-px input into a ``grid`` of square patch tokens. When the tile it
sees is cut from the slide so that one token spans ``pitch_um`` µm (8 µm: Visium HD's smallest bin), each
token is an 8 µm bin of tissue with its own feature vector. Units in names: ``*_um`` micrometres, ``*_px``
level-0 pixels of the slide, ``row``/``col`` integer indices (token within a tile, or bin of a lattice).

Conventions (every caller uses these functions, so training, export and the runtime cannot disagree):

* A tile is a ``tile_um``-µm square (``grid × pitch_um``) cut around a centre with
  :func:`hishrst_runtime.core.patches.patch_origins` — ``round(tile_um / mpp)`` slide pixels starting at a
  whole pixel — and resized to ``input_size`` px. Token ``(r, c)`` covers the ``r``-th row and ``c``-th
  column of equal parts of that pixel square; its centre is :func:`token_centres_px`.
* Aggregation is in count space: a spot's (or a 16 µm bin's) log-normalised expression is
  ``log1p(Σ w_t · expm1(ŷ_t))`` over its tokens ``t`` with overlap weights ``w_t`` summing to 1
  (:func:`aggregate_log1p`). Counts add up over area — a spot's UMIs are the sum of the UMIs of the tissue
  under it — so the mean of normalised counts, not of their logarithms, is what a larger bin measures.
* At run time tiles overlap: only the central ``grid - 2·margin`` tokens of each tile are kept (edge
  tokens see a truncated context), and kept tokens of neighbouring tiles tile the plane without gaps or
  overlaps, on a bin lattice of ``pitch_um`` (:func:`tile_lattice`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.patches import patch_origins, patch_side_px

__all__ = [
    "DEFAULT_TOKEN_PITCH_UM",
    "DEFAULT_MARGIN_TOKENS",
    "TokenGeometry",
    "TileLattice",
    "token_offsets_um",
    "token_centres_px",
    "disk_token_weights",
    "square_token_weights",
    "aggregate_log1p",
    "pool_bins_log1p",
    "tile_lattice",
    "lattice_shape",
]

#: Token pitch of sub-spot models unless a run says otherwise: 8 µm, Visium HD's smallest bin.
DEFAULT_TOKEN_PITCH_UM = 8.0
#: Tokens dropped at each side of a run-time tile (the overlap margin: 2 tokens = 16 µm at 8 µm pitch).
DEFAULT_MARGIN_TOKENS = 2


@dataclass(frozen=True)
class TokenGeometry:
    """Tokens of one encoder tile: ``grid`` (rows, cols) tokens of ``pitch_um`` µm from an ``input_size``-px
    input, and the run-time overlap ``margin`` (tokens dropped at each side)."""

    grid: tuple[int, int]
    input_size: int
    pitch_um: float = DEFAULT_TOKEN_PITCH_UM
    margin: int = DEFAULT_MARGIN_TOKENS

    def __post_init__(self) -> None:
        rows, cols = (int(v) for v in self.grid)
        object.__setattr__(self, "grid", (rows, cols))
        if rows < 1 or cols < 1 or rows != cols:
            raise InputError(f"token grid must be square and positive, got {self.grid}")
        if int(self.input_size) < 1 or int(self.input_size) % cols:
            raise InputError(f"input size {self.input_size} px is not a whole number of {cols} tokens")
        if not (np.isfinite(self.pitch_um) and self.pitch_um > 0):
            raise InputError(f"token pitch must be a positive number of µm, got {self.pitch_um!r}")
        if not 0 <= int(self.margin) or cols - 2 * int(self.margin) < 1:
            raise InputError(f"margin {self.margin} leaves no token of a {cols}-token tile")

    @property
    def patch_px(self) -> int:
        """Encoder pixels per token side."""
        return int(self.input_size) // self.grid[1]

    @property
    def tile_um(self) -> float:
        """Side of the tile in µm (``grid × pitch_um``)."""
        return self.grid[1] * float(self.pitch_um)

    @property
    def encoder_mpp(self) -> float:
        """µm per encoder pixel (``pitch_um / patch_px``: 0.5 for UNI's 16-px tokens at 8 µm)."""
        return float(self.pitch_um) / self.patch_px

    @property
    def keep(self) -> int:
        """Tokens kept per side of a run-time tile (``grid - 2·margin``): the tile lattice's stride in bins."""
        return self.grid[1] - 2 * int(self.margin)

    @property
    def stride_um(self) -> float:
        """Distance between neighbouring run-time tiles in µm."""
        return self.keep * float(self.pitch_um)

    def tile_side_px(self, mpp: float) -> int:
        """Slide pixels one tile spans at ``mpp`` µm/px (rounded as every patch is)."""
        return patch_side_px(self.tile_um, mpp)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (manifests, run configs)."""
        return {"grid": list(self.grid), "input_size": int(self.input_size), "pitch_um": float(self.pitch_um),
                "margin": int(self.margin)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenGeometry:
        """Inverse of :meth:`to_dict`; an :class:`InputError` names a missing key."""
        try:
            return cls(grid=tuple(d["grid"]), input_size=int(d["input_size"]), pitch_um=float(d["pitch_um"]),
                       margin=int(d.get("margin", DEFAULT_MARGIN_TOKENS)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"token geometry {d!r} is incomplete or malformed ({type(e).__name__}: {e}); it needs "
                             "grid, input_size and pitch_um (and an optional margin)") from e


def token_offsets_um(geom: TokenGeometry) -> np.ndarray:
    """Centres of the tokens relative to the tile centre, ``[rows, cols, 2]`` (x, y) µm (ideal lattice)."""
    rows, cols = geom.grid
    y = (np.arange(rows) + 0.5 - rows / 2.0) * geom.pitch_um
    x = (np.arange(cols) + 0.5 - cols / 2.0) * geom.pitch_um
    return np.stack(np.meshgrid(x, y), axis=-1)


def token_centres_px(centres_px: np.ndarray, geom: TokenGeometry, *, mpp: float) -> np.ndarray:
    """Slide-pixel centres ``[N, rows, cols, 2]`` (x, y) of the tokens of tiles cut around ``centres_px``
    ``[N, 2]`` on a slide of ``mpp`` µm/px: the pixels each token actually sees (whole-pixel tile origin)."""
    side = geom.tile_side_px(mpp)
    origin = patch_origins(np.asarray(centres_px, np.float64).reshape(-1, 2), side).astype(np.float64)
    rows, cols = geom.grid
    fy = (np.arange(rows) + 0.5) * side / rows
    fx = (np.arange(cols) + 0.5) * side / cols
    out = np.empty((len(origin), rows, cols, 2), np.float64)
    out[..., 0] = origin[:, 0, None, None] + fx[None, None, :]
    out[..., 1] = origin[:, 1, None, None] + fy[None, :, None]
    return out


def _sample_offsets(geom: TokenGeometry, samples: int) -> np.ndarray:
    """``[rows, cols, samples², 2]`` µm sample points spread evenly over each token's square."""
    base = token_offsets_um(geom)
    s = (np.arange(samples) + 0.5) / samples - 0.5
    sx, sy = np.meshgrid(s, s)
    sub = np.stack([sx.ravel(), sy.ravel()], axis=-1) * geom.pitch_um
    return base[:, :, None, :] + sub[None, None, :, :]


def disk_token_weights(geom: TokenGeometry, radius_um: float, *, centre_offset_um: tuple[float, float] = (0.0, 0.0),
                       samples: int = 16) -> np.ndarray:
    """Share of a disk (radius ``radius_um``, centred ``centre_offset_um`` (x, y) µm from the tile centre) that
    falls in each token, ``[rows, cols]`` summing to 1 (area by ``samples²`` points per token). An
    :class:`InputError` if the disk misses the tile."""
    pts = _sample_offsets(geom, samples) - np.asarray(centre_offset_um, np.float64)
    inside = (np.hypot(pts[..., 0], pts[..., 1]) <= radius_um).mean(axis=-1)
    total = inside.sum()
    if total <= 0:
        raise InputError(f"a {radius_um} µm disk at {centre_offset_um} µm misses the {geom.tile_um} µm tile")
    return inside / total


def square_token_weights(geom: TokenGeometry, side_um: float, *, centre_offset_um: tuple[float, float] = (0.0, 0.0),
                         samples: int = 16) -> np.ndarray:
    """Share of an axis-aligned square bin (side ``side_um``, centred ``centre_offset_um`` µm from the tile
    centre) in each token, ``[rows, cols]`` summing to 1 — how a Visium HD bin is made of tokens."""
    pts = _sample_offsets(geom, samples) - np.asarray(centre_offset_um, np.float64)
    half = side_um / 2.0
    inside = ((np.abs(pts[..., 0]) <= half) & (np.abs(pts[..., 1]) <= half)).mean(axis=-1)
    total = inside.sum()
    if total <= 0:
        raise InputError(f"a {side_um} µm bin at {centre_offset_um} µm misses the {geom.tile_um} µm tile")
    return inside / total


def aggregate_log1p(pred_log: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Count-space aggregate of per-token log-expression: ``log1p(Σ_t w_t · expm1(pred_log[..., t, :]))``.

    ``pred_log`` ``[..., T, G]``, ``weights`` ``[..., T]`` (or ``[T]``) summing to 1 → ``[..., G]``."""
    lin = np.expm1(np.asarray(pred_log, np.float64))
    w = np.asarray(weights, np.float64)
    return np.log1p(np.einsum("...tg,...t->...g", lin, np.broadcast_to(w, lin.shape[:-1]))).astype(np.float32)


def pool_bins_log1p(pred_log: np.ndarray, factor: int) -> np.ndarray:
    """Pool ``factor × factor`` blocks of a bin map ``[rows, cols, G]`` in count space (8 µm → 16 µm with
    ``factor=2``); rows and columns must be multiples of ``factor``."""
    a = np.asarray(pred_log)
    rows, cols = a.shape[:2]
    if rows % factor or cols % factor:
        raise InputError(f"a {rows}×{cols} bin map does not pool into {factor}×{factor} blocks")
    lin = np.expm1(a.astype(np.float64)).reshape(rows // factor, factor, cols // factor, factor, *a.shape[2:])
    return np.log1p(lin.mean(axis=(1, 3))).astype(np.float32)


@dataclass(frozen=True)
class TileLattice:
    """Run-time tiles over a region: tile centres ``centres_px`` ``[T, 2]`` (x, y) and their lattice indices
    ``tile_rc`` ``[T, 2]``; the kept token ``(r, c)`` of tile ``(i, j)`` is bin
    ``(i·keep + r - margin, j·keep + c - margin)`` of a ``pitch_um`` lattice whose bin ``(0, 0)`` is centred
    half a pitch inside ``origin_px``."""

    geometry: TokenGeometry
    mpp: float
    origin_px: tuple[float, float]
    centres_px: np.ndarray
    tile_rc: np.ndarray
    n_bins: tuple[int, int]

    def bin_rc(self, tile: int) -> np.ndarray:
        """``[keep, keep, 2]`` (row, col) lattice indices of the kept tokens of tile number ``tile``."""
        k = self.geometry.keep
        i, j = (int(v) for v in self.tile_rc[tile])
        r, c = np.meshgrid(np.arange(k) + i * k, np.arange(k) + j * k, indexing="ij")
        return np.stack([r, c], axis=-1)

    def bin_centres_px(self, rc: np.ndarray) -> np.ndarray:
        """Ideal slide-pixel centres (x, y) of lattice bins ``rc`` ``[..., 2]`` (row, col)."""
        step = self.geometry.pitch_um / self.mpp
        rc = np.asarray(rc, np.float64)
        return np.stack([self.origin_px[0] + (rc[..., 1] + 0.5) * step, self.origin_px[1] + (rc[..., 0] + 0.5) * step],
                        axis=-1)


def tile_lattice(box_px: tuple[float, float, float, float], geom: TokenGeometry, *, mpp: float,
                 keep_tile: np.ndarray | None = None) -> TileLattice:
    """Tiles whose kept tokens cover ``box_px`` (x0, y0, x1, y1; slide pixels at ``mpp`` µm/px) without gaps.

    ``keep_tile`` (optional): a boolean ``[tiles_y, tiles_x]`` array (the shape :func:`lattice_shape` gives)
    choosing which lattice tiles to keep, e.g. those touching tissue."""
    x0, y0, x1, y1 = (float(v) for v in box_px)
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"empty region {box_px} px")
    step = geom.pitch_um / mpp
    nbx, nby = int(np.ceil((x1 - x0) / step)), int(np.ceil((y1 - y0) / step))
    k = geom.keep
    ntx, nty = -(-nbx // k), -(-nby // k)
    ii, jj = np.meshgrid(np.arange(nty), np.arange(ntx), indexing="ij")
    sel = np.ones((nty, ntx), bool) if keep_tile is None else np.asarray(keep_tile, bool)
    if sel.shape != (nty, ntx):
        raise InputError(f"tile filter has shape {sel.shape}, the lattice is {(nty, ntx)}")
    rc = np.stack([ii[sel], jj[sel]], axis=-1).astype(np.int64)
    cx = x0 + (rc[:, 1] * k + k / 2.0) * step
    cy = y0 + (rc[:, 0] * k + k / 2.0) * step
    return TileLattice(geometry=geom, mpp=float(mpp), origin_px=(x0, y0), centres_px=np.stack([cx, cy], axis=-1),
                       tile_rc=rc, n_bins=(nty * k, ntx * k))


def lattice_shape(box_px: tuple[float, float, float, float], geom: TokenGeometry, *, mpp: float) -> tuple[int, int]:
    """(tiles_y, tiles_x) of :func:`tile_lattice` over ``box_px`` (to build its ``keep_tile`` filter)."""
    x0, y0, x1, y1 = (float(v) for v in box_px)
    step = geom.pitch_um / mpp
    k = geom.keep
    return -(-int(np.ceil((y1 - y0) / step)) // k), -(-int(np.ceil((x1 - x0) / step)) // k)
