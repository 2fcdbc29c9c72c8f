"""Who trains on what: the spot split, the genes and their targets, and the neighbour groups of a fit.

* :func:`spot_split` — the recovery task's seeded half of the spots (per section, :func:`section_seed`);
* :func:`build_targets` — genes (intersection over sections, HVGs on training spots only) and the model's
  target for each spot (:func:`hishrst_train.preprocess.log_expression`, per section);
* :func:`training_groups` — training and validation neighbour groups, never spanning sections; validation
  takes whole groups (as dense as training and inference groups).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.grouping import group_points
from hishrst_train.data.sections import Section
from hishrst_train.runconfig import Task

__all__ = ["TARGET_SUM", "FitError", "Targets", "build_targets", "dropped_genes", "section_seed", "spot_split",
           "training_groups"]

log = logging.getLogger("hishrst")

#: Counts per spot after normalisation (``log1p`` of counts per 10k).
TARGET_SUM = 1e4


class FitError(InputError):
    """Fit inputs or options that cannot work (the message names the file or option and the fix)."""


def spot_split(n: int, seed: int) -> np.ndarray:
    """Boolean train mask: a seeded random half of the spots."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: n // 2]] = True
    return mask


def section_seed(seed: int, i: int) -> int:
    """Seed of section ``i`` (section 0 keeps ``seed``, so one-section runs split as before)."""
    return seed + 1000 * i


@dataclass(frozen=True)
class Targets:
    """Genes, per-section train masks and log-normalised expression, concatenated over sections."""

    genes: list[str]
    train_mask: np.ndarray  # [N] over all sections
    expr: np.ndarray  # [N, G] float32
    offsets: np.ndarray  # [S + 1] first row of each section
    #: Genes measured in some sections but not all, left out by the intersection (sorted).
    dropped_genes: list[str] = field(default_factory=list)


def _common_genes(secs: list[Section]) -> list[str]:
    genes = [str(g) for g in secs[0].adata.var_names]
    for s in secs[1:]:
        have = set(map(str, s.adata.var_names))
        genes = [g for g in genes if g in have]
    if not genes:
        raise FitError(f"the sections share no gene names ({', '.join(s.name for s in secs)}); use sections measured "
                       "with the same gene annotation (symbols)")
    return genes


def dropped_genes(secs: list[Section]) -> list[str]:
    """Genes some sections measured but not all (left out by the intersection), sorted; logged as a warning
    with their count and a few names."""
    if len(secs) < 2:
        return []
    every = set(_common_genes(secs))
    dropped = sorted({str(g) for s in secs for g in s.adata.var_names} - every)
    if dropped:
        per = ", ".join(f"{s.name}: {sum(str(g) not in every for g in s.adata.var_names)}" for s in secs)
        log.warning("%d genes are not measured in every section and are left out (%s; e.g. %s); use sections "
                    "with the same gene annotation to keep them", len(dropped), per, ", ".join(dropped[:5]))
    return dropped


def _select_genes(secs: list[Section], masks: list[np.ndarray], *, n_genes: int, pooled_train: bool,
                  counts: str = "raw") -> list[str]:
    """HVGs on the training spots (all spots when not ``pooled_train``), sections as Seurat v3 batches."""
    from hishrst_train.preprocess import select_hvgs

    if len(secs) == 1:
        return select_hvgs(secs[0].adata, n_top=n_genes, train_mask=masks[0] if pooled_train else None,
                           counts=counts)
    common = _common_genes(secs)
    rows = [m if pooled_train else np.ones_like(m) for m in masks]
    parts = [s.adata[r][:, common].X for s, r in zip(secs, rows)]
    X = sp.vstack([sp.csr_matrix(p) for p in parts]).tocsr()
    pooled = ad.AnnData(X=X, var=pd.DataFrame(index=pd.Index(common)))
    batch = np.repeat(np.arange(len(secs)), [int(r.sum()) for r in rows])
    return select_hvgs(pooled, n_top=n_genes, batch=batch, counts=counts)


def build_targets(secs: list[Section], *, task: Task, seed: int, n_genes: int, counts: str = "raw") -> Targets:
    """Train masks, selected genes (from training spots only) and log-normalised expression; ``counts``:
    what the sections' matrices hold (``raw`` counts or ``log``-normalised values, see ``--counts``)."""
    from hishrst_train.preprocess import log_expression

    masks = [spot_split(s.adata.n_obs, section_seed(seed, i)) if task == "recovery" else np.ones(s.adata.n_obs, bool)
             for i, s in enumerate(secs)]
    dropped = dropped_genes(secs)
    genes = list(_select_genes(secs, masks, n_genes=n_genes, pooled_train=task == "recovery", counts=counts))
    expr = [log_expression(s.adata, genes, target_sum=TARGET_SUM) for s in secs]
    offsets = np.concatenate([[0], np.cumsum([s.adata.n_obs for s in secs])])
    return Targets(genes=genes, train_mask=np.concatenate(masks), expr=np.concatenate(expr), offsets=offsets,
                   dropped_genes=dropped)


def _train_groups(xy: np.ndarray, train_mask: np.ndarray, *, seed: int, val_frac: float, max_group: int
                  ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """One section's training spots (validation removed), their neighbour groups and the validation groups.

    Validation takes whole neighbour groups of the training spots (seeded, about ``val_frac`` of the spots),
    so validation groups are as dense as training groups and as the groups met at inference: a random
    sample of spots grouped among itself would be sparser, which misleads early stopping for position modes
    that see distances within a group (``relative``)."""
    train_idx = np.flatnonzero(train_mask)
    groups = [train_idx[g] for g in group_points(xy[train_idx], max_size=max_group)]
    if val_frac <= 0 or len(groups) < 2:
        return train_idx, groups, []
    order = np.random.default_rng(seed + 1).permutation(len(groups))
    sizes = np.cumsum([len(groups[k]) for k in order])
    n_val_groups = int(np.clip(np.searchsorted(sizes, len(train_idx) * val_frac) + 1, 1, len(groups) - 1))
    is_val = np.zeros(len(groups), bool)
    is_val[order[:n_val_groups]] = True
    val_groups = [g for g, v in zip(groups, is_val) if v]
    train_groups = [g for g, v in zip(groups, is_val) if not v]
    return np.sort(np.concatenate(train_groups)), train_groups, val_groups


def training_groups(secs: list[Section], t: Targets, *, seed: int, val_frac: float, max_group: int
                    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray] | None]:
    """Training rows, training groups and validation groups over all sections (global row indices);
    ``max_group``: largest group (spots)."""
    train_idx, groups, val_groups = [], [], []
    for i, s in enumerate(secs):
        lo, hi = t.offsets[i], t.offsets[i + 1]
        ti, g, vg = _train_groups(s.xy, t.train_mask[lo:hi], seed=section_seed(seed, i), val_frac=val_frac,
                                  max_group=max_group)
        train_idx.append(ti + lo)
        groups += [x + lo for x in g]
        val_groups += [x + lo for x in vg]
    return np.concatenate(train_idx), groups, val_groups or None


