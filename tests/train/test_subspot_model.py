"""The sub-spot head: shapes, count-space aggregation, invariances and learning token-level truth from spots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hishrst_runtime.core.tokens import TokenGeometry, aggregate_log1p
from hishrst_train.subspot import SubspotConfig, SubspotHead, aggregate_tokens
from hishrst_train.subspot_train import TokenRows, predict_spots, predict_tokens, spot_weights, train_subspot
from hishrst_train.train import TrainConfig

GEOM = TokenGeometry(grid=(14, 14), input_size=224, pitch_um=8.0)


def _config(width: int = 8, genes: int = 3) -> SubspotConfig:
    return SubspotConfig(width=width, n_genes=genes, geometry=GEOM.to_dict(), head_hidden=32, dim_head=8, dropout=0.0)


def test_shapes_and_positive_output() -> None:
    torch.manual_seed(0)
    m = SubspotHead(_config()).eval()
    out = m(torch.randn(2, 14, 14, 8))
    assert out.shape == (2, 14, 14, 3) and bool((out >= 0).all())


def test_torch_and_numpy_aggregation_agree() -> None:
    pred = torch.rand(4, 196, 5) * 3
    w = torch.from_numpy(spot_weights(_config()).astype(np.float32))
    np.testing.assert_allclose(aggregate_tokens(pred, w).numpy(), aggregate_log1p(pred.numpy(), w.numpy()), rtol=1e-5)


def test_prediction_of_a_token_does_not_depend_on_where_it_sits() -> None:
    """No absolute positions: a tile shifted by whole tokens (wrapped) predicts the same for interior
    tokens whose neighbourhood is unchanged up to attention over the whole tile — exact for a transpose."""
    torch.manual_seed(1)
    m = SubspotHead(_config()).eval()
    with torch.no_grad():
        m.attn.pair.weight.normal_()  # a non-zero distance bias
    x = torch.randn(1, 14, 14, 8)
    a = m(x)
    b = m(x.transpose(1, 2)).transpose(1, 2)  # reflection about the diagonal keeps every pairwise distance
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _deconvolution_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles of two 'regions' split by a random straight boundary; token features say the region (noisy);
    spot targets are the count-space disk aggregate of the regions' expression."""
    expr = np.log1p(np.array([[20.0, 1.0, 5.0], [1.0, 20.0, 5.0]]))  # region × gene
    yy, xx = np.mgrid[0:14, 0:14] - 6.5
    tokens = np.empty((n, 14, 14, 8), np.float32)
    truth = np.empty((n, 14, 14, 3), np.float32)
    for i in range(n):
        ang, off = rng.uniform(0, 2 * np.pi), rng.uniform(-5, 5)
        region = ((np.cos(ang) * xx + np.sin(ang) * yy) > off).astype(int)
        tokens[i] = rng.normal(0, 0.3, (14, 14, 8))
        tokens[i, ..., 0] += 2 * region - 1
        truth[i] = expr[region]
    w = spot_weights(_config())
    spots = aggregate_log1p(truth.reshape(n, 196, 3), w)
    return tokens, truth, spots


def test_learns_token_expression_from_spot_measurements() -> None:
    rng = np.random.default_rng(0)
    tokens, truth, spots = _deconvolution_data(144, rng)
    rows = TokenRows([tokens[:72], tokens[72:]])
    model, hist = train_subspot(rows, spots, config=_config(), train_rows=np.arange(120), val_rows=np.arange(120, 144),
                                train_config=TrainConfig(epochs=30, lr=5e-3, seed=0, patience=30), batch_tiles=16,
                                progress=False)
    assert hist[-1] < hist[0]
    test_tokens, test_truth, test_spots = _deconvolution_data(20, np.random.default_rng(1))
    pred = predict_tokens(model, test_tokens)
    inside = spot_weights(_config()).reshape(14, 14) > 0
    for g in range(2):  # the two region-specific genes: token-level maps follow the boundary
        pcc = np.corrcoef(pred[:, inside, g].ravel(), test_truth[:, inside, g].ravel())[0, 1]
        assert pcc > 0.9, (g, pcc)
    spot_pred = predict_spots(model, TokenRows([test_tokens]))
    assert np.abs(spot_pred - test_spots).mean() < 0.3


