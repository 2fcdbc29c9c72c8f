"""``hishrst export`` of a sub-spot run: token encoder + per-token head, parity, manifest, runtime validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def subspot_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hishrst_train.synth import make_synthetic_visium
    from hishrst_train.tasks import fit_run

    d = tmp_path_factory.mktemp("subspot")
    outs = make_synthetic_visium(d / "sec", preset="small", seed=1)
    fit_run([outs], out=d / "run", task="recovery", encoder="test-vit-uni", allow_test_encoder=True, head="subspot",
            epochs=2, n_genes=40, progress=False)
    return d / "run"


def test_subspot_bundle_is_parity_checked_and_self_describing(subspot_run: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from hishrst_export.bundle import export_bundle
    from hishrst_runtime.bundle.manifest import load_bundle

    m = export_bundle(subspot_run, out=tmp_path / "b", echo=lambda _m: None)
    assert m["head"]["kind"] == "subspot" and m["tokens"]["grid"] == [14, 14] and m["tokens"]["pitch_um"] == 8.0
    assert m["patch"]["size_um"] == pytest.approx(112.0) and m["tokens"]["width"] == 64
    for label in ("random", "real"):
        assert m["parity"]["head"][label]["max_abs"] <= 1e-4
    assert m["parity"]["encoder"]["real"]["tokens"]["max_abs"] <= 1e-4
    bundle = load_bundle(tmp_path / "b")
    assert bundle.spec.subspot and bundle.spec.tokens.grid == (14, 14)
    enc = ort.InferenceSession(str(tmp_path / "b" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(tmp_path / "b" / "head.onnx"), providers=["CPUExecutionProvider"])
    tiles = np.full((2, 3, 224, 224), 200, np.uint8)  # NCHW, the default layout
    feats, tokens = enc.run(None, {"tiles": tiles})
    assert feats.shape == (2, 64) and tokens.shape == (2, 14, 14, 64)
    expr = head.run(None, {"tokens": tokens})[0]
    assert expr.shape == (2, 14, 14, 40) and np.isfinite(expr).all() and (expr >= 0).all()
    # --tile-layout NHWC: the token encoder takes interleaved tiles and gives the same features and tokens
    m2 = export_bundle(subspot_run, out=tmp_path / "p", tile_layout="NHWC", echo=lambda _m: None)
    assert m2["encoder"]["input"]["layout"] == "NHWC" and load_bundle(tmp_path / "p").spec.encoder.layout == "NHWC"
    nhwc = ort.InferenceSession(str(tmp_path / "p" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    rng_tiles = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    want = nhwc.run(None, {"tiles": rng_tiles})
    got = enc.run(None, {"tiles": np.ascontiguousarray(rng_tiles.transpose(0, 3, 1, 2))})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_subspot_bundle_refuses_int8_and_writes_nothing(subspot_run: Path, tmp_path: Path) -> None:
    from hishrst_export.bundle import ExportError, export_bundle

    with pytest.raises(ExportError, match="int8"):
        export_bundle(subspot_run, out=tmp_path / "b", precision="int8", echo=lambda _m: None)
    assert not (tmp_path / "b").exists()


def test_subspot_run_records_head_and_geometry(subspot_run: Path) -> None:
    cfg = json.loads((subspot_run / "config.json").read_text())
    assert cfg["head"]["kind"] == "subspot" and cfg["tokens"]["grid"] == [14, 14]
    assert cfg["model"]["kind"] == "subspot" and cfg["patch"]["size_um"] == pytest.approx(112.0)
    from hishrst_train.train import load_run

    model, config = load_run(subspot_run)
    assert type(model).__name__ == "SubspotHead" and config.head_kind == "subspot"
