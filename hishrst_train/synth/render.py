"""Rendering the synthetic section: nuclei as a thinned Poisson process and an H&E-like image built
strip by strip (Beer–Lambert mixing of hematoxylin, eosin and glass optical densities)."""

from __future__ import annotations

import numpy as np

from hishrst_train.synth.model import _BG, REGION_NAMES, _Tissue, _ValueNoise

__all__ = ["Renderer", "make_nuclei", "downsample2", "STRIP_ROWS"]

#: Rows per rendered strip (and the TIFF tile side).
STRIP_ROWS = 256
_BLOCK = 4  # region labels are evaluated on 4×4-pixel blocks (≈ 2.3 µm) and repeated

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
# Beer–Lambert optical densities per unit stain (RGB).
_OD_HEMA = np.array([0.65, 0.70, 0.29], np.float32) * 1.6
_OD_EOSIN = np.array([0.10, 0.80, 0.30], np.float32)
_OD_GLASS = np.array([0.025, 0.03, 0.02], np.float32)


def make_nuclei(tissue: _Tissue, box: tuple[float, float, float, float], rng: np.random.Generator) -> dict[str, np.ndarray]:
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


class Renderer:
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
            transmit(od, out[..., ch])
        return out


def transmit(neg_od: np.ndarray, out: np.ndarray) -> None:
    """Beer–Lambert: ``out = round(255 · exp(neg_od))`` clipped to 255 (``neg_od`` = −optical density,
    overwritten as scratch); ``out`` is one uint8 channel."""
    np.exp(neg_od, out=neg_od)
    neg_od *= 255.0
    neg_od += 0.5
    np.minimum(neg_od, 255.0, out=neg_od)
    out[...] = neg_od


def downsample2(a: np.ndarray) -> np.ndarray:
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
