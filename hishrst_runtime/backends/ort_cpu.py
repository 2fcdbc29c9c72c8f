"""ONNX Runtime on the CPU: the reference backend, available everywhere.

Graph optimisation level ``ORT_ENABLE_ALL``, sequential execution, ``intra_op_num_threads`` =
physical cores unless ``threads`` says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hishrst_runtime.backends.base import (
    BackendBase,
    BackendError,
    check_model_path,
    ort_errors,
    ort_session_options,
)

__all__ = ["OrtCpuBackend"]


class OrtCpuBackend(BackendBase):
    """An onnxruntime ``InferenceSession`` on ``CPUExecutionProvider``.

    Args:
        model_path: the ``.onnx`` file (external-data files next to it are found by onnxruntime).
        threads: intra-op threads; default = number of physical cores.
    """

    provider = "cpu"

    def __init__(self, model_path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_path = check_model_path(model_path)
        so = ort_session_options(threads=threads)
        self.threads = so.intra_op_num_threads
        try:
            self._session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=["CPUExecutionProvider"])
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: onnxruntime could not load the model ({e}); re-export the bundle") from e
        self._adopt_session_io(self._session)
        self.name = f"onnxruntime-cpu-{ort.__version__}"

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run on host arrays; returns host arrays in ``output_names`` order."""
        if self._session is None:
            raise BackendError(f"{self.name}: the backend was closed")
        arrays = self._prepare(feeds)
        try:
            return list(self._session.run(self.output_names, dict(zip(self.input_names, arrays))))
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: inference failed on the CPU ({e})") from e

    def close(self) -> None:
        """Drop the session (idempotent)."""
        self._session = None
