"""Token geometry of sub-spot models (hishrst_runtime.core.tokens)."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.patches import cut_patch, resize_patch
from hishrst_runtime.core.tokens import (
    TokenGeometry,
    aggregate_log1p,
    disk_token_weights,
    lattice_shape,
    pool_bins_log1p,
    square_token_weights,
    tile_lattice,
    token_centres_px,
    token_offsets_um,
)

UNI = TokenGeometry(grid=(14, 14), input_size=224, pitch_um=8.0, margin=2)


def test_uni_geometry_numbers() -> None:
    assert UNI.patch_px == 16 and UNI.tile_um == 112.0 and UNI.encoder_mpp == 0.5
    assert UNI.keep == 10 and UNI.stride_um == 80.0
    uni2 = TokenGeometry(grid=(16, 16), input_size=224, pitch_um=8.0)
    assert uni2.patch_px == 14 and uni2.tile_um == 128.0
    assert TokenGeometry.from_dict(UNI.to_dict()) == UNI


@pytest.mark.parametrize("kw", [dict(grid=(14, 12), input_size=224), dict(grid=(14, 14), input_size=220),
                                dict(grid=(14, 14), input_size=224, pitch_um=0.0),
                                dict(grid=(4, 4), input_size=64, margin=2)])
def test_bad_geometry_is_refused(kw: dict) -> None:
    with pytest.raises(InputError):
        TokenGeometry(**kw)


@pytest.mark.parametrize("mpp", [0.25, 0.2731, 0.5, 0.5705, 1.0])
def test_token_centre_maps_back_to_its_pixels(mpp: float) -> None:
    """A token's µm centre lands on the pixels that token sees after the tile is cut and resized."""
    side = UNI.tile_side_px(mpp)
    h = w = side + 40
    # an image whose every pixel encodes its own coordinates in R (x) and G (y), coarse enough to survive resizing
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (xx * 255 // (w - 1)).astype(np.uint8)
    img[..., 1] = (yy * 255 // (h - 1)).astype(np.uint8)
    centre = np.array([[w / 2 + 0.3, h / 2 - 0.2]])
    tok = token_centres_px(centre, UNI, mpp=mpp)[0]
    tile = resize_patch(cut_patch(img, centre[0], side), UNI.input_size)
    p = UNI.patch_px
    for r, c in [(0, 0), (3, 11), (13, 13), (7, 6)]:
        seen = tile[r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1, 3).astype(float).mean(0)
        x, y = tok[r, c]
        assert abs(seen[0] - x * 255 / (w - 1)) < 1.5 and abs(seen[1] - y * 255 / (h - 1)) < 1.5
    # the ideal µm offsets agree with the pixel centres within one pixel
    off = (tok - tok.mean(axis=(0, 1))) * mpp
    np.testing.assert_allclose(off, token_offsets_um(UNI), atol=mpp + 1e-9)


def test_disk_weights_cover_the_right_tokens() -> None:
    w = disk_token_weights(UNI, 27.5)
    assert w.shape == (14, 14) and abs(w.sum() - 1) < 1e-12
    # a 55 µm disk centred on the tile spans ±27.5 µm = tokens 3..10 (centres at ±4, ±12, ±20, ±28 µm minus edge)
    rows = np.flatnonzero(w.sum(1) > 0)
    assert rows.min() == 3 and rows.max() == 10
    assert np.allclose(w, w.T) and np.allclose(w, w[::-1]) and w[6, 6] == w.max()
    # area: a token wholly inside gets pitch² / (π r²)
    assert abs(w[6, 6] - 64 / (np.pi * 27.5**2)) < 1e-3
    shifted = disk_token_weights(UNI, 27.5, centre_offset_um=(16.0, 0.0))
    np.testing.assert_allclose(shifted[:, 2:], w[:, :-2], atol=1e-12)
    with pytest.raises(InputError):
        disk_token_weights(UNI, 5.0, centre_offset_um=(500.0, 0.0))


def test_square_weights_of_a_bin_and_of_a_16um_bin() -> None:
    one = square_token_weights(UNI, 8.0, centre_offset_um=(4.0, 4.0), samples=8)
    assert one[7, 7] == pytest.approx(1.0) and one.sum() == pytest.approx(1.0)
    four = square_token_weights(UNI, 16.0, samples=8)
    assert np.count_nonzero(four > 0.2) == 4 and four[6:8, 6:8].sum() == pytest.approx(1.0)


def test_aggregation_is_in_count_space() -> None:
    pred = np.log1p(np.array([[0.0, 10.0], [4.0, 10.0]]))  # two tokens, two genes
    out = aggregate_log1p(pred, np.array([0.5, 0.5]))
    np.testing.assert_allclose(out, np.log1p([2.0, 10.0]), rtol=1e-6)
    m = np.log1p(np.arange(16, dtype=float).reshape(4, 4, 1))
    pooled = pool_bins_log1p(m, 2)
    assert pooled.shape == (2, 2, 1)
    np.testing.assert_allclose(pooled[0, 0, 0], np.log1p(np.mean([0, 1, 4, 5])), rtol=1e-6)
    with pytest.raises(InputError):
        pool_bins_log1p(np.zeros((3, 4, 1)), 2)


@pytest.mark.parametrize("mpp", [0.25, 0.5, 0.5705])
def test_lattice_tiles_kept_tokens_without_gaps(mpp: float) -> None:
    box = (100.0, 50.0, 100.0 + 1000 / mpp, 50.0 + 700 / mpp)
    lat = tile_lattice(box, UNI, mpp=mpp)
    assert lattice_shape(box, UNI, mpp=mpp) == (int(lat.tile_rc[:, 0].max()) + 1, int(lat.tile_rc[:, 1].max()) + 1)
    seen = np.zeros(lat.n_bins, int)
    for t in range(len(lat.centres_px)):
        rc = lat.bin_rc(t)
        seen[rc[..., 0], rc[..., 1]] += 1
        # kept tokens of the tile (cut around its centre) sit on their bins' ideal centres within a pixel
        tok = token_centres_px(lat.centres_px[t:t + 1], UNI, mpp=mpp)[0, 2:-2, 2:-2]
        np.testing.assert_allclose(tok, lat.bin_centres_px(rc), atol=1.0)
    assert seen.min() == 1 and seen.max() == 1
    assert lat.n_bins[1] * UNI.pitch_um >= 1000 and lat.n_bins[0] * UNI.pitch_um >= 700
    keep = np.zeros(lattice_shape(box, UNI, mpp=mpp), bool)
    keep[0, 0] = True
    assert len(tile_lattice(box, UNI, mpp=mpp, keep_tile=keep).centres_px) == 1
