"""The 8 µm truth of a synthetic section: what every Visium HD-style bin of its image holds.

``hishrst synth`` writes ``truth_bins.npz`` next to ``truth.npz``: the inputs of the expected expression of
every 8 µm bin of the image that holds any tissue. The bin lattice is axis-aligned in image pixels: bin
``(row, col)`` covers ``x ∈ [col·s, (col+1)·s)``, ``y ∈ [row·s, (row+1)·s)`` with ``s = 8 µm / mpp`` px,
in the pixel frame of ``truth.npz``'s ``spot_xy_px`` (and of ``obsm['spatial']``: pixel ``(i, j)``'s centre
at ``(i, j)``); bin ``(0, 0)`` starts at pixel ``(0, 0)``. Per bin (in ``(row, col)`` order):

* ``bin_rc`` int32 [n, 2] (row, col); ``centre_px`` float64 [n, 2] (x, y) = ``((col+½)·s, (row+½)·s)``;
* ``region_fractions`` float16 [n, 7]: share of the bin's area in each region (:data:`REGION_NAMES`),
  measured on ``samples × samples`` points per bin (4 × 4: exact multiples of 1/16) mapped to lattice µm
  with the inverse of ``affine_um_to_px``; points outside the section's pixels are glass;
* ``tissue_fraction`` float32 (sum of the above); ``depth_um`` float32 (mean cortical depth over the tissue
  points); ``xnorm`` float32 (the x-gradient variable of the expression model at the bin centre);

and ``bin_um`` (8.0), ``mpp``, ``samples``, ``lattice_shape`` (rows, cols of the whole image's lattice),
plus the expression model's own arrays: ``region_log_means`` float64 [7, G], ``grad_beta`` float64 [G],
``x_gradient`` bool [G] and ``cortex_um``.

:func:`bin_truth` turns them into the **expected log-normalised expression** of each bin: the formula of
the spot model (:func:`hishrst_train.synth.model.spot_counts`) without library size and sampling noise —
proportions from the region mix and the depth / x gradients, then ``log1p(target_sum · proportion)`` as the
training targets get (:func:`hishrst_train.preprocess.normalize_log1p`, 1e4 counts). 16 µm bins pool
2 × 2 bins of 8 µm in count space (:func:`hishrst_runtime.core.tokens.aggregate_log1p`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.tokens import DEFAULT_TOKEN_PITCH_UM, aggregate_log1p
from hishrst_runtime.core.vocab import RESOLUTION_BINS
from hishrst_train.data.errors import DataError
from hishrst_train.synth.model import _BG, REGION_NAMES, _Tissue, log_gradient

__all__ = ["BIN_UM", "BINS_FILE", "SAMPLES", "BinModel", "bin_inputs", "bin_truth", "hd_barcodes", "load_bins",
           "pool_children"]

#: Side of the smallest truth bin (µm): Visium HD's 8 µm bin, the sub-spot token pitch.
BIN_UM = DEFAULT_TOKEN_PITCH_UM
#: File of the bin truth, next to ``truth.npz``.
BINS_FILE = "truth_bins.npz"
#: Sample points per bin side used to measure region fractions (4 × 4 = 16 per bin).
SAMPLES = 4
_CHUNK_SAMPLES = 1_000_000  # sample points evaluated at once (a few tens of MB of temporaries)
_CHUNK_VALUES = 4_000_000  # bins × genes computed at once by bin_truth


def _lattice(width: int, height: int, mpp: float, size_um: float) -> tuple[float, int, int]:
    """``(side_px, rows, cols)`` of the ``size_um`` lattice covering a ``width × height``-px image."""
    s = float(size_um) / float(mpp)
    return s, int(np.ceil(height / s)), int(np.ceil(width / s))


def bin_inputs(tissue: _Tissue, *, affine: np.ndarray, image_wh: tuple[int, int], section_box_px: tuple[int, ...],
               mpp: float, size_um: float = BIN_UM, samples: int = SAMPLES) -> dict[str, np.ndarray]:
    """The per-bin arrays of ``truth_bins.npz`` (see the module docstring) for an image of ``image_wh`` px.

    ``affine``: px = affine @ [x_um, y_um, 1] (lattice µm); ``section_box_px``: (x0, y0, x1, y1) pixel indices
    of the section on its canvas (pixels outside are glass). Labels are evaluated in chunks of about
    a million points, so memory stays at a few tens of MB whatever the image size.
    """
    s, n_rows, n_cols = _lattice(*image_wh, mpp, size_um)
    inv = np.linalg.inv(np.asarray(affine, np.float64)[:, :2])
    off = np.asarray(affine, np.float64)[:, 2]
    sub = (np.arange(samples) + 0.5) / samples * s
    xs = (np.arange(n_cols)[:, None] * s + sub[None, :]).ravel()
    x_out = (np.rint(xs) < section_box_px[0]) | (np.rint(xs) >= section_box_px[2])
    step = max(1, _CHUNK_SAMPLES // (len(xs) * samples))
    parts = []
    for r0 in range(0, n_rows, step):
        rows = np.arange(r0, min(n_rows, r0 + step))
        ys = (rows[:, None] * s + sub[None, :]).ravel()
        y_out = (np.rint(ys) < section_box_px[1]) | (np.rint(ys) >= section_box_px[3])
        dx, dy = xs[None, :] - off[0], ys[:, None] - off[1]
        xu = (inv[0, 0] * dx + inv[0, 1] * dy).astype(np.float32)
        yu = (inv[1, 0] * dx + inv[1, 1] * dy).astype(np.float32)
        lab, depth = tissue.labels_depth(xu, yu)
        lab[y_out[:, None] | x_out[None, :]] = _BG
        parts.append(_per_bin(lab, depth, rows, n_cols, samples))
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    centre = (out["bin_rc"][:, ::-1].astype(np.float64) + 0.5) * s
    x_um = inv[0, 0] * (centre[:, 0] - off[0]) + inv[0, 1] * (centre[:, 1] - off[1])
    out.update(centre_px=centre, xnorm=tissue.xnorm(x_um).astype(np.float32), bin_um=np.float64(size_um),
               mpp=np.float64(mpp), samples=np.int64(samples), lattice_shape=np.array([n_rows, n_cols], np.int64))
    return out


def _per_bin(lab: np.ndarray, depth: np.ndarray, rows: np.ndarray, n_cols: int, samples: int) -> dict[str, np.ndarray]:
    """Region fractions, tissue fraction and mean tissue depth of the bins of ``rows`` that hold tissue."""
    nr, k = len(rows), samples * samples
    per = lab.reshape(nr, samples, n_cols, samples).transpose(0, 2, 1, 3).reshape(nr * n_cols, k)
    dep = depth.reshape(nr, samples, n_cols, samples).transpose(0, 2, 1, 3).reshape(nr * n_cols, k)
    counts = np.stack([(per == r).sum(axis=1) for r in range(len(REGION_NAMES))], axis=1)
    n_tis = counts.sum(axis=1)
    keep = np.flatnonzero(n_tis > 0)
    tis = per[keep] != _BG
    depth_um = np.where(tis, dep[keep], 0).sum(axis=1) / n_tis[keep]
    rc = np.stack([rows[keep // n_cols], keep % n_cols], axis=1).astype(np.int32)
    return {"bin_rc": rc, "region_fractions": (counts[keep] / k).astype(np.float16),
            "tissue_fraction": (n_tis[keep] / k).astype(np.float32), "depth_um": depth_um.astype(np.float32)}


@dataclass(frozen=True)
class BinModel:
    """The expression model of bins: region log-means ``logmu`` [7, G], gradient slopes ``grad_beta`` [G],
    ``is_x`` [G] (x-gradient genes; the others follow depth) and the cortex thickness ``cortex_um`` (µm)."""

    logmu: np.ndarray
    grad_beta: np.ndarray
    is_x: np.ndarray
    cortex_um: float

    @classmethod
    def from_programme(cls, gp: dict[str, np.ndarray], cortex_um: float) -> BinModel:
        """The model of a gene programme (:func:`hishrst_train.synth.model._gene_programme`)."""
        return cls(np.asarray(gp["logmu"], np.float64), np.asarray(gp["grad_beta"], np.float64),
                   np.asarray(gp["kind"] == "x_gradient"), float(cortex_um))

    def arrays(self) -> dict[str, np.ndarray]:
        """Its arrays as stored in ``truth_bins.npz``."""
        return {"region_log_means": self.logmu, "grad_beta": self.grad_beta, "x_gradient": self.is_x,
                "cortex_um": np.float64(self.cortex_um)}

    def _rate(self, f_in: np.ndarray, depth: np.ndarray, xnorm: np.ndarray, genes: np.ndarray) -> np.ndarray:
        """Unnormalised expected rate ``[n, len(genes)]`` (region mix × gradients), as in ``spot_counts``
        (the gradient factor is evaluated for gradient genes only: it is exactly 1 for the others)."""
        rate = f_in @ np.exp(self.logmu[:, genes])
        moving = np.flatnonzero(self.grad_beta[genes] != 0)
        if moving.size:
            g = np.asarray(genes)[moving]
            rate[:, moving] *= np.exp(log_gradient(self.is_x[g], self.grad_beta[g], cortex_um=self.cortex_um,
                                                   depth_um=np.asarray(depth, np.float64),
                                                   xnorm=np.asarray(xnorm, np.float64)))
        return rate

    def proportions(self, frac: np.ndarray, depth: np.ndarray, xnorm: np.ndarray) -> np.ndarray:
        """Expected proportions ``[n, G]`` (float64, rows sum to 1) of bins with region fractions ``frac``."""
        f = np.asarray(frac, np.float64)
        rate = self._rate(f / f.sum(axis=1, keepdims=True), depth, xnorm, np.arange(len(self.grad_beta)))
        return rate / rate.sum(axis=1, keepdims=True)

    def log_expression(self, frac: np.ndarray, depth: np.ndarray, xnorm: np.ndarray, genes: np.ndarray, *,
                       target_sum: float = 1e4, renormalise: bool = False) -> np.ndarray:
        """``log1p(target_sum · proportion)`` ``[n, len(genes)]`` float32; proportions over all genes, or over
        ``genes`` only with ``renormalise`` (what :func:`hishrst_train.preprocess.log_expression` does for a
        model's gene set). Only the genes asked for and the gradient genes are evaluated."""
        f = np.asarray(frac, np.float64)
        f_in = f / f.sum(axis=1, keepdims=True)
        rate = self._rate(f_in, depth, xnorm, genes)
        if renormalise:
            total = rate.sum(axis=1, keepdims=True)
        else:  # genes without a gradient (grad_beta = 0) add a fixed rate per region
            flat = self.grad_beta == 0
            moving = np.flatnonzero(~flat)
            total = (f_in @ np.exp(self.logmu[:, flat]).sum(axis=1))[:, None]
            total = total + self._rate(f_in, depth, xnorm, moving).sum(axis=1, keepdims=True)
        return np.log1p(target_sum * (rate / total)).astype(np.float32)


def hd_barcodes(rc: np.ndarray, size_um: float) -> np.ndarray:
    """Space Ranger 3 bin barcodes ``s_008um_00012_00034-1`` (size, row, col) of ``rc`` [n, 2] (row, col)."""
    tag = f"s_{int(round(size_um)):03d}um_"
    return np.asarray([f"{tag}{r:05d}_{c:05d}-1" for r, c in np.asarray(rc).tolist()], dtype=object)


def _section_dir(section_dir: str | Path) -> Path:
    p = Path(section_dir)
    return p.parent if p.name == "outs" else p


def load_bins(section_dir: str | Path) -> dict[str, np.ndarray]:
    """``truth_bins.npz`` of a synthetic section (its folder or its ``outs``) as a dict of arrays."""
    path = _section_dir(section_dir) / BINS_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the bin truth ({e}); regenerate the section with `hishrst synth`") from e


def _gene_index(section: Path, genes: Any) -> np.ndarray:
    """Indices of ``genes`` in ``truth.npz``'s gene order (all genes for ``None``)."""
    path = section / "truth.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            names = [str(g) for g in z["gene_names"]]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path}: cannot read the gene names ({e}); regenerate the section with `hishrst synth`") from e
    if genes is None:
        return np.arange(len(names))
    asked = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    where = {g: i for i, g in enumerate(names)}
    unknown = [g for g in asked if g not in where]
    if unknown:
        raise DataError(f"{path}: {len(unknown)} gene(s) not in this section, e.g. {unknown[:3]}; ask for genes of "
                        f"truth.npz's gene_names ({len(names)} genes, e.g. {names[:3]})")
    return np.asarray([where[g] for g in asked], np.int64)


