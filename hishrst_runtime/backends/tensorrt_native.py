"""A serialized TensorRT engine from the bundle, run with the TensorRT Python API (no onnxruntime, no torch).

Loading: the engine's recorded GPU model and TensorRT version (from the manifest, ``expected=``) are
compared with this machine *before* deserializing, because TensorRT engines only run on the
TensorRT version and (in practice) the GPU model they were built for; a mismatch raises
:class:`BackendError` telling the user to rebuild the engine or use another provider. Then
``trt.Runtime.deserialize_cuda_engine`` and ``create_execution_context``.

Device memory comes from ``cuda-python`` (``cuda.bindings.runtime``, formerly ``cuda.cudart``:
``cudaMalloc``, ``cudaMemcpyAsync``, ``cudaStreamCreate``) or, if that is missing, CuPy. One buffer
per I/O tensor is allocated once, sized for the profile's maximum shapes, and bound once with
``set_tensor_address``. Each call sets the input shapes (``set_input_shape``), copies the inputs in,
reads the resulting output shapes from the context, runs ``execute_async_v3`` and copies the outputs
back, all on one CUDA stream, then synchronises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import BackendBase, BackendError, gpu_name
from hishrst_runtime.backends.profiles import check_profile

__all__ = ["MIN_TENSORRT_MAJOR", "TensorRTNativeBackend", "check_engine_compat", "import_tensorrt"]

log = logging.getLogger(__name__)


#: Oldest TensorRT major version hishrst builds or runs engines with (the one version rule, for export too).
MIN_TENSORRT_MAJOR = 10


def import_tensorrt(error: type[Exception] = BackendError, *, fix: str = "or choose --provider cuda / cpu") -> Any:
    """Import the ``tensorrt`` module, refusing TensorRT older than :data:`MIN_TENSORRT_MAJOR`.

    The one TensorRT importer of hishrst: the runtime raises :class:`BackendError` (``fix`` names another
    provider); export passes its own ``error`` class and ``fix``. The message names the ``[gpu]`` extra."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise error(f"the TensorRT Python package is not installed ({e}); install TensorRT >= {MIN_TENSORRT_MAJOR} "
                    f"with: pip install 'hishrst[gpu]' (or pip install tensorrt), {fix}") from e
    version = str(getattr(trt, "__version__", "0"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < MIN_TENSORRT_MAJOR:
        raise error(f"TensorRT {version} is too old; hishrst needs TensorRT >= {MIN_TENSORRT_MAJOR} "
                    f"(pip install -U tensorrt), {fix}")
    return trt


def check_engine_compat(engine_path: Path, expected: Mapping[str, Any] | None, *, trt_version: str, gpu: str | None) -> None:
    """Refuse an engine recorded for another GPU model or TensorRT version than this machine's."""
    if gpu is None:
        raise BackendError(f"{engine_path}: no NVIDIA GPU is visible (nvidia-smi/cuda-python found none); use --provider cpu")
    if not expected:
        log.warning("%s: no recorded GPU/TensorRT version to check the engine against", engine_path)
        return
    problems = []
    want_trt = expected.get("tensorrt_version")
    if want_trt and str(want_trt) != trt_version:
        problems.append(f"TensorRT {want_trt} (this machine has TensorRT {trt_version})")
    want_gpu = expected.get("gpu")
    if want_gpu and str(want_gpu) != gpu:
        problems.append(f"GPU '{want_gpu}' (this machine has '{gpu}')")
    if problems:
        raise BackendError(
            f"{engine_path}: the TensorRT engine was built for {' and '.join(problems)}; engines are not portable. "
            "Rebuild it on this machine (`hishrst export ... --tensorrt`), or run with --provider tensorrt "
            "(onnxruntime builds and caches its own engines) or --provider cuda"
        )


# ----------------------------------------------------------------------------- device memory


class _CudaPython:
    """CUDA runtime calls through cuda-python; every call returns ``(err, *results)``."""

    def __init__(self, device_id: int) -> None:
        try:
            from cuda.bindings import runtime as rt
        except ImportError:
            from cuda import cudart as rt  # older cuda-python layout; ImportError propagates
        self.rt = rt
        self.device_id = int(device_id)
        self.activate()
        self._stream = self._check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.stream_handle = int(self._stream)

    def activate(self) -> None:
        """Make the device current in the calling thread (the runtime calls the head from its own thread)."""
        self._check(self.rt.cudaSetDevice(self.device_id), "cudaSetDevice")

    def _check(self, result: tuple[Any, ...], what: str) -> Any:
        err, *rest = result
        if err != self.rt.cudaError_t.cudaSuccess:
            msg = self.rt.cudaGetErrorString(err)[1]
            msg = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
            raise BackendError(f"CUDA error in {what}: {msg} ({err})")
        return rest[0] if len(rest) == 1 else None

    def malloc(self, nbytes: int) -> Any:
        return self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")

    def ptr(self, buf: Any) -> int:
        return int(buf)

    def h2d(self, buf: Any, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(int(buf), host.ctypes.data, host.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def d2h(self, host: np.ndarray, buf: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(host.ctypes.data, int(buf), host.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def free(self, buf: Any) -> None:
        self._check(self.rt.cudaFree(int(buf)), "cudaFree")

    def close(self) -> None:
        self._check(self.rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")


class _CuPy:
    """The same operations with CuPy's public API (device arrays of bytes, ``set``/``get`` on a stream)."""

    def __init__(self, device_id: int) -> None:
        import cupy

        self.cp = cupy
        self.device_id = int(device_id)
        self.activate()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_handle = int(self._stream.ptr)

    def activate(self) -> None:
        """Make the device current in the calling thread."""
        self.cp.cuda.Device(self.device_id).use()

    def malloc(self, nbytes: int) -> Any:
        return self.cp.empty(max(int(nbytes), 1), dtype=self.cp.uint8)

    def ptr(self, buf: Any) -> int:
        return int(buf.data.ptr)

    def h2d(self, buf: Any, host: np.ndarray) -> None:
        buf[: host.nbytes].set(host.reshape(-1).view(np.uint8), stream=self._stream)

    def d2h(self, host: np.ndarray, buf: Any) -> None:
        buf[: host.nbytes].get(stream=self._stream, out=host.reshape(-1).view(np.uint8))

    def synchronize(self) -> None:
        self._stream.synchronize()

    def free(self, buf: Any) -> None:
        del buf  # returned to CuPy's memory pool when the last reference goes

    def close(self) -> None:
        self._stream = None


def _cuda_memory(device_id: int) -> _CudaPython | _CuPy:
    try:
        return _CudaPython(device_id)
    except ImportError:
        pass
    try:
        return _CuPy(device_id)
    except ImportError as e:
        raise BackendError(
            "the native TensorRT backend needs cuda-python (or CuPy) for device memory; install it with "
            "pip install 'hishrst[gpu]' or pip install cuda-python (or use --provider tensorrt / cuda)"
        ) from e


# ----------------------------------------------------------------------------- backend


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


class TensorRTNativeBackend(BackendBase):
    """Run a serialized TensorRT engine (``.engine``/``.plan``) on GPU ``device_id``.

    Args:
        engine_path: the engine file from the bundle.
        expected: ``{"gpu": ..., "tensorrt_version": ...}`` recorded in the manifest when the engine
            was built; a mismatch with this machine raises :class:`BackendError`.
        device_id: CUDA device ordinal.

    Attributes:
        max_batch: the largest first dimension every input accepts (optimisation profile 0).
        profile: ``{input: (min, opt, max) shapes}`` of profile 0.
    """

    provider = "trt-native"

    def __init__(self, engine_path: str | Path, *, expected: Mapping[str, Any] | None = None, device_id: int = 0) -> None:
        self.engine_path = Path(engine_path)
        self.device_id = int(device_id)
        self._mem: _CudaPython | _CuPy | None = None
        self._buffers: dict[str, Any] = {}
        self._context: Any = None
        self._engine: Any = None
        if not self.engine_path.is_file():
            raise BackendError(f"{self.engine_path}: TensorRT engine file not found; re-export the bundle with --tensorrt")
        trt = import_tensorrt()
        self._trt = trt
        check_engine_compat(self.engine_path, expected, trt_version=trt.__version__, gpu=gpu_name(self.device_id))
        self.name = f"tensorrt-{trt.__version__}"
        self._mem = _cuda_memory(self.device_id)
        try:
            self._load(trt)
        except BaseException:
            self.close()
            raise

    def _load(self, trt: Any) -> None:
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise BackendError(
                f"{self.engine_path}: TensorRT {trt.__version__} could not deserialize the engine (built with another "
                "TensorRT version or for another GPU, or the file is damaged); rebuild it on this machine"
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendError(f"{self.engine_path}: could not create a TensorRT execution context (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._dtypes: dict[str, np.dtype] = {}
        for n in names:
            try:
                self._dtypes[n] = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            except TypeError as e:
                raise BackendError(f"{self.engine_path}: tensor {n!r} has a type numpy cannot hold ({e})") from e
        self.input_dtypes = [self._dtypes[n] for n in self.input_names]
        self.input_shapes = [tuple(d if d >= 0 else None for d in _dims(engine.get_tensor_shape(n))) for n in self.input_names]
        self.profile = {n: self._profile_of(engine, n) for n in self.input_names}
        self.max_batch = min((p[2][0] for p in self.profile.values() if p[2]), default=0)
        # Size every buffer for the largest shapes the profile allows.
        for n in self.input_names:
            self._set_shape(n, self.profile[n][2])
        max_shapes = {n: self.profile[n][2] for n in self.input_names}
        for n in self.output_names:
            shape = _dims(self._context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise BackendError(f"{self.engine_path}: output {n!r} has a data-dependent shape {shape}; not supported")
            max_shapes[n] = shape
        assert self._mem is not None
        for n in names:
            nbytes = int(np.prod(max_shapes[n], dtype=np.int64)) * self._dtypes[n].itemsize
            self._buffers[n] = self._mem.malloc(nbytes)
            if not self._context.set_tensor_address(n, self._mem.ptr(self._buffers[n])):
                raise BackendError(f"{self.engine_path}: TensorRT refused the device address of tensor {n!r}")

    @staticmethod
    def _profile_of(engine: Any, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of ``name`` in profile 0; a static input's own shape three times."""
        static = _dims(engine.get_tensor_shape(name))
        if all(d >= 0 for d in static):
            return static, static, static
        lo, opt, hi = (_dims(s) for s in engine.get_tensor_profile_shape(name, 0))
        return lo, opt, hi

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            lo, _, hi = self.profile[name]
            raise BackendError(
                f"{self.engine_path}: input {name!r} shape {shape} is outside the engine's profile (min {lo}, max {hi}); "
                "use smaller batches or rebuild the engine with a larger max batch"
            )

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Copy inputs to the GPU, execute the engine, copy outputs back (one stream, synchronised)."""
        if self._context is None or self._mem is None:
            raise BackendError(f"{self.name}: the backend was closed")
        arrays = self._prepare(feeds)
        self._mem.activate()  # CUDA's current device is per thread
        check_profile(str(self.engine_path), {n: a.shape for n, a in zip(self.input_names, arrays)}, self.profile)
        for name, arr in zip(self.input_names, arrays):
            self._set_shape(name, arr.shape)
            self._mem.h2d(self._buffers[name], arr)
        outputs = []
        for name in self.output_names:
            outputs.append(np.empty(_dims(self._context.get_tensor_shape(name)), dtype=self._dtypes[name]))
        if not self._context.execute_async_v3(self._mem.stream_handle):
            raise BackendError(f"{self.engine_path}: TensorRT execute_async_v3 failed (see the TensorRT log above)")
        for name, out in zip(self.output_names, outputs):
            self._mem.d2h(out, self._buffers[name])
        self._mem.synchronize()
        return outputs

    def close(self) -> None:
        """Free device buffers, the stream, the context and the engine (idempotent)."""
        self._context = None
        self._engine = None
        mem, self._mem = self._mem, None
        if mem is not None:
            mem.activate()
            for buf in self._buffers.values():
                mem.free(buf)
            self._buffers = {}
            mem.close()
