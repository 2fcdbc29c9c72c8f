"""Visium HD: ``hishrst synth --platform visium-hd`` writes Space Ranger 3 binned outputs that read back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from hishrst_runtime.core.extras import MissingExtraError
from hishrst_train.cli import synth
from hishrst_train.data import DataError, read_visium_hd
from hishrst_train.data.sections import SectionError, open_section, parse_section, section_names
from hishrst_train.synth import PRESETS, bin_truth, load_bins, load_truth
from hishrst_train.synth.hd import AREA_RATIO

SMALL = PRESETS["small"]
COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@pytest.fixture(scope="module")
def outs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hd") / "s0"
    res = CliRunner().invoke(synth, [str(out), "--platform", "visium-hd", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert "wrote synthetic visium-hd (small)" in res.output
    return out / "outs"


@pytest.fixture(scope="module")
def bins8(outs: Path):
    return read_visium_hd(outs, bin_size_um=8)


@pytest.fixture(scope="module")
def bins16(outs: Path):
    return read_visium_hd(outs)


def test_layout(outs: Path) -> None:
    assert not (outs / "filtered_feature_bc_matrix.h5").exists() and (outs.parent / "image.tif").is_file()
    assert (outs.parent / "truth.npz").is_file() and (outs.parent / "truth_bins.npz").is_file()
    for size in (8, 16):
        d = outs / "binned_outputs" / f"square_{size:03d}um"
        for f in ("filtered_feature_bc_matrix.h5", "spatial/tissue_positions.parquet", "spatial/scalefactors_json.json",
                  "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png"):
            assert (d / f).is_file(), f
        pos = pd.read_parquet(d / "spatial" / "tissue_positions.parquet")
        assert list(pos.columns) == COLUMNS
        assert all(re.fullmatch(rf"s_{size:03d}um_\d{{5}}_\d{{5}}-1", b) for b in pos["barcode"].head(50))
        assert pos["barcode"].is_monotonic_increasing and set(pos["in_tissue"].unique()) == {0, 1}
        sf = json.loads((d / "spatial" / "scalefactors_json.json").read_text())
        assert set(sf) == {"spot_diameter_fullres", "bin_size_um", "microns_per_pixel", "regist_target_img_scalef",
                           "tissue_hires_scalef", "tissue_lowres_scalef"}
        assert sf["bin_size_um"] == size and sf["microns_per_pixel"] == SMALL.mpp
        assert sf["spot_diameter_fullres"] == pytest.approx(size / SMALL.mpp)
        row = pos.iloc[len(pos) // 2]
        side = size / SMALL.mpp
        assert row["pxl_col_in_fullres"] == pytest.approx((row["array_col"] + 0.5) * side)
        assert row["pxl_row_in_fullres"] == pytest.approx((row["array_row"] + 0.5) * side)


def test_reads_back_on_the_truth_lattice(outs: Path, bins8, bins16) -> None:
    for a, size in ((bins8, 8), (bins16, 16)):
        meta = a.uns["hishrst"]
        assert meta["platform"] == "visium-hd" and meta["bin_size_um"] == size and meta["mpp"] == SMALL.mpp
        assert Path(meta["fullres_image"]) == outs.parent / "image.tif"
        lib = next(iter(a.uns["spatial"].values()))
        assert lib["scalefactors"]["bin_size_um"] == size and lib["images"]["hires"].shape[2] == 3
        assert (a.obs["in_tissue"] == 1).all() and "layer" in a.obs
        table, _ = bin_truth(outs, ["ACTB"], size_um=size)
        t = table.loc[a.obs_names]  # every bin read is a truth bin, under the same barcode
        np.testing.assert_allclose(a.obsm["spatial"], t[["x_px", "y_px"]].to_numpy())
        assert np.array_equal(a.obs[["array_row", "array_col"]].to_numpy(), t[["array_row", "array_col"]].to_numpy())
        assert (t["tissue_fraction"] >= 0.5).all()
        assert set(a.obs_names) == set(table.index[table["tissue_fraction"] >= 0.5])
    truth, b = load_truth(outs), load_bins(outs)
    assert list(bins8.var_names) == [str(g) for g in truth["gene_names"]]
    full = b["tissue_fraction"] == 1.0
    assert full.sum() > 0
    umis = np.asarray(bins8.X.sum(axis=1)).ravel()
    assert 10 < np.median(umis) < 200  # tens of UMIs per 8 µm bin, as real Visium HD
    assert np.median(umis) == pytest.approx(SMALL.mean_umis * AREA_RATIO, rel=0.35)


def test_16um_bins_are_sums_of_8um_bins(bins8, bins16) -> None:
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(bins8.obs[["array_row", "array_col"]].to_numpy())}
    x8, x16 = bins8.X.tocsr(), bins16.X.tocsr()
    n = 0
    for i, (R, C) in enumerate(bins16.obs[["array_row", "array_col"]].to_numpy()):
        kids = [where.get((2 * R + a, 2 * C + c)) for a in (0, 1) for c in (0, 1)]
        if None in kids:
            continue
        n += 1
        assert (x16[i] != x8[kids].sum(axis=0)).sum() == 0
    assert n > 500


def test_counts_follow_the_truth(outs: Path, bins16) -> None:
    genes = [str(g) for g in bins16.var_names]
    table, expected = bin_truth(outs, genes, size_um=16)
    e = expected[table.index.get_indexer(bins16.obs_names)]
    x = bins16.X.toarray().astype(np.float64)
    obs = np.log1p(1e4 * x / x.sum(axis=1, keepdims=True))
    assert np.corrcoef(obs.mean(axis=0), e.mean(axis=0))[0, 1] > 0.95  # gene means
    truth = load_truth(outs)
    markers = np.flatnonzero(truth["gene_kind"] == "marker")
    r = [np.corrcoef(obs[:, j], e[:, j])[0, 1] for j in markers if e[:, j].std() > 0.5]
    assert len(r) > 10 and np.median(r) > 0.3  # noisy bins, but marker maps follow the layers


def test_path_forms_and_bin_sizes(outs: Path, bins16) -> None:
    binned = outs / "binned_outputs"
    for p in (outs, outs.parent, binned, binned / "square_016um"):
        assert list(read_visium_hd(p, load_images=False).obs_names) == list(bins16.obs_names)
    assert read_visium_hd(binned / "square_008um", load_images=False).uns["hishrst"]["bin_size_um"] == 8
    with pytest.raises(DataError, match="holds 8 µm bins"):
        read_visium_hd(binned / "square_008um", bin_size_um=16)
    with pytest.raises(DataError, match=r"square_002um/ is missing; present: \['square_008um', 'square_016um'\]"):
        read_visium_hd(outs, bin_size_um=2)
    with pytest.raises(DataError, match="not a Visium HD output"):
        read_visium_hd(outs.parent.parent)


def test_errors(outs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "outs"
    shutil.copytree(outs / "binned_outputs" / "square_016um", copy / "binned_outputs" / "square_016um")
    pq = copy / "binned_outputs" / "square_016um" / "spatial" / "tissue_positions.parquet"
    pos = pd.read_parquet(pq)
    pos[pos["in_tissue"] == 0].to_parquet(pq, index=False)  # another run's bins
    with pytest.raises(DataError, match="matrix barcodes are missing from the bin positions"):
        read_visium_hd(copy, load_images=False)
    pos.drop(columns=["pxl_row_in_fullres"]).to_parquet(pq, index=False)
    with pytest.raises(DataError, match=r"columns \['pxl_row_in_fullres'\] are missing"):
        read_visium_hd(copy, load_images=False)

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    with pytest.raises(MissingExtraError, match="pip install pyarrow"):
        read_visium_hd(outs, load_images=False)


def test_sections_open_visium_hd(outs: Path) -> None:
    spec = parse_section(outs)
    assert spec.kind == "visium-hd" and spec.bin_size_um == 16 and spec.data.name == "square_016um"
    assert parse_section(outs.parent).data == spec.data
    spec8 = parse_section(f"{outs}@8um")
    assert spec8.bin_size_um == 8 and spec8.data.name == "square_008um"
    assert parse_section(str(spec8.record()["data"])) == spec8  # a run's record reopens the same bins
    assert spec8.record()["bin_size_um"] == 8
    assert section_names([spec, spec8]) == ["s0", "s0-2"]
    with pytest.raises(DataError, match="@4um"):
        parse_section(f"{outs}@4um")
    sec = open_section(spec, name="s0")
    assert sec.platform == "visium-hd" and sec.bin_size_um == 16 and sec.mpp == SMALL.mpp
    assert sec.xy.shape == (sec.adata.n_obs, 2) and sec.array_rc is not None
    assert sec.record()["bin_size_um"] == 16 and sec.record()["kind"] == "visium-hd"


def test_visium_sections_are_unchanged(tmp_path: Path) -> None:
    from hishrst_train.synth import make_synthetic_visium

    o = make_synthetic_visium(tmp_path / "v", preset="small", seed=1)
    spec = parse_section(o)
    assert spec.kind == "visium" and spec.bin_size_um is None and "bin_size_um" not in spec.record()
    assert not (o / "binned_outputs").exists()
    with pytest.raises(SectionError, match="Visium HD outputs"):
        parse_section(f"{o}@8um")
    sec = open_section(spec, name="v")
    assert sec.platform == "visium" and sec.bin_size_um is None


def test_negative_binomial_sampler() -> None:
    """The sparse cluster sampler draws NB(μ, θ): mean μ, variance μ + μ²/θ, P(0) = (θ / (θ + μ))^θ."""
    from hishrst_train.synth.hd import _nb_sparse

    mu, theta = np.array([2.0, 0.05, 10.0]), np.array([4.0, 3.0, 1.5])
    b, g, size = _nb_sparse(np.tile(mu, (100_000, 1)), theta, np.random.default_rng(1))
    x = np.zeros((100_000, 3))
    np.add.at(x, (b, g), size)
    np.testing.assert_allclose(x.mean(axis=0), mu, rtol=0.03)
    np.testing.assert_allclose(x.var(axis=0), mu + mu**2 / theta, rtol=0.08)
    np.testing.assert_allclose((x == 0).mean(axis=0), (theta / (theta + mu)) ** theta, atol=0.005)
