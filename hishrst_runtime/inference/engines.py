"""Loading a bundle's encoder and head engines for a provider, and the engine thread default."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hishrst_runtime.bundle.manifest import BundleError

__all__ = ["default_engine_threads", "load_engines"]


def default_engine_threads(workers: int) -> int:
    """ONNX Runtime intra-op threads when ``--engine-threads`` is not given: the physical cores the
    ``workers`` reader threads leave free (at least 1): on 2 cores, 1 engine thread next to 2 readers
    (benchmarks/RESULTS.md); with a GPU engine the intra-op threads only run the odd CPU node."""
    from hishrst_runtime.backends.base import default_threads

    return max(1, default_threads() - max(0, workers))


def load_engines(bundle: Any, provider: str, *, cache_dir: Path | None, threads: int | None = None
                 ) -> tuple[Any, Any, str]:
    """The bundle's (encoder, head) backends for ``provider`` exactly as ``hishrst-run`` loads them, and
    the provider chosen (``auto`` resolved). ``threads``: ONNX Runtime intra-op threads (default:
    physical cores); ``cache_dir``: TensorRT engine cache; ``"noop"`` gives zero-returning stand-ins."""
    from hishrst_runtime.backends import load_backend, resolve_provider
    from hishrst_runtime.backends.noop import NoopBackend

    if provider == "noop":  # benchmarks: the pipeline's ceiling
        d = int(bundle.encoder["feature_dim"])
        g = len(bundle.genes)
        enc = NoopBackend(lambda f: (len(f["tiles"]), d))
        head = NoopBackend(lambda f: (*f["features"].shape[:2], g))
        return enc, head, "noop"
    has_engine = bundle.file_entry("encoder_trt") is not None and bundle.file_entry("head_trt") is not None
    chosen = resolve_provider(provider, engine_available=has_engine)  # type: ignore[arg-type]
    engines: list[Any] = []
    try:
        for key in ("encoder", "head"):
            trt = bundle.file_entry(f"{key}_trt")
            if chosen == "trt-native":
                if trt is None:
                    raise BundleError(f"{bundle.root}: no TensorRT engine in the bundle; "
                                               "export with `hishrst export --tensorrt` or use --provider tensorrt")
                engines.append(load_backend(bundle.path(f"{key}_trt"), provider="trt-native",
                                            expected={"gpu": trt.get("gpu"), "tensorrt_version": trt.get("tensorrt_version")}))
            elif chosen == "tensorrt":
                d = int(bundle.encoder["feature_dim"])
                m, n = int(bundle.manifest.get("max_batch", 64)), bundle.max_group_size
                shapes = None if key == "encoder" else {
                    name: ((1, 1) + tail, (min(8, m), n) + tail, (m, n) + tail)
                    for name, tail in (("features", (d,)), ("positions", (2,)), ("mask", ()))
                }
                entry = bundle.file_entry(key) or {}
                engines.append(load_backend(bundle.path(key), provider="tensorrt", cache_dir=cache_dir, max_batch=m,
                                            shapes=shapes, model_sha256=entry.get("sha256"),
                                            fp16=entry.get("precision") == "fp16"))
            else:
                engines.append(load_backend(bundle.path(key), provider=chosen,  # type: ignore[arg-type]
                                            cache_dir=cache_dir, threads=threads))
    except BaseException:
        for eng in engines:
            with contextlib.suppress(Exception):
                eng.close()
        raise
    return engines[0], engines[1], chosen
