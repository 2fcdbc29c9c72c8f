"""ONNX → TensorRT engine build, ending with a parity check against ONNX Runtime (CPU).

Supports TensorRT 10 and 11 with the ``tensorrt`` Python API:

* Network: ``builder.create_network(flags)`` (explicit batch is the only mode since TensorRT 10),
  filled by ``trt.OnnxParser.parse_from_file`` (ONNX external data next to the model is found).
* Precision. An ONNX graph that already holds float16 tensors (``hishrst export --precision fp16``
  writes mixed-precision ONNX) is built as a *strongly typed* network
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): TensorRT keeps the graph's own types. A float32
  graph with ``precision="fp16"`` uses the weak-typing ``BuilderFlag.FP16`` on TensorRT 10; TensorRT 11
  removed that flag (strong typing only), so there the fp16 request must come as an fp16 ONNX and a
  float32 graph with ``precision="fp16"`` is refused with that fix. The version is detected with
  ``hasattr(trt.BuilderFlag, "FP16")``.
* One optimisation profile: the dynamic batch (first) dimension of every input gets
  ``min_batch``/``opt_batch``/``max_batch`` and keeps its other dimensions from the ONNX input
  shape; inputs with other dynamic dimensions (the head's ``[G, N, *]``) take their ranges from
  ``shapes={name: (min, opt, max)}``.
* Workspace limit via ``IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)``; an
  optional timing cache file is loaded (``create_timing_cache``/``set_timing_cache``) and saved back
  after the build (``get_timing_cache().serialize()``) to speed up later builds.
* ``build_serialized_network`` → the engine file, written atomically.

Engines only run with the TensorRT version and on the GPU model they were built with; record
:func:`tensorrt_info` in the manifest (the runtime refuses mismatches). Where TensorRT or a GPU is
missing every entry point raises :class:`TensorRTUnavailable` before touching any file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hishrst_export.parity import PARITY_TOLERANCE as _PARITY
from hishrst_export.parity import compare, passes
from hishrst_runtime.core.errors import EnvironmentProblem, HishrstError
from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.vocab import TENSORRT_PRECISIONS, Precision

__all__ = [
    "PARITY_TOLERANCE",
    "EngineParityError",
    "TensorRTBuildError",
    "TensorRTUnavailable",
    "build_engine",
    "engine_parity",
    "onnx_has_fp16",
    "tensorrt_info",
]

log = logging.getLogger(__name__)

#: Engine-vs-ONNX Runtime thresholds (the ``tensorrt`` rows of
#: :data:`hishrst_export.parity.PARITY_TOLERANCE`; see there for the statistics).
PARITY_TOLERANCE: dict[str, dict[str, float]] = _PARITY["tensorrt"]


class TensorRTUnavailable(EnvironmentProblem):
    """TensorRT (the ``tensorrt`` package) or an NVIDIA GPU is missing on this machine."""


class TensorRTBuildError(EnvironmentProblem):
    """TensorRT could not parse the ONNX model or build the engine."""


class EngineParityError(HishrstError, RuntimeError):
    """A TensorRT engine disagrees with ONNX Runtime (CPU) beyond the tolerance."""


def _import_tensorrt() -> Any:
    """TensorRT through the runtime's one importer and version rule, failing as :class:`TensorRTUnavailable`."""
    from hishrst_runtime.backends.tensorrt_native import import_tensorrt

    return import_tensorrt(TensorRTUnavailable, fix="on the GPU machine the engine will run on (or skip --tensorrt)")


def _require_gpu(device_id: int = 0) -> str:
    from hishrst_runtime.backends.base import gpu_name

    name = gpu_name(device_id)
    if name is None:
        raise TensorRTUnavailable(
            f"no NVIDIA GPU {device_id} is visible (nvidia-smi and cuda-python found none); TensorRT engines must be "
            "built on the GPU model they will run on — run the export there, or skip --tensorrt"
        )
    return name


def _use_device(device_id: int) -> None:
    """Make GPU ``device_id`` current for the builder (TensorRT builds on the current CUDA device)."""
    if device_id == 0:
        return
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt  # type: ignore[no-redef]  # older cuda-python layout
        except ImportError as e:
            raise TensorRTUnavailable(
                f"building on GPU {device_id} needs cuda-python (pip install cuda-python); "
                f"or run with CUDA_VISIBLE_DEVICES={device_id} and device_id=0"
            ) from e
    (err,) = rt.cudaSetDevice(int(device_id))
    if int(err) != 0:
        raise TensorRTUnavailable(f"cannot select GPU {device_id}: {err}")


def tensorrt_info(*, device_id: int = 0) -> dict[str, Any]:
    """TensorRT version and GPU name of this machine, as recorded next to an engine in the manifest.

    Returns ``{"tensorrt_version": "10.9.0.34", "version": <same>, "gpu": "NVIDIA H100 80GB HBM3",
    "fp16_builder_flag": bool}``. Raises :class:`TensorRTUnavailable` without TensorRT or a GPU.
    """
    trt = _import_tensorrt()
    gpu = _require_gpu(device_id)
    version = str(trt.__version__)
    return {"tensorrt_version": version, "version": version, "gpu": gpu,
            "fp16_builder_flag": hasattr(trt.BuilderFlag, "FP16")}


