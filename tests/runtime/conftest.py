"""Runtime fixtures that need neither torch nor a trained run: a tiny, valid model bundle.

* ``tiny_bundle`` (session scope, treat as read-only — copy it before changing anything): a bundle
  directory built with ``onnx.helper`` in a few milliseconds. ``encoder.onnx`` maps uint8 tiles
  ``[B, 8, 8, 3]`` to features ``[B, 4]`` (cast, scale by 1/255, mean over pixels, 3×4 matmul);
  ``head.onnx`` maps features ``[G, N, 4]``, positions ``[G, N, 2]`` (µm) and mask ``[G, N]`` to
  expression ``[G, N, 3]`` (a linear map of features and positions, zeroed where the mask is 0).
  Manifest: genes ``G0 G1 G2``, 32 µm patches at 0.5 µm/px, groups of at most 8, ``max_batch`` 16.
  ``head.onnx`` records the gene names and count in its ``metadata_props`` as export does (not the
  manifest content hash, so ``edit`` may change other sections).
  It runs end to end through the CPU engines (and the whole pipeline) on a base install.
* ``make_tiny_bundle`` (function): the builder, ``make_tiny_bundle(root, *, external=False,
  edit=None, **sizes)`` → ``root``; ``external=True`` stores the encoder's weights in
  ``encoder.onnx.data`` (listed in the manifest); ``edit(manifest)`` changes the manifest dict
  before it is written; ``sizes``: ``input_size``, ``feature_dim``, ``n_genes``.

Both skip (with the reason) when ``onnx`` is not importable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

__all__ = ["build_tiny_bundle"]

TINY_OPSET = 17


def _onnx() -> Any:
    return pytest.importorskip("onnx", reason="the tiny bundle is built with onnx.helper (pip install onnx)")


def _save(model: Any, path: Path, *, external: bool) -> None:
    onnx = _onnx()
    onnx.checker.check_model(model)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))


def tiny_encoder_model(*, input_size: int = 8, feature_dim: int = 4, seed: int = 0, layout: str = "NHWC") -> Any:
    """uint8 tiles [B, S, S, 3] (``layout`` NCHW: [B, 3, S, S]) → Cast → ×1/255 → ReduceMean(H, W) → MatMul W[3, D]
    → features [B, D]."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3, feature_dim)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["tiles"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "scale"], ["xs"]),
        helper.make_node("ReduceMean", ["xs"], ["m"], axes=[2, 3] if layout == "NCHW" else [1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["features"]),
    ]
    hw = [3, input_size, input_size] if layout == "NCHW" else [input_size, input_size, 3]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["batch", *hw])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_dim])],
        initializer=[numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"), numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], ir_version=8)


def tiny_head_model(*, feature_dim: int = 4, n_genes: int = 3, seed: int = 1) -> Any:
    """expression [G, N, genes] = (features @ A + positions @ B / 1000) * mask[..., None]."""
    _onnx()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((feature_dim, n_genes)).astype(np.float32)
    b = rng.standard_normal((2, n_genes)).astype(np.float32) / 1000
    nodes = [
        helper.make_node("MatMul", ["features", "a"], ["fa"]),
        helper.make_node("MatMul", ["positions", "b"], ["pb"]),
        helper.make_node("Add", ["fa", "pb"], ["h"]),
        helper.make_node("Unsqueeze", ["mask", "axes"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["expression"]),
    ]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "tiny_head",
        [helper.make_tensor_value_info("features", f32, ["groups", "points", feature_dim]),
         helper.make_tensor_value_info("positions", f32, ["groups", "points", 2]),
         helper.make_tensor_value_info("mask", f32, ["groups", "points"])],
        [helper.make_tensor_value_info("expression", f32, ["groups", "points", n_genes])],
        initializer=[numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TINY_OPSET)], ir_version=8)


def tiny_manifest(*, input_size: int = 8, feature_dim: int = 4, n_genes: int = 3, layout: str = "NHWC") -> dict[str, Any]:
    """A manifest with every section ``hishrst export`` writes (``files`` left empty)."""
    return {
        "hishrst_version": "0.0.0-test",
        "encoder": {"name": "tiny", "fingerprint": "tiny-0", "input_size": input_size, "feature_dim": feature_dim,
                    "input": {"name": "tiles", "dtype": "uint8", "layout": layout, "channels": "RGB"},
                    "normalisation": {"scale": 1 / 255, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "in_graph": True},
                    "gated": False, "license": "MIT"},
        "patch": {"size_um": 32.0, "train_mpp": 0.5, "resize": "bilinear", "pad_value": 255},
        "position": {"mode": "continuous", "units": "um"},
        "grouping": {"method": "kd-median-v1", "max_size": 8, "coords": "level0_px"},
        "genes": [f"G{i}" for i in range(n_genes)],
        "output": {"name": "expression", "meaning": "log1p of counts per 10k", "target_sum": 1e4, "dtype": "float32"},
        "files": {},
        "onnx_opset": TINY_OPSET,
        "max_batch": 16,
        "license": {"gated": False, "redistributable": True, "notice": None},
    }


def build_tiny_bundle(
    root: Path,
    *,
    external: bool = False,
    edit: Callable[[dict[str, Any]], None] | None = None,
    input_size: int = 8,
    feature_dim: int = 4,
    n_genes: int = 3,
    layout: str = "NHWC",
) -> Path:
    """Write the tiny bundle (encoder tiles in ``layout``) into the new directory ``root`` and return ``root``."""
    from hishrst_runtime.bundle.integrity import META_GENES, META_N_GENES, head_metadata
    from hishrst_runtime.bundle.manifest import write_manifest
    from hishrst_runtime.core.files import sha256_file

    root.mkdir(parents=True)
    models = {"encoder": tiny_encoder_model(input_size=input_size, feature_dim=feature_dim, layout=layout),
              "head": tiny_head_model(feature_dim=feature_dim, n_genes=n_genes)}
    m = tiny_manifest(input_size=input_size, feature_dim=feature_dim, n_genes=n_genes, layout=layout)
    _onnx().helper.set_model_props(models["head"], {k: v for k, v in head_metadata(m).items()
                                                     if k in (META_GENES, META_N_GENES)})
    for key, model in models.items():
        path = root / f"{key}.onnx"
        _save(model, path, external=external and key == "encoder")
        m["files"][key] = {"path": path.name, "sha256": sha256_file(path), "format": "onnx", "precision": "fp32"}
        data = root / f"{key}.onnx.data"
        if data.exists():
            m["files"][key]["external_data"] = [{"path": data.name, "sha256": sha256_file(data)}]
    if edit is not None:
        edit(m)
    write_manifest(root, m)
    return root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny torch-free bundle (read-only; copy before modifying)."""
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle") / "bundle")


@pytest.fixture()
def make_tiny_bundle() -> Callable[..., Path]:
    """The tiny bundle's builder (see the module docstring)."""
    _onnx()
    return build_tiny_bundle
