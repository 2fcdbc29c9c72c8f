"""Sub-spot bin outputs open in the tools labs use: scanpy, squidpy and SpatialData (``rasterize_bins``,
spatialdata-plot). Each check is skipped, with its reason, where that package is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

ad = pytest.importorskip("anndata")
pytest.importorskip("onnx")

from tests.runtime.test_subspot_run import bundle, flat, run  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def outputs(flat: Path, bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("eco")
    res = run(flat, bundle, out, output_format="anndata,spatialdata")
    assert res.status == "ok", res
    return out


def _adata(outputs: Path) -> Any:
    return ad.read_zarr(outputs / "flat.zarr")


def test_scanpy_plots_the_bins(outputs: Path) -> None:
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    a = _adata(outputs)
    assert a.obs["array_row"].dtype.kind == "i" and a.obs["array_col"].dtype.kind == "i"
    size_px = a.uns["bins"]["size_um"] / a.uns["bins"]["mpp"]
    ax = sc.pl.spatial(a, color=a.var_names[0], spot_size=size_px, show=False)
    assert ax is not None


def test_squidpy_builds_the_bin_neighbourhood(outputs: Path) -> None:
    sq = pytest.importorskip("squidpy")
    a = _adata(outputs)
    sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=4)
    degree = np.asarray(a.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    assert degree.max() == 4 and np.median(degree) == 4  # a square lattice: interior bins have 4 neighbours


def test_spatialdata_rasterizes_and_renders_the_bins(outputs: Path) -> None:
    sd = pytest.importorskip("spatialdata")
    pytest.importorskip("spatialdata_plot")
    import matplotlib

    matplotlib.use("Agg")
    sdata = sd.read_zarr(outputs / "flat.sdata.zarr")
    table = sdata.tables["table"]
    region = table.uns["spatialdata_attrs"]["region"]
    img = sd.rasterize_bins(sdata, bins=region, table_name="table", col_key="array_col", row_key="array_row")
    rows = table.obs["array_row"].max() - table.obs["array_row"].min() + 1
    cols = table.obs["array_col"].max() - table.obs["array_col"].min() + 1
    assert img.shape[1:] == (rows, cols) and img.shape[0] == table.n_vars
    sdata.pl.render_shapes(region, color=str(table.var_names[0]), table_name="table").pl.show()
