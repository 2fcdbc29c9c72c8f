"""Batched frozen-encoder feature extraction for spot patches, with an on-disk cache.

:func:`extract_features` cuts one ``patch_um``-µm square RGB patch per spot centre with the shared
:mod:`hishrst_runtime.core.patches` functions (white padding at the image edge, Pillow bilinear resize to the
encoder's input size), runs the encoder on uint8 NHWC batches under ``torch.inference_mode()`` while a
small thread pool cuts the next batches, and returns float32 features ``[N, D]``.

Cache: with ``cache_dir`` set, features are stored as ``<cache_dir>/<encoder name>/<key>.npy`` plus a
JSON sidecar ``<key>.json`` (both written atomically: temporary file + ``os.replace``). The key hashes

* the image identity — ``image_key`` (e.g. its path) plus, when ``image_key`` names a file, its size and
  modification time, plus the image shape and a hash of 64 small pixel blocks sampled over the image; without
  ``image_key`` an in-memory numpy image is hashed in full;
* the exact bytes of the centres (float64, pixels), ``mpp`` and ``patch_um``;
* the encoder fingerprint (name, architecture and weights, :func:`~hishrst_train.encoders.encoder_fingerprint`);
* the patch-cutting algorithm version (:data:`PATCH_ALGORITHM_VERSION`, pad value, resize filter, Pillow
  version) and the cache format version,

so a change of image, spots, encoder weights or patch geometry can never reuse stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from torch import nn
from tqdm.auto import tqdm

from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.patches import (
    DEFAULT_PATCH_UM,
    PAD_VALUE,
    RESIZE_FILTER,
    cut_patches,
    patch_side_px,
)
from hishrst_train.encoders.module import encoder_fingerprint

__all__ = [
    "DEFAULT_PATCH_UM",
    "PATCH_ALGORITHM_VERSION",
    "CACHE_FORMAT_VERSION",
    "extract_features",
    "cut_patches_for",
    "image_fingerprint",
    "feature_cache_key",
    "run_tile_batches",
    "encoder_device",
]

log = logging.getLogger(__name__)

#: Bump when the way patches are cut/resized changes (invalidates every cached feature file).
PATCH_ALGORITHM_VERSION = "patches-v1:round-half-up-origin,white-pad,rgb,pil-resize"
#: Bump when the cache file layout changes.
CACHE_FORMAT_VERSION = 1
_SAMPLE_GRID = 8  # 8 × 8 sampled blocks for the image hash
_SAMPLE_BLOCK = 16  # block side in pixels


def cut_patches_for(
    image: Any,
    centers_xy: np.ndarray,
    *,
    mpp: float,
    patch_um: float = DEFAULT_PATCH_UM,
    input_size: int,
) -> np.ndarray:
    """Patches of ``patch_um`` µm around ``centers_xy`` (pixels, (x, y)) on an image of ``mpp`` µm/pixel.

    Returns uint8 ``[N, input_size, input_size, 3]`` (NHWC, RGB), exactly what the encoder receives.
    """
    centers = _as_centers(centers_xy)
    return cut_patches(image, centers, side=patch_side_px(patch_um, mpp), out_size=int(input_size))


def image_fingerprint(image: Any, *, image_key: str | None = None) -> str:
    """Identity string of ``image`` for cache keys (see the module docstring).

    ``image_key`` (e.g. the file path) is included verbatim; if it names an existing file, its size in bytes
    and modification time (ns) are added. Without ``image_key``, a numpy array is hashed in full; otherwise
    (or for lazy arrays) the shape and 64 sampled 16 × 16 blocks are hashed.
    """
    h = hashlib.blake2b(digest_size=16)
    shape = tuple(int(s) for s in image.shape)
    h.update(repr(("shape", shape, str(getattr(image, "dtype", "")))).encode())
    if image_key is not None:
        h.update(f"key:{image_key}".encode())
        try:
            st = os.stat(image_key)
        except (OSError, ValueError):
            st = None
        if st is not None:
            h.update(f"file:{st.st_size}:{st.st_mtime_ns}".encode())
    if image_key is None and isinstance(image, np.ndarray):
        h.update(b"full:")
        h.update(np.ascontiguousarray(image).reshape(-1).view(np.uint8))
    else:
        hgt, wid = shape[0], shape[1]
        for gy in range(_SAMPLE_GRID):
            for gx in range(_SAMPLE_GRID):
                y0 = (hgt - _SAMPLE_BLOCK) * gy // max(_SAMPLE_GRID - 1, 1) if hgt > _SAMPLE_BLOCK else 0
                x0 = (wid - _SAMPLE_BLOCK) * gx // max(_SAMPLE_GRID - 1, 1) if wid > _SAMPLE_BLOCK else 0
                block = np.ascontiguousarray(np.asarray(image[y0 : y0 + _SAMPLE_BLOCK, x0 : x0 + _SAMPLE_BLOCK]))
                h.update(block.reshape(-1).view(np.uint8))
    return h.hexdigest()


def feature_cache_key(
    *,
    image_id: str,
    centers_xy: np.ndarray,
    mpp: float,
    patch_um: float,
    encoder_id: str,
    input_size: int,
) -> tuple[str, dict[str, Any]]:
    """Cache key (32 hex digits) and the JSON-able description it hashes."""
    centers = _as_centers(centers_xy)
    desc: dict[str, Any] = {
        "cache_format": CACHE_FORMAT_VERSION,
        "patch_algorithm": PATCH_ALGORITHM_VERSION,
        "pad_value": PAD_VALUE,
        "resize_filter": RESIZE_FILTER,
        "pillow": PIL.__version__,
        "image": image_id,
        "n_centers": int(len(centers)),
        "centers_sha256": hashlib.sha256(centers.tobytes()).hexdigest(),
        "mpp": float(mpp).hex(),
        "patch_um": float(patch_um).hex(),
        "patch_side_px": patch_side_px(patch_um, mpp),
        "input_size": int(input_size),
        "encoder": encoder_id,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]
    return key, desc


def _as_centers(centers_xy: Any) -> np.ndarray:
    centers = np.ascontiguousarray(np.asarray(centers_xy, dtype=np.float64))
    if centers.ndim != 2 or centers.shape[1] != 2:
        raise ValueError(f"centres must be an [N, 2] array of (x, y) pixels, got shape {centers.shape}")
    if not np.all(np.isfinite(centers)):
        raise ValueError(f"centres contain {int((~np.isfinite(centers)).any(axis=1).sum())} non-finite rows")
    return centers


def _read_cache(npy: Path, sidecar: Path, key: str, n: int, dim: int) -> np.ndarray | None:
    if not (npy.is_file() and sidecar.is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
        feats = np.load(npy, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable feature cache %s (%s); recomputing", npy, e)
        return None
    if meta.get("key") != key or feats.shape != (n, dim) or feats.dtype != np.float32:
        log.warning("ignoring feature cache %s: key/shape mismatch; recomputing", npy)
        return None
    return feats


def _write_cache(npy: Path, sidecar: Path, key: str, desc: dict[str, Any], feats: np.ndarray, extra: dict[str, Any]) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(npy, lambda f: np.save(f, feats, allow_pickle=False), fsync=True)
    meta = {"key": key, "shape": list(feats.shape), "dtype": "float32", **extra, "inputs": desc}
    atomic_write(sidecar, json.dumps(meta, indent=1).encode(), fsync=True)


def extract_features(
    image: Any,
    centers_xy_px: np.ndarray,
    *,
    encoder: nn.Module,
    mpp: float,
    patch_um: float = DEFAULT_PATCH_UM,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    image_key: str | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_workers: int = 2,
) -> np.ndarray:
    """Encoder features of one ``patch_um``-µm patch per centre; float32 ``[N, encoder.feature_dim]``.

    Args:
        image: RGB uint8 ``(H, W, 3)`` level-0 image — a numpy array or any lazily sliceable array.
        centers_xy_px: ``[N, 2]`` spot centres (x, y) in level-0 pixels.
        encoder: an :class:`~hishrst_train.encoders.EncoderModule` (uint8 NHWC tiles → ``[B, D]``).
        device: where to run; the encoder is moved there (``None``, the default: wherever it already is,
            e.g. ``load_encoder(name, device="cuda")``).
        mpp: µm per level-0 pixel; the patch side is ``round(patch_um / mpp)`` pixels before resizing to
            ``encoder.input_size``.
        patch_um: patch side in µm.
        batch_size: tiles per encoder call.
        cache_dir: folder for the feature cache (``None``: no caching). See the module docstring.
        image_key: identity of the image for the cache key (e.g. its file path); see :func:`image_fingerprint`.
        progress: show a tqdm bar (tiles/s).
        num_workers: threads cutting patches ahead of the encoder.
    """
    centers = _as_centers(centers_xy_px)
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    n, dim = len(centers), int(encoder.feature_dim)
    cache = None
    if cache_dir is not None:
        cache = _cache_entry(image, centers, encoder=encoder, mpp=mpp, patch_um=patch_um, cache_dir=cache_dir,
                             image_key=image_key)
        cached = _read_cache(cache[0], cache[1], cache[2], n, dim)
        if cached is not None:
            log.info("features: cache hit %s (%d × %d)", cache[0], n, dim)
            return cached

    out = np.empty((n, dim), dtype=np.float32)
    if n:
        if device is not None:
            encoder.to(device)
        t0 = time.perf_counter()
        run_tile_batches(image, centers, _features_into(out, encoder), side=patch_side_px(patch_um, mpp),
                         size=int(encoder.input_size), batch_size=batch_size, device=encoder_device(encoder),
                         progress=progress, num_workers=num_workers)
        log.info("features: %d tiles in %.1f s", n, time.perf_counter() - t0)

    if cache is not None:
        spec = getattr(encoder, "spec", None)
        extra = {"encoder_name": getattr(spec, "name", None), "image_key": image_key, "mpp": float(mpp),
                 "patch_um": float(patch_um), "n": n}
        _write_cache(*cache, out, extra)
    return out


def encoder_device(encoder: nn.Module) -> torch.device:
    """Where ``encoder``'s parameters are (the CPU for a module without any): where its tiles must go."""
    return next(iter(encoder.parameters()), torch.empty(0)).device