def onnx_has_fp16(onnx_path: str | Path) -> bool:
    """Whether the ONNX graph holds float16 tensors (initializers, casts or typed values); weights not loaded."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    if any(t.data_type == TensorProto.FLOAT16 for t in g.initializer):
        return True
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            return True
    for node in g.node:
        if node.op_type in ("Cast", "CastLike"):
            for a in node.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT16:
                    return True
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT16:
                    return True
    return False


def build_engine(
    onnx_path: str | Path,
    *,
    out_path: str | Path | None = None,
    precision: Precision = "fp32",
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 64,
    timing_cache: str | Path | None = None,
    workspace_gb: float = 4,
    shapes: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
    device_id: int = 0,
) -> Path:
    """Build a serialized TensorRT engine from ``onnx_path`` and return its path.

    Args:
        onnx_path: the ONNX model.
        out_path: engine file (default: ``onnx_path`` with suffix ``.engine``).
        precision: ``"fp32"`` or ``"fp16"`` (see the module docstring for TensorRT 10 vs 11).
        min_batch / opt_batch / max_batch: profile range of every input's dynamic first dimension;
            ``opt_batch`` defaults to ``max_batch`` (whole-slide inference runs full batches).
        timing_cache: timing-cache file to load (if it exists) and update after the build.
        workspace_gb: builder workspace limit, GiB.
        shapes: ``{input: (min, opt, max)}`` full shapes for inputs with dynamic non-batch dims.
        device_id: the GPU to build on (made current with cuda-python when not 0).

    Raises:
        TensorRTUnavailable: no TensorRT >= 10 or no GPU (checked before anything is written).
        TensorRTBuildError: parsing or building failed, or fp16 was requested in a way this
            TensorRT cannot honour.
        ValueError: inconsistent batch or shape arguments.
    """
    onnx_path = Path(onnx_path)
    profile = _check_build_args(onnx_path, precision=precision, workspace_gb=workspace_gb, min_batch=min_batch,
                                opt_batch=opt_batch, max_batch=max_batch, shapes=shapes)
    trt = _import_tensorrt()
    _require_gpu(device_id)
    _use_device(device_id)
    out = Path(out_path) if out_path is not None else onnx_path.with_suffix(".engine")
    strongly_typed = _strongly_typed(trt, onnx_path, precision)
    builder, network, parser = _parse_network(trt, onnx_path, strongly_typed=strongly_typed)  # noqa: F841 - kept alive
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    _add_profile(builder, network, config, profile, onnx_path)
    if timing_cache is not None:
        _load_timing_cache(config, Path(timing_cache))
    log.info("building TensorRT engine for %s (%s, %s network, profile %s)", onnx_path, precision,
             "strongly typed" if strongly_typed else "weakly typed", profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(serialized))
    if timing_cache is not None:
        blob = config.get_timing_cache().serialize()
        atomic_write(Path(timing_cache), lambda f: f.write(blob))
    return out


def _check_build_args(onnx_path: Path, *, precision: str, workspace_gb: float, min_batch: int, opt_batch: int | None,
                      max_batch: int, shapes: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate the arguments of :func:`build_engine` and return the optimisation profile (before TensorRT)."""
    from hishrst_runtime.backends.ort_trt import onnx_input_shapes, profile_shapes

    if precision not in TENSORRT_PRECISIONS:  # int8 bundles are QDQ graphs for ONNX Runtime CPU
        raise ValueError(f"precision must be one of {', '.join(TENSORRT_PRECISIONS)} for TensorRT, got {precision!r}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be > 0, got {workspace_gb}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX model not found")
    profile = profile_shapes(onnx_input_shapes(onnx_path), min_batch=min_batch, opt_batch=opt_batch,
                             max_batch=max_batch, shapes=shapes)
    if profile is None:
        raise ValueError(
            f"{onnx_path}: some inputs have dynamic dimensions besides the batch; pass "
            "shapes={input: ((min...), (opt...), (max...))} for them"
        )
    return profile


def _strongly_typed(trt: Any, onnx_path: Path, precision: str) -> bool:
    """Whether to build a strongly typed network (fp16 ONNX, or TensorRT >= 11); refuses an fp16 request this
    TensorRT cannot honour for a float32 graph."""
    has_fp16_flag = hasattr(trt.BuilderFlag, "FP16")  # False on TensorRT >= 11 (weak typing removed)
    fp16_graph = onnx_has_fp16(onnx_path)
    if precision == "fp16" and not has_fp16_flag and not fp16_graph:
        raise TensorRTBuildError(
            f"{onnx_path}: TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11: networks are "
            "strongly typed), and this ONNX graph is float32, so the engine would be fp32. Export an fp16 ONNX "
            "(hishrst export --precision fp16, or NVIDIA ModelOpt AutoCast) and build that, or build with precision='fp32'"
        )
    return fp16_graph or not has_fp16_flag


