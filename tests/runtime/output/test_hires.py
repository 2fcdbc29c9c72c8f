"""The AnnData output's ``uns['spatial']`` images: a ``'hires'`` beside ``'lowres'`` (format version 2), so
squidpy's ``spatial_scatter`` works with its defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.output.content import HIRES_MAX_SIDE  # noqa: E402
from hishrst_runtime.output.layout import FORMAT_VERSION  # noqa: E402
from hishrst_runtime.output.store import SpatialImages  # noqa: E402
from tests.runtime.output.test_store import GENES, create, finished_adata, spatial, write_all  # noqa: E402


def test_store_has_hires_and_lowres(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    store = create(path, n=64)
    write_all(store, np.arange(64))
    store.finalize()
    assert FORMAT_VERSION == 2
    assert json.loads((path / ".zattrs").read_text())["hishrst_format_version"] == 2
    lib = ad.read_zarr(path).uns["spatial"]["slide_A"]
    np.testing.assert_array_equal(lib["images"]["lowres"], spatial().lowres)
    np.testing.assert_array_equal(lib["images"]["hires"], spatial().lowres)  # a small overview is both
    assert lib["scalefactors"]["tissue_hires_scalef"] == lib["scalefactors"]["tissue_lowres_scalef"] == 0.0125


def test_hires_is_bounded_and_explicit_hires_is_kept() -> None:
    big = np.zeros((2500, 3000, 3), np.uint8)
    images = SpatialImages("lib", big, lowres_scalef=0.1, spot_diameter_fullres=50.0).to_uns()["lib"]
    hires = images["images"]["hires"]
    assert max(hires.shape[:2]) == HIRES_MAX_SIDE and hires.shape == (1667, 2000, 3)
    assert images["images"]["lowres"] is big
    assert images["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.1 * 2000 / 3000)
    own = np.ones((10, 12, 3), np.uint8)
    images = SpatialImages("lib", big, 0.1, 50.0, hires=own, hires_scalef=0.5).to_uns()["lib"]
    assert images["images"]["hires"] is own and images["scalefactors"]["tissue_hires_scalef"] == 0.5


def test_squidpy_spatial_scatter_with_defaults(tmp_path: Path) -> None:
    sq = pytest.importorskip("squidpy", reason="squidpy is not installed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adata = finished_adata(tmp_path / "s.zarr", n=64)
    lib = adata.uns["spatial"]["slide_A"]
    sq.pl.spatial_scatter(adata, color=GENES[0])  # looks up uns['spatial'][lib]['images']['hires']
    ax = plt.gcf().axes[0]
    assert ax.get_title() == GENES[0]
    (im,) = ax.images  # the slide image is drawn under the spots: the stored 'hires' one
    np.testing.assert_array_equal(np.asarray(im.get_array()), lib["images"]["hires"])
    (spots,) = ax.collections
    centres = np.array([path.vertices[:-1].mean(axis=0) for path in spots.get_paths()])
    want = np.asarray(adata.obsm["spatial"]) * lib["scalefactors"]["tissue_hires_scalef"]
    order = lambda xy: xy[np.lexsort((xy[:, 1], xy[:, 0]))]  # noqa: E731
    np.testing.assert_allclose(order(centres), order(want), atol=0.05)  # every spot, on its place in the image
    values = np.asarray(adata[:, GENES[0]].X).ravel()
    np.testing.assert_allclose(np.sort(np.asarray(spots.get_array())), np.sort(values), rtol=1e-6)  # its colours
    plt.close("all")
