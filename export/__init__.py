"""hishrst_export — PyTorch → ONNX → TensorRT export of fitted HisHRST runs into model bundles.

A chain of plain functions, each ending with a parity check:
``export_encoder_onnx`` / ``export_head_onnx`` (→ ``encoder_parity`` / ``head_parity`` against PyTorch),
``build_engine`` (→ ``engine_parity`` against ONNX Runtime), and ``export_bundle``, which runs the chain
and writes the versioned ``manifest.json``. Needs the ``[export]`` extra (plus ``[gpu]`` for TensorRT).
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        try:
            module = importlib.import_module(f"hishrst_export.{_WHERE[name]}")
        except ImportError as e:
            raise ImportError(f"hishrst_export.{name} needs the export extra: pip install \"hishrst[export]\" ({e})") from e
        return getattr(module, name)
    raise AttributeError(f"module 'hishrst_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
