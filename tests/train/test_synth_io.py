"""Synthetic Visium generator + readers: layout, round trips, geometry, determinism, image I/O, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from hishrst_runtime.core.geometry import apply_affine, fit_affine, visium_array_to_um
from hishrst_runtime.core.patches import cut_patch, patch_side_px
from hishrst_train.data import (
    DataError,
    image_mpp,
    open_fullres_image,
    read_10x_h5,
    read_h5ad_with_image,
    read_visium,
    write_10x_h5,
)
from hishrst_train.synth import PRESETS, REGION_NAMES, load_truth, make_synthetic_visium

SMALL_MPP = PRESETS["small"].mpp


@pytest.fixture(scope="module")
def outs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_visium(tmp_path_factory.mktemp("synth") / "s0", preset="small", seed=0)


@pytest.fixture(scope="module")
def adata(outs: Path):
    return read_visium(outs)


def _copy_outs(outs: Path, dst: Path) -> Path:
    shutil.copytree(outs, dst / "outs")
    return dst / "outs"


def test_layout(outs: Path) -> None:
    sp = outs / "spatial"
    for f in ("tissue_positions.csv", "scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png",
              "ground_truth_layers.csv"):
        assert (sp / f).is_file(), f
    assert (outs / "filtered_feature_bc_matrix.h5").is_file()
    assert (outs.parent / "image.tif").is_file() and (outs.parent / "truth.npz").is_file()
    assert (sp / "tissue_positions.csv").read_text().splitlines()[0] == (
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    sf = json.loads((sp / "scalefactors_json.json").read_text())
    assert set(sf) >= {"spot_diameter_fullres", "fiducial_diameter_fullres", "tissue_hires_scalef", "tissue_lowres_scalef"}
    assert sf["spot_diameter_fullres"] == pytest.approx(55.0 / SMALL_MPP)
    assert max(Image.open(sp / "tissue_hires_image.png").size) == 2000
    assert max(Image.open(sp / "tissue_lowres_image.png").size) == 600
    with h5py.File(outs / "filtered_feature_bc_matrix.h5") as f:
        assert set(f["matrix"]) == {"barcodes", "data", "indices", "indptr", "shape", "features"}
        assert set(f["matrix/features"]) == {"_all_tag_keys", "feature_type", "genome", "id", "name"}
        n_genes, n_bc = f["matrix/shape"][()]
        assert n_genes == PRESETS["small"].n_genes and len(f["matrix/indptr"]) == n_bc + 1
    with tifffile.TiffFile(outs.parent / "image.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == 256 and len(tif.series[0].levels) >= 2
        assert json.loads(page.description)["mpp"] == pytest.approx(SMALL_MPP)


def test_10x_roundtrip(outs: Path, tmp_path: Path) -> None:
    a = read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    assert a.X.dtype == np.float32 and a.X.format == "csr"
    truth = load_truth(outs)
    assert list(a.obs_names) == list(truth["barcodes"]) and list(a.var["gene_ids"]) == list(truth["gene_ids"])
    write_10x_h5(a, tmp_path / "m.h5")
    b = read_10x_h5(tmp_path / "m.h5")
    assert (a.X != b.X).nnz == 0 and a.X.shape == b.X.shape
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.var, b.var)
    dup = a[:, :3].copy()
    dup.var_names = ["GENEA", "GENEA", "GENEB"]
    write_10x_h5(dup, tmp_path / "dup.h5")
    d = read_10x_h5(tmp_path / "dup.h5")
    assert d.var_names.is_unique and list(d.var["gene_ids"]) == list(dup.var["gene_ids"])
    with pytest.raises(DataError, match="raw counts"):
        a2 = a.copy()
        a2.X = a2.X * 0.5
        write_10x_h5(a2, tmp_path / "bad.h5")


def test_read_visium(outs: Path, adata) -> None:
    truth = load_truth(outs)
    assert adata.n_obs == len(truth["barcodes"]) and (adata.obs["in_tissue"] == 1).all()
    pos = pd.read_csv(outs / "spatial" / "tissue_positions.csv", index_col=0).loc[adata.obs_names]
    np.testing.assert_array_equal(adata.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    np.testing.assert_array_equal(adata.obs["array_row"], pos["array_row"])
    np.testing.assert_allclose(adata.obsm["spatial"], truth["spot_xy_px"], atol=1e-5)
    # the µm -> px map is an exact affine of the lattice: a fit recovers it
    um = visium_array_to_um(adata.obs["array_row"], adata.obs["array_col"])
    A = fit_affine(um, adata.obsm["spatial"])
    np.testing.assert_allclose(A, truth["affine_um_to_px"], atol=1e-6)
    assert np.abs(apply_affine(A, um) - adata.obsm["spatial"]).max() < 1e-5
    lib = next(iter(adata.uns["spatial"]))
    entry = adata.uns["spatial"][lib]
    assert entry["images"]["hires"].dtype == np.uint8 and entry["images"]["hires"].shape[2] == 3
    assert set(entry["images"]) == {"hires", "lowres"} and "spot_diameter_fullres" in entry["scalefactors"]
    meta = adata.uns["hishrst"]
    assert Path(meta["fullres_image"]).name == "image.tif"
    assert meta["mpp"] == pytest.approx(SMALL_MPP)
    assert set(adata.obs["layer"].astype(str)) <= set(REGION_NAMES)
    assert adata.var["gene_ids"].is_unique and adata.var_names.is_unique


def test_image_choice_hires(outs: Path) -> None:
    a = read_visium(outs, image="hires")
    meta = a.uns["hishrst"]
    assert meta["fullres_image"] is None and meta["image"] == "hires"
    assert meta["image_scalef"] == pytest.approx(json.loads((outs / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"])


def test_legacy_positions_identical(outs: Path, adata, tmp_path: Path) -> None:
    legacy = _copy_outs(outs, tmp_path)
    df = pd.read_csv(legacy / "spatial" / "tissue_positions.csv")
    df.to_csv(legacy / "spatial" / "tissue_positions_list.csv", header=False, index=False, float_format="%.6f")
    (legacy / "spatial" / "tissue_positions.csv").unlink()
    b = read_visium(legacy, fullres_image=outs.parent / "image.tif")
    pd.testing.assert_frame_equal(adata.obs, b.obs)
    np.testing.assert_array_equal(adata.obsm["spatial"], b.obsm["spatial"])


def test_determinism(outs: Path, tmp_path: Path) -> None:
    again = make_synthetic_visium(tmp_path / "again", preset="small", seed=0)
    other = make_synthetic_visium(tmp_path / "other", preset="small", seed=1)
    for rel in ("spatial/tissue_positions.csv", "spatial/ground_truth_layers.csv", "spatial/scalefactors_json.json"):
        assert (outs / rel).read_bytes() == (again / rel).read_bytes(), rel
    t0, t1, t2 = load_truth(outs), load_truth(again), load_truth(other)
    for k in t0:
        np.testing.assert_array_equal(t0[k], t1[k], err_msg=k)
    a, b, c = (read_10x_h5(o / "filtered_feature_bc_matrix.h5") for o in (outs, again, other))
    assert (a.X != b.X).nnz == 0
    im0, im1, im2 = (tifffile.imread(o.parent / "image.tif") for o in (outs, again, other))
    np.testing.assert_array_equal(im0, im1)
    assert im0.shape != im2.shape or not np.array_equal(im0, im2)
    assert not np.array_equal(t0["expected_means"], t2["expected_means"]) or a.X.shape != c.X.shape
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0


def test_default_layout_is_the_classic_section(outs: Path) -> None:
    """Without placement options the section sits at the image origin with a small array rotation."""
    truth = load_truth(outs)
    assert truth["shift_px"].tolist() == [0, 0] and truth["canvas_pad_px"].tolist() == [0, 0]
    assert truth["shift_um"].tolist() == [0.0, 0.0] and abs(float(truth["rotation_deg"])) <= 0.6


def test_image_mpp(outs: Path, tmp_path: Path) -> None:
    assert image_mpp(outs.parent / "image.tif") == pytest.approx(SMALL_MPP)
    img = np.full((64, 64, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "res.tif", img, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    assert image_mpp(tmp_path / "res.tif") == pytest.approx(0.25)
    tifffile.imwrite(tmp_path / "none.tif", img, photometric="rgb", metadata=None)
    assert image_mpp(tmp_path / "none.tif") is None
    Image.fromarray(img).save(tmp_path / "x.png")
    assert image_mpp(tmp_path / "x.png") is None


def _region_patches(outs: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std colour features of 64 µm patches at spots lying almost entirely in one region."""
    truth = load_truth(outs)
    img = open_fullres_image(outs.parent / "image.tif")
    side = patch_side_px(64.0, float(truth["mpp"]))
    frac = truth["region_fractions"]
    pure = frac.max(axis=1) >= 0.9
    feats = []
    for xy in truth["spot_xy_px"][pure]:
        p = cut_patch(img, xy, side).astype(np.float32) / 255.0
        dark = (p.mean(axis=2) < 0.55).mean()
        feats.append(np.concatenate([p.mean(axis=(0, 1)), p.std(axis=(0, 1)), [dark]]))
    return np.asarray(feats), frac[pure].argmax(axis=1)


