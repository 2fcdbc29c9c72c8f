"""The baselines wired into fit, evaluate and cv: what a run stores, what evaluate scores and prints."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("torch")

from hishrst_train.baselines import RIDGE_FILE, RidgeBaseline, knn_positions  # noqa: E402
from hishrst_train.cv import cv_warnings  # noqa: E402
from hishrst_train.evaluate import evaluate_run, format_scores  # noqa: E402


def test_recovery_run_stores_the_ridge_fitted_on_training_spots_only(small_run):
    ridge = RidgeBaseline.load(small_run / RIDGE_FILE)
    base = json.loads((small_run / "baseline.json").read_text())
    split = json.loads((small_run / "split.json").read_text())
    pred = ad.read_h5ad(small_run / "predictions.h5ad")
    # the ridge's intercept is the mean target of the rows it was fitted on: the training spots (with the
    # validation spots, as baseline.json); the held-out spots' mean is different
    np.testing.assert_allclose(ridge.intercept, base["train_mean"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ridge.intercept, np.asarray(pred.layers["truth"]).mean(0), atol=1e-3)
    assert len(split["train"]) + len(split["validation"]) > ridge.components.shape[0]


def test_recovery_predictions_carry_the_baselines_and_evaluate_scores_them(small_run, small_section, tmp_path):
    from hishrst_train.tasks import load_section

    pred = ad.read_h5ad(small_run / "predictions.h5ad")
    assert {"baseline_ridge", "baseline_knn"} <= set(pred.layers)
    assert pred.layers["baseline_ridge"].shape == pred.shape
    # kNN: the mean of the 6 nearest training (+ validation) spots of the section, distances in µm
    from hishrst_train.preprocess import log_expression
    from hishrst_train.targets import TARGET_SUM

    adata = load_section(small_section)
    split = json.loads((small_run / "split.json").read_text())
    train = adata.obs_names.isin(split["train"] + split["validation"]).astype(bool)
    um = np.asarray(adata.obsm["spatial"], np.float64) * float(adata.uns["hishrst"]["mpp"])
    expr = log_expression(adata, list(pred.var_names), target_sum=TARGET_SUM)
    held = adata.obs_names.get_indexer(pred.obs_names)
    want = knn_positions(um[train], expr[train], um[held])
    np.testing.assert_allclose(pred.layers["baseline_knn"], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(pred.layers["baseline_knn"], pred.layers["truth"])

    run = tmp_path / "run"
    import shutil

    shutil.copytree(small_run, run)
    s = evaluate_run(run, ssim=False, ari=False)
    for key in ("baseline_ridge", "baseline_knn", "baseline_train_mean"):
        assert np.isfinite(s[key]["mse_mean"]), key
    assert isinstance(s["warnings"], list)
    table = pd.read_csv(run / "per_gene_metrics.csv")
    assert {"pcc_ridge", "mse_ridge", "pcc_knn", "mse_knn", "mse_train_mean"} <= set(table.columns)
    lines = format_scores(s)
    assert any(line.startswith("ridge (embeddings)") for line in lines)
    assert any(line.startswith("kNN (positions)") for line in lines)


def _summary(model_mse: float, model_pcc: float) -> dict:
    row = {"pcc_mean": model_pcc, "pcc_mean_constant_as_zero": model_pcc, "mse_mean": model_mse, "mae_mean": 0.5,
           "n_genes": 10, "n_constant": 0}
    return {"n_heldout_spots": 100, "model": row,
            "baseline_train_mean": {"pcc_mean": float("nan"), "pcc_mean_constant_as_zero": 0.0, "mse_mean": 1.0,
                                    "mae_mean": 0.8},
            "baseline_ridge": {"pcc_mean": 0.3, "pcc_mean_constant_as_zero": 0.3, "mse_mean": 0.9, "mae_mean": 0.7},
            "baseline_mean": {"pcc_mean": float("nan"), "pcc_mean_constant_as_zero": 0.0, "mse_mean": 0.95,
                              "mae_mean": 0.75}}


def test_format_scores_rows_and_warning_lines():
    from hishrst_train.baselines import baseline_warnings

    s = _summary(1.2, 0.1)
    s["warnings"] = baseline_warnings(s)
    lines = format_scores(s)
    rows = {ln.split("  ")[0]: ln for ln in lines}
    assert "model" in rows and "training mean" in rows and "ridge (embeddings)" in rows
    assert "kNN (positions)" not in rows  # not in the summary: not printed
    assert rows["training mean"].split()[2:4] == ["n/a", "0.0000"] and rows["training mean"].split()[4] == "1.0000"
    warn = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warn) == 2 and "WORSE" in warn[0] and "BELOW" in warn[1]
    good = _summary(0.8, 0.4)
    good["warnings"] = baseline_warnings(good)
    assert not [ln for ln in format_scores(good) if ln.startswith("warning:")]


def test_cv_warnings_name_the_fold_and_the_mean():
    rows = [{"fold": 0, "heldout": "a", "pcc_mean": 0.4, "mse_mean": 0.9, "mse_train_mean_baseline": 1.0,
             "pcc_ridge_baseline": 0.3},
            {"fold": 1, "heldout": "b", "pcc_mean": 0.1, "mse_mean": 1.3, "mse_train_mean_baseline": 1.0,
             "pcc_ridge_baseline": 0.3}]
    table = pd.DataFrame(rows)
    mean = {"fold": "mean", "heldout": "", **{c: float(table[c].mean()) for c in table.columns[2:]}}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    w = cv_warnings(table)
    assert [x.split(":")[0] for x in w] == ["fold 1 (b)", "fold 1 (b)", "mean over folds", "mean over folds"]
    assert "WORSE" in w[0] and "BELOW" in w[1]


def _toy(signal: float, seed: int = 0, n: int = 600, d: int = 16, g: int = 30):
    """Spots on a 100-µm lattice; features ~ N(0, 1); targets = per-gene mean + signal · linear + noise (≥ 0)."""
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(30), np.arange(n // 30)), -1).reshape(-1, 2)[:n] * 100.0
    f = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.uniform(0.5, 3.0, g) + f @ (rng.normal(size=(d, g)) * signal) + rng.normal(size=(n, g)) * rng.uniform(0.3, 1.5, g)
    return xy, f, np.clip(y, 0, None).astype(np.float32)


def _unseen_mse_ratio(signal: float, head_hidden: int | None = None, **train: object) -> float:
    """Model MSE / training-mean MSE on 200 spots never trained on (400 train, one validation group)."""
    import torch

    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.model import HisHRSTConfig
    from hishrst_train.train import TrainConfig, predict, train_model

    xy, f, y = _toy(signal)
    tr, te = np.arange(400), np.arange(400, 600)
    groups = [tr[g] for g in group_points(xy[tr], max_size=50)]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, _ = train_model(f, xy, y, groups=groups[1:], val_groups=groups[:1], progress=False,
                               model_config=HisHRSTConfig(feature_dim=16, n_genes=30, head_hidden=head_hidden or
                                                          HisHRSTConfig.head_hidden), train_config=TrainConfig(**train))
    finally:
        torch.set_num_threads(before)
    assert model.output_affine is None  # folded: the saved model is the plain architecture
    pred = predict(model, f, xy, groups=[te[g] for g in group_points(xy[te], max_size=50)])[te]
    return float(((pred - y[te]) ** 2).mean() / ((y[tr].mean(0) - y[te]) ** 2).mean())


def test_default_training_falls_back_to_the_training_mean_on_uninformative_features():
    # features carry nothing: the defaults (head initialised at the training mean, standardised targets, 256
    # wide) stay at the mean; the reference recipe (2048 wide, random output layer, raw targets) ends well above it
    assert _unseen_mse_ratio(0.0) < 1.03
    assert _unseen_mse_ratio(0.0, head_hidden=2048, target_scaling="none", init_output="default") > 1.1


def test_default_training_learns_a_real_signal():
    assert _unseen_mse_ratio(0.15) < 0.88