def _features_into(out: np.ndarray, encoder: nn.Module) -> Callable[[int, torch.Tensor], None]:
    """A :func:`run_tile_batches` consumer writing ``encoder(tiles)`` (float32) into rows of ``out``."""

    def consume(start: int, tiles: torch.Tensor) -> None:
        with torch.inference_mode():
            out[start : start + len(tiles)] = encoder(tiles).detach().to("cpu", torch.float32).numpy()

    return consume


def _cache_entry(image: Any, centers: np.ndarray, *, encoder: nn.Module, mpp: float, patch_um: float,
                 cache_dir: str | os.PathLike[str], image_key: str | None) -> tuple[Path, Path, str, dict[str, Any]]:
    """``(<key>.npy, <key>.json, key, description)`` of these features in ``cache_dir`` (module docstring)."""
    key, desc = feature_cache_key(
        image_id=image_fingerprint(image, image_key=image_key),
        centers_xy=centers,
        mpp=mpp,
        patch_um=patch_um,
        encoder_id=encoder_fingerprint(encoder),
        input_size=int(encoder.input_size),
    )
    folder = Path(cache_dir) / str(getattr(getattr(encoder, "spec", None), "name", "encoder"))
    return folder / f"{key}.npy", folder / f"{key}.json", key, desc


