"""The inference-backend contract and helpers shared by the backends (torch-free).

A backend wraps one exported model (``encoder.onnx``, ``head.onnx`` or a TensorRT engine) behind a
numpy-in / numpy-out interface, :class:`Backend`. Everything GPU-specific (onnxruntime-gpu's
CUDA/TensorRT execution providers, the ``tensorrt`` and ``cuda-python`` packages) is imported only
inside the backend modules, and only when such a backend is loaded; this module needs numpy and, for
:func:`ort_session_io`, onnxruntime.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
from hishrst_runtime.core.errors import EnvironmentProblem

__all__ = [
    "GPU_EXTRA_HINT",
    "Backend",
    "BackendBase",
    "BackendError",
    "check_model_path",
    "default_threads",
    "named_output",
    "gpu_name",
    "has_nvidia_smi",
    "ort_errors",
    "ort_session_io",
    "ort_session_options",
    "ort_type_to_numpy",
    "preload_ort_cuda_libraries",
    "prepare_feeds",
]

#: The install instruction given whenever a GPU provider is missing from onnxruntime.
GPU_EXTRA_HINT = (
    "pip install 'hishrst[gpu]' && pip install --force-reinstall --no-deps onnxruntime-gpu "
    "(onnxruntime and onnxruntime-gpu share the `onnxruntime` module, so the GPU build must be installed last)"
)


class BackendError(EnvironmentProblem):
    """A backend cannot be created or run: missing GPU libraries, wrong provider, bad inputs."""


@runtime_checkable
class Backend(Protocol):
    """One loaded model: numpy arrays in, numpy arrays out.

    Attributes:
        name: human-readable engine, e.g. ``"onnxruntime-cpu"`` or ``"tensorrt-10.9.0"``.
        provider: the hishrst provider name (``"cpu"``, ``"cuda"``, ``"tensorrt"``, ``"trt-native"``).
        input_names / output_names: graph input and output names, in graph order.
        input_dtypes: numpy dtype of each input, aligned with ``input_names``.
        input_shapes: each input's shape; dynamic dimensions are ``None``.
    """

    name: str
    provider: str
    input_names: list[str]
    output_names: list[str]
    input_dtypes: list[np.dtype]
    input_shapes: list[tuple[int | None, ...]]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the model on host arrays; returns host arrays in ``output_names`` order."""
        ...

    def close(self) -> None:
        """Release sessions and device memory (idempotent)."""
        ...


_B = TypeVar("_B", bound="BackendBase")


class BackendBase(Backend):
    """Mix-in with the behaviour every backend shares: context manager, feed checking, repr (the
    attributes are those of :class:`Backend`)."""

    def _adopt_session_io(self, session: Any) -> None:
        """Take ``input_names`` / ``input_dtypes`` / ``input_shapes`` / ``output_names`` from an onnxruntime session."""
        io = ort_session_io(session)
        self.input_names, self.input_dtypes = io["input_names"], io["input_dtypes"]
        self.input_shapes, self.output_names = io["input_shapes"], io["output_names"]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - overridden
        """Run the model (implemented by each backend)."""
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - overridden
        """Release resources (overridden by backends that hold any)."""

    def __enter__(self: _B) -> _B:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(
            f"{n}:{np.dtype(d).name}{list(s)}" for n, d, s in zip(self.input_names, self.input_dtypes, self.input_shapes)
        )
        return f"<{type(self).__name__} {self.name} provider={self.provider} inputs=[{ins}] outputs={self.output_names}>"

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return prepare_feeds(feeds, self.input_names, self.input_dtypes, self.input_shapes, where=self.name)


def named_output(backend: Any, outputs: Sequence[np.ndarray], name: str) -> np.ndarray:
    """The output called ``name`` among ``outputs`` (what ``backend.run`` returned, in ``output_names`` order):
    e.g. ``tokens`` of a sub-spot encoder, which also outputs ``features``. A backend with a single output (the
    benchmark stand-ins) gives that one; a missing name raises :class:`BackendError`."""
    names = list(getattr(backend, "output_names", None) or [])
    if name in names and len(outputs) == len(names):
        return outputs[names.index(name)]
    if len(outputs) == 1:
        return outputs[0]
    raise BackendError(f"{getattr(backend, 'name', 'engine')}: no output {name!r} among {names or len(outputs)}; the "
                       "model does not match the bundle's manifest — re-export the bundle")


# ----------------------------------------------------------------------------- feeds and dtypes

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def ort_type_to_numpy(type_str: str) -> np.dtype:
    """Map an onnxruntime type string such as ``"tensor(uint8)"`` to a numpy dtype."""
    try:
        return np.dtype(_ORT_TYPES[type_str])
    except KeyError as e:
        raise BackendError(f"unsupported model input/output type {type_str!r}; supported: {', '.join(_ORT_TYPES)}") from e


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """Normalise an onnxruntime/TensorRT shape: symbolic names, None and negative values become None."""
    return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) >= 0 else None for d in shape)


def ort_session_io(session: Any) -> dict[str, Any]:
    """Input/output names, numpy dtypes and shapes (dynamic dims as ``None``) of an onnxruntime session."""
    ins = session.get_inputs()
    outs = session.get_outputs()
    return {
        "input_names": [i.name for i in ins],
        "input_dtypes": [ort_type_to_numpy(i.type) for i in ins],
        "input_shapes": [_dims(i.shape) for i in ins],
        "output_names": [o.name for o in outs],
    }


