"""Synthetic Visium sections that exercise the real readers (Space Ranger ``outs`` + pyramidal TIFF).

Real data cannot be downloaded here, so :func:`make_synthetic_visium` writes a dataset with the exact
on-disk layout of a Space Ranger ≥ 2.0 run::

    out_dir/
      image.tif                          full-resolution H&E-like image (tiled pyramidal TIFF, JPEG)
      truth.npz                          the generator's ground truth (see below)
      outs/filtered_feature_bc_matrix.h5 10x HDF5 feature-barcode matrix (in-tissue spots only)
      outs/spatial/tissue_positions.csv  all lattice spots, header, in_tissue 0/1
      outs/spatial/scalefactors_json.json
      outs/spatial/tissue_hires_image.png (max side 2000 px), tissue_lowres_image.png (max side 600 px)
      outs/spatial/ground_truth_layers.csv  barcode,layer (like the DLPFC annotations)

Biology a model can learn: the tissue is a cortex-like section with six curved layer bands plus white
matter (:data:`REGION_NAMES`). Each region has its own nuclei density, nuclei size and shape, stain
intensity, eosin tint, neuronal cytoplasm halo and (white matter) fibre streaks, so a 64 µm patch shows
which region it comes from. Gene means depend on the region mix inside each 55 µm spot disk (marker,
housekeeping and background genes), some genes follow smooth gradients (cortical depth, slide x),
library sizes vary and counts are negative binomial. Everything is deterministic from ``seed``.

Geometry: lattice positions come from :func:`hishrst_runtime.core.geometry.visium_array_to_um` (100 µm
pitch); full-resolution pixels are ``px = A @ [x_um, y_um, 1]`` with an exact similarity affine ``A``
(scale ``1 / mpp``, a small rotation, a margin offset; no jitter), so an affine fit recovers it.
Pixel ``(col, row)`` indices are pixel centres.

``truth.npz`` holds, for the in-tissue spots in matrix order: ``barcodes``, ``region_names``,
``region_fractions`` [N, 7] (fraction of the spot disk in each region), ``tissue_fraction`` [N],
``depth_um`` [N], ``expected_means`` [N, G] (expected UMI counts), ``library_size`` [N], ``spot_xy_px``
[N, 2]; per gene ``gene_names``, ``gene_ids``, ``gene_kind``, ``marker_region`` (-1: none),
``region_log_means`` [7, G]; and ``affine_um_to_px`` [2, 3], ``mpp``, ``image_shape``, ``seed``, ``preset``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.core.geometry import (
    VISIUM_PITCH_UM,
    VISIUM_SPOT_DIAMETER_UM,
    visium_array_to_um,
    visium_lattice,
)

__all__ = ["PRESETS", "REGION_NAMES", "SynthPreset", "load_truth", "make_synthetic_visium"]

log = logging.getLogger("hishrst")

#: Region names, in depth order; index 7 (internal) is background glass.
REGION_NAMES: tuple[str, ...] = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
_BG = len(REGION_NAMES)  # background label
_TILE = 256
_BLOCK = 4  # region labels are evaluated on 4×4-pixel blocks (≈ 2.3 µm) and repeated


@dataclass(frozen=True)
class SynthPreset:
    """Size of a synthetic section: lattice, pixel size (µm/px), genes, layer thicknesses (µm)."""

    n_rows: int
    n_cols: int
    mpp: float
    n_genes: int
    margin_um: float
    layer_um: tuple[float, float, float, float, float, float]
    depth_at_centre: float  # cortical depth at the lattice centre, as a fraction of the cortex
    mean_umis: float


PRESETS: dict[str, SynthPreset] = {
    "small": SynthPreset(18, 30, 0.6, 300, 100.0, (110, 110, 230, 110, 200, 200), 0.5, 2500.0),
    "dlpfc": SynthPreset(78, 128, 0.5705, 2000, 150.0, (300, 250, 900, 250, 600, 650), 0.55, 3500.0),
}

# Per-region rendering parameters (index 0..6 = REGION_NAMES, 7 = background).
_NUC_DENSITY = np.array([450, 3600, 2000, 4200, 1300, 2500, 1900, 0], np.float64)  # nuclei / mm²
_NUC_RADIUS = np.array([2.8, 2.9, 4.3, 2.6, 5.4, 3.4, 2.8, 0], np.float64)  # semi-major axis, µm
_NUC_ASPECT = np.array([1.15, 1.1, 1.3, 1.05, 1.35, 1.5, 2.0, 1], np.float64)
_NUC_INTENSITY = np.array([0.95, 1.25, 0.95, 1.3, 0.85, 1.1, 1.3, 0], np.float64)
_HALO = np.array([0.0, 0.0, 0.32, 0.0, 0.42, 0.12, 0.0, 0], np.float64)  # neuronal cytoplasm (Nissl)
_HEMA_BG = np.array([0.04, 0.13, 0.09, 0.15, 0.08, 0.11, 0.03, 0], np.float32)  # neuropil purple
_EOSIN = np.array([0.30, 0.42, 0.48, 0.40, 0.55, 0.47, 0.72, 0], np.float32)
_EOSIN_TEX = np.array([0.25, 0.15, 0.18, 0.12, 0.20, 0.18, 0.10, 0], np.float32)
_FIBRE = np.array([0.0, 0.0, 0.0, 0.0, 0.05, 0.12, 0.40, 0], np.float32)
_UMI_FACTOR = np.array([0.8, 1.1, 1.1, 1.05, 1.0, 0.95, 0.6], np.float64)
# Beer–Lambert optical densities per unit stain (RGB).
_OD_HEMA = np.array([0.65, 0.70, 0.29], np.float32) * 1.6
_OD_EOSIN = np.array([0.10, 0.80, 0.30], np.float32)
_OD_GLASS = np.array([0.025, 0.03, 0.02], np.float32)

_MARKERS: dict[int, tuple[str, ...]] = {
    0: ("RELN", "AQP4", "GFAP"),
    1: ("CUX2", "LAMP5"),
    2: ("CARTPT", "HPCAL1"),
    3: ("RORB", "RXFP1"),
    4: ("PCP4", "BCL11B"),
    5: ("KRT17", "NTNG2"),
    6: ("MBP", "PLP1", "MOBP"),
}
_HOUSEKEEPING = ("ACTB", "GAPDH", "MALAT1", "RPL13", "RPS18", "EEF1A1", "TPT1", "MT-CO1")


class _ValueNoise:
    """Smooth 2-D value noise in [-1, 1] on a ``cell_um`` lattice, evaluable at any µm position."""

    def __init__(self, rng: np.random.Generator, box: tuple[float, float, float, float], cell_um: float) -> None:
        x0, y0, x1, y1 = box
        self.x0, self.y0, self.cell = float(x0), float(y0), float(cell_um)
        nx = int(np.ceil((x1 - x0) / cell_um)) + 3
        ny = int(np.ceil((y1 - y0) / cell_um)) + 3
        self.grid = rng.uniform(-1.0, 1.0, (ny, nx)).astype(np.float32)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        gx = np.clip((np.asarray(x, np.float32) - self.x0) / self.cell, 0, self.grid.shape[1] - 2.001)
        gy = np.clip((np.asarray(y, np.float32) - self.y0) / self.cell, 0, self.grid.shape[0] - 2.001)
        ix, iy = gx.astype(np.int32), gy.astype(np.int32)
        fx, fy = gx - ix, gy - iy
        fx = fx * fx * (3 - 2 * fx)
        fy = fy * fy * (3 - 2 * fy)
        g = self.grid
        top = g[iy, ix] * (1 - fx) + g[iy, ix + 1] * fx
        bot = g[iy + 1, ix] * (1 - fx) + g[iy + 1, ix + 1] * fx
        return (top * (1 - fy) + bot * fy).astype(np.float32)


class _Tissue:
    """Analytic tissue model in lattice µm: a blob cut by a curved pial surface, layered by depth."""

    def __init__(self, p: SynthPreset, rng: np.random.Generator, box: tuple[float, float, float, float]) -> None:
        ext_x = (p.n_cols - 1) * VISIUM_PITCH_UM / 2.0
        ext_y = (p.n_rows - 1) * VISIUM_PITCH_UM * np.sqrt(3.0) / 2.0
        self.cx, self.cy = ext_x / 2.0, ext_y / 2.0
        self.ax, self.ay = 0.6 * ext_x, 0.6 * ext_y
        ext = max(ext_x, ext_y)
        cortex = float(sum(p.layer_um))
        self.bounds = np.cumsum(p.layer_um).astype(np.float32)  # depth where each layer ends
        alpha = np.deg2rad(rng.uniform(40.0, 60.0))  # direction in which depth increases
        radius = rng.uniform(1.6, 2.4) * ext  # curvature radius of the pia
        self.px, self.py = self.cx - radius * np.cos(alpha), self.cy - radius * np.sin(alpha)
        self.r0 = radius - p.depth_at_centre * cortex
        self.wobble = 0.05 * cortex
        self.depth_noise = _ValueNoise(rng, box, 0.25 * ext)
        self.blob_noise = _ValueNoise(rng, box, 0.3 * ext)
        self.fibre_dir = alpha + np.pi / 2.0 + rng.uniform(-0.3, 0.3)  # fibres run along the layers

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Cortical depth in µm below the pia (negative: above the pia, i.e. outside the tissue)."""
        d = np.hypot(np.asarray(x, np.float32) - self.px, np.asarray(y, np.float32) - self.py) - self.r0
        return (d + self.wobble * self.depth_noise(x, y)).astype(np.float32)

    def labels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Region index 0..6 at µm positions, 7 = background."""
        d = self.depth(x, y)
        u = (np.asarray(x, np.float32) - self.cx) / self.ax
        v = (np.asarray(y, np.float32) - self.cy) / self.ay
        inside = (u**4 + v**4 + 0.35 * self.blob_noise(x, y) < 1.0) & (d >= 0)
        lab = np.searchsorted(self.bounds, d, side="right").astype(np.int8)
        lab[~inside] = _BG
        return lab


def _disk_offsets(radius_um: float, step_um: float = 4.0) -> np.ndarray:
    """Hexagonal sample points (µm offsets) inside a disk, used to measure region fractions."""
    dy = step_um * np.sqrt(3.0) / 2.0
    pts = [
        (x + (i % 2) * step_um / 2.0, y)
        for i, y in enumerate(np.arange(-radius_um, radius_um + 1e-9, dy))
        for x in np.arange(-radius_um - step_um, radius_um + step_um, step_um)
    ]
    arr = np.asarray(pts)
    return arr[np.hypot(arr[:, 0], arr[:, 1]) <= radius_um]


def _barcodes(n: int) -> np.ndarray:
    """A fixed (seed-independent) whitelist of unique 16-mer barcodes with the ``-1`` suffix."""
    rng = np.random.default_rng(20240611)
    out: list[str] = []
    seen: set[str] = set()
    letters = np.array(list("ACGT"))
    while len(out) < n:
        for row in rng.integers(0, 4, size=(n, 16)):
            bc = "".join(letters[row]) + "-1"
            if bc not in seen:
                seen.add(bc)
                out.append(bc)
                if len(out) == n:
                    break
    return np.asarray(out)


def _gene_programme(n_genes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-gene region log-means, kinds, gradients and dispersions."""
    k = len(REGION_NAMES)
    base = rng.normal(-0.5, 1.0, n_genes)
    logmu = np.repeat(base[None, :], k, axis=0) + rng.normal(0.0, 0.15, (k, n_genes))
    kind = np.full(n_genes, "background", dtype=object)
    marker_region = np.full(n_genes, -1, np.int64)
    names = np.array([f"GENE{i:04d}" for i in range(n_genes)], dtype=object)
    n_hk = max(4, int(0.08 * n_genes))
    n_mark = int(0.45 * n_genes)
    n_depth = max(2, int(0.08 * n_genes))
    n_x = max(2, int(0.04 * n_genes))
    hk = np.arange(n_hk)
    logmu[:, hk] = (base[hk] + 3.0)[None, :]
    kind[hk] = "housekeeping"
    names[: len(_HOUSEKEEPING)] = _HOUSEKEEPING[: min(n_hk, len(_HOUSEKEEPING))]
    marks = np.arange(n_hk, n_hk + n_mark)
    named = {r: list(v) for r, v in _MARKERS.items()}
    for j, g in enumerate(marks):
        r = j % k
        lfc = rng.uniform(1.0, 2.8)
        logmu[r, g] += lfc
        if rng.random() < 0.3:  # some markers are shared with a neighbouring layer
            nb = min(k - 1, max(0, r + rng.choice([-1, 1])))
            logmu[nb, g] += 0.5 * lfc
        kind[g] = "marker"
        marker_region[g] = r
        if named[r]:
            names[g] = named[r].pop(0)
    dep = np.arange(marks[-1] + 1, marks[-1] + 1 + n_depth)
    xg = np.arange(dep[-1] + 1, dep[-1] + 1 + n_x)
    kind[dep], kind[xg] = "depth_gradient", "x_gradient"
    grad_beta = np.zeros(n_genes)
    grad_beta[dep] = rng.choice([-1, 1], len(dep)) * rng.uniform(1.0, 2.0, len(dep))
    grad_beta[xg] = rng.choice([-1, 1], len(xg)) * rng.uniform(0.8, 1.5, len(xg))
    theta = np.exp(rng.normal(np.log(4.0), 0.4, n_genes))
    ids = np.array([f"ENSSYNG{i:08d}" for i in range(n_genes)], dtype=object)
    return {"logmu": logmu, "kind": kind, "marker_region": marker_region, "names": names, "ids": ids, "grad_beta": grad_beta, "theta": theta}


