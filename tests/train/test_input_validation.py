"""Training inputs are checked when a section is read: counts (NaN, negative, fractions, all zero, ``--counts
log``), sections given twice, genes dropped by the intersection, Space Ranger's ``in_tissue`` and every pixel
size (``--mpp``, HEST metadata). Each refusal is one line naming the file, how much is wrong and the fix."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from hishrst_train import cli  # noqa: E402
from tests.train.cli_helpers import FAST, invoke, one_line_error  # noqa: E402







@pytest.fixture(scope="module")
def base(small_section):
    """(AnnData of the synthetic section with dense float X, its image)."""
    from hishrst_train.data import read_visium

    a = read_visium(small_section, load_images=False)
    a.X = np.asarray(a.X.toarray(), dtype=np.float32)
    a.uns = {}
    return a, small_section.parent / "image.tif"


def write_h5ad(adata, path: Path, image: Path, *, X=None, genes=None) -> str:
    """``PATH.h5ad:IMAGE`` of ``adata`` with ``X`` (and only ``genes``) replaced."""
    a = adata.copy()
    if X is not None:
        a.X = X
    if genes is not None:
        a = a[:, genes].copy()
    a.write_h5ad(path)
    return f"{path}:{image}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validation_cache")


# ------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("bad, needle", [(np.nan, "1 NaN/inf"), (-3.0, "1 negative"), (2.5, "1 non-integer")])
def test_bad_raw_counts_are_refused_naming_the_file(base, tmp_path, bad, needle):
    adata, image = base
    X = adata.X.copy()
    X[3, 7] = bad
    data = write_h5ad(adata, tmp_path / "bad.h5ad", image, X=X)
    r = invoke(cli.fit, [data, "--out", tmp_path / "r", *FAST])
    line = one_line_error(r, str(tmp_path / "bad.h5ad"), needle, "Fix:")
    assert "--counts log" in line or needle != "1 non-integer"
    assert not (tmp_path / "r").exists()


def test_all_zero_section_is_refused(base, tmp_path):
    adata, image = base
    data = write_h5ad(adata, tmp_path / "zero.h5ad", image, X=np.zeros_like(adata.X))
    r = invoke(cli.fit, [data, "--out", tmp_path / "r", *FAST])
    one_line_error(r, str(tmp_path / "zero.h5ad"), "every count is zero")


def test_bad_log_values_are_refused_too(base):
    from hishrst_train.data.counts import CountsError, check_counts

    adata, _ = base
    for bad, needle in ((np.inf, "NaN/inf"), (-0.5, "negative")):
        a = adata.copy()
        a.X = np.log1p(a.X)
        a.X[0, 0] = bad
        with pytest.raises(CountsError, match=needle):
            check_counts(a, source="x.h5ad", mode="log")
    with pytest.raises(CountsError, match="--counts 'lg'"):
        check_counts(adata, source="x.h5ad", mode="lg")  # type: ignore[arg-type]


def test_counts_log_trains_on_normalised_data_and_is_recorded(base, tmp_path, cache):
    import scipy.sparse as sp

    from hishrst_train.preprocess import normalize_log1p

    adata, image = base
    logX = normalize_log1p(sp.csr_matrix(adata.X)).toarray()
    a = write_h5ad(adata, tmp_path / "a.h5ad", image, X=logX)
    b = write_h5ad(adata, tmp_path / "b.h5ad", image, X=logX)
    r = invoke(cli.fit, [a, "--out", tmp_path / "raw", *FAST])
    one_line_error(r, "non-integer", "--counts log")  # fractions are not raw counts
    r = invoke(cli.fit, [a, "--out", tmp_path / "run", "--counts", "log", "--cache-dir", cache, *FAST])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["schema_version"] == 5 and cfg["preprocessing"]["counts"] == "log"
    assert cfg["preprocessing"]["normalised_by"] == "input" and cfg["sections"][0]["counts"] == "log"
    assert np.isfinite(cfg["summary"]["final_train_mse"])
    # evaluate --on reads other sections as the run was trained (log) unless --counts says otherwise
    r = invoke(cli.evaluate, [tmp_path / "run", "--on", b, "--no-progress", "--device", "cpu", "--no-ari", "--allow-test-encoder",
                              "--no-ssim", "--cache-dir", cache])
    assert r.exit_code == 0, r.output
    r = invoke(cli.evaluate, [tmp_path / "run", "--on", b, "--counts", "raw", "--device", "cpu", "--allow-test-encoder"])
    one_line_error(r, str(tmp_path / "b.h5ad"), "non-integer")


def test_log_targets_are_used_as_given(base):
    from hishrst_train.preprocess import log_expression

    adata, _ = base
    a = adata.copy()
    a.X = np.log1p(a.X)
    a.uns["hishrst"] = {"counts": "log"}
    genes = list(a.var_names[:5])
    assert np.allclose(log_expression(a, genes), a[:, genes].X)


def test_runconfig_version_3_reads_as_raw_counts(small_run):
    from hishrst_train.runconfig import RUN_SCHEMA_VERSION, RunConfig

    d = json.loads((small_run / "config.json").read_text())
    assert d["schema_version"] == RUN_SCHEMA_VERSION == 5 and d["preprocessing"]["counts"] == "raw"
    d["schema_version"] = 3
    for k in ("counts", "genes_dropped"):
        d["preprocessing"].pop(k)
    cfg = RunConfig.from_dict(d)
    assert cfg.schema_version == 5 and cfg.counts == "raw" and cfg.preprocessing["genes_dropped"] is None
    assert RunConfig.from_dict({**d, "preprocessing": {}}).counts == "raw"


# ------------------------------------------------------------------------------------------ sections


def test_section_given_twice_is_refused(base, small_section, tmp_path):
    adata, image = base
    r = invoke(cli.fit, [small_section, small_section.parent, "--out", tmp_path / "r", *FAST])
    one_line_error(r, "is the same file as", "given twice")
    a = write_h5ad(adata, tmp_path / "a.h5ad", image)
    shutil.copy(tmp_path / "a.h5ad", tmp_path / "copy.h5ad")
    r = invoke(cli.fit, [a, f"{tmp_path / 'copy.h5ad'}:{image}", "--out", tmp_path / "r", *FAST])
    one_line_error(r, str(tmp_path / "copy.h5ad"), "same content", "given twice")
    assert not (tmp_path / "r").exists()


def test_genes_dropped_by_the_intersection_are_reported(base, tmp_path, cache, caplog):
    adata, image = base
    genes = list(adata.var_names)
    X = adata.X.copy()
    X[:, 0] += 1  # different content from the first section
    a = write_h5ad(adata, tmp_path / "a.h5ad", image, genes=genes[:-4])
    b = write_h5ad(adata, tmp_path / "b.h5ad", image, X=X, genes=genes[3:])
    with caplog.at_level(logging.WARNING, logger="hishrst"):
        r = invoke(cli.fit, [a, b, "--out", tmp_path / "r", "--cache-dir", cache, *FAST])
    assert r.exit_code == 0, r.output
    msg = [rec.getMessage() for rec in caplog.records if "not measured in every section" in rec.getMessage()]
    assert msg and msg[0].startswith("7 genes") and genes[0] in msg[0]
    dropped = json.loads((tmp_path / "r" / "config.json").read_text())["preprocessing"]["genes_dropped"]
    assert dropped["count"] == 7 and set(dropped["examples"]) == set(genes[:3] + genes[-4:])


def test_out_of_tissue_spots_are_not_used(small_section, tmp_path):
    import pandas as pd

    from hishrst_train.tasks import open_sections

    root = tmp_path / "s"
    shutil.copytree(small_section.parent, root, ignore=shutil.ignore_patterns("*.png"))
    pos_file = root / "outs" / "spatial" / "tissue_positions.csv"
    pos = pd.read_csv(pos_file)
    inside = pos.index[pos["in_tissue"] == 1]
    pos.loc[inside[:10], "in_tissue"] = 0  # Space Ranger says: outside the tissue
    pos.to_csv(pos_file, index=False)
    before = open_sections([small_section])[0].adata.n_obs
    sec = open_sections([root / "outs"])[0]
    assert sec.adata.n_obs == before - 10 and (sec.adata.obs["in_tissue"] == 1).all()
    assert len(sec.xy) == sec.adata.n_obs


# ------------------------------------------------------------------------------------------ pixel sizes


def test_implausible_mpp_is_refused(small_section, small_run, tmp_path, monkeypatch):
    from hishrst_train.tasks import load_section

    for value in ("1e6", "0"):
        r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--mpp", value, *FAST])
        one_line_error(r, "--mpp", "µm per pixel" if value == "0" else "implausible")
    assert not (tmp_path / "r").exists()
    r = invoke(cli.evaluate, [small_run, "--on", small_section, "--mpp", "1e6", "--device", "cpu", "--allow-test-encoder"])
    one_line_error(r, "--mpp", "implausible", "HISHRST_MPP_RANGE")
    monkeypatch.setenv("HISHRST_MPP_RANGE", "0.01,2000")
    assert load_section(small_section, mpp=1000).uns["hishrst"]["mpp"] == 1000


def test_hest_metadata_with_implausible_pixel_size(base, tmp_path):
    import anndata as ad

    adata, image = base
    for d in ("st", "wsis", "metadata"):
        (tmp_path / d).mkdir()
    a = ad.AnnData(X=adata.X, obs=adata.obs[["in_tissue"]].copy(), var=adata.var[[]].copy())
    a.obsm["spatial"] = adata.obsm["spatial"]
    a.write_h5ad(tmp_path / "st" / "S1.h5ad")
    (tmp_path / "wsis" / "S1.tif").symlink_to(image)
    meta = tmp_path / "metadata" / "S1.json"
    meta.write_text(json.dumps({"pixel_size_um_estimated": 6100.0}))
    r = invoke(cli.fit, [tmp_path / "st" / "S1.h5ad", "--out", tmp_path / "r", *FAST])
    one_line_error(r, str(meta), "pixel_size_um_estimated", "implausible", "--mpp")