def test_region_texture_differs(outs: Path) -> None:
    feats, lab = _region_patches(outs)
    present = np.unique(lab)
    assert len(present) >= 5
    cents = np.stack([feats[lab == r].mean(axis=0) for r in present])
    # distinct mean colours between regions (L1 pale, L4 dense nuclei, WM pink)
    d = np.abs(cents[:, None, :3] - cents[None, :, :3]).max(axis=-1)
    assert np.all(d[~np.eye(len(present), dtype=bool)] > 0.005)
    # the texture of a 64 µm patch is informative of the region: nearest centroid beats chance by far
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-9)
    zc = np.stack([z[lab == r].mean(axis=0) for r in present])
    pred = present[np.argmin(((z[:, None, :] - zc[None]) ** 2).sum(-1), axis=1)]
    assert (pred == lab).mean() > 0.6


def test_expression_depends_on_region(outs: Path, adata) -> None:
    truth = load_truth(outs)
    lab = truth["region_fractions"].argmax(axis=1)
    X = adata.X.toarray()
    X = X / X.sum(axis=1, keepdims=True) * 1e4
    wins = []
    for g in np.flatnonzero(truth["gene_kind"] == "marker"):
        r = truth["marker_region"][g]
        if (lab == r).sum() >= 5:
            wins.append(X[lab == r, g].mean() > X[lab != r, g].mean())
    assert len(wins) > 50 and np.mean(wins) > 0.85
    # expected means follow the region programme exactly
    means = truth["expected_means"]
    assert np.corrcoef(np.log1p(means.mean(0)), np.log1p(X.mean(0)))[0, 1] > 0.9


