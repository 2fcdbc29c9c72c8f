"""Tests of tissue detection (hishrst_runtime.slides.tissue)."""

from __future__ import annotations

import numpy as np
import pytest

from hishrst_runtime.slides.tissue import detect_tissue, otsu_threshold, tissue_fraction_at


def _background(h: int = 160, w: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(238, 4, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _blob_slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    img = _background(seed=seed)
    yy, xx = np.mgrid[:160, :240]
    blob = ((yy - 80) / 50.0) ** 2 + ((xx - 110) / 70.0) ** 2 <= 1.0
    rng = np.random.default_rng(seed + 1)
    pink = np.clip(rng.normal((215, 140, 190), 12, size=img.shape), 0, 255).astype(np.uint8)
    img[blob] = pink[blob]
    hole = ((yy - 80) ** 2 + (xx - 110) ** 2) <= 6**2  # a small white hole (e.g. a vessel)
    img[hole] = 240
    return img, blob


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("method", ["otsu-saturation", "otsu-gray"])
def test_finds_blob_on_white(method: str) -> None:
    img, truth = _blob_slide()
    mask = detect_tissue(img, method=method)  # type: ignore[arg-type]
    assert mask.dtype == bool and mask.shape == truth.shape
    assert _iou(mask, truth) > 0.95
    assert mask[80, 110]  # the hole is filled


@pytest.mark.parametrize("fill", ["white", "noisy", "black", "gray"])
def test_blank_is_empty(fill: str) -> None:
    img = {"white": np.full((100, 120, 3), 255, np.uint8), "noisy": _background(100, 120),
           "black": np.zeros((100, 120, 3), np.uint8), "gray": np.full((100, 120, 3), 128, np.uint8)}[fill]
    for method in ("otsu-saturation", "otsu-gray"):
        if fill == "gray" and method == "otsu-gray":
            continue  # a uniformly grey overview is ambiguous for a darkness threshold
        assert not detect_tissue(img, method=method).any()  # type: ignore[arg-type]
    assert detect_tissue(np.zeros((0, 0, 3), np.uint8)).shape == (0, 0)


def test_pen_black_and_specks_are_ignored() -> None:
    img, truth = _blob_slide()
    img[10:16, 5:235] = (40, 160, 60)  # green pen stroke
    img[140:150, 190:235] = (10, 10, 10)  # black marker / dirt
    img[20:22, 20:22] = (200, 120, 180)  # a 4-pixel speck of stain
    mask = detect_tissue(img)
    assert not mask[10:16].any()
    assert not mask[140:150, 190:235].any()
    assert not mask[20:22, 20:22].any()
    assert _iou(mask, truth) > 0.95


def test_rgba_and_bad_input() -> None:
    img, truth = _blob_slide()
    rgba = np.concatenate([img, np.full(img.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    np.testing.assert_array_equal(detect_tissue(rgba), detect_tissue(img))
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(img.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect_tissue(img[..., 0])
    with pytest.raises(ValueError, match="method"):
        detect_tissue(img, method="magic")  # type: ignore[arg-type]


def test_otsu_threshold_bimodal() -> None:
    v = np.concatenate([np.full(100, 10.0), np.full(100, 200.0)])
    assert 10.0 < otsu_threshold(v) < 200.0
    assert otsu_threshold(np.array([]), value_range=(0, 1)) == 0.0


def test_tissue_fraction_at_square_and_disk() -> None:
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue; 2 µm / mask pixel -> 200 x 200 µm
    pts = np.array([[40.0, 100.0], [160.0, 100.0], [100.0, 100.0], [-500.0, 50.0], [100.0, 0.0]])
    sq = tissue_fraction_at(mask, 2.0, pts, radius_um=20.0)
    assert sq.dtype == np.float32 and sq.shape == (5,)
    np.testing.assert_allclose(sq[:4], [1.0, 0.0, 0.5, 0.0])
    assert sq[4] == pytest.approx(0.25)  # half tissue, and half the window is above the slide
    disk = tissue_fraction_at(mask, 2.0, pts, radius_um=20.0, shape="disk")
    np.testing.assert_allclose(disk[:4], [1.0, 0.0, 0.5, 0.0], atol=0.05)
    tiny = tissue_fraction_at(mask, 2.0, pts[:2], radius_um=0.1)
    np.testing.assert_array_equal(tiny, [1.0, 0.0])
    assert tissue_fraction_at(mask, 2.0, np.zeros((0, 2)), radius_um=5.0).shape == (0,)
    with pytest.raises(ValueError):
        tissue_fraction_at(mask, 0.0, pts, radius_um=5.0)


def test_all_tissue_overview_is_all_tissue(tmp_path):
    """A crop that is tissue everywhere must not be split into nuclei vs cytoplasm (and then emptied)."""
    from hishrst_train.synth import make_synthetic_visium
    from hishrst_train.data import open_fullres_image

    make_synthetic_visium(tmp_path / "s", preset="small", seed=0)
    img = open_fullres_image(tmp_path / "s" / "image.tif")
    h, w = img.shape[:2]
    crop = np.asarray(img[h // 2 - 300 : h // 2 + 300, w // 2 - 300 : w // 2 + 300])
    mask = detect_tissue(crop)
    assert mask.mean() > 0.9
