"""The 8 µm truth of synthetic sections (``truth_bins.npz``) and :func:`hishrst_train.synth.bin_truth`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.core.tokens import aggregate_log1p, pool_bins_log1p
from hishrst_train.data import DataError
from hishrst_train.synth import BINS_FILE, PRESETS, REGION_NAMES, bin_truth, load_bins, load_truth, \
    make_synthetic_sections, make_synthetic_visium
from hishrst_train.synth.bins import BinModel

SMALL = PRESETS["small"]


@pytest.fixture(scope="module")
def section(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_visium(tmp_path_factory.mktemp("bins") / "s0", preset="small", seed=0).parent


@pytest.fixture(scope="module")
def full(section: Path) -> tuple:
    return bin_truth(section)


def _spot_log_expression(truth: dict) -> np.ndarray:
    em = truth["expected_means"].astype(np.float64)
    return np.log1p(1e4 * em / em.sum(axis=1, keepdims=True))


def _model(b: dict) -> BinModel:
    return BinModel(b["region_log_means"], b["grad_beta"], b["x_gradient"].astype(bool), float(b["cortex_um"]))


def test_truth_bins_layout(section: Path) -> None:
    b = load_bins(section)
    assert (section / BINS_FILE).is_file() and load_bins(section / "outs")["bin_rc"].shape == b["bin_rc"].shape
    n = len(b["bin_rc"])
    assert n > 1000 and b["bin_rc"].dtype == np.int32 and b["centre_px"].dtype == np.float64
    assert b["region_fractions"].dtype == np.float16 and b["region_fractions"].shape == (n, len(REGION_NAMES))
    assert {b[k].dtype for k in ("tissue_fraction", "depth_um", "xnorm")} == {np.dtype(np.float32)}
    assert float(b["bin_um"]) == 8.0 and float(b["mpp"]) == SMALL.mpp and int(b["samples"]) >= 4
    key = b["bin_rc"][:, 0].astype(np.int64) * 10**6 + b["bin_rc"][:, 1]
    assert np.all(np.diff(key) > 0)  # (row, col) order, unique
    frac = b["region_fractions"].astype(np.float64)
    assert np.all(frac * 16 == np.round(frac * 16))  # 4 × 4 points per bin
    np.testing.assert_allclose(frac.sum(axis=1), b["tissue_fraction"], atol=1e-6)
    assert b["tissue_fraction"].min() > 0 and b["tissue_fraction"].max() == 1
    s = 8.0 / SMALL.mpp
    np.testing.assert_allclose(b["centre_px"], (b["bin_rc"][:, ::-1] + 0.5) * s)
    h, w = load_truth(section)["image_shape"][:2]
    assert np.array_equal(b["lattice_shape"], [np.ceil(h / s), np.ceil(w / s)])


def test_bin_formula_is_the_spot_formula(section: Path) -> None:
    """The bins' formula applied to the spots' own inputs gives truth.npz's expected spot expression."""
    truth, b = load_truth(section), load_bins(section)
    inv = np.linalg.inv(truth["affine_um_to_px"][:, :2])
    x_um = ((truth["spot_xy_px"] - truth["affine_um_to_px"][:, 2]) @ inv.T)[:, 0]
    cx = (SMALL.n_cols - 1) * 100.0 / 4.0  # lattice centre (µm): half of the lattice's x extent
    xnorm = (x_um - cx) / (2 * cx)
    model, genes = _model(b), np.arange(SMALL.n_genes)
    got = model.log_expression(truth["region_fractions"], truth["depth_um"], xnorm, genes)
    np.testing.assert_allclose(got, _spot_log_expression(truth), atol=2e-5)
    sub = np.arange(0, SMALL.n_genes, 7)
    em = truth["expected_means"][:, sub].astype(np.float64)
    np.testing.assert_allclose(model.log_expression(truth["region_fractions"], truth["depth_um"], xnorm, sub,
                                                    renormalise=True),
                               np.log1p(1e4 * em / em.sum(axis=1, keepdims=True)), atol=2e-5)
    prop = model.proportions(truth["region_fractions"], truth["depth_um"], xnorm)
    np.testing.assert_allclose(np.log1p(1e4 * prop), got, atol=2e-5)


def test_pure_region_bins_carry_their_region(section: Path, full: tuple) -> None:
    table, expr = full
    truth, b = load_truth(section), load_bins(section)
    logmu = truth["region_log_means"].astype(np.float64)
    flat = np.flatnonzero(b["grad_beta"] == 0)  # no gradient: the region alone sets their ratios
    frac = b["region_fractions"].astype(np.float64)
    means = {}
    for r in range(len(REGION_NAMES)):
        pure = np.flatnonzero(frac[:, r] == 1.0)
        if len(pure) < 5:
            continue
        lin = np.log(np.expm1(expr[pure][:, flat].astype(np.float64)))  # log(1e4 · proportion)
        offset = lin - logmu[r, flat][None, :]
        assert np.abs(offset - offset.mean(axis=1, keepdims=True)).max() < 1e-3  # that region's profile exactly
        means[r] = expr[pure].mean(axis=0)
    assert len(means) >= 5
    for r, m in means.items():
        markers = np.flatnonzero(truth["marker_region"] == r)
        others = [means[q][markers].mean() for q in means if q != r]
        assert m[markers].mean() > max(others)


