"""Tests of hishrst_train.tokens: tiles cut as features are, tokens of forward_tokens, the on-disk token cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from hishrst_runtime.core.errors import InputError  # noqa: E402
from hishrst_runtime.core.tokens import TokenGeometry  # noqa: E402
from hishrst_train.encoders import load_encoder  # noqa: E402
from hishrst_train.features import cut_patches_for, extract_features  # noqa: E402
from hishrst_train.tokens import TokenFeatures, TokenGeometryMismatch, extract_tokens  # noqa: E402

MPP = 0.5  # µm / pixel: 8 µm tokens of 16 px, 112 µm tiles of 224 px (no resampling)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("test-vit-uni")


@pytest.fixture()
def calls(encoder, monkeypatch):
    """Counts ``forward_tokens`` calls (tiles per call)."""
    seen: list[int] = []
    real = type(encoder).forward_tokens

    def counting(tiles):
        seen.append(int(tiles.shape[0]))
        return real(encoder, tiles)

    monkeypatch.setattr(encoder, "forward_tokens", counting)
    return seen


def _image(seed: int = 0, h: int = 420, w: int = 460) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(h // 4, w // 4, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, np.ones((4, 4, 1), dtype=np.uint8)))


def _centres(n: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.column_stack([rng.uniform(60, 400, n), rng.uniform(60, 360, n)])


def _extract(img, xy, encoder, **kw) -> TokenFeatures:
    kw.setdefault("geometry", encoder.spec.token_geometry())
    return extract_tokens(img, xy, encoder=encoder, mpp=MPP, **kw)


def test_tokens_are_forward_tokens_of_the_feature_tiles(encoder, calls):
    img, xy = _image(), _centres(5)
    geom = encoder.spec.token_geometry()
    tf = _extract(img, xy, encoder, batch_size=2)
    assert calls == [2, 2, 1] and len(tf) == 5 and tf.geometry == geom
    assert tf.cls.shape == (5, 64) and tf.cls.dtype == np.float32
    assert tf.tokens.shape == (5, 14, 14, 64) and tf.tokens.dtype == np.float16
    tiles = cut_patches_for(img, xy, mpp=MPP, patch_um=geom.tile_um, input_size=224)
    with torch.inference_mode():
        feats, tokens = type(encoder).forward_tokens(encoder, torch.from_numpy(tiles))
    np.testing.assert_allclose(tf.tokens.astype(np.float32), tokens.numpy(), rtol=1e-3, atol=1e-4)  # float16
    np.testing.assert_allclose(tf.cls, feats.numpy(), rtol=1e-5, atol=1e-5)
    spots = extract_features(img, xy, encoder=encoder, mpp=MPP, patch_um=geom.tile_um, progress=False)
    np.testing.assert_allclose(tf.cls, spots, rtol=1e-5, atol=1e-5)  # the same tiles as spot features


def test_cache_hit_returns_identical_arrays_without_the_encoder(encoder, calls, tmp_path):
    img, xy = _image(), _centres(5)
    first = _extract(img, xy, encoder, cache_dir=tmp_path, image_key="img-0", batch_size=3)
    assert calls == [3, 2]
    folder = tmp_path / "test-vit-uni"
    names = sorted(p.name.split(".", 1)[1] for p in folder.iterdir())
    assert names == ["cls.npy", "json", "npy"]  # no temporary file left behind
    meta = json.loads(next(folder.glob("*.json")).read_text())
    assert meta["shape"] == [5, 14, 14, 64] and meta["dtype"] == "float16" and meta["geometry"]["pitch_um"] == 8.0
    again = _extract(img, xy, encoder, cache_dir=tmp_path, image_key="img-0")
    assert calls == [3, 2]
    assert isinstance(again.tokens, np.memmap) and not again.tokens.flags.writeable
    np.testing.assert_array_equal(again.tokens, first.tokens)
    np.testing.assert_array_equal(again.cls, first.cls)
    fresh = _extract(img, xy, encoder)
    np.testing.assert_array_equal(fresh.tokens, first.tokens)
    np.testing.assert_array_equal(fresh.cls, first.cls)


def test_cache_misses_on_geometry_or_centres_and_ignores_the_margin(encoder, calls, tmp_path):
    img, xy = _image(), _centres(3)
    _extract(img, xy, encoder, cache_dir=tmp_path)

    def runs(**kw) -> bool:
        before = len(calls)
        _extract(kw.pop("img", img), kw.pop("xy", xy), encoder, cache_dir=tmp_path, **kw)
        return len(calls) > before

    assert not runs()
    assert not runs(geometry=encoder.spec.token_geometry(margin=1))  # run-time margin: same tokens
    assert runs(geometry=encoder.spec.token_geometry(pitch_um=7.0))  # 98 µm tiles
    assert runs(xy=xy + [[1.0, 0.0]])
    assert runs(xy=xy[:2])
    assert runs(img=_image(seed=1))
    assert len(list((tmp_path / "test-vit-uni").glob("*.json"))) == 5


def test_stale_cache_entry_is_recomputed(encoder, calls, tmp_path):
    img, xy = _image(), _centres(2)
    first = _extract(img, xy, encoder, cache_dir=tmp_path)
    sidecar = next((tmp_path / "test-vit-uni").glob("*.json"))
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "key": "0" * 32}))
    n = len(calls)
    again = _extract(img, xy, encoder, cache_dir=tmp_path)
    assert len(calls) > n
    np.testing.assert_array_equal(again.tokens, first.tokens)


def test_geometry_must_be_the_encoders(encoder):
    img, xy = _image(), _centres(2)
    small = load_encoder("test-vit")
    with pytest.raises(TokenGeometryMismatch, match="224-px tiles.*'test-vit'.*64 px.*token_geometry"):
        extract_tokens(img, xy, encoder=small, mpp=MPP, geometry=encoder.spec.token_geometry())
    with pytest.raises(TokenGeometryMismatch, match=r"grid \(7, 7\).*\(14, 14\)"):
        _extract(img, xy, encoder, geometry=TokenGeometry(grid=(7, 7), input_size=224, margin=1))
    with pytest.raises(InputError, match=r"\[N, 2\]"):
        _extract(img, np.zeros((3, 3)), encoder)
    with pytest.raises(InputError, match="finite"):
        _extract(img, np.array([[10.0, np.nan]]), encoder)
    with pytest.raises(InputError, match="mpp"):
        extract_tokens(img, xy, encoder=encoder, mpp=0.0, geometry=encoder.spec.token_geometry())
    with pytest.raises(InputError, match="batch_size"):
        _extract(img, xy, encoder, batch_size=0)
    empty = _extract(img, np.zeros((0, 2)), encoder, cache_dir=None)
    assert empty.cls.shape == (0, 64) and empty.tokens.shape == (0, 14, 14, 64)
