"""Tests for hishrst_runtime.output.spatialdata_store: the SpatialData store built from an AnnData output."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ad = pytest.importorskip("anndata")

from hishrst_runtime.core.errors import EnvironmentProblem  # noqa: E402
from hishrst_runtime.output.errors import IncompleteOutputError, MissingExtraError, OutputExistsError  # noqa: E402
from hishrst_runtime.output.layout import update_root_attrs  # noqa: E402
from hishrst_runtime.output.overview import ArrayLevel, as_level_sources, read_pyramid  # noqa: E402
from hishrst_runtime.output.spatialdata_store import spatialdata_path, spatialdata_status, write_spatialdata  # noqa: E402
from hishrst_runtime.output.store import OutputStore, SpatialImages  # noqa: E402
from tests.runtime.output.test_store import GENES, expected_values  # noqa: E402

H0, W0 = 1024, 1536  # level-0 size of the synthetic slide (pixels)
MARKED = np.array([[200.0, 300.0], [1000.0, 700.0], [1400.0, 150.0]])  # level-0 (x, y) under red squares
SPOT_DIAMETER = 60.0  # level-0 pixels


def need_spatialdata():
    return pytest.importorskip("spatialdata", reason="the [spatialdata] extra is not installed")


def slide_image() -> np.ndarray:
    """A white level-0 image with a red 64 px square centred on each MARKED point."""
    img = np.full((H0, W0, 3), 255, np.uint8)
    for x, y in MARKED.astype(int):
        img[y - 32:y + 32, x - 32:x + 32] = (255, 0, 0)
    return img


def points() -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(100, W0, 250.0), np.arange(100, H0, 250.0))
    return np.concatenate([MARKED, np.stack([xs.ravel(), ys.ravel()], axis=1)])


def write_store(path: Path, *, spatial: SpatialImages | None = None, uns: dict | None = None,
                finalize: bool = True) -> OutputStore:
    xy = points()
    n = len(xy)
    if spatial is None and uns is None:
        thumb = slide_image()[::16, ::16].copy()
        spatial = SpatialImages("slide_A", thumb, lowres_scalef=1 / 16, spot_diameter_fullres=SPOT_DIAMETER)
    store = OutputStore.create(path, obs_xy_px=xy, grid_index=np.stack([np.arange(n), np.arange(n)], 1),
                               tissue_fraction=np.ones(n, np.float32), genes=GENES,
                               uns={"hishrst": {"mpp": 0.5, "pitch_um": 30.0}, **(uns or {})}, spatial=spatial,
                               chunk_rows=8, fsync=False)
    store.write_rows(np.arange(n), expected_values(np.arange(n)))
    if finalize:
        store.finalize()
    return store


@pytest.fixture(scope="module")
def slide_levels(tmp_path_factory: pytest.TempPathFactory):
    """A real 3-level OME-Zarr slide (1536, 768, 384 px wide), opened with the runtime's reader."""
    from hishrst_runtime.slides.pyramid import write_ome_zarr
    from hishrst_runtime.slides.reader import open_slide

    path = write_ome_zarr(slide_image(), tmp_path_factory.mktemp("slide") / "s.ome.zarr", mpp=0.5, chunk=256,
                          n_levels=3)
    with open_slide(path) as slide:
        yield slide.levels


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, slide_levels) -> tuple[Path, Path, object]:
    """(AnnData store, SpatialData store, what spatialdata.read_zarr gives) for the synthetic slide."""
    sd = need_spatialdata()
    d = tmp_path_factory.mktemp("out")
    src = d / "slide_A.zarr"
    write_store(src)
    out = write_spatialdata(src, levels=slide_levels, max_image_side=800, fsync=False)
    return src, out, sd.read_zarr(out)


