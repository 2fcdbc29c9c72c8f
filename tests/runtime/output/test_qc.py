"""The QC thumbnail (``OUT/S.qc.png``) and the pixel size the SpatialData output carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.output.errors import OutputExistsError
from hishrst_runtime.output.qc import GENE_RULE, choose_gene, nice_length_um, render_qc, write_qc_png
from hishrst_runtime.output.store import OutputStore


def _store(path: Path, values: np.ndarray) -> None:
    n, g = values.shape
    store = OutputStore.create(path, obs_xy_px=np.stack([np.arange(n) * 10.0, np.arange(n) * 5.0], 1),
                               grid_index=np.zeros((n, 2), np.int64), tissue_fraction=np.ones(n, np.float32),
                               genes=[f"G{j}" for j in range(g)], uns={}, chunk_rows=7, fsync=False)
    store.write_rows(np.arange(n), values)
    store.finalize()


def test_choose_gene_takes_the_highest_variance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(5, s, 40) for s in (0.1, 3.0, 1.0)], 1).astype(np.float32)
    _store(tmp_path / "s.zarr", values)
    gene = choose_gene(tmp_path / "s.zarr", ["G0", "G1", "G2"])
    assert (gene.index, gene.name, gene.rule) == (1, "G1", GENE_RULE)
    np.testing.assert_array_equal(gene.values, values[:, 1])  # read across chunks of 7 rows
    assert gene.variance == pytest.approx(values[:, 1].astype(np.float64).var(), rel=1e-6)


@pytest.mark.parametrize("target, want", [(0.7, 0.5), (130.0, 100.0), (260.0, 200.0), (999.0, 500.0), (5.0, 5.0)])
def test_scale_bar_lengths(target: float, want: float) -> None:
    assert nice_length_um(target) == want


def test_render_and_write(tmp_path: Path) -> None:
    from PIL import Image

    thumb = np.full((100, 160, 3), 240, np.uint8)
    mask = np.zeros((100, 160), bool)
    mask[20:80, 30:130] = True
    pts = np.array([[200.0, 200.0], [400.0, 300.0], [600.0, 250.0]])  # level-0 px; overview scale 0.25
    img = render_qc(thumb, mask, pts, np.array([0.0, 1.0, 2.0]), thumbnail_scale=0.25, mpp0=0.5, radius_px=8,
                    title="slide.svs", gene="G1")
    assert img.shape == (134, 160, 3) and img.dtype == np.uint8  # the title band on top
    band = 34
    assert tuple(img[band + 20, 60]) == (0, 200, 255)  # the tissue outline
    low, high = img[band + 50, 50], img[band + 62, 150]  # the first and last point: ramp ends
    assert tuple(low) != tuple(high) and low[2] > low[1] and high[0] > 200 and high[1] > 200
    out = write_qc_png(tmp_path / "s.qc.png", img, gene="G1")
    with Image.open(out) as png:
        assert png.size == (160, 134) and png.text["hishrst:gene"] == "G1"
        assert png.text["hishrst:rule"] == GENE_RULE and png.text["Software"] == "hishrst"
    write_qc_png(out, img, gene="G2")  # its own thumbnail is replaced; anything else is left alone
    other = tmp_path / "other.qc.png"
    other.write_bytes(b"not ours")
    with pytest.raises(OutputExistsError, match="was not written by hishrst-run"):
        write_qc_png(other, img, gene="G1")
    assert other.read_bytes() == b"not ours"


def test_spatialdata_output_carries_the_pixel_size(tmp_path: Path) -> None:
    """The SpatialData store is fed back in without --mpp: its image element has µm units and scales."""
    pytest.importorskip("spatialdata")
    from hishrst_runtime.output.spatialdata_store import write_spatialdata
    from hishrst_runtime.slides.reader import open_slide
    from tests.runtime.output.test_spatialdata import slide_image, write_store

    write_store(tmp_path / "s.zarr")  # uns['hishrst']['mpp'] = 0.5; a 1/16 thumbnail
    img = slide_image()
    for name, kw in (("full", {"levels": [img, img[::4, ::4].copy()], "level_downsamples": [1, 4]}), ("thumb", {})):
        out = write_spatialdata(tmp_path / "s.zarr", tmp_path / f"{name}.sdata.zarr", fsync=False, **kw)
        slide = open_slide(f"{out}::slide_A_he")
        assert slide.mpp_source != "override" and slide.mpp0 == pytest.approx(0.5)
        assert tuple(slide.shape0) == img.shape[:2]
        import spatialdata as sd
        from spatialdata.transformations import get_transformation

        element = sd.read_zarr(out).images["slide_A_he"]
        scale = get_transformation(element).to_affine_matrix(("y", "x"), ("y", "x"))
        assert scale[0, 0] == pytest.approx(1.0 if name == "full" else 16.0)  # still level-0 pixels
