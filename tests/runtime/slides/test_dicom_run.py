"""``hishrst-run`` end to end on a DICOM whole slide: the folder argument reaches the DICOM reader through the
format registry (:mod:`hishrst_runtime.slides.formats`, no DICOM case in ``sources`` / ``reader``), and the run
gives the same points and expression as a run on an OME-Zarr store of the same pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("wsidicom")
ad = pytest.importorskip("anndata")

from hishrst_runtime.cli.run import run  # noqa: E402
from hishrst_runtime.slides.pyramid import write_ome_zarr  # noqa: E402
from hishrst_runtime.slides.reader import open_slide  # noqa: E402
from hishrst_runtime.slides.sources import parse_source  # noqa: E402
from tests.runtime.slides.dicom_fixture import write_dicom_wsi  # noqa: E402

H, W, MPP = 900, 1100, 0.5


def _tissue_image() -> np.ndarray:
    """White glass with a textured pink / purple ellipse of tissue (what the tissue detector keeps)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:H, 0:W]
    inside = ((y - 450) / 330.0) ** 2 + ((x - 560) / 420.0) ** 2 <= 1.0
    img = np.full((H, W, 3), 245, dtype=np.uint8)
    base = np.array([180, 90, 160], dtype=np.int16)
    tissue = np.clip(base + rng.integers(-40, 40, size=(H, W, 3)), 0, 255).astype(np.uint8)
    img[inside] = tissue[inside]
    return img


def _run(slide: Path, out: Path, bundle: Path) -> Path:
    env = {k: None for k in os.environ if k.startswith("SLURM_ARRAY_")}
    args = [str(slide), "--out", str(out), "--bundle", str(bundle), "--pitch-um", "40", "--provider", "cpu",
            "--no-progress"]
    r = CliRunner().invoke(run, args, env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (result,) = [p for p in out.iterdir() if p.name.endswith(".zarr")]
    return result


def test_hishrst_run_on_a_dicom_folder_equals_the_ome_zarr_run(tmp_path: Path, tiny_bundle: Path) -> None:
    img = _tissue_image()
    folder = tmp_path / "in" / "case_1"
    write_dicom_wsi(folder, img, tile=256, levels=2, mpp=(MPP, MPP))
    store = write_ome_zarr(img, tmp_path / "ref" / "case_1.ome.zarr", mpp=MPP, chunk=256)

    src = parse_source(folder)  # dispatch by content: a folder of .dcm files is the "dicom" format
    assert src.kind == "dicom" and src.format is not None and src.format.opener.endswith(":open_dicom_slide")
    with open_slide(folder) as s:
        assert s.kind == "dicom" and s.mpp0 == pytest.approx(MPP) and s.shape0 == (H, W)

    got = ad.read_zarr(_run(folder, tmp_path / "out_dicom", tiny_bundle))
    ref = ad.read_zarr(_run(store, tmp_path / "out_zarr", tiny_bundle))
    assert got.n_obs == ref.n_obs > 20  # the expected number of points: those of the same pixels as OME-Zarr
    assert list(got.var_names) == ["G0", "G1", "G2"]
    np.testing.assert_array_equal(got.obsm["spatial"], ref.obsm["spatial"])
    np.testing.assert_allclose(np.asarray(got.X), np.asarray(ref.X), rtol=1e-5, atol=1e-6)
    assert got.uns["hishrst"]["mpp"] == pytest.approx(MPP)
