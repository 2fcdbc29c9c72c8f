"""``hishrst evaluate``: metrics of a fitted run on its held-out spots.

Writes ``metrics.json`` (summary + baselines) and ``per_gene_metrics.csv`` into the run directory.
Recovery runs are scored on the held-out half only. Generation runs have no held-out truth: their
dense predictions are compared at the measured spots only as an in-sample fit, and labelled so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import atomic_write
from hishrst_train.metrics import gene_map_ssim, kmeans_ari, per_gene_metrics, summarise
from hishrst_train.runconfig import RunConfig

__all__ = ["evaluate_run", "EvaluateError"]


class EvaluateError(InputError):
    """The run directory cannot be scored (generation run, missing predictions, not writable)."""


class MissingPredictionsError(EvaluateError, FileNotFoundError):
    """``predictions.h5ad`` is missing: the run is not a finished recovery run."""


def evaluate_run(run_dir: str | Path, *, ssim: bool = True, ari: bool = True) -> dict[str, Any]:
    """Compute per-gene PCC/MSE/MAE, SSIM of gene maps and k-means ARI; write them; return the summary."""
    run_dir = Path(run_dir)
    pred_path = run_dir / "predictions.h5ad"
    cfg_path = run_dir / "config.json"
    task = RunConfig.from_json(cfg_path).task if cfg_path.is_file() else None
    if task == "generation" or (not pred_path.is_file() and (run_dir / "dense.h5ad").is_file()):
        raise EvaluateError(f"{run_dir}: a generation run has no held-out spots to score; evaluate a "
                            "`--task recovery` run")
    if not pred_path.is_file():
        raise MissingPredictionsError(f"{pred_path}: missing; run `hishrst fit DATA --out {run_dir} --task recovery` "
                                      "first")
    res = ad.read_h5ad(pred_path)
    pred = np.asarray(res.X, dtype=np.float64)
    truth = np.asarray(res.layers["truth"], dtype=np.float64)
    m = per_gene_metrics(pred, truth)
    summary: dict[str, Any] = {"model": summarise(m), "n_heldout_spots": int(res.n_obs)}
    per_gene = pd.DataFrame({"gene": res.var_names, "pcc": m["pcc"], "mse": m["mse"], "mae": m["mae"], "constant": m["constant"]})
    if ssim:
        s = gene_map_ssim(pred, truth, res.obs["array_row"].to_numpy(), res.obs["array_col"].to_numpy())
        per_gene["ssim"] = s
        summary["model"]["ssim_mean"] = float(np.nanmean(s))
    if ari and "layer" in res.obs:
        labels = res.obs["layer"].astype(str).to_numpy()
        summary["ari_prediction"] = kmeans_ari(pred, labels)
        summary["ari_measured"] = kmeans_ari(truth, labels)
    # Mean-expression baseline: the held-out mean of the training data is unknown here, so use the
    # measured held-out mean (an optimistic baseline for MSE); its PCC is undefined (constant).
    base = np.broadcast_to(truth.mean(0), truth.shape)
    summary["baseline_mean"] = summarise(per_gene_metrics(base, truth))
    try:
        atomic_write(run_dir / "per_gene_metrics.csv", per_gene.to_csv(index=False).encode())
        atomic_write(run_dir / "metrics.json", (json.dumps(summary, indent=2) + "\n").encode())
    except PermissionError as e:
        raise EvaluateError(f"{run_dir}: not writable ({e.strerror}); fix its permissions or copy the run") from e
    return summary