def test_token_rows_gathers_across_parts_in_any_order() -> None:
    a, b = np.arange(3 * 2).reshape(3, 2, 1).astype(np.float16), np.arange(10, 14).reshape(2, 2, 1).astype(np.float16)
    rows = TokenRows([a, b])
    assert len(rows) == 5 and rows.shape == (5, 2, 1)
    np.testing.assert_array_equal(rows.take(np.array([4, 0, 3, 2])), np.concatenate([b[1:2], a[0:1], b[0:1], a[2:3]]))


def test_neighbour_pairs_are_adjacent_tokens_without_wrapping() -> None:
    from hishrst_train.subspot_train import _neighbour_pairs

    cols = 4
    query = np.array([2, 3, 4, 6, 7, 11])  # row 0: cols 2,3; row 1: cols 0,2,3; row 2: col 3
    a, b = _neighbour_pairs(query, cols)
    pairs = {(int(query[i]), int(query[j])) for i, j in zip(a, b)}
    assert pairs == {(2, 3), (2, 6), (3, 7), (6, 7), (7, 11)}  # 3→4 would wrap a row: not a pair


def test_smoothness_adds_the_total_variation_of_the_queried_tokens() -> None:
    from hishrst_train.subspot_train import _loss_pass

    torch.manual_seed(0)
    model = SubspotHead(_config()).train()
    rng = np.random.default_rng(0)
    tokens, _, spots = _deconvolution_data(4, rng)
    rows = TokenRows([tokens])
    w = spot_weights(_config())

    class Opt:  # records the loss instead of stepping
        def zero_grad(self, set_to_none: bool = True) -> None: ...
        def step(self) -> None: ...

    class Sched:
        def step(self) -> None: ...

    args = dict(batch=4, device="cpu", opt=Opt(), sched=Sched())
    plain = _loss_pass(model.eval(), rows, spots, np.arange(4), w, **args)
    with_tv = _loss_pass(model.eval(), rows, spots, np.arange(4), w, smoothness=2.0, **args)
    with torch.no_grad():
        q = np.flatnonzero(w > 0)
        tok = model.forward_selected(torch.from_numpy(tokens.reshape(4, 196, 8)), torch.from_numpy(q))
        from hishrst_train.subspot_train import _neighbour_pairs

        a, b = _neighbour_pairs(q, 14)
        tv = float((tok[:, a] - tok[:, b]).abs().mean())
    assert with_tv == pytest.approx(plain + 2.0 * tv, rel=1e-5)


def test_visium_hd_sections_weight_their_bins_not_a_disk() -> None:
    from types import SimpleNamespace

    from hishrst_train.subspot_fit import section_weights

    secs = [SimpleNamespace(platform="visium", bin_size_um=None), SimpleNamespace(platform="visium-hd", bin_size_um=16.0),
            SimpleNamespace(platform="visium-hd", bin_size_um=8.0)]
    w = section_weights(_config(), secs)
    assert w.shape == (3, 196) and np.allclose(w.sum(axis=1), 1.0)
    assert np.count_nonzero(w[0]) > 40  # the 55 µm disk
    grid = w[1].reshape(14, 14)
    assert np.count_nonzero(w[1] > 1e-9) == 4 and grid[6:8, 6:8].sum() == pytest.approx(1.0)  # 2 × 2 tokens
    # an 8 µm bin centred in an even tile straddles the 4 central tokens equally
    assert np.allclose(w[2].reshape(14, 14)[6:8, 6:8], 0.25)


def test_mixed_spot_and_bin_sections_train_and_predict() -> None:
    rng = np.random.default_rng(3)
    tokens, _, spots = _deconvolution_data(24, rng)
    from types import SimpleNamespace

    from hishrst_train.subspot_fit import section_weights

    w = section_weights(_config(), [SimpleNamespace(platform="visium", bin_size_um=None),
                                    SimpleNamespace(platform="visium-hd", bin_size_um=16.0)])
    rows = TokenRows([tokens[:12], tokens[12:]])
    model, hist = train_subspot(rows, spots, config=_config(), train_rows=np.arange(24), weights=w,
                                train_config=TrainConfig(epochs=2, seed=0), progress=False)
    pred = predict_spots(model, rows, weights=w)
    assert pred.shape == (24, 3) and np.isfinite(pred).all() and len(hist) == 2
