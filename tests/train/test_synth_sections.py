"""Multi-section synthetic data (one expression model, different layouts) and sections moved on a larger canvas."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from hishrst_runtime.core.geometry import apply_affine, fit_affine, visium_array_to_um
from hishrst_train.data import read_10x_h5, read_visium
from hishrst_train.synth import SECTIONS_FILE, SynthPreset, load_truth, make_synthetic_sections, make_synthetic_visium

#: A tiny section (10 × 16 lattice, 40 genes, 1 µm/px, ≈ 1k × 1k px) so that generation takes well under a second.
TINY = SynthPreset(n_rows=10, n_cols=16, mpp=1.0, n_genes=40, margin_um=100.0, layer_um=(60, 60, 120, 60, 110, 110),
                   depth_at_centre=0.5, mean_umis=2000.0)
N_SECTIONS = 3


@pytest.fixture(scope="module")
def sections(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_synthetic_sections(tmp_path_factory.mktemp("multi") / "data", N_SECTIONS, seed=4, preset=TINY,
                                   max_shift_um=800.0)


def test_sections_are_complete_readable_outs(sections: list[Path]) -> None:
    assert len(sections) == N_SECTIONS
    root = sections[0].parent.parent
    assert [o.relative_to(root).as_posix() for o in sections] == [f"section_{k}/outs" for k in range(N_SECTIONS)]
    summary = json.loads((root / SECTIONS_FILE).read_text())
    assert [s["outs"] for s in summary["sections"]] == [f"section_{k}/outs" for k in range(N_SECTIONS)]
    for o in sections:
        adata = read_visium(o)
        truth = load_truth(o)
        assert adata.n_obs == len(truth["barcodes"]) > 10
        assert adata.uns["hishrst"]["mpp"] == pytest.approx(TINY.mpp)
        h, w = tifffile.TiffFile(o.parent / "image.tif").pages[0].shape[:2]
        assert (h, w) == tuple(truth["image_shape"][:2])
        xy = adata.obsm["spatial"]
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        # the rotated, shifted µm → px map is still an exact affine of the lattice
        um = visium_array_to_um(adata.obs["array_row"], adata.obs["array_col"])
        np.testing.assert_allclose(fit_affine(um, xy), truth["affine_um_to_px"], atol=1e-6)
        np.testing.assert_allclose(apply_affine(truth["affine_um_to_px"], um), xy, atol=1e-5)


def test_sections_share_genes_and_the_expression_model(sections: list[Path]) -> None:
    truths = [load_truth(o) for o in sections]
    genes = [list(read_10x_h5(o / "filtered_feature_bc_matrix.h5").var_names) for o in sections]
    assert all(g == genes[0] for g in genes) and len(genes[0]) == TINY.n_genes
    for t in truths[1:]:
        for key in ("gene_names", "gene_ids", "gene_kind", "marker_region", "region_log_means"):
            np.testing.assert_array_equal(t[key], truths[0][key], err_msg=key)
    # the same gene programme: per-region mean expression profiles agree across sections
    for t in truths:
        lab = t["region_fractions"].argmax(1)
        for g in np.flatnonzero(t["gene_kind"] == "marker"):
            r = t["marker_region"][g]
            if (lab == r).sum() >= 3 and (lab != r).sum() >= 3:
                prop = t["expected_means"][:, g] / t["library_size"]
                assert prop[lab == r].mean() > prop[lab != r].mean()


def test_sections_differ_in_layout_and_tissue(sections: list[Path]) -> None:
    truths = [load_truth(o) for o in sections]
    for a, b in combinations(truths, 2):
        assert abs(float(a["rotation_deg"]) - float(b["rotation_deg"])) > 1.0
        assert not np.array_equal(a["shift_um"], b["shift_um"])
        assert set(a["barcodes"]) != set(b["barcodes"])  # different tissue shapes cover different spots
    for t in truths:
        assert (t["shift_um"] >= 0).all() and (t["shift_um"] <= 800.0 + TINY.mpp).all()
        np.testing.assert_allclose(t["shift_um"], t["shift_px"] * TINY.mpp)
    summary = json.loads((sections[0].parent.parent / SECTIONS_FILE).read_text())["sections"]
    assert [s["rotation_deg"] for s in summary] == pytest.approx([float(t["rotation_deg"]) for t in truths])


def test_sections_are_deterministic(sections: list[Path], tmp_path: Path) -> None:
    again = make_synthetic_sections(tmp_path / "again", 1, seed=4, preset=TINY, max_shift_um=800.0)
    t0, t1 = load_truth(sections[0]), load_truth(again[0])
    assert set(t0) == set(t1)
    for k in t0:
        if k != "n_sections":
            np.testing.assert_array_equal(t0[k], t1[k], err_msg=k)


@pytest.mark.parametrize("bad", [{"n_sections": 0}, {"max_shift_um": -1.0}])
def test_sections_reject_bad_arguments(bad: dict, tmp_path: Path) -> None:
    kw = {"n_sections": 1, "max_shift_um": 100.0, **bad}
    with pytest.raises(ValueError):
        make_synthetic_sections(tmp_path / "x", kw.pop("n_sections"), preset=TINY, **kw)


# ------------------------------------------------------------------------------ the same slide, moved


def test_shift_moves_the_section_on_a_larger_canvas(tmp_path: Path) -> None:
    shift = (5000.0, 0.0)
    base = make_synthetic_visium(tmp_path / "base", preset=TINY, seed=3, compression="zlib", canvas_pad_um=shift)
    moved = make_synthetic_visium(tmp_path / "moved", preset=TINY, seed=3, compression="zlib", shift_um=shift)
    tb, tm = load_truth(base), load_truth(moved)
    sx, sy = (int(v) for v in tm["shift_px"])
    assert (sx, sy) == (5000, 0) and tm["shift_um"].tolist() == [5000.0, 0.0]
    assert tb["shift_px"].tolist() == [0, 0] and tb["canvas_pad_px"].tolist() == [5000, 0]
    np.testing.assert_array_equal(tb["image_shape"], tm["image_shape"])  # same canvas, section at either end
    np.testing.assert_allclose(tm["spot_xy_px"], tb["spot_xy_px"] + [sx, sy])
    for k in ("barcodes", "expected_means", "region_fractions"):
        np.testing.assert_array_equal(tm[k], tb[k], err_msg=k)
    ib, im = tifffile.imread(base.parent / "image.tif"), tifffile.imread(moved.parent / "image.tif")
    w = int(tb["image_shape"][1]) - sx  # the section's own width
    np.testing.assert_array_equal(im[:, sx:], ib[:, :w])  # the section's pixels are unchanged
    assert im[:, : sx - 10].mean() > 230 and ib[:, w + 10 :].mean() > 230  # background glass around it
    pb = pd.read_csv(base / "spatial" / "tissue_positions.csv")
    pm = pd.read_csv(moved / "spatial" / "tissue_positions.csv")
    np.testing.assert_allclose(pm["pxl_col_in_fullres"], pb["pxl_col_in_fullres"] + sx, atol=1e-5)
    np.testing.assert_array_equal(pm["in_tissue"], pb["in_tissue"])
    assert read_visium(moved).n_obs == read_visium(base).n_obs


def test_negative_shift_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shift_um"):
        make_synthetic_visium(tmp_path / "neg", preset=TINY, shift_um=(-10.0, 0.0))