def prepare_feeds(
    feeds: Mapping[str, np.ndarray],
    names: Sequence[str],
    dtypes: Sequence[np.dtype],
    shapes: Sequence[tuple[int | None, ...]],
    *,
    where: str = "model",
) -> list[np.ndarray]:
    """Check ``feeds`` against the model inputs and return C-contiguous arrays in input order.

    Missing or unknown names, a wrong rank or a wrong static dimension raise :class:`BackendError`.
    A dtype that differs is converted when numpy's ``same_kind`` casting allows it (float64 -> float32,
    int64 -> int32); anything else (e.g. float -> uint8) is refused, because silently truncating image
    data would corrupt predictions.
    """
    missing = [n for n in names if n not in feeds]
    unknown = [n for n in feeds if n not in names]
    if missing or unknown:
        raise BackendError(
            f"{where}: inputs do not match the model (missing: {missing or 'none'}, unknown: {unknown or 'none'}); "
            f"the model expects {list(names)}"
        )
    out: list[np.ndarray] = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        arr = np.asarray(feeds[name])
        if arr.dtype != dtype:
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise BackendError(
                    f"{where}: input {name!r} has dtype {arr.dtype}, the model expects {np.dtype(dtype)}; "
                    f"convert it explicitly (e.g. images must be uint8 RGB, not scaled floats)"
                )
            arr = arr.astype(dtype)
        if arr.ndim != len(shape) or any(s is not None and s != a for s, a in zip(shape, arr.shape)):
            want = "x".join("?" if s is None else str(s) for s in shape)
            raise BackendError(f"{where}: input {name!r} has shape {arr.shape}, the model expects [{want}] (? = any)")
        out.append(np.ascontiguousarray(arr))
    return out


# ----------------------------------------------------------------------------- machine facts


def default_threads() -> int:
    """Number of physical CPU cores (the default intra-op thread count); logical cores if unknown."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return max(1, int(n or os.cpu_count() or 1))


def has_nvidia_smi() -> bool:
    """Whether the ``nvidia-smi`` tool (installed with the NVIDIA driver) is on ``PATH``."""
    return shutil.which("nvidia-smi") is not None


@functools.lru_cache(maxsize=16)
def gpu_name(device_id: int = 0) -> str | None:
    """Marketing name of GPU ``device_id`` (e.g. ``"NVIDIA H100 80GB HBM3"``), or ``None`` without a GPU.

    Asks ``nvidia-smi --query-gpu=name`` first (no CUDA context is created; ``device_id`` is mapped
    through ``CUDA_VISIBLE_DEVICES``), then cuda-python's ``cudaGetDeviceProperties``. Both report the
    driver's device name, so an engine's recorded GPU compares equal across the two. Cached per process.
    """
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        # nvidia-smi numbers GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES; map the CUDA ordinal
        # through it (entries may be indices or UUIDs, both accepted by --id).
        smi_id = str(device_id)
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            visible = [v.strip() for v in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if v.strip()]
            if device_id >= len(visible) or visible[0].startswith("-"):
                return None  # CUDA sees no such device
            smi_id = visible[device_id]
        try:
            res = subprocess.run(
                [smi, f"--id={smi_id}", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            res = None
        if res is not None and res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip().splitlines()[0].strip()
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.8 layout
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python layout
        except ImportError:
            return None
    try:
        err, prop = cudart.cudaGetDeviceProperties(device_id)
    except (RuntimeError, OSError):
        return None
    if int(err) != 0 or prop is None:
        return None
    raw = prop.name
    name = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    return name.split("\x00", 1)[0].strip() or None


# ----------------------------------------------------------------------------- onnxruntime helpers


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception classes onnxruntime raises (its pybind classes derive from ``Exception`` directly)."""
    errs: list[type[BaseException]] = [RuntimeError, OSError, ValueError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:
        return tuple(errs)
    for attr in ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
                 "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail"):
        cls = getattr(state, attr, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errs.append(cls)
    return tuple(errs)


@functools.lru_cache(maxsize=1)
def preload_ort_cuda_libraries() -> None:
    """Let onnxruntime-gpu find pip-installed CUDA/cuDNN libraries (``onnxruntime.preload_dlls()``, ORT >= 1.21).

    A no-op on CPU-only onnxruntime builds and on older releases. Set ``HISHRST_ORT_PRELOAD_DLLS=0``
    to skip it (e.g. when CUDA comes from the system and must not be mixed with pip wheels).
    """
    if os.environ.get("HISHRST_ORT_PRELOAD_DLLS", "1") == "0":
        return
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except OSError:
        # Missing libraries are diagnosed properly when the session is created (see ort_cuda.py).
        return


def ort_session_options(*, threads: int | None = None, spin: bool = False) -> Any:
    """Session options used by every onnxruntime backend: full graph optimisation, sequential execution.

    ``threads``: intra-op threads (default: physical cores). ``spin``: let idle intra-op threads
    busy-wait for work (onnxruntime's own default). We turn spinning **off**: the runtime keeps two
    sessions (encoder and head) whose thread pools would otherwise spin on the same cores while the
    other session and the reader threads work — on a 2-core machine that cut the encoder+head rate
    from ~2,800 to ~1,750 tiles/s and starved the readers (see benchmarks/RESULTS.md).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads) if threads else default_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return so


def check_model_path(model_path: str | Path) -> Path:
    """Return ``model_path`` as a Path, or raise :class:`BackendError` if it is not a file."""
    p = Path(model_path)
    if not p.is_file():
        raise BackendError(f"{p}: model file not found; pass the encoder.onnx/head.onnx of a bundle written by `hishrst export`")
    return p