def test_store_holds_table_shapes_and_image(converted) -> None:
    src, out, sdata = converted
    assert out == src.with_name("slide_A.sdata.zarr") == spatialdata_path(src)
    assert spatialdata_status(out) == "complete" and spatialdata_status(out, source=src) == "complete"
    assert not Path(str(out) + ".partial").exists()
    assert set(sdata.images) == {"slide_A_he"} and set(sdata.shapes) == {"slide_A_spots"}
    assert set(sdata.tables) == {"table"}
    tree = sdata.images["slide_A_he"]
    shapes = [tuple(tree[k]["image"].shape) for k in tree]  # level 0 (1536 px) exceeds 800: levels 1 and 2
    assert shapes == [(3, H0 // 2, W0 // 2), (3, H0 // 4, W0 // 4)]
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X, expected_values(np.arange(table.n_obs)))
    assert list(table.var_names) == GENES
    np.testing.assert_array_equal(table.obsm["spatial"], points())
    assert "hires" in table.uns["spatial"]["slide_A"]["images"]


def test_table_annotates_the_shapes(converted) -> None:
    _, _, sdata = converted
    table, circles = sdata.tables["table"], sdata.shapes["slide_A_spots"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "slide_A_spots", "region_key": "region", "instance_key": "instance_id"}
    assert (table.obs["region"] == "slide_A_spots").all()
    np.testing.assert_array_equal(table.obs["instance_id"].to_numpy(), np.arange(table.n_obs))
    np.testing.assert_array_equal(circles.index.to_numpy(), table.obs["instance_id"].to_numpy())
    centres = np.stack([circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy()], axis=1)
    np.testing.assert_array_equal(centres, table.obsm["spatial"])  # same order as the rows
    np.testing.assert_allclose(circles["radius"].to_numpy(), SPOT_DIAMETER / 2)


def _to_pixel(transform, xy: np.ndarray) -> np.ndarray:
    """Global (x, y) -> the element's own (x, y) through the inverse of its transformation to "global"."""
    m = transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    inv = np.linalg.inv(m)
    return (inv @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]


def test_spots_land_on_the_image_pixels_they_were_placed_on(converted) -> None:
    from spatialdata.transformations import get_transformation

    _, _, sdata = converted
    circles, tree = sdata.shapes["slide_A_spots"], sdata.images["slide_A_he"]
    assert set(sdata.coordinate_systems) == {"global"}
    centres = np.stack([circles.geometry.x.to_numpy(), circles.geometry.y.to_numpy()], axis=1)
    world = _to_pixel(get_transformation(circles, "global").inverse(), centres)  # shapes -> global (Identity)
    np.testing.assert_allclose(world, centres)
    scale0 = tree["scale0"]["image"]
    px = _to_pixel(get_transformation(tree, "global"), world[: len(MARKED)])
    np.testing.assert_allclose(px, MARKED / 2)  # level 1: 2 level-0 pixels per image pixel
    img0 = np.moveaxis(scale0.values, 0, -1)
    for x, y in np.floor(px).astype(int):
        assert tuple(img0[y, x]) == (255, 0, 0)
    off = np.floor(_to_pixel(get_transformation(tree, "global"), world[len(MARKED):])).astype(int)
    assert (img0[off[:, 1], off[:, 0]] == 255).all()  # grid points away from the squares: white
    img1 = np.moveaxis(tree["scale1"]["image"].values, 0, -1)
    factor = scale0.shape[-1] / img1.shape[1]  # scale1 is implied by the shape ratio
    for x, y in np.floor(px / factor).astype(int):
        assert tuple(img1[y, x]) == (255, 0, 0)


def test_spatialdata_plot_draws_predictions_over_the_image(converted) -> None:
    """No glue: the gene is found in the table that annotates the circles."""
    pytest.importorskip("spatialdata_plot", reason="spatialdata-plot is not installed")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, sdata = converted
    fig, ax = plt.subplots()
    sdata.pl.render_images("slide_A_he").pl.render_shapes("slide_A_spots", color=GENES[0]).pl.show(ax=ax)
    (im,) = ax.images  # the H&E, spanning the slide in level-0 pixels, its red squares under MARKED
    img = np.asarray(im.get_array())
    to_data = im.get_transform() - ax.transData
    h, w = img.shape[:2]
    np.testing.assert_allclose(to_data.transform([[-0.5, -0.5], [w - 0.5, h - 0.5]]), [[0, 0], [W0, H0]], atol=4)
    for x, y in np.floor(to_data.inverted().transform(MARKED) + 0.5).astype(int):
        np.testing.assert_allclose(img[y, x][:3], (1.0, 0.0, 0.0) if img.dtype.kind == "f" else (255, 0, 0))
    (spots,) = ax.collections  # one circle per point, where it was predicted, coloured by its value
    centres = np.array([path.vertices[:-1].mean(axis=0) for path in spots.get_paths()])
    np.testing.assert_allclose(centres, points(), atol=2)
    values = np.asarray(sdata.tables["table"][:, GENES[0]].X).ravel()
    assert len(values) == len(points()) and np.ptp(values) > 0
    np.testing.assert_allclose(spots.get_facecolors(), spots.cmap(spots.norm(values)), atol=1e-6)
    plt.close("all")


def test_without_levels_the_stored_overview_is_used(tmp_path: Path) -> None:
    need_spatialdata()
    import spatialdata as sd
    from spatialdata.transformations import get_transformation

    src = tmp_path / "s.zarr"
    write_store(src)
    sdata = sd.read_zarr(write_spatialdata(src, fsync=False))
    tree = sdata.images["slide_A_he"]  # the overview and its 2x reduction
    assert [tuple(tree[k]["image"].shape) for k in tree] == [(3, H0 // 16, W0 // 16), (3, H0 // 32, W0 // 32)]
    px = _to_pixel(get_transformation(tree, "global"), MARKED)
    np.testing.assert_allclose(px, MARKED / 16)


def test_older_store_without_hires_converts(tmp_path: Path) -> None:
    """A format-1 store (uns['spatial'] with 'lowres' only) is still read and converted."""
    need_spatialdata()
    import spatialdata as sd

    thumb = slide_image()[::8, ::8].copy()
    lib = {"images": {"lowres": thumb}, "metadata": {},
           "scalefactors": {"tissue_lowres_scalef": 1 / 8, "tissue_hires_scalef": 1 / 8, "spot_diameter_fullres": 50.0}}
    src = tmp_path / "old.zarr"
    write_store(src, uns={"spatial": {"old_lib": lib}})
    assert "hires" not in ad.read_zarr(src).uns["spatial"]["old_lib"]["images"]
    sdata = sd.read_zarr(write_spatialdata(src, fsync=False))
    assert tuple(sdata.images["old_lib_he"]["scale0"]["image"].shape) == (3, H0 // 8, W0 // 8)
    np.testing.assert_allclose(sdata.shapes["old_lib_spots"]["radius"].to_numpy(), 25.0)


def test_missing_extra_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "s.zarr"
    write_store(src)
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # "import spatialdata" raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "hishrst\[spatialdata\]"') as info:
        write_spatialdata(src, fsync=False)
    assert isinstance(info.value, EnvironmentProblem) and "\n" not in str(info.value)
    assert isinstance(info.value.__cause__, ImportError)
    assert spatialdata_status(spatialdata_path(src)) == "missing"


def test_crash_mid_write_leaves_no_complete_looking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = need_spatialdata()
    src = tmp_path / "s.zarr"
    write_store(src)
    out = spatialdata_path(src)
    real_write = sd.SpatialData.write

    def crashing_write(self, file_path, **kw):
        real_write(self, file_path, **kw)  # everything on disk, but not yet marked complete nor swapped in
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(sd.SpatialData, "write", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_spatialdata(src, fsync=False)
    assert not out.exists() and spatialdata_status(out) == "missing"
    monkeypatch.undo()
    # a killed run's leftover partial (no mark) is incomplete, and the next write replaces it
    partial = Path(str(out) + ".partial")
    partial.mkdir()
    (partial / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    assert spatialdata_status(out) == "incomplete" and not out.exists()
    write_spatialdata(src, fsync=False)
    assert spatialdata_status(out) == "complete" and not partial.exists()


def test_existing_stores_foreign_complete_and_stale(tmp_path: Path) -> None:
    need_spatialdata()
    src = tmp_path / "s.zarr"
    write_store(src)
    out = spatialdata_path(src)
    out.mkdir()
    (out / "mine.txt").write_text("not hishrst's")
    with pytest.raises(OutputExistsError, match="not a SpatialData store written by hishrst"):
        write_spatialdata(src, fsync=False, replace=True)
    assert (out / "mine.txt").read_text() == "not hishrst's"
    (out / "mine.txt").unlink()
    out.rmdir()
    write_spatialdata(src, fsync=False)
    with pytest.raises(OutputExistsError, match="already exists"):
        write_spatialdata(src, fsync=False)
    update_root_attrs(src, {"hishrst_completed_at": 1.0}, fsync=False)  # the AnnData output was recomputed
    assert spatialdata_status(out) == "complete" and spatialdata_status(out, source=src) == "stale"
    write_spatialdata(src, fsync=False, replace=True)
    assert spatialdata_status(out, source=src) == "complete"


def test_incomplete_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "s.zarr"
    write_store(src, finalize=False).close()
    with pytest.raises(IncompleteOutputError, match="finish it"):
        write_spatialdata(src, fsync=False)
    assert spatialdata_status(spatialdata_path(src)) == "missing"


class _HugeLevel:
    """A level too large to read: any read fails the test."""

    def __init__(self, shape: tuple[int, int], downsample: float) -> None:
        self.shape, self.downsample = shape, downsample

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise AssertionError(f"read a box of level {self.shape}")


class _CountingLevel(_HugeLevel):
    """A constant grey level that records the size of each box read."""

    def __init__(self, shape: tuple[int, int], downsample: float) -> None:
        super().__init__(shape, downsample)
        self.boxes: list[int] = []

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        h, w = min(y1, self.shape[0]) - y0, min(x1, self.shape[1]) - x0
        self.boxes.append(h * w)
        return np.full((h, w, 3), 128, np.uint8)


def test_pyramid_never_reads_large_levels() -> None:
    small = _CountingLevel((3000, 4000), 16.0)
    scales = read_pyramid([_HugeLevel((48000, 64000), 1.0), _HugeLevel((12000, 16000), 4.0), small], max_side=4096)
    assert [s.image.shape for s in scales] == [(3000, 4000, 3)] and scales[0].downsample == 16.0
    # no level is small enough: the coarsest is reduced block by block, never read whole
    coarse = _CountingLevel((6000, 9000), 8.0)
    scales = read_pyramid([_HugeLevel((48000, 72000), 1.0), coarse], max_side=4096)
    assert scales[0].image.shape == (2000, 3000, 3) and scales[0].downsample == 24.0
    assert (scales[0].image == 128).all() and max(coarse.boxes) <= 2048 ** 2 and sum(coarse.boxes) == 6000 * 9000


def test_array_levels_need_downsamples() -> None:
    img = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(ValueError, match="level_downsamples"):
        as_level_sources([img], None)
    (lv,) = as_level_sources([img], [4])
    assert isinstance(lv, ArrayLevel) and lv.shape == (64, 96) and lv.downsample == 4.0


def test_per_axis_downsample_from_pixel_sizes() -> None:
    """Slide levels whose y and x ratios differ (odd sizes) keep both in the image's Scale."""
    big, small = _HugeLevel((10001, 20001), 1.0), _CountingLevel((2500, 5001), 3.9998)
    big.mpp_yx, small.mpp_yx = (0.25, 0.25), (0.25 * 4.0004, 0.25 * 3.9992)
    (scale,) = read_pyramid([big, small], max_side=8000)
    assert scale.yx == pytest.approx((4.0004, 3.9992)) and scale.downsample == 3.9998
    (scale,) = read_pyramid([ArrayLevel(np.zeros((50, 80, 3), np.uint8), 8.0)], max_side=100)
    assert scale.yx == (8.0, 8.0)
