"""The one parity comparison and tolerance table of every export check.

Two checks use it: ONNX Runtime (CPU) against PyTorch fp32 (:mod:`hishrst_export.onnx_export`) and a
TensorRT engine against ONNX Runtime (:mod:`hishrst_export.tensorrt`). :func:`compare` measures,
:func:`passes` judges against a row of :data:`PARITY_TOLERANCE`.

Statistics (all dimensionless): ``max_abs`` = max |got − want|; ``scaled_max_abs`` = ``max_abs`` /
max(1, max |want|); ``min_gene_pcc`` / ``mean_gene_pcc`` = the smallest / mean Pearson correlation per
output column (last axis: per gene for the head, per feature for the encoder; constant columns are
skipped); ``pcc`` = the correlation of all compared values; ``nonfinite`` = values where ``got`` or
``want`` is NaN/inf (``nonfinite_output`` in ``got``, ``nonfinite_reference`` in ``want``); any such
value fails the check, even where both hold the same NaN: a model that outputs NaN/inf is broken whatever
the engine, and agreement on NaN is no parity. ``compared`` = values compared.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["PARITY_TOLERANCE", "Check", "compare", "passes"]

Check = Literal["onnx", "tensorrt"]

#: ``check -> precision -> thresholds``.
#:
#: ``onnx`` (ONNX Runtime CPU vs PyTorch fp32 on the CPU): fp32 is float round-off only: scaled error
#: ≈ 1e-6 (test model ≤ 8e-7, UNI ViT-L with random weights ≤ 1.2e-6), per-column PCC > 0.9999999.
#: fp16 is the accuracy cost of half precision: ≤ 6e-3 scaled / PCC ≥ 0.9997 on the test model,
#: ≤ 1.6e-3 / ≥ 0.9988 (4 tiles) on UNI ViT-L; the tolerance leaves ~3x headroom on the error.
#: ``tensorrt`` (engine vs ONNX Runtime CPU, all values pooled): fp32 engines use TF32 kernels by
#: default, hence the looser fp32 row.
PARITY_TOLERANCE: dict[str, dict[str, dict[str, float]]] = {
    "onnx": {
        "fp32": {"scaled_max_abs": 1e-4, "min_gene_pcc": 0.9999},
        "fp16": {"scaled_max_abs": 2e-2, "min_gene_pcc": 0.995},
    },
    "tensorrt": {
        "fp32": {"scaled_max_abs": 2e-2, "min_pcc": 0.999},
        "fp16": {"scaled_max_abs": 1e-1, "min_pcc": 0.99},
    },
}


def _column_pcc(g: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation per column of two ``[rows, columns]`` arrays (constant columns left out)."""
    gc, wc = g - g.mean(0), w - w.mean(0)
    denom = np.sqrt((gc**2).sum(0) * (wc**2).sum(0))
    ok = denom > 1e-12
    return (gc * wc).sum(0)[ok] / denom[ok]


def compare(got: np.ndarray, want: np.ndarray, *, valid: np.ndarray | None = None) -> dict[str, float]:
    """Statistics of ``got`` against the reference ``want`` (see the module docstring).

    ``valid``: a boolean mask over the leading axes (e.g. the head's ``mask > 0``); masked-out values
    (padding) are not compared. Raises ``ValueError`` when the shapes differ.
    """
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        raise ValueError(f"output shape {g.shape} differs from the reference's {w.shape}")
    if valid is not None:
        g, w = g[valid], w[valid]
    g, w = g.reshape(-1, g.shape[-1] if g.ndim else 1), w.reshape(-1, w.shape[-1] if w.ndim else 1)
    bad_g, bad_w = ~np.isfinite(g), ~np.isfinite(w)
    counts = {"nonfinite": int(np.count_nonzero(bad_g | bad_w)), "nonfinite_output": int(np.count_nonzero(bad_g)),
              "nonfinite_reference": int(np.count_nonzero(bad_w)), "compared": int(g.size)}
    if g.size == 0:
        return {"max_abs": 0.0, "scaled_max_abs": 0.0, "min_gene_pcc": 1.0, "mean_gene_pcc": 1.0, "pcc": 1.0, **counts}
    if counts["nonfinite"]:
        return {"max_abs": float("inf"), "scaled_max_abs": float("inf"), "min_gene_pcc": 0.0, "mean_gene_pcc": 0.0,
                "pcc": 0.0, **counts}
    max_abs = float(np.abs(g - w).max())
    scaled = max_abs / max(1.0, float(np.abs(w).max()))
    cols = _column_pcc(g, w)
    flat_g, flat_w = g.reshape(-1), w.reshape(-1)
    constant = flat_g.size < 2 or flat_g.std() == 0 or flat_w.std() == 0
    pcc = 1.0 if constant else float(np.corrcoef(flat_g, flat_w)[0, 1])  # constant: scaled_max_abs decides
    return {
        "max_abs": max_abs,
        "scaled_max_abs": scaled,
        "min_gene_pcc": float(cols.min()) if cols.size else 1.0,
        "mean_gene_pcc": float(cols.mean()) if cols.size else 1.0,
        "pcc": pcc,
        **counts,
    }


def passes(stats: dict[str, float], tolerance: dict[str, float]) -> bool:
    """Whether ``stats`` meet every threshold in ``tolerance`` (written so that NaN fails)."""
    ok = stats["nonfinite"] == 0 and stats["scaled_max_abs"] <= tolerance["scaled_max_abs"]
    if "min_gene_pcc" in tolerance:
        ok = ok and stats["min_gene_pcc"] >= tolerance["min_gene_pcc"]
    if "min_pcc" in tolerance:
        ok = ok and stats["pcc"] >= tolerance["min_pcc"]
    return bool(ok)
