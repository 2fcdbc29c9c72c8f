"""ONNX Runtime with the CUDA execution provider, fed through IOBinding.

Each call copies the inputs to device ``OrtValue``\\ s (``OrtValue.ortvalue_from_numpy(arr, "cuda",
device_id)``), binds every output to the device (``io_binding.bind_output(name, "cuda", device_id)``,
onnxruntime allocates it with the right shape), runs ``session.run_with_iobinding`` and copies the
outputs back with ``copy_outputs_to_cpu()``. This keeps onnxruntime from staging copies inside the
run and keeps intermediate results on the GPU.

onnxruntime falls back to the CPU *silently* when it cannot create the CUDA provider (CUDA/cuDNN
libraries missing, the CPU-only ``onnxruntime`` wheel installed, no GPU): the session is created,
just without CUDA. We therefore check ``session.get_providers()`` right after creation and refuse to
continue with a CPU session that claims to be CUDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import (
    GPU_EXTRA_HINT,
    BackendBase,
    BackendError,
    check_model_path,
    ort_errors,
    ort_session_options,
    preload_ort_cuda_libraries,
)

__all__ = ["OrtCudaBackend", "cuda_provider_options", "explain_missing_provider"]


def cuda_provider_options(device_id: int = 0) -> dict[str, Any]:
    """CUDA execution-provider options (documented keys of onnxruntime's CUDA EP)."""
    return {
        "device_id": int(device_id),
        "arena_extend_strategy": "kNextPowerOfTwo",
        # Our models are a fixed-shape-per-batch ViT encoder and a small head: exhaustive cuDNN
        # search happens once per new shape and then pays off over a whole slide.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "do_copy_in_default_stream": True,
    }


def explain_missing_provider(ep: str, session_providers: list[str] | None = None) -> str:
    """Why execution provider ``ep`` is unusable, and the fix.

    ``session_providers`` is what a session that came up without ``ep`` got instead (``None`` when no
    session was created because this onnxruntime build does not have ``ep`` at all).
    """
    import onnxruntime as ort

    avail = ort.get_available_providers()
    if ep not in avail:
        why = (
            f"this onnxruntime {ort.__version__} build has no {ep} (available: {', '.join(avail)}), "
            "i.e. the CPU-only 'onnxruntime' wheel is installed"
        )
    elif ep == "TensorrtExecutionProvider":
        why = (
            f"onnxruntime lists {ep} but could not create it: the TensorRT libraries (libnvinfer) are missing "
            "or do not match this onnxruntime-gpu release, the CUDA/cuDNN libraries are missing, or no NVIDIA GPU is visible"
        )
    else:
        why = (
            f"onnxruntime lists {ep} but could not create it: the CUDA or cuDNN libraries onnxruntime-gpu "
            "was built against are missing (or the wrong major version), or no NVIDIA GPU / driver is visible"
        )
    fallback = f"; the session silently fell back to {', '.join(session_providers) or 'nothing'}" if session_providers else ""
    return (
        f"{why}{fallback}. "
        f"Fix: {GPU_EXTRA_HINT}; check `nvidia-smi` and `python -c \"import onnxruntime; onnxruntime.print_debug_info()\"` "
        "(onnxruntime >= 1.21), or choose --provider cpu"
    )


class OrtCudaBackend(BackendBase):
    """An onnxruntime session on ``CUDAExecutionProvider`` (CPU provider kept for unsupported nodes).

    Args:
        model_path: the ``.onnx`` file.
        device_id: CUDA device ordinal.
        threads: intra-op CPU threads for nodes left on the CPU (default: physical cores).
    """

    provider = "cuda"
    _EP = "CUDAExecutionProvider"

    def __init__(self, model_path: str | Path, *, device_id: int = 0, threads: int | None = None) -> None:
        self.model_path = check_model_path(model_path)
        self.device_id = int(device_id)
        self._open([(self._EP, cuda_provider_options(self.device_id)), "CPUExecutionProvider"], threads=threads)

    def _open(self, providers: list[Any], *, threads: int | None) -> None:
        """Create the session (refusing a silent CPU fallback) and read its inputs and outputs."""
        import onnxruntime as ort

        self._session = self._create_session(providers, threads=threads)
        self._adopt_session_io(self._session)
        self.name = f"onnxruntime-{self.provider}-{ort.__version__}"

    def _create_session(self, providers: list[Any], *, threads: int | None) -> Any:
        """Create the session and check that ``self._EP`` is really in use."""
        import onnxruntime as ort

        preload_ort_cuda_libraries()
        so = ort_session_options(threads=threads)
        try:
            session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=providers)
        except ort_errors() as e:
            raise BackendError(
                f"{self.model_path}: could not create an onnxruntime session with {self._EP} ({e}). "
                f"Fix: {GPU_EXTRA_HINT}, or choose --provider cpu"
            ) from e
        got = session.get_providers()
        if self._EP not in got:
            raise BackendError(f"{self.model_path}: {explain_missing_provider(self._EP, got)}")
        return session

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Copy inputs to the GPU, run with IOBinding, copy the outputs back to host arrays."""
        import onnxruntime as ort

        if self._session is None:
            raise BackendError(f"{self.name}: the backend was closed")
        arrays = self._prepare(feeds)
        try:
            binding = self._session.io_binding()
            # Keep the device OrtValues referenced until the run has finished.
            device_inputs = [ort.OrtValue.ortvalue_from_numpy(a, "cuda", self.device_id) for a in arrays]
            for name, value in zip(self.input_names, device_inputs):
                binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cuda", self.device_id)
            self._session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        except ort_errors() as e:
            raise BackendError(f"{self.model_path}: inference failed on {self.name} device {self.device_id} ({e})") from e
        return [np.asarray(o) for o in outputs]

    def close(self) -> None:
        """Drop the session and its device memory (idempotent)."""
        self._session = None
