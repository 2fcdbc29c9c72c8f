"""hishrst_runtime.inference.bins: the tiles and bins of a sub-spot run, from a tissue mask (no slide, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.tokens import TokenGeometry, token_centres_px
from hishrst_runtime.inference.bins import bin_layout, check_resolution

UNI = TokenGeometry(grid=(14, 14), input_size=224, pitch_um=8.0, margin=2)  # keep 10: 80 µm tile stride


def _mask(h: int = 200, w: int = 300) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[40:150, 60:260] = True
    return m


@pytest.mark.parametrize("resolution, factor", [("8um", 1), ("16um", 2)])
def test_bins_cover_the_tissue_once_on_a_global_lattice(resolution: str, factor: int) -> None:
    mpp0, shape0 = 0.5, (8000, 12000)  # an overview pixel is 40 level-0 px = 20 µm
    lay = bin_layout(_mask(), shape0=shape0, mpp0=mpp0, geometry=UNI, resolution=resolution)  # type: ignore[arg-type]
    rc = lay.bin_rc(0, lay.n_tiles)
    assert len(rc) == lay.n_obs and len({tuple(v) for v in rc}) == lay.n_obs
    size_px = 8.0 * factor / mpp0
    xy = lay.centres_px(rc)
    np.testing.assert_allclose(xy, (rc[:, ::-1] + 0.5) * size_px)  # bin (0, 0) at pixel (0, 0)
    # every bin centre is in tissue (overview columns 60..259, rows 40..149) and the tissue is covered
    ov = np.floor(xy / 40.0).astype(int)
    assert _mask()[ov[:, 1], ov[:, 0]].all()
    tissue_um2 = 110 * 200 * 20.0**2
    assert abs(lay.n_obs * (8.0 * factor) ** 2 / tissue_um2 - 1) < 0.02
    # tiles: each bin lies in its tile's kept square, the lattice starts at an even 8 µm bin
    assert lay.offset[0] % 2 == 0 and lay.offset[1] % 2 == 0
    kb = UNI.keep // factor
    t_of_row = np.repeat(np.arange(lay.n_tiles), np.diff(lay.starts))
    tile = lay.lattice.tile_rc[t_of_row]
    np.testing.assert_array_equal((rc - np.asarray(lay.offset) // factor) // kb, tile)


def test_kept_tokens_are_the_bins() -> None:
    """The central tokens of each tile (by the tile reader's whole-pixel origin) sit on their bins."""
    mpp0 = 0.25
    lay = bin_layout(_mask(), shape0=(16000, 24000), mpp0=mpp0, geometry=UNI)
    cen = token_centres_px(lay.lattice.centres_px[:50], UNI, mpp=mpp0)[:, 2:12, 2:12]  # kept tokens
    kept = lay.lattice.bin_centres_px(np.stack(np.meshgrid(np.arange(10), np.arange(10), indexing="ij"), -1)[None]
                                      + lay.lattice.tile_rc[:50, None, None] * 10)
    assert np.abs(cen - kept).max() <= 1.0  # within a level-0 pixel (whole-pixel tile origins)


def test_resolution_checks() -> None:
    assert check_resolution(None, UNI) == "8um" and check_resolution("16um", UNI) == "16um"
    with pytest.raises(InputError, match="--resolution must be one of 8um, 16um"):
        check_resolution("4um", UNI)
    keep8 = TokenGeometry(grid=(14, 14), input_size=224, pitch_um=8.0, margin=3)
    assert check_resolution("16um", keep8) == "16um"
    with pytest.raises(InputError, match="keep 9 tokens"):
        check_resolution("16um", TokenGeometry(grid=(13, 13), input_size=208, pitch_um=8.0, margin=2))


def test_no_tissue_is_an_input_error() -> None:
    with pytest.raises(InputError, match="no tissue"):
        bin_layout(np.zeros((10, 10), bool), shape0=(1000, 1000), mpp0=0.5, geometry=UNI, where="s.svs")


def test_encoder_passes_per_mm2_at_8um() -> None:
    """UNI's geometry: one pass per 80 × 80 µm of tissue (plus the tiles on its edge) — 25× fewer than a
    16 µm spot grid's one pass per 16 × 16 µm."""
    lay = bin_layout(_mask(), shape0=(8000, 12000), mpp0=0.5, geometry=UNI)
    tissue_mm2 = lay.n_obs * (8e-3) ** 2
    per_mm2 = lay.n_tiles / tissue_mm2
    assert 1e6 / 80**2 <= per_mm2 < 1.1 * 1e6 / 80**2  # 156.25 / mm² and the edge tiles
    assert (1e6 / 16**2) / per_mm2 > 20
