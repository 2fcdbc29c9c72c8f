"""HEST-1k samples: `st/<id>.h5ad` finds `wsis/<id>.tif` and `metadata/<id>.json` (pixel size)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hest_root(small_section, tmp_path_factory):
    """A HEST-style folder built from the synthetic section (one out-of-tissue spot added)."""
    import anndata as ad

    from hishrst_train.data import read_visium

    adata = read_visium(small_section)
    root = tmp_path_factory.mktemp("hest")
    for d in ("st", "wsis", "metadata"):
        (root / d).mkdir()
    out = ad.AnnData(X=adata.X, obs=adata.obs[["in_tissue", "array_row", "array_col"]].copy(), var=adata.var[[]].copy())
    out.obsm["spatial"] = adata.obsm["spatial"]
    out.obs.iloc[0, 0] = 0  # outside the tissue: dropped on reading
    out.write_h5ad(root / "st" / "SYN1.h5ad")
    shutil.copy(small_section.parent / "image.tif", root / "wsis" / "SYN1.tif")
    (root / "metadata" / "SYN1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.61, "organ": "Brain"}))
    return root


def test_read_hest_finds_siblings(hest_root, tmp_path):
    from hishrst_train.data.hest import read_hest
    from hishrst_train.data.sections import parse_section

    h5 = hest_root / "st" / "SYN1.h5ad"
    assert parse_section(h5).kind == "hest"
    a = read_hest(h5)
    assert a.uns["hishrst"]["mpp"] == 0.61 and a.uns["hishrst"]["mpp_source"] == "pixel_size_um_estimated"
    assert a.uns["hishrst"]["fullres_image"].endswith("wsis/SYN1.tif") and not (a.obs["in_tissue"] == 0).any()
    assert np.asarray(a.obsm["spatial"]).shape == (a.n_obs, 2)
    alt = tmp_path / "alt"
    shutil.copytree(hest_root, alt)
    (alt / "metadata" / "SYN1.json").write_text(json.dumps({"pixel_size_um_embedded": 0.55}))
    assert read_hest(alt / "st" / "SYN1.h5ad").uns["hishrst"]["mpp"] == 0.55
    (alt / "wsis" / "SYN1.tif").unlink()
    with pytest.raises(ValueError, match="wsis/SYN1.tif"):
        read_hest(alt / "st" / "SYN1.h5ad")


def test_fit_hest_sample_and_paired_h5ad(hest_root, small_section, tmp_path):
    from hishrst_train.cli import fit
    from tests.conftest import torch_threads

    h5 = hest_root / "st" / "SYN1.h5ad"
    shutil.copy(h5, tmp_path / "plain.h5ad")  # outside a HEST layout: needs its image after ':'
    paired = f"{tmp_path / 'plain.h5ad'}:{small_section.parent / 'image.tif'}"
    args = [str(h5), paired, "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress", "--device", "cpu",
            "--mpp", "0.6", "--task", "full", "--encoder", "test-vit", "--allow-test-encoder"]
    with torch_threads(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(fit, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert [s["kind"] for s in cfg["sections"]] == ["hest", "h5ad"]
    assert [s["name"] for s in cfg["sections"]] == ["SYN1", "plain"] and cfg["task"] == "full"