def test_disk_aggregate_reproduces_the_spots(section: Path, full: tuple) -> None:
    """Count-space aggregate of the 8 µm truth over each 55 µm spot disk ≈ the spot's expected expression."""
    table, expr = full
    truth = load_truth(section)
    s = 8.0 / SMALL.mpp
    rc = table[["array_row", "array_col"]].to_numpy()
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(rc)}
    tfrac = table["tissue_fraction"].to_numpy(np.float64)
    radius = 27.5 / SMALL.mpp
    g = np.arange(-radius, radius + 1e-9, 1.0)
    offs = np.stack(np.meshgrid(g, g), axis=-1).reshape(-1, 2)
    offs = offs[np.hypot(offs[:, 0], offs[:, 1]) <= radius]
    agg = np.empty_like(truth["expected_means"])
    for k, xy in enumerate(truth["spot_xy_px"]):
        cells = np.floor((xy + offs) / s).astype(np.int64)  # (col, row) of each disk point
        uniq, counts = np.unique(cells, axis=0, return_counts=True)
        rows = [index.get((int(r), int(c)), -1) for c, r in uniq]
        have = np.asarray(rows) >= 0
        w = counts[have] * tfrac[np.asarray(rows)[have]]
        agg[k] = aggregate_log1p(expr[np.asarray(rows)[have]], w / w.sum())
    ref = _spot_log_expression(truth)
    assert np.corrcoef(agg.ravel(), ref.ravel())[0, 1] > 0.99
    varying = ref.std(axis=0) > 0.1
    per_gene = [np.corrcoef(agg[:, j], ref[:, j])[0, 1] for j in np.flatnonzero(varying)]
    assert np.median(per_gene) > 0.95


def test_16um_pools_the_8um_bins(section: Path) -> None:
    genes = [str(g) for g in load_truth(section)["gene_names"][:40]]
    t8, e8 = bin_truth(section, genes)
    t16, e16 = bin_truth(section, genes, size_um=16)
    assert list(t16.columns) == ["array_row", "array_col", "x_px", "y_px", "tissue_fraction"]
    assert t16.index[0].startswith("s_016um_") and t8.index[0].startswith("s_008um_")
    s16 = 16.0 / SMALL.mpp
    np.testing.assert_allclose(t16["x_px"], (t16["array_col"] + 0.5) * s16)
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(t8[["array_row", "array_col"]].to_numpy())}
    tf8 = t8["tissue_fraction"].to_numpy()
    n_full = 0
    for i, (R, C) in enumerate(t16[["array_row", "array_col"]].to_numpy()):
        kids = [index.get((2 * R + a, 2 * C + c), -1) for a in (0, 1) for c in (0, 1)]
        w = np.array([tf8[k] if k >= 0 else 0.0 for k in kids])
        assert t16["tissue_fraction"].iloc[i] == pytest.approx(w.sum() / 4, abs=1e-6)
        vals = np.stack([e8[k] if k >= 0 else np.zeros(len(genes), np.float32) for k in kids])
        if w.min() == 1.0:
            n_full += 1
            pooled = pool_bins_log1p(vals.reshape(2, 2, -1), 2)[0, 0]
            np.testing.assert_allclose(e16[i], pooled, atol=1e-5)
        else:
            np.testing.assert_allclose(e16[i], aggregate_log1p(vals, w / w.sum()), atol=1e-5)
    assert n_full > 100


def test_genes_rows_and_errors(section: Path, full: tuple) -> None:
    table, expr = full
    names = [str(g) for g in load_truth(section)["gene_names"]]
    rows = np.array([5, 0, len(table) - 1])
    t, e = bin_truth(section, [names[3], names[1]], rows=rows)
    assert list(t.index) == list(table.index[rows]) and e.dtype == np.float32
    np.testing.assert_allclose(e, expr[rows][:, [3, 1]])
    np.testing.assert_allclose(t[["x_px", "y_px"]].to_numpy(), load_bins(section)["centre_px"][rows])
    with pytest.raises(DataError, match="NOT_A_GENE"):
        bin_truth(section, ["ACTB", "NOT_A_GENE"])
    with pytest.raises(DataError, match="bin size"):
        bin_truth(section, names[:1], size_um=4)
    with pytest.raises(DataError, match="rows"):
        bin_truth(section, names[:1], rows=[len(table)])
    with pytest.raises(DataError, match="truth"):
        bin_truth(section.parent, names[:1])


def test_bin_centres_map_back_to_their_pixels(tmp_path: Path) -> None:
    """Rotated, shifted sections: the bin under a spot's centre pixel lies in the spot's (pure) region."""
    outs = make_synthetic_sections(tmp_path / "multi", 2, seed=3, preset="small", max_shift_um=600.0)
    for o in outs:
        truth, b = load_truth(o), load_bins(o)
        s = float(b["bin_um"]) / float(b["mpp"])
        index = {(int(r), int(c)): i for i, (r, c) in enumerate(b["bin_rc"])}
        assert np.all(b["centre_px"] >= truth["shift_px"] - s)  # no tissue before the section on its canvas
        frac = truth["region_fractions"]
        checked = agree = 0
        for xy, f in zip(truth["spot_xy_px"], frac):
            r = int(np.argmax(f))
            if f[r] < 1.0:
                continue
            i = index.get((int(xy[1] // s), int(xy[0] // s)))
            checked += 1
            agree += i is not None and float(b["region_fractions"][i, r]) == 1.0
        assert checked > 50 and agree >= 0.98 * checked
