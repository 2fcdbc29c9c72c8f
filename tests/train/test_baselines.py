"""The baselines scored beside every result: PCA + ridge on embeddings, position kNN, the warning rule."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_train.baselines import RidgeBaseline, baseline_warnings, fit_ridge, knn_positions
from hishrst_train.metrics import per_gene_metrics


def _linear_data(n: int, d: int = 40, g: int = 5, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d))
    w = rng.normal(size=(d, g)) * 0.3
    y = f @ w + 2.0 + noise * rng.normal(size=(n, g))
    return f, y


def test_ridge_recovers_a_linear_signal_on_unseen_rows():
    f, y = _linear_data(600)
    r = fit_ridge(f[:400], y[:400])
    m = per_gene_metrics(r.predict(f[400:]), y[400:])
    mean = per_gene_metrics(np.broadcast_to(y[:400].mean(0), y[400:].shape), y[400:])
    assert np.nanmean(m["pcc"]) > 0.9
    assert m["mse"].mean() < 0.25 * mean["mse"].mean()


def test_ridge_penalty_grows_when_the_signal_is_noise():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 60))
    pure_noise = fit_ridge(f, rng.normal(size=(300, 3)))
    signal = fit_ridge(*_linear_data(300, d=60, g=3, noise=0.01))
    assert pure_noise.alpha > signal.alpha
    # with noise targets the ridge shrinks towards the mean: predictions vary little
    assert pure_noise.predict(f).std(0).mean() < 0.5


def test_ridge_components_are_capped_by_rows_and_width(tmp_path):
    f, y = _linear_data(50, d=300)
    r = fit_ridge(f, y)
    assert r.components.shape == (49, 300)
    path = r.save(tmp_path / "b.npz")
    back = RidgeBaseline.load(path)
    np.testing.assert_array_equal(back.predict(f), r.predict(f))
    assert back.alpha == r.alpha


def test_knn_positions_averages_nearest_training_spots():
    xy = np.array([[0, 0], [1, 0], [10, 10], [11, 10]], float)
    y = np.array([[1.0], [3.0], [10.0], [20.0]])
    out = knn_positions(xy, y, np.array([[0.4, 0.0], [10.6, 10.0]]), k=2)
    np.testing.assert_allclose(out[:, 0], [2.0, 15.0])


@pytest.mark.parametrize(("model", "expect"), [
    ({"mse_mean": 1.2, "pcc_mean": 0.1}, ["WORSE than predicting", "BELOW a ridge"]),
    ({"mse_mean": 0.8, "pcc_mean": 0.4}, []),
])
def test_warnings_name_the_baseline_and_the_margin(model, expect):
    s = {"model": model, "baseline_train_mean": {"mse_mean": 1.0}, "baseline_ridge": {"pcc_mean": 0.3}}
    w = baseline_warnings(s)
    assert len(w) == len(expect)
    for text, key in zip(w, expect):
        assert key in text
    if expect:
        assert "+0.2000" in w[0] and "-0.2000" in w[1]
