"""Inference backends: which engine runs the exported models, and where.

Providers (hishrst names):

- ``"cpu"``: onnxruntime on the CPU; always available.
- ``"cuda"``: onnxruntime-gpu's CUDA execution provider, with IOBinding.
- ``"tensorrt"``: onnxruntime-gpu's TensorRT execution provider; engines and timing caches are
  built on first use and cached per model / onnxruntime / TensorRT / GPU.
- ``"trt-native"``: the bundle's own serialized TensorRT engine, run with the ``tensorrt`` package.

The registry (:mod:`.registry`: :data:`ENGINES`, provider → engine module and loader, and
:class:`BackendOptions`) is the one list of these; :func:`load_engine` loads a concrete provider with
options, :func:`load_backend` adds ``"auto"`` and the availability checks. The zero-returning engine
(:mod:`.noop`) is a benchmark stand-in and not a provider.

``onnxruntime.get_available_providers()`` is not trusted on its own: onnxruntime-gpu lists CUDA even
when the CUDA/cuDNN libraries are missing and then silently runs on the CPU. :func:`available_providers`
therefore creates (once per process) a tiny session per GPU provider and checks that the provider
really came up. Importing this package imports neither torch nor tensorrt (nor onnxruntime); the
engines are imported when a backend is loaded or a provider probed.

Typical use (``files.encoder_trt`` is the bundle's optional engine, recorded with its GPU and
TensorRT version)::

    engine = bundle.file_entry("encoder_trt")
    backend = load_backend(
        bundle.path("encoder"), provider="auto",
        engine_path=bundle.path("encoder_trt") if engine else None, expected=engine,
        model_sha256=bundle.file_entry("encoder")["sha256"],
    )
    print(f"encoder: {backend.name} ({backend.provider})")
    feats = backend.run({"tiles": tiles})[0]
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.backends.base import GPU_EXTRA_HINT, Backend, BackendError, gpu_name
from hishrst_runtime.backends.registry import ENGINES, BackendOptions, EngineEntry, engine_entry, load_engine
from hishrst_runtime.core.vocab import Provider  # the one list of --provider choices

__all__ = [
    "ENGINES",
    "PROVIDERS",
    "Backend",
    "BackendError",
    "BackendOptions",
    "EngineEntry",
    "Provider",
    "available_providers",
    "load_backend",
    "load_engine",
    "provider_report",
    "resolve_provider",
]

log = logging.getLogger(__name__)


#: Concrete providers, fastest first (the order ``"auto"`` tries them in): the keys of :data:`ENGINES`.
PROVIDERS: tuple[str, ...] = tuple(ENGINES)

# A 76-byte ONNX model (opset 13, IR 8): y = x * x with x, y float32[4]. Built with onnx.helper and
# embedded so that probing needs no `onnx` package and no file.
_PROBE_MODEL = base64.b64decode(
    "CAgSB2hpc2hyc3Q6OQoOCgF4CgF4EgF5IgNNdWwSBXByb2JlWg8KAXgSCgoICAESBAoCCARiDwoBeRIKCggIARIECgIIBEIECgAQDQ=="
)


def _probe_ort(ep: str, device_id: int) -> str | None:
    """``None`` if onnxruntime can really run ``ep`` on ``device_id``, else the reason it cannot."""
    import onnxruntime as ort

    from hishrst_runtime.backends.base import ort_errors, preload_ort_cuda_libraries
    from hishrst_runtime.backends.ort_cuda import explain_missing_provider

    if ep not in ort.get_available_providers():
        return explain_missing_provider(ep)
    preload_ort_cuda_libraries()
    providers: list[Any] = [(ep, {"device_id": device_id}), "CPUExecutionProvider"]
    if ep == "TensorrtExecutionProvider":
        providers.insert(1, ("CUDAExecutionProvider", {"device_id": device_id}))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(_PROBE_MODEL, sess_options=so, providers=providers)
        got = sess.get_providers()
        if ep not in got:
            return explain_missing_provider(ep, got)
        x = np.arange(4, dtype=np.float32)
        (y,) = sess.run(None, {"x": x})
    except ort_errors() as e:
        return f"a test session with {ep} failed ({e}). Fix: {GPU_EXTRA_HINT}"
    if not np.allclose(y, x * x):
        return f"a test session with {ep} returned wrong results; check the GPU driver and CUDA installation"
    return None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _probe_trt_native(device_id: int) -> str | None:
    if not _has_module("tensorrt"):
        return "the TensorRT Python package is not installed. Fix: pip install 'hishrst[gpu]' (or pip install tensorrt)"
    try:
        importlib.import_module("tensorrt")  # a probe: only whether it imports
    except ImportError as e:  # installed but its libraries do not load
        return f"the TensorRT Python package does not import ({e}). Fix: pip install --force-reinstall tensorrt"
    if gpu_name(device_id) is None:
        return f"no NVIDIA GPU {device_id} is visible (nvidia-smi / cuda-python report none)"
    if not any(_has_module(m) for m in ("cuda.bindings", "cuda.cudart", "cupy")):
        return "neither cuda-python nor CuPy is installed (needed for device memory). Fix: pip install cuda-python"
    return None


@functools.lru_cache(maxsize=8)
def provider_report(*, device_id: int = 0) -> dict[str, str | None]:
    """``{provider: None if usable else the reason it is not}`` for this machine (probed once, cached)."""
    report: dict[str, str | None] = {"cpu": None}
    report["cuda"] = _probe_ort("CUDAExecutionProvider", device_id)
    if report["cuda"] is None:
        report["tensorrt"] = _probe_ort("TensorrtExecutionProvider", device_id)
    else:
        import onnxruntime as ort

        from hishrst_runtime.backends.ort_cuda import explain_missing_provider

        trt_ep = "TensorrtExecutionProvider"
        report["tensorrt"] = (
            explain_missing_provider(trt_ep)
            if trt_ep not in ort.get_available_providers()
            else f"the TensorRT provider needs a working CUDA provider, and {report['cuda']}"
        )
    report["trt-native"] = _probe_trt_native(device_id)
    return report


def available_providers(*, device_id: int = 0) -> list[str]:
    """Providers usable on this machine, fastest first; always ends with ``"cpu"``."""
    report = provider_report(device_id=device_id)
    return [p for p in PROVIDERS if report.get(p) is None]


def resolve_provider(requested: Provider, *, engine_available: bool = False, device_id: int = 0) -> str:
    """Turn a requested provider into a concrete, available one.

    ``"auto"`` picks the fastest available: ``"trt-native"`` (only when ``engine_available``, i.e. the
    bundle has an engine), then ``"tensorrt"``, ``"cuda"``, ``"cpu"``. The caller should print which.
    An explicit provider that is not available raises :class:`BackendError` with the reason and the fix.
    """
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        avail = available_providers(device_id=device_id)
        for p in PROVIDERS:
            if p in avail and (p != "trt-native" or engine_available):
                return p
        return "cpu"
    engine_entry(requested)  # an unknown provider: BackendError listing the choices
    reason = provider_report(device_id=device_id).get(requested)
    if reason is not None:
        raise BackendError(f"provider {requested!r} is not available on this machine: {reason}")
    return requested


def load_backend(
    model_path: str | Path | None,
    *,
    provider: Provider,
    cache_dir: str | Path | None = None,
    engine_path: str | Path | None = None,
    device_id: int = 0,
    threads: int | None = None,
    fp16: bool = False,
    max_batch: int = 64,
    shapes: Mapping[str, tuple[Any, Any, Any]] | None = None,
    expected: Mapping[str, Any] | None = None,
    model_sha256: str | None = None,
    opt_batch: int | None = None,
) -> Backend:
    """Load a model on a provider and return its :class:`Backend`.

    Args:
        model_path: the ``.onnx`` file; for ``"trt-native"`` it may be ``None`` (then ``engine_path``
            is used) or the engine file itself.
        provider: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"tensorrt"`` or ``"trt-native"``. With
            ``"auto"`` the providers are tried fastest first and one that fails to load is skipped
            with a warning; an explicit provider never falls back.
        cache_dir: engine/timing-cache root for ``"tensorrt"`` (default ``$HISHRST_CACHE_DIR/trt``
            or ``~/.cache/hishrst/trt``).
        engine_path: serialized TensorRT engine for ``"trt-native"`` (and, with ``"auto"``, whether
            ``"trt-native"`` is a candidate).
        device_id: CUDA device ordinal.
        threads: CPU intra-op threads (default: physical cores).
        fp16: allow FP16 kernels in the onnxruntime TensorRT provider.
        max_batch: largest batch the TensorRT provider's optimisation profile covers.
        shapes: ``{input: (min, opt, max)}`` shapes for inputs with dynamic non-batch dims (TensorRT provider).
        expected: ``{"gpu": ..., "tensorrt_version": ...}`` the engine was built for (from the manifest).
        model_sha256: the model's SHA-256 from the manifest (saves hashing it for the TensorRT cache key).
        opt_batch: the batch the TensorRT provider tunes for (default ``max_batch``; see
            :func:`hishrst_runtime.backends.profiles.batch_range`).
    """
    options = BackendOptions(cache_dir=cache_dir, engine_path=engine_path, device_id=device_id, threads=threads,
                             fp16=fp16, max_batch=max_batch, shapes=shapes, expected=expected, model_sha256=model_sha256,
                             opt_batch=opt_batch)
    engine_ok = engine_path is not None and Path(engine_path).is_file()
    if provider == "auto":
        avail = available_providers(device_id=device_id)
        candidates = [p for p in PROVIDERS if p in avail and (p != "trt-native" or engine_ok)]
        if model_path is None:
            candidates = [p for p in candidates if ENGINES[p].runs == "engine"]
        errors = []
        for p in candidates:
            try:
                return load_engine(p, model_path, options)
            except BackendError as e:
                log.warning("provider %s could not load %s, trying the next one: %s", p, model_path or engine_path, e)
                errors.append(f"{p}: {e}")
        raise BackendError("no provider could load the model: " + "; ".join(errors or ["no candidate provider"]))
    concrete = resolve_provider(provider, engine_available=engine_ok, device_id=device_id)
    return load_engine(concrete, model_path, options)
