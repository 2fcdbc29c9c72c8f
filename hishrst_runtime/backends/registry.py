"""The engine registry: which module runs each provider, and the options every engine is loaded with.

:data:`ENGINES` maps each user-selectable provider (``--provider``), fastest first, to an
:class:`EngineEntry`: the module holding the engine and a loader that imports that module (and so
its engine package: onnxruntime, tensorrt, cuda-python) only when the engine is loaded. Importing
this module imports none of them. :class:`BackendOptions` holds the settings a loader may use; each
engine reads the ones it needs.

The zero-returning engine of :mod:`hishrst_runtime.backends.noop` is deliberately **not** registered:
it is a benchmark stand-in (``hishrst_runtime.inference.engines.noop_engines``), not a user choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from hishrst_runtime.backends.base import Backend, BackendError
from hishrst_runtime.core.errors import InputError

__all__ = ["ENGINES", "BackendOptions", "EngineEntry", "engine_entry", "load_engine"]


@dataclass(frozen=True)
class BackendOptions:
    """Settings of one engine load (each engine uses the ones that apply to it).

    ``cache_dir``: engine/timing-cache root of the onnxruntime TensorRT provider; ``engine_path``: the
    bundle's serialized TensorRT engine (``trt-native``); ``device_id``: CUDA device ordinal;
    ``threads``: CPU intra-op threads (``None``: physical cores); ``fp16``: allow FP16 kernels (TensorRT
    provider); ``max_batch`` / ``opt_batch``: largest and optimal batch of the TensorRT optimisation profile
(``opt_batch`` ``None``: ``max_batch``; see :mod:`hishrst_runtime.backends.profiles`); ``shapes``:
    ``{input: (min, opt, max)}`` for inputs with dynamic non-batch dimensions; ``expected``:
    ``{"gpu", "tensorrt_version"}`` a native engine was built for; ``model_sha256``: the model's hash
    from the manifest (saves hashing it for the TensorRT cache key). Bad values raise :class:`InputError`.
    """

    cache_dir: str | Path | None = None
    engine_path: str | Path | None = None
    device_id: int = 0
    threads: int | None = None
    fp16: bool = False
    max_batch: int = 64
    shapes: Mapping[str, tuple[Any, Any, Any]] | None = None
    expected: Mapping[str, Any] | None = None
    model_sha256: str | None = None
    opt_batch: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("device_id", 0), ("threads", 1), ("max_batch", 1), ("opt_batch", 1)):
            value = getattr(self, name)
            if value is None and name in ("threads", "opt_batch"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"backend option {name} must be an integer >= {low}, got {value!r}")
        if self.opt_batch is not None and self.opt_batch > self.max_batch:
            raise InputError(f"backend option opt_batch ({self.opt_batch}) must not exceed max_batch ({self.max_batch})")


Loader = Callable[[Path | None, BackendOptions], Backend]


@dataclass(frozen=True)
class EngineEntry:
    """One provider: the ``module`` holding its engine, what it runs (an ONNX model or a serialized
    TensorRT engine), a one-line ``summary``, the ``loader`` (imports ``module`` when called) and whether
    its batch size is bounded by the bundle's ``max_batch`` (TensorRT optimisation profiles stop there)."""

    provider: str
    module: str
    runs: Literal["onnx", "engine"]
    summary: str
    loader: Loader
    batch_bounded: bool = False

    def load(self, model_path: str | Path | None, options: BackendOptions) -> Backend:
        """Load ``model_path`` with this engine (see :func:`load_engine`)."""
        return self.loader(None if model_path is None else Path(model_path), options)


def _onnx_path(provider: str, model_path: Path | None) -> Path:
    if model_path is None:
        raise BackendError(f"provider {provider!r} needs the ONNX model path")
    return model_path


def _load_trt_native(model_path: Path | None, o: BackendOptions) -> Backend:
    # The engine may come as engine_path or, for convenience, as the only path given.
    engine = o.engine_path if o.engine_path is not None else model_path
    if engine is None or Path(engine).suffix == ".onnx":
        raise BackendError("provider 'trt-native' needs the bundle's TensorRT engine (engine_path); "
                           "export one with `hishrst export ... --tensorrt` or use --provider tensorrt")
    from hishrst_runtime.backends.tensorrt_native import TensorRTNativeBackend

    return TensorRTNativeBackend(engine, expected=o.expected, device_id=o.device_id)


def _load_ort_trt(model_path: Path | None, o: BackendOptions) -> Backend:
    path = _onnx_path("tensorrt", model_path)
    from hishrst_runtime.backends.ort_trt import OrtTensorrtBackend

    return OrtTensorrtBackend(path, device_id=o.device_id, cache_dir=o.cache_dir, fp16=o.fp16, max_batch=o.max_batch,
                              shapes=o.shapes, model_sha256=o.model_sha256, threads=o.threads, opt_batch=o.opt_batch)


def _load_ort_cuda(model_path: Path | None, o: BackendOptions) -> Backend:
    path = _onnx_path("cuda", model_path)
    from hishrst_runtime.backends.ort_cuda import OrtCudaBackend

    return OrtCudaBackend(path, device_id=o.device_id, threads=o.threads)


def _load_ort_cpu(model_path: Path | None, o: BackendOptions) -> Backend:
    path = _onnx_path("cpu", model_path)
    from hishrst_runtime.backends.ort_cpu import OrtCpuBackend

    return OrtCpuBackend(path, threads=o.threads)


_PKG = "hishrst_runtime.backends"
#: ``{provider: entry}`` of every ``--provider`` choice but ``auto``, fastest first (the order ``auto`` tries).
ENGINES: Mapping[str, EngineEntry] = MappingProxyType({
    e.provider: e for e in (
        EngineEntry("trt-native", f"{_PKG}.tensorrt_native", "engine",
                    "the bundle's serialized TensorRT engine, run with the tensorrt package", _load_trt_native,
                    batch_bounded=True),
        EngineEntry("tensorrt", f"{_PKG}.ort_trt", "onnx",
                    "onnxruntime-gpu's TensorRT execution provider (engines cached on first use)", _load_ort_trt,
                    batch_bounded=True),
        EngineEntry("cuda", f"{_PKG}.ort_cuda", "onnx", "onnxruntime-gpu's CUDA execution provider", _load_ort_cuda),
        EngineEntry("cpu", f"{_PKG}.ort_cpu", "onnx", "onnxruntime on the CPU (always available)", _load_ort_cpu),
    )
})


def engine_entry(provider: str) -> EngineEntry:
    """The registered engine of a concrete ``provider``; :class:`BackendError` listing the choices otherwise."""
    entry = ENGINES.get(provider) if isinstance(provider, str) else None
    if entry is None:
        hint = (" (the no-op engine is a benchmark stand-in: hishrst_runtime.inference.engines.noop_engines)"
                if provider == "noop" else "")
        raise BackendError(f"unknown provider {provider!r}; choose one of auto, {', '.join(ENGINES)}{hint}")
    return entry


def load_engine(provider: str, model_path: str | Path | None, options: BackendOptions | None = None) -> Backend:
    """Load ``model_path`` on the concrete ``provider`` (no ``auto``, no availability probe, no fallback).

    ``model_path`` is the ``.onnx`` file; for ``"trt-native"`` it may be ``None`` (``options.engine_path``
    is used) or the engine file itself. Raises :class:`BackendError` for an unknown provider or an
    engine that cannot load the model.
    """
    return engine_entry(provider).load(model_path, options or BackendOptions())
