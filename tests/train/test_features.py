"""Tests of hishrst_train.features: patch cutting into the encoder, batching and the feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from hishrst_train.encoders import load_encoder  # noqa: E402
from hishrst_train.features import cut_patches_for, extract_features, image_fingerprint  # noqa: E402

MPP = 0.5  # µm / pixel
PATCH_UM = 32.0  # → 64-pixel patches, the test encoder's input size (no resampling needed)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("test-vit")


class Spy:
    """Counts encoder calls and keeps the uint8 tiles each call received."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tiles: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.tiles.append(args[0].detach().clone())

    @property
    def calls(self) -> int:
        return len(self.tiles)

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture()
def spy(encoder):
    s = Spy(encoder)
    yield s
    s.close()


def _image(seed: int = 0, h: int = 200, w: int = 240) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8)))


def _centers(n: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(40, 200, n), rng.uniform(40, 160, n)])


def _extract(img, xy, encoder, **kw):
    kw.setdefault("mpp", MPP)
    kw.setdefault("patch_um", PATCH_UM)
    kw.setdefault("progress", False)
    return extract_features(img, xy, encoder=encoder, **kw)


def test_shape_dtype_and_equivalence_to_direct_encoding(encoder, spy):
    img, xy = _image(), _centers(10)
    feats = _extract(img, xy, encoder, batch_size=4)
    assert feats.shape == (10, 64) and feats.dtype == np.float32
    assert spy.calls == 3 and [t.shape[0] for t in spy.tiles] == [4, 4, 2]
    tiles = cut_patches_for(img, xy, mpp=MPP, patch_um=PATCH_UM, input_size=64)
    with torch.inference_mode():
        direct = encoder(torch.from_numpy(tiles)).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_extract(img, xy, encoder, batch_size=64), feats, rtol=1e-5, atol=1e-5)


def test_resized_patches_and_empty_and_bad_input(encoder):
    img = _image()
    feats = _extract(img, _centers(3), encoder, patch_um=50.0)  # 100-px patches resized to 64
    assert feats.shape == (3, 64) and np.all(np.isfinite(feats))
    assert _extract(img, np.zeros((0, 2)), encoder).shape == (0, 64)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        _extract(img, np.zeros((3, 3)), encoder)
    with pytest.raises(ValueError, match="non-finite"):
        _extract(img, np.array([[10.0, np.nan]]), encoder)


def test_cache_hit_skips_encoder_and_returns_identical_features(encoder, spy, tmp_path):
    img, xy = _image(), _centers(10)
    first = _extract(img, xy, encoder, cache_dir=tmp_path)
    calls = spy.calls
    assert calls > 0
    files = sorted(p.suffix for p in (tmp_path / "test-vit").iterdir())
    assert files == [".json", ".npy"]  # no temporary files left behind
    again = _extract(img, xy, encoder, cache_dir=tmp_path)
    assert spy.calls == calls
    np.testing.assert_array_equal(again, first)


def test_cache_misses_on_any_input_change(encoder, spy, tmp_path):
    img, xy = _image(), _centers(6)
    base = _extract(img, xy, encoder, cache_dir=tmp_path)

    def misses(**kw) -> bool:
        before = spy.calls
        _extract(kw.pop("img", img), kw.pop("xy", xy), kw.pop("enc", encoder), cache_dir=tmp_path, **kw)
        return spy.calls > before

    moved = xy.copy()
    moved[0, 0] += 1e-6  # any change of the exact centre bytes
    assert misses(xy=moved)
    assert misses(patch_um=40.0)
    assert misses(mpp=0.51)
    edited = img.copy()
    edited[100, 100, 1] ^= 1  # one pixel of an in-memory image
    assert misses(img=edited)

    other = load_encoder("test-vit")
    with torch.no_grad():
        other.backbone.blocks[0].mlp.fc1.bias += 0.1
    before = spy.calls
    changed = _extract(img, xy, other, cache_dir=tmp_path)
    assert spy.calls == before  # the spy watches `encoder`; `other` ran instead of a cache hit
    assert not np.allclose(changed, base)
    assert not misses()  # the original inputs still hit


def test_cache_misses_when_image_file_changes(encoder, spy, tmp_path):
    path = tmp_path / "slide.npy"
    img, xy = _image(), _centers(4)
    np.save(path, img)
    _extract(img, xy, encoder, cache_dir=tmp_path / "cache", image_key=str(path))
    before = spy.calls
    _extract(img, xy, encoder, cache_dir=tmp_path / "cache", image_key=str(path))
    assert spy.calls == before
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # the file was rewritten
    _extract(img, xy, encoder, cache_dir=tmp_path / "cache", image_key=str(path))
    assert spy.calls > before


def test_edge_patch_is_padded_white(encoder, spy):
    img = np.zeros((100, 120, 3), dtype=np.uint8)  # black image
    feats = _extract(img, np.array([[0.0, 0.0], [60.0, 50.0]]), encoder)
    assert np.all(np.isfinite(feats))
    corner, inner = spy.tiles[-1].numpy()
    assert np.all(corner[:32, :] == 255) and np.all(corner[:, :32] == 255)  # outside the image: white
    assert np.all(corner[32:, 32:] == 0)  # inside: the (black) image
    assert np.all(inner == 0)


def test_rgb_order_reaches_encoder(encoder, spy):
    red = np.zeros((80, 80, 3), dtype=np.uint8)
    red[..., 0] = 255
    blue = np.zeros((80, 80, 3), dtype=np.uint8)
    blue[..., 2] = 255
    xy = np.array([[40.0, 40.0]])
    f_red = _extract(red, xy, encoder)
    tile = spy.tiles[-1]
    assert tile.dtype == torch.uint8 and tile.shape == (1, 64, 64, 3)  # NHWC uint8
    assert torch.all(tile[..., 0] == 255) and torch.all(tile[..., 1:] == 0)  # channel 0 is red
    f_blue = _extract(blue, xy, encoder)
    assert np.linalg.norm(f_red - f_blue) > 0.1 * np.linalg.norm(f_red)


class LazyImage:
    """A minimal lazily sliced image (like a tifffile/zarr level): only shape and 2-D slicing."""

    def __init__(self, array: np.ndarray) -> None:
        self._a = array
        self.shape = array.shape
        self.dtype = array.dtype

    def __getitem__(self, key):
        return self._a[key].copy()


def test_lazy_image_source(encoder, tmp_path):
    img, xy = _image(), _centers(5)
    lazy = _extract(LazyImage(img), xy, encoder, image_key="slide-A", cache_dir=tmp_path)
    np.testing.assert_allclose(lazy, _extract(img, xy, encoder), rtol=1e-5, atol=1e-5)
    edited = img.copy()
    edited[:16, :16] = 0  # lies in a sampled block
    assert image_fingerprint(LazyImage(edited), image_key="slide-A") != image_fingerprint(
        LazyImage(img), image_key="slide-A")
    assert Path(tmp_path, "test-vit").is_dir()
