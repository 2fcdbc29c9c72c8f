"""Tensor names of the bundle's ONNX graphs: the contract between export and every runtime engine."""

from __future__ import annotations

__all__ = ["ENCODER_IO", "HEAD_IO", "ENCODER_TOKENS_IO", "SUBSPOT_HEAD_IO"]

#: ``encoder.onnx``: uint8 NHWC tiles ``[B, S, S, 3]`` → float32 features ``[B, D]``.
ENCODER_IO: dict[str, list[str]] = {"inputs": ["tiles"], "outputs": ["features"]}
#: ``head.onnx``: features ``[G, N, D]``, positions ``[G, N, 2]`` (µm), mask ``[G, N]`` → expression ``[G, N, genes]``.
HEAD_IO: dict[str, list[str]] = {"inputs": ["features", "positions", "mask"], "outputs": ["expression"]}
#: ``encoder.onnx`` of a sub-spot bundle: tiles → features ``[B, D]`` and the last-layer patch tokens
#: ``[B, rows, cols, width]`` (class token and registers removed; see ``hishrst_runtime.core.tokens``).
ENCODER_TOKENS_IO: dict[str, list[str]] = {"inputs": ["tiles"], "outputs": ["features", "tokens"]}
#: ``head.onnx`` of a sub-spot bundle: tokens ``[B, rows, cols, width]`` → expression ``[B, rows, cols, genes]``.
SUBSPOT_HEAD_IO: dict[str, list[str]] = {"inputs": ["tokens"], "outputs": ["expression"]}
