"""Tensor names of the bundle's two ONNX graphs: the contract between export and every runtime engine."""

from __future__ import annotations

__all__ = ["ENCODER_IO", "HEAD_IO"]

#: ``encoder.onnx``: uint8 NHWC tiles ``[B, S, S, 3]`` → float32 features ``[B, D]``.
ENCODER_IO: dict[str, list[str]] = {"inputs": ["tiles"], "outputs": ["features"]}
#: ``head.onnx``: features ``[G, N, D]``, positions ``[G, N, 2]`` (µm), mask ``[G, N]`` → expression ``[G, N, genes]``.
HEAD_IO: dict[str, list[str]] = {"inputs": ["features", "positions", "mask"], "outputs": ["expression"]}