def test_image_smaller_than_coordinates(outs: Path, tmp_path: Path) -> None:
    full = tifffile.imread(outs.parent / "image.tif")
    small = tmp_path / "downscaled.tif"
    tifffile.imwrite(small, full[::2, ::2], photometric="rgb", tile=(256, 256))
    with pytest.raises(DataError, match="downscaled.tif.*smaller than the coordinates"):
        read_visium(outs, fullres_image=small)
    import anndata as ad

    a = read_visium(outs)
    a.uns.clear()
    a.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(DataError, match="downscaled.tif"):
        read_h5ad_with_image(tmp_path / "a.h5ad", small, mpp=0.6)
    b = read_h5ad_with_image(tmp_path / "a.h5ad", outs.parent / "image.tif")
    assert b.uns["hishrst"]["mpp"] == pytest.approx(SMALL_MPP) and isinstance(b, ad.AnnData)


def test_missing_matrix(outs: Path, tmp_path: Path) -> None:
    broken = _copy_outs(outs, tmp_path)
    (broken / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(DataError, match="filtered_feature_bc_matrix.h5.*missing"):
        read_visium(broken)
    with pytest.raises(DataError, match="does not exist"):
        read_10x_h5(broken / "filtered_feature_bc_matrix.h5")


def test_missing_positions_and_barcodes(outs: Path, tmp_path: Path) -> None:
    broken = _copy_outs(outs, tmp_path)
    pos = broken / "spatial" / "tissue_positions.csv"
    df = pd.read_csv(pos)
    a = read_10x_h5(outs / "filtered_feature_bc_matrix.h5")
    df[~df["barcode"].isin(a.obs_names[:5])].to_csv(pos, index=False)
    with pytest.raises(DataError, match="tissue_positions.csv.*5 of .* missing"):
        read_visium(broken)
    pos.unlink()
    with pytest.raises(DataError, match="tissue_positions"):
        read_visium(broken)


def test_gene_count_mismatch(outs: Path, tmp_path: Path) -> None:
    h5 = tmp_path / "m.h5"
    shutil.copy(outs / "filtered_feature_bc_matrix.h5", h5)
    with h5py.File(h5, "r+") as f:
        ids = f["matrix/features/id"][()]
        del f["matrix/features/id"]
        f["matrix/features"].create_dataset("id", data=ids[:-1])
    with pytest.raises(DataError, match="m.h5.*gene count mismatch"):
        read_10x_h5(h5)


def test_rgb_order(tmp_path: Path) -> None:
    img = np.full((300, 400, 3), 255, np.uint8)
    img[50:150, 60:200] = (255, 0, 0)
    img[200:280, 250:390] = (0, 0, 255)
    tifffile.imwrite(tmp_path / "c.tif", img, photometric="rgb", tile=(256, 256), compression="zlib")
    tifffile.imwrite(tmp_path / "p.tif", np.moveaxis(img, 2, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "j.tif", img, photometric="rgb", tile=(256, 256), compression="jpeg")
    Image.fromarray(img).save(tmp_path / "c.png")
    for name, tol in (("c.tif", 0), ("p.tif", 0), ("c.png", 0), ("j.tif", 12)):
        im = open_fullres_image(tmp_path / name)
        assert im.shape == (300, 400, 3), name
        red = im[60:140, 70:190]
        assert red.shape == (80, 120, 3) and red.dtype == np.uint8
        assert np.abs(red.astype(int) - [255, 0, 0]).max() <= tol, name
        assert np.abs(im[210:270, 260:380].astype(int) - [0, 0, 255]).max() <= tol, name
        patch = cut_patch(im, (100.0, 100.0), 20)
        assert np.abs(patch.astype(int) - [255, 0, 0]).max() <= tol, name
        edge = cut_patch(im, (0.0, 0.0), 20)  # white padding outside the image
        assert (edge[:5, :5] == 255).all()


def test_unreadable_image(tmp_path: Path) -> None:
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(DataError, match="broken.tif"):
        open_fullres_image(bad)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png"):
        open_fullres_image(tmp_path / "x.png")


def test_lazy_reader_matches_numpy(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "r.tif", img, photometric="rgb", tile=(256, 256), compression="zlib")
    with open_fullres_image(tmp_path / "r.tif", cache_mb=1) as im:  # a tiny cache forces evictions
        for ys, xs in ((slice(0, 600), slice(0, 700)), (slice(250, 520), slice(10, 690)), (slice(255, 257), slice(511, 513)),
                       (slice(3, 599, 5), slice(None)), (slice(590, 700), slice(690, 800))):
            np.testing.assert_array_equal(im[ys, xs], img[ys, xs])
        np.testing.assert_array_equal(np.asarray(im), img)
