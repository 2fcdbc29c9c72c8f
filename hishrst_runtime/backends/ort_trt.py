"""ONNX Runtime with the TensorRT execution provider, with persistent engine and timing caches.

The first session on a machine builds TensorRT engines (minutes for a ViT-L encoder). They are
cached with ``trt_engine_cache_enable``/``trt_engine_cache_path`` and the kernel timings with
``trt_timing_cache_enable``/``trt_timing_cache_path``, in a user cache directory
(``$HISHRST_CACHE_DIR/trt``, else ``$XDG_CACHE_HOME/hishrst/trt`` or ``~/.cache/hishrst/trt``).

TensorRT engines are not portable: onnxruntime's documentation asks to clear the cache whenever the
model, the onnxruntime version, the TensorRT version or the GPU changes. Rather than trusting users
to do that, every cache lives in a sub-directory named after a hash of exactly these facts (model
SHA-256, onnxruntime version, TensorRT version, GPU name, precision), so any change gets a fresh
directory (:func:`trt_cache_dir`); ``key.json`` inside records what the hash was made of.

The optimisation profile is given explicitly (``trt_profile_min_shapes``/``_opt_shapes``/
``_max_shapes``, format ``"name:1x224x224x3,other:..."``, onnxruntime's "explicit shape range for dynamic shape
input") from the model's dynamic batch dimension: ``min_batch`` (1) … ``max_batch``, optimal ``opt_batch``
(default ``max_batch``), i.e. the batch sizes the run uses (:mod:`hishrst_runtime.backends.profiles`: the
run's ``--batch-size`` and its partial batches for the encoder, 1 … the head batch for the head; a sub-spot
head's ``tokens [B, rows, cols, width]`` has only ``B`` dynamic, so its profile comes from the graph the same
way). onnxruntime requires the three options to cover *every* dynamic input; inputs whose other dimensions are
dynamic too (the spot head's ``[G, N, *]``) need ``shapes=``, otherwise no explicit profile is set and
onnxruntime derives one from the shapes it sees (rebuilding the engine when a larger shape arrives). The
profile is part of the cache key, so engines built for other batch sizes are never reused; a batch outside the
profile raises :class:`BackendError` before the run (:func:`~hishrst_runtime.backends.profiles.check_profile`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hishrst_runtime.backends.base import BackendError, check_model_path, gpu_name
from hishrst_runtime.backends.ort_cuda import OrtCudaBackend, cuda_provider_options
from hishrst_runtime.backends.profiles import check_profile

__all__ = [
    "OrtTensorrtBackend",
    "ShapeRange",
    "default_cache_root",
    "onnx_input_shapes",
    "profile_shapes",
    "tensorrt_version",
    "trt_cache_dir",
]

log = logging.getLogger(__name__)

#: (min, opt, max) shapes of one input for a TensorRT optimisation profile.
ShapeRange = tuple[Sequence[int], Sequence[int], Sequence[int]]


def default_cache_root() -> Path:
    """``$HISHRST_CACHE_DIR/trt``, else ``$XDG_CACHE_HOME/hishrst/trt``, else ``~/.cache/hishrst/trt``."""
    env = os.environ.get("HISHRST_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "trt"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hishrst" / "trt"


def tensorrt_version() -> str | None:
    """Installed TensorRT version without importing the ``tensorrt`` module, or ``None``.

    Looks at the pip distributions first (``tensorrt``, ``tensorrt-cu12`` ...), then asks the shared
    library itself (``getInferLibVersion()`` of ``libnvinfer``), which is what onnxruntime's TensorRT
    provider loads.
    """
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs",
                 "tensorrt-cu13-libs", "tensorrt-cu12-libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    for soname in ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so", "nvinfer_11.dll", "nvinfer_10.dll"):
        try:
            lib = ctypes.CDLL(soname)
        except OSError:
            continue
        try:
            v = int(lib.getInferLibVersion())
        except AttributeError:
            continue
        # NV_TENSORRT_VERSION = major * 10000 + minor * 100 + patch (TensorRT >= 10).
        return f"{v // 10000}.{(v // 100) % 100}.{v % 100}"
    return None


def trt_cache_dir(
    model_path: str | Path,
    *,
    cache_dir: str | Path | None = None,
    fp16: bool = False,
    device_id: int = 0,
    model_sha256: str | None = None,
    profile: Mapping[str, Any] | None = None,
) -> Path:
    """The engine/timing-cache directory for this model on this machine (not created).

    ``<cache_dir or default_cache_root()>/<model stem>-<key>``, where ``key`` hashes the model file's
    SHA-256 (pass ``model_sha256`` from the bundle manifest to skip re-hashing a large file), the
    onnxruntime and TensorRT versions, the GPU name, the precision and the explicit optimisation ``profile``.
    """
    return _cache_location(model_path, cache_dir=cache_dir, fp16=fp16, device_id=device_id, model_sha256=model_sha256,
                           profile=profile)[0]


def _cache_location(
    model_path: str | Path, *, cache_dir: str | Path | None, fp16: bool, device_id: int, model_sha256: str | None,
    profile: Mapping[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """(cache directory, the facts its name hashes; an explicit optimisation ``profile`` is one of them)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    facts = _cache_facts(model_path, fp16=fp16, device_id=device_id, model_sha256=model_sha256, ort_version=ort.__version__)
    if profile:
        facts["profile"] = {n: [list(s) for s in r] for n, r in sorted(profile.items())}
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / f"{model_path.stem}-{_facts_key(facts)}", facts


