"""The bins of a sub-spot run: which tiles the encoder sees and which square bins are written (issue #17).

A sub-spot bundle's encoder sees ``tokens.tile_um``-µm tiles and its head predicts one value per token, an 8 µm
bin (``tokens.pitch_um``). :func:`prepare_bins` opens the slide and finds tissue exactly as
:func:`~hishrst_runtime.inference.prepare.prepare_slide` does, then lays the run-time tile lattice
(:func:`~hishrst_runtime.core.tokens.tile_lattice`) over the tissue's bounding box and keeps the tiles whose
output bins touch tissue (:func:`bin_layout`).

Conventions (units in names: ``*_px`` level-0 pixels, ``*_um`` µm):

* **Global bin lattice.** 8 µm bin ``(R, C)`` covers level-0 pixels ``[C·s, (C+1)·s) × [R·s, (R+1)·s)`` with
  ``s = pitch_um / mpp0``: bin ``(0, 0)`` starts at pixel ``(0, 0)``, as ``hishrst synth``'s ``truth_bins.npz``.
  A 16 µm bin is ``(R // 2, C // 2)``; ``array_row`` / ``array_col`` are these indices.
* **Tiles.** The tile lattice starts at an even 8 µm bin at or before the tissue box's corner and steps ``keep``
  bins, so with ``keep`` even no 16 µm bin straddles two tiles (``16um`` with an odd ``keep`` is refused).
* **Rows.** Tiles in lattice order (row-major); within a tile its output bins row-major; only bins whose centre
  is in tissue. A tile's rows are consecutive (``starts[t] .. starts[t + 1]``), so rows arrive in increasing
  order and each X chunk fills once.

Memory is one byte per output bin of the kept tiles (the in-tissue map) plus a few numbers per tile; bin names,
indices and centres are produced in blocks (:meth:`BinLayout.blocks`) when the store is laid out.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import Bundle
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.tokens import TileLattice, TokenGeometry, lattice_shape, tile_lattice
from hishrst_runtime.core.vocab import DEFAULT_MASK_MODE, DEFAULT_RESOLUTION, RESOLUTION_BINS, RESOLUTIONS, MaskMode, \
    Resolution
from hishrst_runtime.inference.prepare import PreparedSlide, mask_info, slide_location, survey_slide

__all__ = ["DEFAULT_RESOLUTION", "BinLayout", "PreparedBins", "TileGroups", "bin_layout", "check_resolution",
           "prepare_bins"]

#: Tiles per block of :meth:`BinLayout.blocks` (a few hundred thousand bins at most).
_BLOCK_TILES = 4096


def check_resolution(resolution: str | None, geometry: TokenGeometry, *, where: str = "the bundle") -> Resolution:
    """``resolution`` (default :data:`DEFAULT_RESOLUTION`), checked against the token geometry: a known choice,
    and a tile stride (``keep`` tokens) that ``RESOLUTION_BINS[resolution]`` bins divide (:class:`InputError`)."""
    res = DEFAULT_RESOLUTION if resolution is None else resolution
    if res not in RESOLUTIONS:
        raise InputError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    f = RESOLUTION_BINS[res]
    if geometry.keep % f:
        raise InputError(f"{where}: --resolution {res} pools {f}×{f} tokens, but its tiles keep {geometry.keep} tokens "
                         f"a side (grid {geometry.grid[1]} − 2 × margin {geometry.margin}), so {res} bins would straddle "
                         "tiles; use --resolution 8um, or re-export with an even number of kept tokens")
    return res  # type: ignore[return-value]


@dataclass(frozen=True)
class BinLayout:
    """The tiles and output bins of one slide (see the module docstring).

    ``lattice``: the kept tiles (level-0 centres, lattice indices); ``resolution`` and ``factor`` (8 µm bins per
    output bin side); ``offset``: global 8 µm (row, col) of the lattice's first bin (even); ``in_tissue``: bool
    ``[tiles, kb, kb]`` (``kb = keep / factor``), the output bins of each tile whose centre is in tissue;
    ``starts``: int64 ``[tiles + 1]``, each tile's first row; ``shape0``: the slide's level-0 (H, W) pixels."""

    lattice: TileLattice
    resolution: Resolution
    factor: int
    offset: tuple[int, int]
    in_tissue: np.ndarray
    starts: np.ndarray
    shape0: tuple[int, int]

    @property
    def n_obs(self) -> int:
        """Output bins (rows)."""
        return int(self.starts[-1])

    @property
    def n_tiles(self) -> int:
        """Tiles to encode (one encoder pass each)."""
        return int(len(self.lattice.tile_rc))

    @property
    def size_um(self) -> float:
        """Side of one output bin (µm)."""
        return float(self.lattice.geometry.pitch_um) * self.factor

    @property
    def size_px(self) -> float:
        """Side of one output bin (level-0 pixels)."""
        return self.size_um / self.lattice.mpp

    def tile_rows(self, first: int, last: int) -> np.ndarray:
        """int64 rows of tiles ``first .. last`` (inclusive, consecutive)."""
        return np.arange(self.starts[first], self.starts[last + 1], dtype=np.int64)

    def bin_rc(self, first: int, stop: int) -> np.ndarray:
        """int32 ``[n, 2]`` global (row, col) of the output bins of tiles ``first .. stop - 1``, in row order."""
        kb = self.lattice.geometry.keep // self.factor
        t, a, b = np.nonzero(self.in_tissue[first:stop])
        ij = self.lattice.tile_rc[first:stop][t]
        r = self.offset[0] // self.factor + ij[:, 0] * kb + a
        c = self.offset[1] // self.factor + ij[:, 1] * kb + b
        return np.stack([r, c], axis=1).astype(np.int32)

    def centres_px(self, rc: np.ndarray) -> np.ndarray:
        """float64 ``[n, 2]`` level-0 (x, y) centres of output bins ``rc`` (row, col)."""
        rc = np.asarray(rc, np.float64)
        return np.stack([(rc[:, 1] + 0.5) * self.size_px, (rc[:, 0] + 0.5) * self.size_px], axis=1)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rc, xy)`` of every output bin in row order, in blocks of tiles (for the obs table and the QC image)."""
        for t in range(0, self.n_tiles, _BLOCK_TILES):
            rc = self.bin_rc(t, t + _BLOCK_TILES)
            yield rc, self.centres_px(rc)

    def uns(self) -> dict[str, Any]:
        """``uns['bins']``: bin side and centre spacing (µm), the level-0 pixel (x, y) of bin (0, 0)'s corner, µm
        per level-0 pixel, the resolution, the token geometry, the tiles encoded, and where they lie: tile ``(i, j)``
        holds the bins ``tile_origin_rc + (i, j) × tile_stride_bins`` + ``[0, tile_stride_bins)`` on each axis."""
        f = self.factor
        return {"size_um": self.size_um, "pitch_um": self.size_um, "origin_px": [0.0, 0.0], "mpp": self.lattice.mpp,
                "resolution": self.resolution, "tokens": self.lattice.geometry.to_dict(), "tiles": self.n_tiles,
                "tile_stride_bins": self.lattice.geometry.keep // f,
                "tile_origin_rc": [self.offset[0] // f, self.offset[1] // f]}


def bin_layout(mask: np.ndarray, *, shape0: tuple[int, int], mpp0: float, geometry: TokenGeometry,
               resolution: Resolution = DEFAULT_RESOLUTION, where: str = "slide") -> BinLayout:
    """The :class:`BinLayout` of a slide of ``shape0`` (H, W) level-0 pixels at ``mpp0`` µm/px whose tissue is the
    overview mask ``mask`` (bool ``(h, w)``, pixel (0, 0) at the slide's origin). :class:`InputError` when the
    mask holds no tissue or ``resolution`` does not fit the geometry (:func:`check_resolution`)."""
    res = check_resolution(resolution, geometry)
    f, (h, w), (h0, w0) = RESOLUTION_BINS[res], mask.shape, shape0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        raise InputError(f"{where}: no tissue found (tissue detected on 0% of the overview); check the slide or "
                         "pass a --tissue-mask")
    step = geometry.pitch_um / mpp0  # one 8 µm bin in level-0 pixels
    y0, x0 = (2 * int(np.floor(v / (2 * step))) for v in (rows[0] * h0 / h, cols[0] * w0 / w))
    box = (x0 * step, y0 * step, min(w0, (cols[-1] + 1) * w0 / w), min(h0, (rows[-1] + 1) * h0 / h))
    nty, ntx = lattice_shape(box, geometry, mpp=mpp0)
    kb = geometry.keep // f
    centre_r = (y0 // f + np.arange(nty * kb) + 0.5) * step * f  # level-0 y of each output bin row's centre
    centre_c = (x0 // f + np.arange(ntx * kb) + 0.5) * step * f
    iy, ix = (centre_r * h / h0).astype(np.int64), (centre_c * w / w0).astype(np.int64)
    full = mask[np.ix_(np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1))]
    full &= (centre_r < h0)[:, None] & (centre_c < w0)[None, :]
    tiles = full.reshape(nty, kb, ntx, kb).transpose(0, 2, 1, 3)
    keep_tile = tiles.any(axis=(2, 3))
    lattice = tile_lattice(box, geometry, mpp=mpp0, keep_tile=keep_tile)
    in_tissue = np.ascontiguousarray(tiles[keep_tile])
    starts = np.concatenate([[0], np.cumsum(in_tissue.sum(axis=(1, 2)), dtype=np.int64)])
    return BinLayout(lattice=lattice, resolution=res, factor=f, offset=(y0, x0), in_tissue=in_tissue, starts=starts,
                     shape0=(int(h0), int(w0)))


class TileGroups(Sequence[np.ndarray]):
    """One "neighbour group" per tile (group ``t`` holds tile ``t`` alone), made on demand: what the work units and
    the tile reader take, without an array object per tile (tens of thousands on a large slide)."""

    def __init__(self, n: int) -> None:
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, t: Any) -> Any:
        if isinstance(t, slice):
            return [np.array([i], dtype=np.int64) for i in range(*t.indices(self.n))]
        if not -self.n <= int(t) < self.n:
            raise IndexError(f"tile {t} out of range [0, {self.n})")
        return np.array([int(t) % self.n], dtype=np.int64)


@dataclass
class PreparedBins(PreparedSlide):
    """A slide prepared for a sub-spot run: a :class:`~hishrst_runtime.inference.prepare.PreparedSlide` whose
    "points" are the tile centres (``points_px`` ``[tiles, 2]``, ``grid_index`` the tiles' lattice indices, one
    group per tile: what the tile reader and the work units take) and whose output rows are the bins of
    ``layout`` (:class:`BinLayout`)."""

    layout: BinLayout | None = None

    @property
    def bins(self) -> BinLayout:
        """The layout (always set by :func:`prepare_bins`)."""
        assert self.layout is not None
        return self.layout


def prepare_bins(path: str | Path, bundle: Bundle, *, resolution: Resolution | None = None, mpp: float | None = None,
                 thumbnail_side: int = 1024, allow_missing_chunks: bool = False,
                 tissue_mask: str | Path | None = None, mask_mode: MaskMode = DEFAULT_MASK_MODE) -> PreparedBins:
    """Open a slide for a sub-spot bundle and lay out its tiles and bins (no inference yet).

    ``resolution``: ``8um`` (default) or ``16um``; ``mpp``, ``thumbnail_side``, ``allow_missing_chunks``,
    ``tissue_mask`` and ``mask_mode``: as :func:`~hishrst_runtime.inference.prepare.prepare_slide`. Raises
    :class:`InputError` for a spot bundle, a resolution the geometry cannot pool, or a slide without tissue."""
    from hishrst_runtime.slides.reader import open_slide

    spec = bundle.spec
    if not spec.subspot or spec.tokens is None:
        raise InputError(f"{bundle.root}: a spot bundle (head.kind {spec.head_kind}) predicts at query points, not "
                         "bins; use prepare_slide, or a sub-spot bundle")
    res = check_resolution(resolution, spec.tokens, where=str(bundle.root))
    t0, where = time.perf_counter(), slide_location(path)
    slide = open_slide(path, mpp=mpp, allow_missing_chunks=allow_missing_chunks)
    try:
        sv = survey_slide(slide, bundle, thumbnail_side, allow_missing_chunks, tissue_mask, mask_mode)
        layout = bin_layout(sv.mask, shape0=tuple(slide.shape0), mpp0=float(slide.mpp0), geometry=spec.tokens,
                            resolution=res, where=str(where))
    except BaseException:
        slide.close()
        raise
    n = layout.n_tiles
    return PreparedBins(
        path=where, slide=slide, level_index=sv.level_index, points_px=layout.lattice.centres_px,
        grid_index=layout.lattice.tile_rc, tissue_fraction=np.ones(n, np.float32),
        groups=TileGroups(n), thumbnail=sv.thumbnail,  # type: ignore[arg-type]
        thumbnail_scale=sv.thumbnail.shape[1] / slide.shape0[1], tissue_mask=sv.mask, pitch_um=None,
        seconds=time.perf_counter() - t0, info=mask_info(tissue_mask, mask_mode, 0),
        mask_file=None if tissue_mask is None else Path(tissue_mask), layout=layout,
    )