def pool_children(bin_rc: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Bins of the ``factor``-times coarser lattice that ``bin_rc`` [n, 2] fall into: their (row, col)
    ``[m, 2]`` (sorted) and ``[m, factor²]`` indices of their children in ``bin_rc`` (-1: no such bin)."""
    rc = np.asarray(bin_rc, np.int64).reshape(-1, 2)
    big = rc // factor
    width = int(big[:, 1].max()) + 1 if len(rc) else 1
    keys, inverse = np.unique(big[:, 0] * width + big[:, 1], return_inverse=True)
    coarse = np.stack([keys // width, keys % width], axis=1)
    slot = (rc[:, 0] % factor) * factor + rc[:, 1] % factor
    kids = np.full((len(coarse), factor * factor), -1, np.int64)
    kids[inverse.ravel(), slot] = np.arange(len(rc))
    return coarse, kids


def bin_truth(section_dir: str | Path, genes: Any = None, *, size_um: float = 8, rows: Any = None,
              target_sum: float = 1e4, renormalise: bool = False) -> tuple[Any, np.ndarray]:
    """Expected log-normalised expression of the ``size_um`` bins (8 or 16 µm) of a synthetic section.

    Returns ``(table, expression)``: a DataFrame with one row per bin that holds tissue, indexed by its
    Space Ranger 3 barcode (``s_008um_<row>_<col>-1``), with ``array_row``, ``array_col`` (lattice indices),
    ``x_px``, ``y_px`` (bin centre, full-resolution px) and ``tissue_fraction``; and float32
    ``[n_bins, n_genes]`` of ``log1p(target_sum · expected proportion)`` for ``genes`` (default all, in
    ``truth.npz`` order; an unknown gene is a :class:`~hishrst_train.data.DataError`). ``renormalise``:
    proportions over ``genes`` only, as a model trained on those genes is scored.
    ``size_um=16``: bins ``(row // 2, col // 2)``, each the count-space mean of its 8 µm bins weighted by
    their tissue fraction (``log1p`` of the mean of ``expm1``; fully in tissue this is
    :func:`~hishrst_runtime.core.tokens.pool_bins_log1p`). ``rows`` (integer indices into the table of all
    bins) selects bins before anything is computed. Memory: the result is ``n_bins × n_genes`` float32 —
    a DLPFC-sized section has ~700k bins of 8 µm, so pass a gene subset or ``rows``; work is done in chunks.
    """
    import pandas as pd

    factor = RESOLUTION_BINS.get(f"{float(size_um):g}um")
    if factor is None:
        raise DataError(f"{section_dir}: bin size {size_um} µm is not available; pass size_um as one of "
                        f"{[float(r[:-2]) for r in RESOLUTION_BINS]}")
    sec = _section_dir(section_dir)
    gi = _gene_index(sec, genes)
    b = load_bins(sec)
    model = BinModel(b["region_log_means"], b["grad_beta"], b["x_gradient"].astype(bool), float(b["cortex_um"]))
    rc, kids = pool_children(b["bin_rc"], factor)
    sel = np.arange(len(rc)) if rows is None else np.asarray(rows, np.int64).ravel()
    if sel.size and (sel.min() < -len(rc) or sel.max() >= len(rc)):
        raise DataError(f"{sec / BINS_FILE}: rows select bins {sel.min()}..{sel.max()} of {len(rc)}; pass indices "
                        f"into the table of all {size_um:g} µm bins")
    rc, kids = rc[sel], kids[sel]
    tfrac = np.where(kids >= 0, b["tissue_fraction"][kids], 0).astype(np.float64)
    out = np.empty((len(rc), len(gi)), np.float32)
    step = max(1, _CHUNK_VALUES // (max(len(gi), int((model.grad_beta != 0).sum())) * factor * factor))
    for a in range(0, len(rc), step):
        k = kids[a : a + step]
        have = k[k >= 0]
        expr = np.zeros((*k.shape, len(gi)), np.float32)
        expr[k >= 0] = model.log_expression(b["region_fractions"][have], b["depth_um"][have], b["xnorm"][have], gi,
                                            target_sum=target_sum, renormalise=renormalise)
        w = tfrac[a : a + step]
        out[a : a + step] = expr[:, 0] if factor == 1 else aggregate_log1p(expr, w / w.sum(axis=1, keepdims=True))
    side = float(b["bin_um"]) * factor / float(b["mpp"])
    table = pd.DataFrame({"array_row": rc[:, 0].astype(np.int32), "array_col": rc[:, 1].astype(np.int32),
                          "x_px": (rc[:, 1] + 0.5) * side, "y_px": (rc[:, 0] + 0.5) * side,
                          "tissue_fraction": (tfrac.sum(axis=1) / (factor * factor)).astype(np.float32)},
                         index=pd.Index(hd_barcodes(rc, float(b["bin_um"]) * factor), name="barcode"))
    return table, out
