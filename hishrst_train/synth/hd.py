"""A synthetic section in the Visium HD layout of Space Ranger 3 (``hishrst synth --platform visium-hd``).

Per section, under ``outs/binned_outputs/``::

    square_008um/filtered_feature_bc_matrix.h5         10x HDF5 matrix of the in-tissue 8 µm bins
    square_008um/spatial/tissue_positions.parquet      every bin of the image's lattice: barcode, in_tissue,
                                                       array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres
    square_008um/spatial/scalefactors_json.json        spot_diameter_fullres (= bin side, px), bin_size_um,
                                                       microns_per_pixel, regist_target_img_scalef,
                                                       tissue_lowres_scalef, tissue_hires_scalef
    square_008um/spatial/tissue_hires_image.png, tissue_lowres_image.png
    square_008um/spatial/ground_truth_layers.csv       barcode,layer (majority region; not a Space Ranger file)
    square_016um/...                                   the same for 16 µm bins

and ``image.tif`` beside ``outs/`` as for Visium. What was checked against published descriptions of Space
Ranger 3 Visium HD output (no real HD data set is available here): the folder names ``binned_outputs/``
``square_002um|008um|016um/``, the file names above, the parquet's six columns in that order, barcodes
``s_008um_<row:05d>_<col:05d>-1``, and the scale-factor keys (``spot_diameter_fullres`` is the bin side in
full-resolution px, ``bin_size_um`` the bin side in µm, ``microns_per_pixel`` the image's pixel size).
Not reproduced: the 2 µm bins, ``raw_feature_bc_matrix.h5``, ``fiducial_diameter_fullres``, the analysis
folders, a rotated array (the synthetic lattice is axis-aligned in image pixels, bin (0, 0) at pixel (0, 0),
as in ``truth_bins.npz``) and Space Ranger's 6000-px hires image (hires is 2000 px, as for Visium).

Counts: per 8 µm bin, negative binomial (the gene's dispersion of the spot model) around its expected
proportions (:class:`~hishrst_train.synth.bins.BinModel`) times a library size scaled by area from the
preset's ``mean_umis`` (a 55 µm disk ↔ an 8 µm square: ≈ 2.7 %, so tens of UMIs per bin), the region's
UMI yield and the bin's tissue fraction, with the spot model's log-normal library noise. A 16 µm bin holds
the sums of its four 8 µm bins. Bins are in tissue when their tissue fraction is ≥ 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from hishrst_runtime.core.extras import MissingExtraError
from hishrst_runtime.core.geometry import VISIUM_SPOT_DIAMETER_UM
from hishrst_train.data.visium_hd import BINNED_OUTPUTS, square_dir_name
from hishrst_train.synth.bins import BIN_UM, BinModel, hd_barcodes, pool_children
from hishrst_train.synth.model import REGION_NAMES, UMI_FACTOR, SynthPreset

__all__ = ["HD_SIZES_UM", "AREA_RATIO", "hd_counts", "write_visium_hd"]

#: Bin sides written (µm): the 8 µm bins and their 2 × 2 sums.
HD_SIZES_UM: tuple[float, ...] = (BIN_UM, 2 * BIN_UM)
#: Area of one 8 µm bin over that of a 55 µm Visium spot disk (scales the library size).
AREA_RATIO = BIN_UM**2 / (np.pi * (VISIUM_SPOT_DIAMETER_UM / 2.0) ** 2)
_CHUNK_VALUES = 2_000_000  # bins × genes drawn at once


def _nb_sparse(mu: np.ndarray, theta: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Negative-binomial draws of means ``mu`` [n, G] (dispersions ``theta`` [G]) as COO ``(row, col, count)``.

    Exact and sparse: NB(μ, θ) is a Poisson(θ·log(1 + μ/θ)) number of clusters with Logarithmic(μ / (μ + θ))
    sizes, so only the (tens of) clusters of each bin are drawn, not one gamma and one Poisson per entry."""
    n, g = mu.shape
    r = np.log1p(mu / theta[None, :])
    r *= theta[None, :]
    cum = np.cumsum(r, axis=1)
    total = cum[:, -1]
    k = rng.poisson(total)
    b = np.repeat(np.arange(n), k)
    u = rng.random(len(b)) * total[b]
    gene = np.empty(len(b), np.int64)
    starts = np.concatenate([[0], np.cumsum(k)])
    for row in np.flatnonzero(k):  # the clusters of one bin → genes, by inverse CDF
        a, z = starts[row], starts[row + 1]
        gene[a:z] = np.searchsorted(cum[row], u[a:z], side="right")
    gene = np.minimum(gene, g - 1)
    m = mu[b, gene]
    size = rng.logseries(m / (m + theta[gene]))
    return b, gene, size


def hd_counts(bins: dict[str, np.ndarray], model: BinModel, *, mean_umis: float, theta: np.ndarray,
              rng: np.random.Generator) -> sp.csr_matrix:
    """Counts ``[n_bins, G]`` (CSR int32) of the 8 µm bins of ``bins`` (``truth_bins.npz`` arrays)."""
    frac = bins["region_fractions"].astype(np.float64)
    tfrac = frac.sum(axis=1)
    n, g = len(frac), len(theta)
    lib = mean_umis * AREA_RATIO * ((frac / tfrac[:, None]) @ UMI_FACTOR) * tfrac * np.exp(rng.normal(0.0, 0.3, n))
    step = max(1, _CHUNK_VALUES // g)
    parts = []
    for a in range(0, n, step):
        sl = slice(a, min(n, a + step))
        mu = model.proportions(frac[sl], bins["depth_um"][sl], bins["xnorm"][sl])
        mu *= lib[sl, None]
        b, gene, size = _nb_sparse(mu, theta, rng)
        block = sp.coo_matrix((size.astype(np.int32), (b.astype(np.int32), gene.astype(np.int32))), shape=mu.shape)
        parts.append(block.tocsr())  # duplicate (bin, gene) clusters are summed
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, g), dtype=np.int32)


