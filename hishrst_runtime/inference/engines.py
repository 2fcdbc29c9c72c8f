"""Loading a bundle's encoder and head engines for a provider, and the engine thread default."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, NamedTuple

from hishrst_runtime.bundle.manifest import BundleError

__all__ = ["Engines", "default_engine_threads", "load_engines", "noop_engines"]


class Engines(NamedTuple):
    """A bundle's loaded (encoder, head) backends and the provider that runs them (``auto`` resolved)."""

    encoder: Any
    head: Any
    provider: str


def default_engine_threads(workers: int) -> int:
    """ONNX Runtime intra-op threads when ``--engine-threads`` is not given: the physical cores the
    ``workers`` reader threads leave free (at least 1): on 2 cores, 1 engine thread next to 2 readers
    (benchmarks/RESULTS.md); with a GPU engine the intra-op threads only run the odd CPU node."""
    from hishrst_runtime.backends.base import default_threads

    return max(1, default_threads() - max(0, workers))


def noop_engines(bundle: Any) -> Engines:
    """Zero-returning stand-ins of the bundle's encoder and head (provider ``"noop"``): the pipeline's
    ceiling for benchmarks, and fast engines for tests (a sub-spot bundle's: ``features`` and ``tokens`` out of the
    encoder, expression per token out of the head). Not a ``--provider`` choice."""
    from hishrst_runtime.backends.noop import NoopBackend

    spec = bundle.spec
    d, g = spec.encoder.feature_dim, len(spec.genes)
    if spec.subspot:  # tokens as wide as the features (a noop head ignores them)
        grid = spec.tokens.grid
        enc = NoopBackend(lambda f: [(len(f["tiles"]), d), (len(f["tiles"]), *grid, spec.token_width or d)],
                          output_names=("features", "tokens"))
        return Engines(enc, NoopBackend(lambda f: (*f["tokens"].shape[:3], g)), "noop")
    enc = NoopBackend(lambda f: (len(f["tiles"]), d))
    head = NoopBackend(lambda f: (*f["features"].shape[:2], g))
    return Engines(enc, head, "noop")


def _profile(spec: Any, key: str, batch_size: int | None) -> tuple[int, int]:
    """(max, opt) batch of ``key``'s TensorRT profile for a run of ``batch_size`` tiles: the encoder (and a sub-spot
    head, fed the encoder's batches) from 1 to the run's batch, capped by the bundle's ``max_batch``; a spot head's
    groups 1 … ``max_batch``, optimal as the bundle's profile says."""
    from hishrst_runtime.backends.profiles import batch_range, run_batch_sizes

    if key == "head" and not spec.subspot:
        return spec.max_batch, min(8, spec.max_batch)
    _, opt, hi = batch_range(run_batch_sizes(batch_size or spec.max_batch), cap=spec.max_batch)
    return hi, opt


def _load_one(bundle: Any, key: str, chosen: str, *, cache_dir: Path | None, threads: int | None,
              batch_size: int | None = None) -> Any:
    """The backend of ``key`` (``encoder`` / ``head``) for the resolved provider ``chosen``, from the bundle's
    typed file entries (:class:`~hishrst_runtime.bundle.spec.FileSpec`); TensorRT profiles follow the run's
    ``batch_size`` (:func:`_profile`)."""
    from hishrst_runtime.backends import load_backend

    spec = bundle.spec
    if chosen == "trt-native":
        trt = spec.file(f"{key}_trt")
        if trt is None:
            raise BundleError(f"{bundle.root}: no TensorRT engine in the bundle; "
                              "export with `hishrst export --tensorrt` or use --provider tensorrt")
        return load_backend(bundle.path(f"{key}_trt"), provider="trt-native", expected=trt.engine_target)
    if chosen == "tensorrt":
        entry = spec.file(key)
        hi, opt = _profile(spec, key, batch_size)
        return load_backend(bundle.path(key), provider="tensorrt", cache_dir=cache_dir, max_batch=hi, opt_batch=opt,
                            shapes=None if key == "encoder" or spec.subspot else spec.head_profile(hi, opt),
                            model_sha256=None if entry is None else entry.sha256,
                            fp16=entry is not None and entry.fp16)
    return load_backend(bundle.path(key), provider=chosen, cache_dir=cache_dir, threads=threads)  # type: ignore[arg-type]


def load_engines(bundle: Any, provider: str, *, cache_dir: Path | None, threads: int | None = None,
                 batch_size: int | None = None) -> Engines:
    """The bundle's (encoder, head) backends for ``provider`` exactly as ``hishrst-run`` loads them, and
    the provider chosen (``auto`` resolved). ``threads``: ONNX Runtime intra-op threads (default:
    physical cores); ``cache_dir``: TensorRT engine cache; ``batch_size``: the run's encoder batch (TensorRT
    profiles are built for it)."""
    from hishrst_runtime.backends import resolve_provider

    chosen = resolve_provider(provider, engine_available=bundle.spec.has_engines)  # type: ignore[arg-type]
    engines: list[Any] = []
    try:
        for key in ("encoder", "head"):
            engines.append(_load_one(bundle, key, chosen, cache_dir=cache_dir, threads=threads, batch_size=batch_size))
    except BaseException:
        for eng in engines:
            with contextlib.suppress(Exception):
                eng.close()
        raise
    return Engines(engines[0], engines[1], chosen)