def _parse_network(trt: Any, onnx_path: Path, *, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """A builder, the network parsed from ``onnx_path`` (external data beside it is found) and the parser,
    which owns the weights: the caller keeps it until the engine is built."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    return builder, network, parser


def _add_profile(builder: Any, network: Any, config: Any, profile: dict[str, Any], onnx_path: Path) -> None:
    """One optimisation profile with ``profile``'s (min, opt, max) shape per input."""
    if not profile:
        return
    net_inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    opt_profile = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        if name not in net_inputs:
            raise ValueError(f"{onnx_path}: shapes names an input {name!r} the network does not have ({list(net_inputs)})")
        try:
            opt_profile.set_shape(name, lo, mid, hi)
        except (RuntimeError, TypeError) as e:
            raise TensorRTBuildError(f"{onnx_path}: invalid profile for {name!r} min={lo} opt={mid} max={hi} ({e})") from e
    if config.add_optimization_profile(opt_profile) < 0:
        raise TensorRTBuildError(f"{onnx_path}: TensorRT rejected the optimisation profile {profile}")


def _load_timing_cache(config: Any, tc: Path) -> None:
    """Load the timing cache ``tc`` into ``config`` (a fresh one when it is unreadable or does not match)."""
    data = tc.read_bytes() if tc.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except RuntimeError as e:  # unreadable blob (another TensorRT version, truncated file)
        log.warning("%s: cannot read the timing cache (%s)", tc, e)
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("%s: timing cache does not match this TensorRT/GPU; starting a new one", tc)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)


# ----------------------------------------------------------------------------- parity


def engine_parity(
    engine_path: str | Path,
    onnx_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    precision: Precision | None = None,
    expected: Mapping[str, Any] | None = None,
    device_id: int = 0,
    raise_on_fail: bool = True,
) -> dict[str, Any]:
    """Run the engine and ONNX Runtime (CPU) on ``feeds`` and compare every output.

    When ``feeds`` has a ``mask`` input (the head), only unmasked positions are compared (padding
    outputs are arbitrary). ``precision`` picks the tolerance (:data:`PARITY_TOLERANCE`); by default
    fp16 if the ONNX graph holds float16 tensors, else fp32.

    Returns a JSON-serialisable report ``{"reference", "precision", "tolerance", "outputs": {name:
    stats}, "passed"}``; raises :class:`EngineParityError` on failure unless ``raise_on_fail=False``.
    """
    from hishrst_runtime.backends.ort_cpu import OrtCpuBackend
    from hishrst_runtime.backends.tensorrt_native import TensorRTNativeBackend

    trt = _import_tensorrt()
    gpu = _require_gpu(device_id)
    if expected is None:  # built in this process: compare against this machine
        expected = {"gpu": gpu, "tensorrt_version": str(trt.__version__)}
    prec: Precision = precision or ("fp16" if onnx_has_fp16(onnx_path) else "fp32")
    tol = PARITY_TOLERANCE[prec]
    with OrtCpuBackend(onnx_path) as ref:
        want = ref.run(feeds)
        names = ref.output_names
    with TensorRTNativeBackend(engine_path, expected=expected, device_id=device_id) as eng:
        got_list = eng.run(feeds)
        got = dict(zip(eng.output_names, got_list))
    mask = feeds.get("mask")
    outputs: dict[str, dict[str, float]] = {}
    failures = []
    for name, w in zip(names, want):
        if name not in got:
            raise EngineParityError(f"{engine_path}: the engine has no output {name!r} (it has {list(got)})")
        g = got[name]
        if g.shape != w.shape:
            raise EngineParityError(f"{engine_path}: output {name!r} shape {g.shape} differs from ONNX Runtime's {w.shape}")
        valid = None
        if mask is not None and np.ndim(mask) <= w.ndim and w.shape[: np.ndim(mask)] == np.shape(mask):
            valid = np.asarray(mask) > 0
        stats = compare(g, w, valid=valid)
        outputs[name] = stats
        if not passes(stats, tol):
            nan = f"{stats['nonfinite']} non-finite values (NaN/inf), " if stats["nonfinite"] else ""
            failures.append(f"{name}: {nan}{stats}")
    report = {"reference": "ONNX Runtime (CPU)", "precision": prec, "tolerance": dict(tol),
              "outputs": outputs, "passed": not failures}
    if failures and raise_on_fail:
        raise EngineParityError(
            f"{engine_path}: TensorRT disagrees with ONNX Runtime beyond the {prec} tolerance {tol}: {'; '.join(failures)}. "
            "Rebuild with precision='fp32', or report the model (TensorRT version, GPU) as an issue"
        )
    return report