def _cache_facts(
    model_path: Path, *, fp16: bool, device_id: int, model_sha256: str | None, ort_version: str
) -> dict[str, Any]:
    from hishrst_runtime.core.files import sha256_file

    return {
        "model_sha256": model_sha256 or sha256_file(model_path),
        "onnxruntime": ort_version,
        "tensorrt": tensorrt_version(),
        "gpu": gpu_name(device_id),
        "precision": "fp16" if fp16 else "fp32",
    }


def _facts_key(facts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(facts), sort_keys=True).encode()).hexdigest()[:16]


def onnx_input_shapes(model_path: str | Path) -> dict[str, tuple[int | None, ...]]:
    """Each graph input's shape (dynamic dims as ``None``), read from the protobuf without loading the
    weights or importing ``onnx`` (:func:`hishrst_runtime.core.onnx_graph.read_onnx_graph`)."""
    from hishrst_runtime.core.onnx_graph import read_onnx_graph

    return {t.name: tuple(t.shape) for t in read_onnx_graph(model_path).inputs}


def profile_shapes(
    input_shapes: Mapping[str, Sequence[int | None]],
    *,
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int = 64,
    shapes: Mapping[str, ShapeRange] | None = None,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None:
    """(min, opt, max) shape per dynamic input, or ``None`` when no complete profile can be formed.

    An input listed in ``shapes`` takes its range from there. Otherwise only the first (batch)
    dimension may be dynamic: it gets ``min_batch``/``opt_batch`` (default ``max_batch``)/``max_batch``
    and the other dimensions their static sizes. Static inputs are left out. Returns ``None`` if some
    dynamic input is neither batch-only nor in ``shapes``.
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got min_batch={min_batch}, max_batch={max_batch}")
    opt = max_batch if opt_batch is None else int(opt_batch)
    if not min_batch <= opt <= max_batch:
        raise ValueError(f"need min_batch <= opt_batch <= max_batch, got {min_batch} <= {opt} <= {max_batch}")
    shapes = dict(shapes or {})
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name, dims in input_shapes.items():
        if name in shapes:
            lo, mid, hi = (tuple(int(d) for d in s) for s in shapes[name])
            if not (len(lo) == len(mid) == len(hi) == len(dims)):
                raise ValueError(f"shapes[{name!r}]: min/opt/max must all have rank {len(dims)} (model shape {tuple(dims)})")
            for i, d in enumerate(dims):
                if not lo[i] <= mid[i] <= hi[i] or (d is not None and not lo[i] == mid[i] == hi[i] == d):
                    raise ValueError(
                        f"shapes[{name!r}]: dimension {i} range {lo[i]}/{mid[i]}/{hi[i]} is invalid for model dim {d}"
                    )
            out[name] = (lo, mid, hi)
            continue
        if all(d is not None for d in dims):
            continue
        if not dims or any(d is None for d in dims[1:]):
            return None
        rest = tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]
        out[name] = ((min_batch, *rest), (opt, *rest), (max_batch, *rest))
    return out


def _profile_option(profile: Mapping[str, tuple[tuple[int, ...], ...]], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in rng[which])}" for name, rng in profile.items())


class OrtTensorrtBackend(OrtCudaBackend):
    """onnxruntime with ``TensorrtExecutionProvider`` (then CUDA, then CPU for leftovers), fed through the same
    I/O binding as :class:`OrtCudaBackend` (device values of the two providers are interchangeable).

    Args:
        model_path: the ``.onnx`` file.
        device_id: CUDA device ordinal.
        cache_dir: root of the engine caches (default :func:`default_cache_root`).
        fp16: let TensorRT use FP16 kernels (``trt_fp16_enable``).
        max_batch: largest batch (first dimension) the engines must accept.
        shapes: explicit (min, opt, max) shapes for inputs with dynamic non-batch dims.
        workspace_gb: TensorRT workspace limit (``trt_max_workspace_size``); default: onnxruntime's.
        model_sha256: the model's SHA-256 if already known (bundle manifest), to skip hashing.
        threads: intra-op CPU threads for nodes left on the CPU.
        opt_batch: the batch TensorRT tunes its kernels for (default ``max_batch``: the run's full batches).
        min_batch: smallest batch the engines must accept (default 1: partial batches of any size).

    Attributes:
        profile: ``{input: (min, opt, max) shape}`` given to TensorRT, or ``None`` (shapes seen at run time).
    """

    provider = "tensorrt"
    _EP = "TensorrtExecutionProvider"

    def __init__(
        self,
        model_path: str | Path,
        *,
        device_id: int = 0,
        cache_dir: str | Path | None = None,
        fp16: bool = False,
        max_batch: int = 64,
        shapes: Mapping[str, ShapeRange] | None = None,
        workspace_gb: float | None = None,
        model_sha256: str | None = None,
        threads: int | None = None,
        opt_batch: int | None = None,
        min_batch: int = 1,
    ) -> None:
        self.model_path = check_model_path(model_path)
        self.device_id = int(device_id)
        try:
            profile = profile_shapes(onnx_input_shapes(self.model_path), min_batch=min_batch, opt_batch=opt_batch,
                                     max_batch=max_batch, shapes=shapes)
        except ValueError as e:
            raise BackendError(f"{self.model_path}: invalid TensorRT profile ({e}); pass batch sizes with "
                               "1 <= min_batch <= opt_batch <= max_batch") from e
        self.cache_dir, facts = _cache_location(self.model_path, cache_dir=cache_dir, fp16=fp16,
                                                device_id=self.device_id, model_sha256=model_sha256, profile=profile)
        self._write_cache_key(facts)
        options = self._trt_options(fp16=fp16, workspace_gb=workspace_gb, profile=profile)
        if not any(self.cache_dir.glob("*.engine")):
            log.warning(
                "%s: building TensorRT engines (first run for this model/GPU/TensorRT/profile; this can take "
                "minutes); they are cached in %s", self.model_path, self.cache_dir,
            )
        self.profile = profile
        self.max_batch = int(max_batch)
        self.fp16 = bool(fp16)
        self.provider_options = options
        providers = [
            (self._EP, options),
            ("CUDAExecutionProvider", cuda_provider_options(self.device_id)),
            "CPUExecutionProvider",
        ]
        self._open(providers, threads=threads)

    def _write_cache_key(self, facts: Mapping[str, Any]) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            (self.cache_dir / "key.json").write_text(json.dumps({**facts, "model": str(self.model_path)}, indent=2) + "\n")
        except OSError as e:
            raise BackendError(
                f"{self.cache_dir}: cannot create the TensorRT cache directory ({e}); "
                "set HISHRST_CACHE_DIR to a writable directory"
            ) from e

    def _trt_options(self, *, fp16: bool, workspace_gb: float | None, profile: Mapping[str, Any] | None) -> dict[str, Any]:
        """The TensorRT provider options: caches, precision, workspace and the explicit profile."""
        options: dict[str, Any] = {
            "device_id": self.device_id,
            "trt_fp16_enable": bool(fp16),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(self.cache_dir),
        }
        if workspace_gb is not None:
            options["trt_max_workspace_size"] = int(workspace_gb * (1 << 30))
        if profile is None:
            log.warning(
                "%s: some inputs have dynamic non-batch dimensions and no shapes= range; TensorRT engines will be "
                "built for the shapes seen at run time (and rebuilt when larger ones arrive)", self.model_path,
            )
        elif profile:
            options["trt_profile_min_shapes"] = _profile_option(profile, 0)
            options["trt_profile_opt_shapes"] = _profile_option(profile, 1)
            options["trt_profile_max_shapes"] = _profile_option(profile, 2)
        return options

    def _check_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """A batch outside the explicit profile: :class:`BackendError` naming the largest batch, before TensorRT."""
        check_profile(f"{self.model_path} ({self.name})", shapes, self.profile)
