"""The sub-spot encoder's ONNX graph (issue #17): tiles → features and patch tokens, parity with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx  # noqa: E402
from hishrst_runtime.bundle.io_names import ENCODER_IO, ENCODER_TOKENS_IO  # noqa: E402
from hishrst_train.encoders import load_encoder  # noqa: E402

FP16 = "fp16"


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("test-vit-uni")


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _dims(vi) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_token_encoder_graph_names_shapes_and_parity(encoder, tmp_path: Path) -> None:
    path = export_encoder_onnx(encoder, tmp_path / "encoder.onnx", tokens=True)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ENCODER_TOKENS_IO["inputs"]
    assert [o.name for o in model.graph.output] == ENCODER_TOKENS_IO["outputs"]
    assert _dims(model.graph.input[0]) == ["batch", 3, 224, 224]  # NCHW, the default layout
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    feats, tokens = model.graph.output
    assert _dims(feats) == ["batch", 64] and _dims(tokens) == ["batch", 14, 14, 64]
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}

    t = _tiles(5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b in (1, 5):  # dynamic batch
        got_f, got_t = sess.run(None, {"tiles": np.ascontiguousarray(t[:b].transpose(0, 3, 1, 2))})
        with torch.no_grad():
            want_f, want_t = encoder.forward_tokens(torch.from_numpy(t[:b]))
        assert got_f.shape == (b, 64) and got_t.shape == (b, 14, 14, 64)
        assert np.abs(got_f - want_f.numpy()).max() <= 1e-4 and np.abs(got_t - want_t.numpy()).max() <= 1e-4
    report = encoder_parity(encoder, path, tiles={"random": t}, batch_sizes=(1, 3))["random"]
    assert report["passed"] and report["tokens"]["passed"] and report["n_tiles"] == 5
    assert report["max_abs"] <= 1e-4 and report["tokens"]["max_abs"] <= 1e-4
    assert report["tokens"]["compared"] == 5 * 14 * 14 * 64


def test_fp16_token_encoder_keeps_float32_outputs(encoder, tmp_path: Path) -> None:
    path = export_encoder_onnx(encoder, tmp_path / "encoder.onnx", tokens=True, precision=FP16)
    model = onnx.load(str(path))
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert _dims(model.graph.output[1]) == ["batch", 14, 14, 64]
    report = encoder_parity(encoder, path, tiles={"random": _tiles(3, seed=1)}, precision=FP16, batch_sizes=(3,))
    assert report["random"]["passed"] and report["random"]["tokens"]["passed"]


def test_plain_encoder_export_is_unchanged(encoder, tmp_path: Path) -> None:
    path = export_encoder_onnx(encoder, tmp_path / "encoder.onnx")
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ENCODER_IO["outputs"]
    report = encoder_parity(encoder, path, tiles={"random": _tiles(2)}, batch_sizes=(2,))["random"]
    assert report["passed"] and "tokens" not in report
