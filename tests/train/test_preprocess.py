"""Preprocessing: Seurat v3 HVGs on training spots only (no leakage), per-spot log-normalisation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from hishrst_train.data import read_visium
from hishrst_train.preprocess import normalize_log1p, preprocess, select_hvgs
from hishrst_train.synth import make_synthetic_visium


@pytest.fixture(scope="module")
def adata(tmp_path_factory: pytest.TempPathFactory):
    outs = make_synthetic_visium(tmp_path_factory.mktemp("synth_pp") / "s", preset="small", seed=3)
    return read_visium(outs, load_images=False)


def _half(n: int, seed: int = 0) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return mask


def test_hvgs_basic(adata) -> None:
    genes = select_hvgs(adata, n_top=50)
    assert len(genes) == 50 and len(set(genes)) == 50
    order = [adata.var_names.get_loc(g) for g in genes]
    assert order == sorted(order)  # deterministic: adata.var_names order
    assert genes == select_hvgs(adata, n_top=50)


def test_hvg_no_leakage(adata) -> None:
    mask = _half(adata.n_obs)
    before = select_hvgs(adata, n_top=50, train_mask=mask)
    before_all = select_hvgs(adata, n_top=50)
    # scramble the held-out spots' counts: gene selection on train spots must not move
    mod = adata.copy()
    X = mod.X.toarray()
    rng = np.random.default_rng(1)
    held = np.flatnonzero(~mask)
    X[held] = rng.poisson(rng.gamma(0.3, 50.0, size=(len(held), X.shape[1]))).astype(np.float32)
    mod.X = sp.csr_matrix(X)
    assert select_hvgs(mod, n_top=50, train_mask=mask) == before
    assert select_hvgs(mod, n_top=50, train_mask=np.flatnonzero(mask)) == before  # index form
    assert select_hvgs(mod, n_top=50) != before_all  # the change does matter when all spots are used


def test_fewer_genes_than_n_top(adata, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hishrst"), pytest.warns(UserWarning, match="using all genes"):
        genes = select_hvgs(adata, n_top=1000)
    assert genes == list(adata.var_names)
    assert "using all genes" in caplog.text


def test_hvg_input_checks(adata) -> None:
    with pytest.raises(ValueError, match="raw counts"):
        select_hvgs(normalize_log1p(adata), n_top=50)
    with pytest.raises(ValueError, match="train_mask"):
        select_hvgs(adata, n_top=50, train_mask=np.ones(3, dtype=bool))


def test_normalize_log1p() -> None:
    X = np.array([[1, 0, 3], [0, 0, 0], [10, 10, 0]], dtype=np.float32)
    dense = normalize_log1p(X)
    assert dense.dtype == np.float32
    np.testing.assert_allclose(np.expm1(dense[[0, 2]]).sum(1), 1e4, rtol=1e-5)
    assert (dense[1] == 0).all()  # empty spot stays zero, no NaN
    np.testing.assert_allclose(dense[0], np.log1p(X[0] / 4 * 1e4), rtol=1e-6)
    sparse = normalize_log1p(sp.csr_matrix(X), target_sum=1e4)
    assert sp.issparse(sparse) and sparse.dtype == np.float32
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-6)
    # per spot: a spot's values do not depend on the other spots
    np.testing.assert_allclose(normalize_log1p(X[:1]), dense[:1])


def test_normalize_anndata(adata) -> None:
    counts = adata.X.toarray().astype(np.float64)
    ref = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)  # normalize_total + log1p
    ours = normalize_log1p(adata)
    assert ours is not adata and ours.X.dtype == np.float32
    np.testing.assert_allclose(ours.X.toarray(), ref, rtol=1e-5, atol=1e-6)
    assert (ours.layers["counts"] != adata.X).nnz == 0 and (adata.X != ours.layers["counts"]).nnz == 0


def test_preprocess(adata) -> None:
    mask = _half(adata.n_obs, seed=2)
    out = preprocess(adata, n_top=40, train_mask=mask)
    assert out.shape == (adata.n_obs, 40)
    assert list(out.var_names) == select_hvgs(adata, n_top=40, train_mask=mask)
    assert out.X.dtype == np.float32 and "counts" in out.layers
    assert out.uns["hishrst_preprocess"]["train_only"] is True
    assert "hishrst" in out.uns and "spatial" in out.obsm
    assert isinstance(Path(out.uns["hishrst"]["fullres_image"]), Path)