def run_tile_batches(
    image: Any,
    centers: np.ndarray,
    consume: Callable[[int, torch.Tensor], None],
    *,
    side: int,
    size: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    num_workers: int,
    desc: str = "features",
) -> None:
    """Cut ``side``-px tiles around ``centers`` resized to ``size`` px in a thread pool (up to ``num_workers + 1``
    batches ahead) and hand each batch, in order, to ``consume(start, uint8 tiles [B, size, size, 3] on device)``."""
    n = len(centers)
    starts = list(range(0, n, batch_size))

    def cut(s: int) -> np.ndarray:
        return cut_patches(image, centers[s : s + batch_size], side=side, out_size=size)

    pending: deque[tuple[int, Future[np.ndarray]]] = deque()
    ahead = max(1, num_workers) + 1
    with ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="hishrst-patches") as pool, \
            tqdm(total=n, unit="tile", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        it = iter(starts)
        try:
            for s in it:
                pending.append((s, pool.submit(cut, s)))
                if len(pending) >= ahead:
                    break
            while pending:
                s, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(cut, nxt)))
                tiles = torch.from_numpy(fut.result()).to(device, non_blocking=True)
                consume(s, tiles)
                bar.update(len(tiles))
        finally:
            for _, fut in pending:
                fut.cancel()
