"""Position modes of the HisHRST head: ``relative`` is invariant to translation, rotation and reflection of a
neighbour group (in PyTorch and through the exported ONNX head), ``none`` ignores positions, ``continuous``
does not transfer, and every deployable mode exports with parity and a manifest ``position`` section."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hishrst_train.model import POSITION_MODES, HisHRST, HisHRSTConfig  # noqa: E402

SHIFT_UM = np.array([5000.0, -3000.0])
ANGLE_DEG = 37.0
D, GENES, N = 32, 9, 24


def _model(mode: str, *, seed: int = 0) -> HisHRST:
    """A small eval-mode head; the (zero-initialised) pairwise bias is randomised so that it matters."""
    torch.manual_seed(seed)
    model = HisHRST(feature_dim=D, n_genes=GENES, position_mode=mode, dropout=0.0).eval()
    if mode == "relative":
        with torch.no_grad():
            model.pos.pair.weight.normal_(0.0, 0.5)
            model.pos.pair.bias.normal_(0.0, 0.5)
    return model


def _group(rng: np.random.Generator, n_groups: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [G, N, D], positions [G, N, 2] (µm; a jittered Visium-like patch far from the origin), mask [G, N]."""
    feats = rng.standard_normal((n_groups, N, D)).astype(np.float32)
    pos = rng.uniform(0.0, 700.0, (n_groups, N, 2)) + np.array([3200.0, 1800.0])
    mask = np.ones((n_groups, N), np.float32)
    mask[n_groups // 2, 17:] = 0.0  # one group is padded
    return feats, pos, mask


def _moved(pos: np.ndarray, *, flip: bool = True) -> np.ndarray:
    """``pos`` (µm) rotated by 37° about the origin, mirrored in x (``flip``), then shifted by (5000, -3000) µm."""
    a = math.radians(ANGLE_DEG)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = rot @ np.diag([-1.0, 1.0]) if flip else rot
    return pos @ lin.T + SHIFT_UM


def _run(model: HisHRST, feats: np.ndarray, pos: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        m = None if mask is None else torch.from_numpy(mask)
        return model(torch.from_numpy(feats), torch.from_numpy(pos.astype(np.float32)), m).numpy()


def _valid(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return a[mask > 0]


# ------------------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("flip", [False, True])
def test_relative_is_invariant_to_translation_rotation_and_flip(flip: bool) -> None:
    model = _model("relative")
    feats, pos, mask = _group(np.random.default_rng(1))
    a = _run(model, feats, pos, mask)
    b = _run(model, feats, _moved(pos, flip=flip), mask)
    np.testing.assert_allclose(_valid(b, mask), _valid(a, mask), rtol=0, atol=1e-4)
    # the positions do matter: a different layout of the same spots changes the prediction
    c = _run(model, feats, pos[:, ::-1].copy(), mask)
    assert np.abs(_valid(c, mask) - _valid(a, mask)).max() > 1e-3


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 1e-4), ("fp16", 2e-3)])
def test_relative_invariance_through_exported_onnx(precision: str, atol: float, tmp_path: Path) -> None:
    """fp16 too: the exported position path stays fp32 (positions rounded to fp16 lose µm precision)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from hishrst_export.onnx_export import export_head_onnx

    model = _model("relative")
    feats, pos, mask = _group(np.random.default_rng(2))
    path = export_head_onnx(model, tmp_path / "head.onnx", precision=precision)  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(p: np.ndarray) -> np.ndarray:
        return sess.run(None, {"features": feats, "positions": p.astype(np.float32), "mask": mask})[0]

    a, b = run(pos), run(_moved(pos))
    np.testing.assert_allclose(_valid(b, mask), _valid(a, mask), rtol=0, atol=atol)
    want = _valid(_run(model, feats, pos, mask), mask)
    np.testing.assert_allclose(_valid(a, mask), want, rtol=0, atol=1e-4 if precision == "fp32" else 1e-2)


def test_continuous_is_not_translation_invariant() -> None:
    model = _model("continuous")
    feats, pos, mask = _group(np.random.default_rng(3))
    a = _run(model, feats, pos, mask)
    b = _run(model, feats, pos + SHIFT_UM, mask)
    assert np.abs(_valid(b, mask) - _valid(a, mask)).max() > 1e-2


def test_none_ignores_positions() -> None:
    model = _model("none")
    assert model.pos is None and not any("pos" in k for k in model.state_dict())
    feats, pos, mask = _group(np.random.default_rng(4))
    a = _run(model, feats, pos, mask)
    b = _run(model, feats, np.random.default_rng(5).uniform(-1e5, 1e5, pos.shape), mask)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize("mode", ["relative", "none", "continuous"])
def test_padding_changes_nothing(mode: str) -> None:
    """Padded spots (any features, any positions) affect neither the centroid nor the real spots' outputs."""
    model = _model(mode)
    feats, pos, _ = _group(np.random.default_rng(6), n_groups=1)
    n_real = 15
    want = _run(model, feats[:, :n_real], pos[:, :n_real], None)
    mask = np.zeros((1, N), np.float32)
    mask[0, :n_real] = 1.0
    garbage_f, garbage_p = feats.copy(), pos.copy()
    garbage_f[:, n_real:] = 1e3
    garbage_p[:, n_real:] = [[-8e4, 9e4]]
    got = _run(model, garbage_f, garbage_p, mask)[:, :n_real]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_relative_offsets_are_centred_and_zero_for_padding() -> None:
    model = _model("relative")
    pos = torch.tensor([[[1e4, 2e4], [1e4 + 100.0, 2e4], [1e4, 2e4 + 300.0], [5e5, -5e5]]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rel = model.pos.offsets(pos, mask)
    torch.testing.assert_close(rel[0, :3].sum(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(rel[0, 0], torch.tensor([-100.0 / 3, -100.0]), atol=1e-3, rtol=0)
    assert torch.equal(rel[0, 3], torch.zeros(2))


def test_relative_gradients_are_finite_for_coincident_spots() -> None:
    model = _model("relative").train()
    pos = torch.full((1, 4, 2), 1234.5)  # all pairwise distances and the centroid distance are 0
    out = model(torch.randn(1, 4, D), pos, torch.ones(1, 4))
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.pos.pair.weight.grad.abs().sum() > 0  # the zero-initialised bias still learns


def test_config_accepts_every_mode() -> None:
    assert set(POSITION_MODES) == {"continuous", "grid", "relative", "none"}
    for mode in POSITION_MODES:
        cfg = HisHRSTConfig(feature_dim=8, n_genes=3, position_mode=mode)  # type: ignore[arg-type]
        assert HisHRSTConfig.from_dict(cfg.to_dict()) == cfg
        assert HisHRST(cfg).config.position_mode == mode


# ------------------------------------------------------------------------------------------ export


@pytest.mark.parametrize(("mode", "precision"), [("relative", "fp32"), ("relative", "fp16"), ("none", "fp32"),
                                                 ("none", "fp16"), ("continuous", "fp32")])
def test_head_export_parity_in_every_deployable_mode(mode: str, precision: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from hishrst_export.onnx_export import export_head_onnx, head_parity

    model = _model(mode)
    feats, pos, mask = _group(np.random.default_rng(7))
    path = export_head_onnx(model, tmp_path / "head.onnx", precision=precision)  # type: ignore[arg-type]
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["features", "positions", "mask"]
    feeds = {"random": {"features": feats, "positions": pos.astype(np.float32), "mask": mask}}
    report = head_parity(model, path, feeds=feeds, precision=precision)  # type: ignore[arg-type]
    assert report["random"]["passed"]


@pytest.mark.parametrize("mode", ["continuous", "relative", "none"])
def test_manifest_position_section_records_the_mode(mode: str) -> None:
    pytest.importorskip("onnx")
    from hishrst_export.manifest import POSITION_PARAMS, _position_manifest

    mcfg = HisHRSTConfig(feature_dim=8, n_genes=3, position_mode=mode).to_dict()  # type: ignore[arg-type]
    units = "um" if mode == "continuous" else "array"  # what fit wrote before it knew the new modes
    section = _position_manifest(mcfg, {"mode": mode, "units": units})
    assert section["mode"] == mode and section["units"] == "um"
    for key in POSITION_PARAMS.get(mode, ()):
        assert section[key] == mcfg[key]
    if mode == "relative":
        assert section["rel_n_freqs"] == 16 and "translation" in section["invariant_to"]
    if mode == "continuous":
        assert section == {"mode": "continuous", "units": "um", "pos_n_freqs": 16, "min_wavelength_um": 50.0,
                           "max_wavelength_um": 20000.0}


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("position_feature_cache")


@pytest.mark.parametrize("mode", ["relative", "none"])
def test_fit_and_export_a_bundle_in_mode(mode: str, small_section: Path, feature_cache: Path, tmp_path: Path) -> None:
    """fit → export → the runtime's own validation: the manifest records the mode and its parameters."""
    pytest.importorskip("timm")
    pytest.importorskip("onnx")
    from hishrst_export.bundle import export_bundle
    from hishrst_export.manifest import POSITION_PARAMS
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_train.tasks import fit_run

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only .* genes available")
        fit_run(small_section, out=tmp_path / "run", encoder="test-vit", allow_test_encoder=True, epochs=1, seed=0, progress=False,
                cache_dir=feature_cache, position_mode=mode)
    export_bundle(tmp_path / "run", out=tmp_path / "bundle", echo=lambda s: None)
    position = load_bundle(tmp_path / "bundle").manifest["position"]
    assert position["mode"] == mode and position["units"] == "um"
    assert all(k in position for k in POSITION_PARAMS.get(mode, ()))
    assert "pos_n_freqs" not in position  # continuous-mode parameters are not claimed
