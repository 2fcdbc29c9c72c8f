"""A fake sub-spot bundle for the runtime's tests, built with ``onnx.helper`` (no torch, a few milliseconds).

``encoder.onnx``: uint8 tiles ``[B, S, S, 3]`` → ``tokens[b, r, c, :]`` = the mean RGB (0–1) of token ``(r, c)``'s
``S/grid``-pixel block (width 3) and ``features`` = the mean of the tokens ``[B, 3]``. ``head.onnx``: ``tokens`` →
``expression = ReLU(tokens @ W + b)`` ``[B, rows, cols, genes]`` with a fixed positive ``W`` and ``b`` (so a bin's
value depends on its own pixels only, linearly). Default geometry: an 8 × 8 grid of 4-px tokens (input 32 px) at
8 µm per token (64 µm tiles, 2 µm per encoder pixel), margin 2 (4 × 4 tokens kept per tile), 5 genes,
``patch.train_mpp`` 1 µm/px.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.runtime.conftest import TINY_OPSET, tiny_manifest

__all__ = ["HEAD_W", "HEAD_B", "build_subspot_bundle", "subspot_encoder_model", "subspot_head_model",
           "expected_expression"]

#: The head's linear map (3 colour channels → 5 genes) and bias: positive, so ReLU never clips.
HEAD_W = np.array([[1.0, 0.5, 0.2, 2.0, 0.1], [0.3, 1.0, 0.4, 0.1, 1.5], [0.2, 0.1, 1.0, 0.5, 0.3]], np.float32)
HEAD_B = np.array([0.1, 0.2, 0.05, 0.0, 0.3], np.float32)


def _onnx() -> Any:
    return pytest.importorskip("onnx", reason="the fake sub-spot bundle is built with onnx.helper (pip install onnx)")


def subspot_encoder_model(*, grid: int = 8, input_size: int = 32) -> Any:
    """tiles [B, S, S, 3] uint8 → features [B, 3], tokens [B, grid, grid, 3] (per-token mean RGB / 255)."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    p = input_size // grid
    shape = np.array([-1, grid, p, grid, p, 3], np.int64)
    nodes = [
        helper.make_node("Cast", ["tiles"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "scale"], ["xs"]),
        helper.make_node("Reshape", ["xs", "shape"], ["blocks"]),
        helper.make_node("ReduceMean", ["blocks"], ["tokens"], axes=[2, 4], keepdims=0),
        helper.make_node("ReduceMean", ["tokens"], ["features"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "fake_token_encoder",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", input_size, input_size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", grid, grid, 3])],
        initializer=[numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
                     numpy_helper.from_array(shape, "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], ir_version=8)


def subspot_head_model(*, grid: int = 8, n_genes: int = 5, width: int = 3) -> Any:
    """tokens [B, grid, grid, width] → expression [B, grid, grid, genes] = ReLU(tokens @ W + b)."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    w, b = HEAD_W[:width, :n_genes], HEAD_B[:n_genes]
    nodes = [helper.make_node("MatMul", ["tokens", "w"], ["tw"]), helper.make_node("Add", ["tw", "b"], ["h"]),
             helper.make_node("Relu", ["h"], ["expression"])]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "fake_subspot_head", [helper.make_tensor_value_info("tokens", f32, ["batch", grid, grid, width])],
        [helper.make_tensor_value_info("expression", f32, ["batch", grid, grid, n_genes])],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w), "w"), numpy_helper.from_array(b, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], ir_version=8)


def expected_expression(rgb: np.ndarray, n_genes: int = 5) -> np.ndarray:
    """What the fake head predicts for token colours ``rgb`` ``[..., 3]`` (0–255)."""
    return np.maximum(np.asarray(rgb, np.float64) / 255.0 @ HEAD_W[:, :n_genes] + HEAD_B[:n_genes], 0.0)


def build_subspot_bundle(root: Path, *, grid: int = 8, input_size: int = 32, pitch_um: float = 8.0, margin: int = 2,
                         n_genes: int = 5, train_mpp: float = 1.0,
                         edit: Callable[[dict[str, Any]], None] | None = None,
                         models: dict[str, Any] | None = None) -> Path:
    """Write the fake sub-spot bundle into the new directory ``root`` and return it. ``edit(manifest)`` changes
    the manifest before it is written (and sealed); ``models`` replaces ``encoder`` / ``head`` graphs."""
    from hishrst_runtime.bundle.integrity import head_metadata
    from hishrst_runtime.bundle.manifest import write_manifest
    from hishrst_runtime.core.files import sha256_file
    from hishrst_runtime.core.tokens import TokenGeometry

    onnx = _onnx()
    root.mkdir(parents=True)
    geom = TokenGeometry(grid=(grid, grid), input_size=input_size, pitch_um=pitch_um, margin=margin)
    m = tiny_manifest(input_size=input_size, feature_dim=3, n_genes=n_genes)
    m["patch"].update(size_um=geom.tile_um, train_mpp=train_mpp)
    m["position"] = {"mode": "relative", "units": "um"}
    m["head"] = {"kind": "subspot", "inputs": ["tokens"]}
    m["tokens"] = geom.to_dict()
    m["files"] = {key: {"precision": "fp32"} for key in ("encoder", "head")}  # sealed by the head's content hash
    if edit is not None:
        edit(m)
    built = {"encoder": subspot_encoder_model(grid=grid, input_size=input_size),
             "head": subspot_head_model(grid=grid, n_genes=n_genes), **(models or {})}
    onnx.helper.set_model_props(built["head"], head_metadata(m))
    for key, model in built.items():
        path = root / f"{key}.onnx"
        onnx.checker.check_model(model)
        onnx.save_model(model, str(path))
        m["files"][key].update(path=path.name, sha256=sha256_file(path), format="onnx")
    write_manifest(root, m)
    return root
