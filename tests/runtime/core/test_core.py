"""Torch-free core: geometry, neighbour grouping, patch cutting."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_runtime.core.geometry import (
    apply_affine,
    dense_array_grid,
    fit_affine,
    mpp_from_spot_diameter,
    query_grid,
    visium_array_to_um,
    visium_lattice,
)
from hishrst_runtime.core.grouping import group_points, pad_groups
from hishrst_runtime.core.patches import cut_patch, cut_patches, patch_side_px, resize_patch


def test_visium_lattice_parity_and_pitch():
    r, c = visium_lattice(6, 10)
    assert np.all(r % 2 == c % 2)
    um = visium_array_to_um(r, c)
    d = np.sqrt(((um[:, None] - um[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(d.min(1), 100.0)


def test_affine_fit_recovers_transform():
    r, c = visium_lattice(8, 12)
    A = np.array([[0.1, 87.5, 1200.0], [151.2, -0.2, 800.0]])
    px = apply_affine(A, np.stack([r, c], 1))
    np.testing.assert_allclose(fit_affine(np.stack([r, c], 1), px), A, atol=1e-8)
    with pytest.raises(ValueError, match="not all on one line"):
        fit_affine(np.array([[0, 0], [1, 1], [2, 2]]), np.zeros((3, 2)))


def test_dense_grid_factor_4_is_spots_plus_midpoints():
    r, c = visium_lattice(10, 20)
    dense = dense_array_grid(r, c, factor=4)
    measured = {(float(a), float(b)) for a, b in zip(r, c)}
    got = {(float(a), float(b)) for a, b in dense}
    assert measured <= got  # every measured spot is on the dense grid
    um = visium_array_to_um(dense[:, 0], dense[:, 1])
    d = np.sqrt(((um[:, None] - um[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(np.median(d.min(1)), 50.0)  # half the pitch: 4x density
    assert 3.4 < len(dense) / len(r) < 4.0  # 4x in the interior, fewer at the border
    assert len(dense_array_grid(r, c, factor=9)) > len(dense)
    with pytest.raises(ValueError):
        dense_array_grid(r, c, factor=0.5)


def test_query_grid_hex_and_square():
    hexp = query_grid(0, 0, 1000, 1000, pitch_um=100, kind="hex")
    sq = query_grid(0, 0, 1000, 1000, pitch_um=100, kind="square")
    assert len(sq) == 121
    assert len(hexp) > len(sq)  # hex rows are closer together
    with pytest.raises(ValueError):
        query_grid(0, 0, 10, 10, pitch_um=-1)


def test_mpp_from_spot_diameter():
    assert mpp_from_spot_diameter(96.39) == pytest.approx(0.5706, abs=1e-4)
    with pytest.raises(ValueError):
        mpp_from_spot_diameter(0)


def test_grouping_partitions_bounded_and_deterministic():
    rng = np.random.default_rng(0)
    xy = rng.random((1234, 2)) * 5000
    g1 = group_points(xy, max_size=50)
    g2 = group_points(xy.copy(), max_size=50)
    assert all(np.array_equal(a, b) for a, b in zip(g1, g2)) and len(g1) == len(g2)
    sizes = np.array([len(g) for g in g1])
    assert sizes.max() <= 50 and sizes.min() >= 25
    assert np.array_equal(np.sort(np.concatenate(g1)), np.arange(len(xy)))
    # Scale invariance: µm and pixels give the same groups.
    g3 = group_points(xy * 0.5)
    assert all(np.array_equal(a, b) for a, b in zip(g1, g3))


def test_grouping_is_spatially_coherent_unlike_barcode_order():
    r, c = visium_lattice(30, 40)
    xy = visium_array_to_um(r, c)
    perm = np.random.default_rng(1).permutation(len(xy))  # barcode order is spatially random
    xy = xy[perm]
    ours = group_points(xy, max_size=50)
    ref = np.array_split(np.arange(len(xy)), int(np.ceil(len(xy) / 50)))

    def spread(groups):
        return np.mean([np.sqrt(((xy[g] - xy[g].mean(0)) ** 2).sum(1)).mean() for g in groups])

    assert spread(ours) < 0.4 * spread(ref)


def test_pad_groups():
    idx, mask = pad_groups([np.array([3, 4, 5]), np.array([0])])
    assert idx.tolist() == [[3, 4, 5], [0, -1, -1]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_grouping_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        group_points(np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        group_points(np.array([[0.0, np.nan]]))


def test_edge_patch_is_padded_white_and_rgb_order_kept():
    img = np.zeros((40, 60, 3), np.uint8)
    img[..., 0] = 200  # red
    p = cut_patch(img, (0.0, 0.0), 20)  # centred on the corner
    assert p.shape == (20, 20, 3)
    assert (p[:10, :10] == 255).all()  # outside: white glass
    assert (p[10:, 10:, 0] == 200).all() and (p[10:, 10:, 1:] == 0).all()  # inside: red stays in channel 0
    far = cut_patch(img, (-100.0, -100.0), 8)
    assert (far == 255).all()


def test_patch_side_and_resize():
    assert patch_side_px(64.0, 0.5705) == 112  # the paper's 112-px crop on DLPFC
    with pytest.raises(ValueError):
        patch_side_px(64.0, 0.0)
    img = (np.random.default_rng(0).random((100, 100, 3)) * 255).astype(np.uint8)
    out = cut_patches(img, np.array([[50.0, 50.0], [5.0, 95.0]]), side=30, out_size=16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(resize_patch(out[0], 16), out[0])