def _level(bins: dict[str, np.ndarray], counts8: sp.csr_matrix, size_um: float) -> dict[str, Any]:
    """Bins of one size with tissue: (row, col), region fractions, tissue fraction and counts (sums of 8 µm)."""
    frac = bins["region_fractions"].astype(np.float64)
    factor = int(round(size_um / BIN_UM))
    if factor == 1:
        return {"rc": bins["bin_rc"], "frac": frac, "counts": counts8}
    coarse, kids = pool_children(bins["bin_rc"], factor)
    parent = np.repeat(np.arange(len(coarse)), kids.shape[1])
    has = kids.ravel() >= 0
    pool = sp.csr_matrix((np.ones(int(has.sum()), np.int32), (parent[has], kids.ravel()[has])),
                         shape=(len(coarse), counts8.shape[0]))
    return {"rc": coarse, "frac": (pool @ frac) / factor**2, "counts": (pool @ counts8).tocsr().astype(np.int32)}


def _write_positions(path: Path, *, rc: np.ndarray, in_tissue: np.ndarray, shape: tuple[int, int], side_px: float,
                     size_um: float) -> None:
    """``tissue_positions.parquet``: every bin of the ``shape`` (rows, cols) lattice, in barcode order."""
    import pandas as pd

    flag = np.zeros(shape, np.int32)
    flag[rc[:, 0], rc[:, 1]] = in_tissue.astype(np.int32)
    rr, cc = (a.ravel().astype(np.int32) for a in np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"))
    df = pd.DataFrame({"barcode": hd_barcodes(np.stack([rr, cc], axis=1), size_um), "in_tissue": flag.ravel(),
                       "array_row": rr, "array_col": cc, "pxl_row_in_fullres": (rr + 0.5) * side_px,
                       "pxl_col_in_fullres": (cc + 0.5) * side_px})
    try:
        df.to_parquet(path, index=False)
    except ImportError as e:
        raise MissingExtraError(f"{path}: writing the Visium HD positions needs a parquet engine, which is not "
                                f"installed ({e}); pip install pyarrow") from e


def write_visium_hd(outs: Path, *, p: SynthPreset, gp: dict[str, np.ndarray], bins: dict[str, np.ndarray],
                    model: BinModel, scales: tuple[float, float], rng: np.random.Generator,
                    library_id: str) -> list[Path]:
    """Write ``outs/binned_outputs/square_008um`` and ``square_016um`` (see the module docstring) from the bin
    truth ``bins``; ``scales``: (hires, lowres) image scale factors. Returns the ``spatial/`` folders (the
    caller writes the PNGs there once the image exists)."""
    from hishrst_train.data.tenx import _write_10x_arrays

    counts8 = hd_counts(bins, model, mean_umis=p.mean_umis, theta=np.asarray(gp["theta"], np.float64), rng=rng)
    n8 = bins["lattice_shape"]
    spatial_dirs = []
    for size in HD_SIZES_UM:
        lv = _level(bins, counts8, size)
        factor = int(round(size / BIN_UM))
        d = outs / BINNED_OUTPUTS / square_dir_name(size)
        (d / "spatial").mkdir(parents=True, exist_ok=True)
        keep = np.flatnonzero(lv["frac"].sum(axis=1) >= 0.5)
        barcodes = hd_barcodes(lv["rc"][keep], size)
        _write_10x_arrays(d / "filtered_feature_bc_matrix.h5", lv["counts"][keep], barcodes=barcodes,
                          names=gp["names"], ids=gp["ids"], feature_types=np.full(p.n_genes, "Gene Expression"),
                          genomes=np.full(p.n_genes, "GRCh38"), library_id=library_id,
                          chemistry_description="Visium HD v1", software_version="spaceranger-3.0.0 (hishrst synthetic)")
        in_tissue = np.zeros(len(lv["rc"]), bool)
        in_tissue[keep] = True
        side = size / p.mpp
        _write_positions(d / "spatial" / "tissue_positions.parquet", rc=lv["rc"], in_tissue=in_tissue,
                         shape=(-(-int(n8[0]) // factor), -(-int(n8[1]) // factor)), side_px=side, size_um=size)
        majority = np.asarray(REGION_NAMES)[np.argmax(lv["frac"][keep], axis=1)]
        (d / "spatial" / "ground_truth_layers.csv").write_text(
            "barcode,layer\n" + "".join(f"{b},{m}\n" for b, m in zip(barcodes, majority)))
        sf = {"spot_diameter_fullres": side, "bin_size_um": float(size), "microns_per_pixel": float(p.mpp),
              "regist_target_img_scalef": scales[0], "tissue_lowres_scalef": scales[1],
              "tissue_hires_scalef": scales[0]}
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
        spatial_dirs.append(d / "spatial")
    return spatial_dirs
