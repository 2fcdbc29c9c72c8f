"""The synthetic section's biology: presets, the analytic tissue (layers by cortical depth), the gene
programme and the per-spot expression model (region mix inside each spot disk → negative-binomial counts).

Everything here is in lattice µm; nothing touches pixels or files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hishrst_runtime.core.geometry import VISIUM_PITCH_UM, VISIUM_SPOT_DIAMETER_UM

__all__ = ["PRESETS", "REGION_NAMES", "UMI_FACTOR", "SynthPreset", "SpotModel", "spot_model", "spot_counts",
           "log_gradient"]

#: Region names, in depth order; index 7 (internal) is background glass.
REGION_NAMES: tuple[str, ...] = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
_BG = len(REGION_NAMES)  # background label


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

#: Relative UMI yield of each region (library size per unit of tissue area).
UMI_FACTOR = np.array([0.8, 1.1, 1.1, 1.05, 1.0, 0.95, 0.6], np.float64)
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

    def __init__(self, p: SynthPreset, rng: np.random.Generator, box: tuple[float, float, float, float], *,
                 alpha_range_deg: tuple[float, float] = (40.0, 60.0), blob_scale: tuple[float, float] = (0.6, 0.6)
                 ) -> None:
        """``alpha_range_deg``: range (degrees, lattice frame) of the direction in which depth increases;
        ``blob_scale``: (x, y) half-axes of the tissue blob as fractions of the lattice extent."""
        ext_x = (p.n_cols - 1) * VISIUM_PITCH_UM / 2.0
        ext_y = (p.n_rows - 1) * VISIUM_PITCH_UM * np.sqrt(3.0) / 2.0
        self.cx, self.cy = ext_x / 2.0, ext_y / 2.0
        self.ax, self.ay = blob_scale[0] * ext_x, blob_scale[1] * ext_y
        ext = max(ext_x, ext_y)
        cortex = float(sum(p.layer_um))
        self.bounds = np.cumsum(p.layer_um).astype(np.float32)  # depth where each layer ends
        alpha = np.deg2rad(rng.uniform(*alpha_range_deg))  # direction in which depth increases
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
        return self.labels_depth(x, y)[0]

    def labels_depth(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, depth)`` at µm positions: :meth:`labels` and :meth:`depth` (µm) in one evaluation."""
        d = self.depth(x, y)
        u = (np.asarray(x, np.float32) - self.cx) / self.ax
        v = (np.asarray(y, np.float32) - self.cy) / self.ay
        inside = (u**4 + v**4 + 0.35 * self.blob_noise(x, y) < 1.0) & (d >= 0)
        lab = np.searchsorted(self.bounds, d, side="right").astype(np.int8)
        lab[~inside] = _BG
        return lab, d

    def xnorm(self, x_um: np.ndarray) -> np.ndarray:
        """The x-gradient variable of the expression model at lattice x (µm): 0 at the lattice centre,
        ±0.5 at its left / right edge."""
        return (x_um - self.cx) / (2 * self.cx)


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
    n_named = min(n_hk, len(_HOUSEKEEPING))
    names[:n_named] = _HOUSEKEEPING[:n_named]
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


@dataclass(frozen=True)
class SpotModel:
    """Per lattice spot: region fractions ``frac`` [N, 7] of the 55 µm disk, tissue fraction ``tfrac`` [N],
    mean cortical depth ``depth`` [N] (µm) and ``in_tissue`` [N] (tissue fraction ≥ 0.5)."""

    frac: np.ndarray
    tfrac: np.ndarray
    depth: np.ndarray
    in_tissue: np.ndarray


def spot_model(tissue: _Tissue, spot_um: np.ndarray) -> SpotModel:
    """Region fractions, tissue fraction and mean depth inside each spot disk (``spot_um`` [N, 2], µm)."""
    offs = _disk_offsets(VISIUM_SPOT_DIAMETER_UM / 2.0)
    sx = (spot_um[:, 0:1] + offs[None, :, 0]).astype(np.float32)
    sy = (spot_um[:, 1:2] + offs[None, :, 1]).astype(np.float32)
    lab = tissue.labels(sx, sy)
    k = len(REGION_NAMES)
    frac = np.stack([(lab == r).mean(axis=1) for r in range(k)], axis=1)
    tfrac = frac.sum(axis=1)
    depth_all = np.where(lab != _BG, tissue.depth(sx, sy), 0).sum(1) / np.maximum((lab != _BG).sum(1), 1)
    return SpotModel(frac=frac, tfrac=tfrac, depth=depth_all, in_tissue=tfrac >= 0.5)


def log_gradient(is_x: np.ndarray, grad_beta: np.ndarray, *, depth_um: np.ndarray, xnorm: np.ndarray,
                 cortex_um: float) -> np.ndarray:
    """The gradient term ``[n, g]`` of the log-rate of ``g`` genes at ``n`` places: ``grad_beta`` times the
    normalised slide x (``xnorm``, genes with ``is_x``) or the normalised cortical depth
    (``clip(depth_um / cortex_um, 0, 1.3) - 0.5``, the other genes; their ``grad_beta`` is 0 unless they
    are depth-gradient genes)."""
    dnorm = np.clip(depth_um / cortex_um, 0.0, 1.3) - 0.5
    return np.where(is_x[None, :], xnorm[:, None], dnorm[:, None]) * grad_beta[None, :]


def spot_counts(p: SynthPreset, tissue: _Tissue, gp: dict[str, np.ndarray], spots: SpotModel, spot_um: np.ndarray,
                order: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected UMI means [n, G], library sizes [n] and negative-binomial counts [n, G] (int32) of the
    spots ``order`` (indices into the lattice)."""
    f_in = spots.frac[order] / spots.tfrac[order, None]
    rate = f_in @ np.exp(gp["logmu"])
    grad = log_gradient(gp["kind"] == "x_gradient", gp["grad_beta"], depth_um=spots.depth[order],
                        xnorm=tissue.xnorm(spot_um[order, 0]), cortex_um=float(sum(p.layer_um)))
    rate = rate * np.exp(grad)
    prop = rate / rate.sum(axis=1, keepdims=True)
    lib = p.mean_umis * (f_in @ UMI_FACTOR) * spots.tfrac[order] * np.exp(rng.normal(0.0, 0.3, len(order)))
    mean = lib[:, None] * prop
    theta = gp["theta"][None, :]
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.int32)
    return mean, lib, counts
