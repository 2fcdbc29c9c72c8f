"""hishrst_export — PyTorch → ONNX → TensorRT export of fitted HisHRST runs into model bundles.

A chain of plain functions, each ending with a parity check:
``export_encoder_onnx`` / ``export_head_onnx`` (→ ``encoder_parity`` / ``head_parity`` against PyTorch),
``build_engine`` (→ ``engine_parity`` against ONNX Runtime), and ``export_bundle``, which runs the chain
and writes the versioned ``manifest.json``. Needs the ``[export]`` extra (plus ``[gpu]`` for TensorRT).
"""

from __future__ import annotations

from hishrst_runtime.core.lazy import lazy_attributes


__all__ = [
    "export_bundle",
    "export_encoder_onnx",
    "export_head_onnx",
    "encoder_parity",
    "head_parity",
    "build_engine",
    "engine_parity",
]

_WHERE = {
    "export_bundle": "bundle",
    "export_encoder_onnx": "onnx_export",
    "export_head_onnx": "onnx_export",
    "encoder_parity": "onnx_export",
    "head_parity": "onnx_export",
    "build_engine": "tensorrt",
    "engine_parity": "tensorrt",
}


__getattr__, __dir__ = lazy_attributes("hishrst_export", _WHERE, extra='export')