def _make_nuclei(tissue: _Tissue, box: tuple[float, float, float, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Nuclei as a thinned Poisson process in µm: density, size and shape depend on the region."""
    x0, y0, x1, y1 = box
    dmax = _NUC_DENSITY.max()
    n = rng.poisson((x1 - x0) * (y1 - y0) * 1e-6 * dmax)
    x, y = rng.uniform(x0, x1, n), rng.uniform(y0, y1, n)
    lab = tissue.labels(x, y)
    keep = rng.random(n) < _NUC_DENSITY[lab] / dmax
    x, y, lab = x[keep], y[keep], lab[keep].astype(np.int64)
    m = len(x)
    a = _NUC_RADIUS[lab] * np.exp(rng.normal(0.0, 0.15, m))
    b = a / (_NUC_ASPECT[lab] * np.exp(rng.normal(0.0, 0.1, m)))
    theta = rng.uniform(0, np.pi, m)
    wm = lab == len(REGION_NAMES) - 1
    theta[wm] = tissue.fibre_dir + rng.normal(0, 0.2, wm.sum())  # oligodendrocytes line up with fibres
    inten = _NUC_INTENSITY[lab] * rng.uniform(0.8, 1.15, m)
    return {"x": x, "y": y, "lab": lab, "a": a, "b": b, "theta": theta, "inten": inten, "halo": _HALO[lab] * rng.uniform(0.7, 1.2, m)}


class _Renderer:
    """Renders the section in 256-row strips (float32 temporaries stay a few tens of MB)."""

    def __init__(self, tissue: _Tissue, nuclei: dict[str, np.ndarray], affine: np.ndarray, shape: tuple[int, int],
                 mpp: float, rng: np.random.Generator, box: tuple[float, float, float, float], seed: int) -> None:
        self.t, self.h, self.w, self.mpp, self.seed = tissue, shape[0], shape[1], mpp, seed
        lin = affine[:, :2]
        self.lin = lin
        self.inv = np.linalg.inv(lin)
        self.fibre_px = tissue.fibre_dir + np.arctan2(lin[1, 0], lin[0, 0])  # fibre direction in pixels
        self.off = affine[:, 2]
        self.eos_fine = _ValueNoise(rng, box, 12.0)
        self.eos_coarse = _ValueNoise(rng, box, 90.0)
        self.fibre_phase = _ValueNoise(rng, box, 35.0)
        self.glass = _ValueNoise(rng, box, 400.0)
        # nuclei in pixels, grouped by region and sorted by row for fast strip selection
        px = self._to_px(nuclei["x"], nuclei["y"])
        scale = 1.0 / mpp
        self.groups = []
        for r in range(len(REGION_NAMES)):
            sel = np.flatnonzero(nuclei["lab"] == r)
            if len(sel) == 0:
                continue
            sel = sel[np.argsort(px[sel, 1], kind="stable")]
            rot = nuclei["theta"][sel] + np.arctan2(lin[1, 0], lin[0, 0])
            g = {"x": px[sel, 0], "y": px[sel, 1], "a": nuclei["a"][sel] * scale, "b": nuclei["b"][sel] * scale,
                     "c": np.cos(rot), "s": np.sin(rot), "inten": nuclei["inten"][sel], "halo": nuclei["halo"][sel]}
            reach = g["a"].max() * (2.0 if _HALO[r] > 0 else 1.0)
            g["R"] = int(np.ceil(reach)) + 1
            self.groups.append(g)

    def _to_px(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        um = np.stack([x, y], axis=1)
        return um @ self.lin.T + self.off

    def _to_um(self, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = px - self.off[0], py - self.off[1]
        return self.inv[0, 0] * dx + self.inv[0, 1] * dy, self.inv[1, 0] * dx + self.inv[1, 1] * dy

    def _stamp(self, field: np.ndarray, y0: int) -> None:
        """Draw nuclei (soft ellipses) and neuronal halos into the hematoxylin field (max-composited)."""
        hh, ww = field.shape
        flat = field.reshape(-1)
        for g in self.groups:
            R = g["R"]
            lo, hi = np.searchsorted(g["y"], [y0 - R - 1, y0 + hh + R + 1])
            step = max(1, 2_000_000 // (2 * R + 1) ** 2)  # cap temporaries at a few tens of MB
            for start in range(int(lo), int(hi), step):
                self._stamp_chunk(flat, g, slice(start, min(int(hi), start + step)), y0, hh, ww)

    @staticmethod
    def _stamp_chunk(flat: np.ndarray, g: dict, sl: slice, y0: int, hh: int, ww: int) -> None:
        R = g["R"]
        icx, icy = np.rint(g["x"][sl]).astype(np.int64), np.rint(g["y"][sl]).astype(np.int64)
        fx = (g["x"][sl] - icx).astype(np.float32)[:, None, None]
        fy = (g["y"][sl] - icy).astype(np.float32)[:, None, None]
        o = np.arange(-R, R + 1, dtype=np.float32)
        dx, dy = o[None, None, :] - fx, o[None, :, None] - fy
        c, s = g["c"][sl].astype(np.float32)[:, None, None], g["s"][sl].astype(np.float32)[:, None, None]
        u = (dx * c + dy * s) / g["a"][sl].astype(np.float32)[:, None, None]
        v = (dy * c - dx * s) / g["b"][sl].astype(np.float32)[:, None, None]
        q = u * u + v * v
        val = np.clip((1.0 - q) * 3.0, 0.0, 1.0) * (0.8 + 0.2 * np.clip(1.0 - q, 0, 1))
        val *= g["inten"][sl].astype(np.float32)[:, None, None]
        if g["halo"][sl].max() > 0:
            halo = np.clip((1.0 - q / 4.0) * 2.0, 0.0, 1.0) * g["halo"][sl].astype(np.float32)[:, None, None]
            val = np.maximum(val, halo)
        iy = icy[:, None, None] + o.astype(np.int64)[None, :, None] - y0
        ix = icx[:, None, None] + o.astype(np.int64)[None, None, :]
        ok = (val > 0.01) & (iy >= 0) & (iy < hh) & (ix >= 0) & (ix < ww)
        np.maximum.at(flat, (iy * ww + ix)[ok], val[ok])

    def strip(self, y0: int, y1: int) -> np.ndarray:
        """RGB uint8 rows ``[y0, y1)`` of the full-resolution image."""
        hh, ww, b = y1 - y0, self.w, _BLOCK
        # block-level fields (region labels, low-frequency noise)
        bx = np.arange(0, ww, b, dtype=np.float64) + (b - 1) / 2.0
        by = np.arange(y0, y1, b, dtype=np.float64) + (b - 1) / 2.0
        xu, yu = self._to_um(bx[None, :], by[:, None])
        lab = self.t.labels(xu, yu)
        eos_n = 0.6 * self.eos_fine(xu, yu) + 0.4 * self.eos_coarse(xu, yu)
        phase = 2.5 * self.fibre_phase(xu, yu)
        glass = self.glass(xu, yu)

        def up(a: np.ndarray) -> np.ndarray:
            return np.repeat(np.repeat(a, b, axis=0), b, axis=1)[:hh, :ww]

        # background has zero stain (_HEMA_BG/_EOSIN/_FIBRE are 0 at index _BG): no mask needed
        hema = up(_HEMA_BG[lab])
        eos = up(_EOSIN[lab] * (1.0 + _EOSIN_TEX[lab] * eos_n))
        fib_amp = _FIBRE[lab]
        if fib_amp.any():  # thin streaks along the fibre direction, period ≈ 7 µm
            k = 2 * np.pi / (7.0 / self.mpp)
            nx, ny = np.float32(-np.sin(self.fibre_px) * k), np.float32(np.cos(self.fibre_px) * k)
            t = nx * np.arange(ww, dtype=np.float32)[None, :] + ny * np.arange(y0, y1, dtype=np.float32)[:, None]
            t += up(phase)
            np.sin(t, out=t)
            t *= t * t
            t *= up(fib_amp)
            t += 1.0
            eos *= t
            del t
        nuc = np.zeros((hh, ww), np.float32)
        self._stamp(nuc, y0)
        np.maximum(hema, nuc, out=hema)
        np.minimum(nuc, 1.0, out=nuc)
        nuc *= -0.6
        nuc += 1.0
        eos *= nuc  # nuclei are less pink
        grain = np.random.default_rng([self.seed, 99, y0]).standard_normal((hh, ww), dtype=np.float32)
        grain *= up(np.where(lab == _BG, np.float32(0.15), np.float32(0.07)))
        grain += 1.0
        hema *= grain
        eos *= grain
        glass_p = up(1.0 + 0.3 * glass)
        glass_p *= grain
        out = np.empty((hh, ww, 3), np.uint8)
        od, tmp = nuc, grain  # reuse buffers
        for ch in range(3):
            np.multiply(hema, _OD_HEMA[ch], out=od)
            np.multiply(eos, _OD_EOSIN[ch], out=tmp)
            od += tmp
            np.multiply(glass_p, _OD_GLASS[ch], out=tmp)
            od += tmp
            np.negative(od, out=od)
            np.exp(od, out=od)
            od *= 255.0
            od += 0.5
            np.minimum(od, 255.0, out=od)
            out[..., ch] = od
        return out


def _downsample2(a: np.ndarray) -> np.ndarray:
    """2× box downsampling of an HWC uint8 array (odd edges replicated)."""
    h, w = a.shape[:2]
    if h % 2 or w % 2:
        a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = a[0::2, 0::2].astype(np.uint16)
    s += a[1::2, 0::2]
    s += a[0::2, 1::2]
    s += a[1::2, 1::2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def _resize(a: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize(size_wh, Image.Resampling.LANCZOS))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fast (level-1) deflate; readable by ``np.load``."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, val in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(val), allow_pickle=False)


def _save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(a).save(path, compress_level=1)


def make_synthetic_visium(
    out_dir: str | Path,
    *,
    preset: Literal["small", "dlpfc"] = "small",
    seed: int = 0,
    compression: Literal["jpeg", "zlib"] = "jpeg",
) -> Path:
    """Write a synthetic Visium section under ``out_dir`` and return its ``outs`` directory.

    ``preset="small"``: 18 × 30 lattice (270 spots, ≈ 230 in tissue), 300 genes, 0.6 µm/px,
    ≈ 2.8k × 2.8k-px image, ~2 s. ``preset="dlpfc"``: 78 × 128 lattice (≈ 4,000 of 4,992 spots in
    tissue), 2,000 genes, 0.5705 µm/px (``spot_diameter_fullres`` ≈ 96.4 px), ≈ 11.7k × 12.3k image,
    ~30 s on 2 cores, < 1 GB RAM, ~90 MB on disk.
    ``compression`` is that of the TIFF tiles. Files and arrays are identical for identical ``seed``.
    """
    import tifffile

    from hishrst_train.data.tenx import _write_10x_arrays

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out_dir = Path(out_dir)
    outs = out_dir / "outs"
    (outs / "spatial").mkdir(parents=True, exist_ok=True)
    ss = np.random.SeedSequence([int(seed), 0x5EED])
    rng_geo, rng_nuc, rng_tex, rng_gene, rng_count = (np.random.default_rng(s) for s in ss.spawn(5))

    # --- geometry: lattice µm -> full-resolution px (exact similarity affine) -------------------------
    rows, cols = visium_lattice(p.n_rows, p.n_cols)
    spot_um = visium_array_to_um(rows, cols)
    rot = np.deg2rad(rng_geo.uniform(-0.6, 0.6))
    lin = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]) / p.mpp
    lo_um, hi_um = spot_um.min(0) - p.margin_um, spot_um.max(0) + p.margin_um
    corners = np.array([[lo_um[0], lo_um[1]], [hi_um[0], lo_um[1]], [lo_um[0], hi_um[1]], [hi_um[0], hi_um[1]]])
    cpx = corners @ lin.T
    off = -cpx.min(0)
    width, height = (int(np.ceil(v)) + 1 for v in (cpx.max(0) - cpx.min(0)))
    affine = np.concatenate([lin, off[:, None]], axis=1)
    spot_px = spot_um @ lin.T + off
    inv = np.linalg.inv(lin)
    img_box_um = (np.array([[0, 0], [width, 0], [0, height], [width, height]], float) - off) @ inv.T
    box = (*img_box_um.min(0), *img_box_um.max(0))

    tissue = _Tissue(p, rng_geo, box)

    # --- spots: region fractions inside the 55 µm disk -----------------------------------------------
    offs = _disk_offsets(VISIUM_SPOT_DIAMETER_UM / 2.0)
    sx = (spot_um[:, 0:1] + offs[None, :, 0]).astype(np.float32)
    sy = (spot_um[:, 1:2] + offs[None, :, 1]).astype(np.float32)
    lab = tissue.labels(sx, sy)
    k = len(REGION_NAMES)
    frac = np.stack([(lab == r).mean(axis=1) for r in range(k)], axis=1)
    tfrac = frac.sum(axis=1)
    depth_all = np.where(lab != _BG, tissue.depth(sx, sy), 0).sum(1) / np.maximum((lab != _BG).sum(1), 1)
    in_tissue = tfrac >= 0.5
    barcodes = _barcodes(len(rows))

    # --- genes and counts (in-tissue spots, sorted by barcode like Space Ranger) ----------------------
    order = np.flatnonzero(in_tissue)
    order = order[np.argsort(barcodes[order], kind="stable")]
    gp = _gene_programme(p.n_genes, rng_gene)
    f_in = frac[order] / tfrac[order, None]
    rate = f_in @ np.exp(gp["logmu"])
    cortex = float(sum(p.layer_um))
    dnorm = np.clip(depth_all[order] / cortex, 0.0, 1.3) - 0.5
    xnorm = (spot_um[order, 0] - tissue.cx) / (2 * tissue.cx)
    is_x = gp["kind"] == "x_gradient"
    grad = np.where(is_x[None, :], xnorm[:, None], dnorm[:, None]) * gp["grad_beta"][None, :]
    rate = rate * np.exp(grad)
    prop = rate / rate.sum(axis=1, keepdims=True)
    lib = p.mean_umis * (f_in @ _UMI_FACTOR) * tfrac[order] * np.exp(rng_count.normal(0.0, 0.3, len(order)))
    mean = lib[:, None] * prop
    theta = gp["theta"][None, :]
    counts = rng_count.poisson(rng_count.gamma(theta, mean / theta)).astype(np.int32)

    import pandas as pd

    _write_10x_arrays(
        outs / "filtered_feature_bc_matrix.h5", counts, barcodes=barcodes[order], names=gp["names"], ids=gp["ids"],
        feature_types=np.full(p.n_genes, "Gene Expression"), genomes=np.full(p.n_genes, "GRCh38"),
        library_id=f"synthetic_{preset}_{seed}", chemistry_description="Spatial 3' v1",
        software_version="spaceranger-2.0.0 (hishrst synthetic)",
    )

    # --- spatial/ ------------------------------------------------------------------------------------
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(int), "array_row": rows, "array_col": cols,
                        "pxl_row_in_fullres": spot_px[:, 1], "pxl_col_in_fullres": spot_px[:, 0]})
    pos = pos.sort_values("barcode", kind="stable")
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False, float_format="%.6f")
    majority = np.asarray(REGION_NAMES)[np.argmax(frac[order], axis=1)]
    pd.DataFrame({"barcode": barcodes[order], "layer": majority}).to_csv(
        outs / "spatial" / "ground_truth_layers.csv", index=False)
    hires_s, lowres_s = 2000.0 / max(width, height), 600.0 / max(width, height)
    sf = {"spot_diameter_fullres": VISIUM_SPOT_DIAMETER_UM / p.mpp, "fiducial_diameter_fullres": 1.5 * VISIUM_SPOT_DIAMETER_UM / p.mpp,
          "tissue_hires_scalef": hires_s, "tissue_lowres_scalef": lowres_s}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))

    # --- image: strips -> TIFF tiles; level 1 is accumulated in memory for the pyramid and PNGs ------
    nuclei = _make_nuclei(tissue, box, rng_nuc)
    ren = _Renderer(tissue, nuclei, affine, (height, width), p.mpp, rng_tex, box, int(seed))
    level1 = np.empty(((height + 1) // 2, (width + 1) // 2, 3), np.uint8)
    level0 = np.empty((height, width, 3), np.uint8) if max(height, width) < 4000 else None  # small: keep for PNGs

    def tiles() -> Iterator[np.ndarray]:
        # strips are rendered ahead by a small thread pool (numpy releases the GIL), consumed in order
        starts = iter(range(0, height, _TILE))
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque = deque()

            def submit() -> None:
                y = next(starts, None)
                if y is not None:
                    pending.append((y, pool.submit(ren.strip, y, min(height, y + _TILE))))

            for _ in range(workers + 1):
                submit()
            while pending:
                y0, fut = pending.popleft()
                submit()
                s = fut.result()
                y1 = y0 + s.shape[0]
                level1[y0 // 2 : (y1 + 1) // 2] = _downsample2(s)
                if level0 is not None:
                    level0[y0:y1] = s
                for x0 in range(0, width, _TILE):
                    yield s[:, x0 : x0 + _TILE]

    desc = json.dumps({"mpp": p.mpp, "generator": "hishrst.synth", "preset": preset, "seed": int(seed)})
    comp: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": 90}} if compression == "jpeg" else {
        "compression": "zlib", "compressionargs": {"level": 6}}
    n_sub = max(1, int(np.ceil(np.log2(max(width, height) / 1024.0))))
    with tifffile.TiffWriter(out_dir / "image.tif", bigtiff=True) as tif:
        tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(_TILE, _TILE), photometric="rgb",
                  subifds=n_sub, resolution=(1e4 / p.mpp, 1e4 / p.mpp), resolutionunit="CENTIMETER",
                  description=desc, metadata=None, **comp)
        levels = [level1]
        for i in range(1, n_sub + 1):
            if i > 1:
                levels.append(_downsample2(levels[-1]))
            m = p.mpp * 2**i
            tif.write(levels[-1], tile=(_TILE, _TILE), photometric="rgb", subfiletype=1,
                      resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER", metadata=None, **comp)
    pyramid = ([level0] if level0 is not None else []) + levels
    for name, s in (("hires", hires_s), ("lowres", lowres_s)):
        size = (max(1, round(width * s)), max(1, round(height * s)))
        src = [lv for lv in pyramid if max(lv.shape[:2]) >= max(size)]
        _save_png(_resize(src[-1] if src else pyramid[0], size), outs / "spatial" / f"tissue_{name}_image.png")

    truth = {
        "barcodes": barcodes[order].astype(str), "region_names": np.asarray(REGION_NAMES), "region_fractions": frac[order].astype(np.float32),
        "tissue_fraction": tfrac[order].astype(np.float32), "depth_um": depth_all[order].astype(np.float32),
        "expected_means": mean.astype(np.float32), "library_size": lib.astype(np.float32), "spot_xy_px": spot_px[order],
        "gene_names": gp["names"].astype(str), "gene_ids": gp["ids"].astype(str), "gene_kind": gp["kind"].astype(str),
        "marker_region": gp["marker_region"], "region_log_means": gp["logmu"].astype(np.float32), "affine_um_to_px": affine,
        "mpp": np.float64(p.mpp), "image_shape": np.array([height, width, 3]), "seed": np.int64(seed), "preset": np.str_(preset),
    }
    _save_npz(out_dir / "truth.npz", truth)
    log.info("synthetic Visium %s (seed %d): %d/%d spots in tissue, image %d×%d px", preset, seed, len(order), len(rows), width, height)
    return outs


def load_truth(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The generator's ground truth (``out_dir/truth.npz``, or next to an ``outs`` dir) as a dict."""
    path = Path(out_dir)
    if path.name == "outs":
        path = path.parent
    with np.load(path / "truth.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
