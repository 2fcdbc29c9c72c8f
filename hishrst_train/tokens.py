"""Encoder patch tokens of tiles around points (sub-spot models, issue #17), with an on-disk cache.

:func:`extract_tokens` cuts one ``geometry.tile_um``-µm tile around each centre exactly as
:func:`hishrst_train.features.extract_features` cuts spot patches (the shared
:mod:`hishrst_runtime.core.patches` functions: ``round(tile_um / mpp)`` slide pixels from a whole-pixel
origin, white padding, Pillow bilinear resize to the encoder's input size), runs
:meth:`~hishrst_train.encoders.EncoderModule.forward_tokens` and returns a :class:`TokenFeatures`: the pooled
feature ``cls`` float32 ``[N, D]`` (what ``extract_features`` gives) and the last-layer patch tokens
``tokens`` float16 ``[N, rows, cols, width]`` (half precision: 8,000 UNI tiles are 8000 × 196 × 1024 values,
3.2 GB in float16).

Cache: with ``cache_dir`` set, the tokens are written batch by batch into a ``.npy`` file opened with
``np.lib.format.open_memmap`` under a temporary name and renamed into place when complete (memory stays flat
whatever N), next to ``<key>.cls.npy`` and a JSON sidecar ``<key>.json`` written last, all under
``<cache_dir>/<encoder name>/tokens-<key>.*``. A hit returns ``tokens`` as a read-only memory map without
running the encoder. The key is :func:`hishrst_train.features.feature_cache_key` of the same image, centres,
``mpp``, tile side and encoder fingerprint, plus a tokens component (:data:`TOKENS_CACHE_VERSION`, the token
grid, the pitch, the stored dtype). The run-time ``margin`` does not change the tokens, so it is not in the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.files import atomic_write, clean_stale_siblings, fsync_path, temp_sibling
from hishrst_runtime.core.patches import patch_side_px
from hishrst_runtime.core.tokens import TokenGeometry
from hishrst_train.encoders.module import encoder_fingerprint
from hishrst_train.features import encoder_device, feature_cache_key, image_fingerprint, run_tile_batches

__all__ = ["TOKENS_CACHE_VERSION", "TokenFeatures", "TokenGeometryMismatch", "extract_tokens", "token_cache_key"]

log = logging.getLogger(__name__)

#: Bump when the token cache layout or what the tokens are changes (invalidates every cached token file).
TOKENS_CACHE_VERSION = "tokens-v1:last-layer-normed,prefix-removed,row-major,float16"
_TOKENS_DTYPE = np.float16


class TokenGeometryMismatch(InputError):
    """The token geometry asked for is not the encoder's (input size or token grid)."""


@dataclass(frozen=True)
class TokenFeatures:
    """Tokens of ``N`` tiles: ``cls`` float32 ``[N, feature_dim]`` (the encoder's pooled feature, as
    ``extract_features`` returns it), ``tokens`` float16 ``[N, rows, cols, width]`` (a read-only memory map
    when it comes from the cache) and the ``geometry`` they were cut with."""

    cls: np.ndarray
    tokens: np.ndarray
    geometry: TokenGeometry

    def __len__(self) -> int:
        return int(len(self.cls))


def token_cache_key(*, image_id: str, centres_px: np.ndarray, mpp: float, geometry: TokenGeometry,
                    encoder_id: str) -> tuple[str, dict[str, Any]]:
    """Cache key (32 hex digits) of the tokens of tiles of ``geometry`` (µm, px) cut around ``centres_px``
    (slide pixels) of image ``image_id`` at ``mpp`` µm/px by encoder ``encoder_id``, and what it hashes."""
    _, desc = feature_cache_key(image_id=image_id, centers_xy=centres_px, mpp=mpp, patch_um=geometry.tile_um,
                                encoder_id=encoder_id, input_size=int(geometry.input_size))
    desc = {**desc, "tokens": TOKENS_CACHE_VERSION, "token_grid": list(geometry.grid),
            "pitch_um": float(geometry.pitch_um).hex(), "tokens_dtype": np.dtype(_TOKENS_DTYPE).name}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32], desc


def _check_geometry(encoder: nn.Module, geometry: TokenGeometry) -> tuple[int, int, int, int]:
    """``(feature_dim, rows, cols, width)`` of ``encoder``'s tokens, or :class:`TokenGeometryMismatch`."""
    name = getattr(getattr(encoder, "spec", None), "name", type(encoder).__name__)
    if not callable(getattr(encoder, "forward_tokens", None)):
        raise TokenGeometryMismatch(f"encoder {name!r} has no forward_tokens; token features need an "
                                    "hishrst_train.encoders.EncoderModule (load_encoder)")
    if int(geometry.input_size) != int(encoder.input_size):
        raise TokenGeometryMismatch(f"token geometry of {geometry.input_size}-px tiles does not fit encoder {name!r} "
                                    f"({encoder.input_size} px); build it with the encoder's spec.token_geometry()")
    grid = tuple(int(v) for v in encoder.token_grid)
    if tuple(geometry.grid) != grid:
        raise TokenGeometryMismatch(f"token geometry grid {geometry.grid} differs from encoder {name!r}'s {grid}; "
                                    "build it with the encoder's spec.token_geometry()")
    return int(encoder.feature_dim), grid[0], grid[1], int(encoder.spec.width)


def _as_centres(centres_px: Any) -> np.ndarray:
    c = np.ascontiguousarray(np.asarray(centres_px, dtype=np.float64))
    if c.ndim != 2 or c.shape[1] != 2 or not np.all(np.isfinite(c)):
        raise InputError(f"tile centres must be a finite [N, 2] array of (x, y) slide pixels, got shape {c.shape}; "
                         "drop rows with NaN/inf")
    return c


@dataclass(frozen=True)
class _Entry:
    tokens: Path
    cls: Path
    sidecar: Path
    key: str
    desc: dict[str, Any]


def _entry(image: Any, centres: np.ndarray, encoder: nn.Module, *, mpp: float, geometry: TokenGeometry,
           cache_dir: str | os.PathLike[str], image_key: str | None) -> _Entry:
    key, desc = token_cache_key(image_id=image_fingerprint(image, image_key=image_key), centres_px=centres, mpp=mpp,
                                geometry=geometry, encoder_id=encoder_fingerprint(encoder))
    folder = Path(cache_dir) / str(getattr(getattr(encoder, "spec", None), "name", "encoder"))
    stem = folder / f"tokens-{key}"
    return _Entry(Path(f"{stem}.npy"), Path(f"{stem}.cls.npy"), Path(f"{stem}.json"), key, desc)


def _read(entry: _Entry, shape: tuple[int, ...], dim: int, geometry: TokenGeometry) -> TokenFeatures | None:
    """The cached tokens of ``entry`` (``tokens`` memory-mapped read-only), or None on a miss."""
    if not (entry.sidecar.is_file() and entry.tokens.is_file() and entry.cls.is_file()):
        return None
    try:
        meta = json.loads(entry.sidecar.read_text(encoding="utf-8"))
        cls = np.load(entry.cls, allow_pickle=False)
        tokens = np.load(entry.tokens, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable token cache %s (%s); recomputing", entry.tokens, e)
        return None
    if (not isinstance(meta, dict) or meta.get("key") != entry.key or tokens.shape != shape
            or tokens.dtype != _TOKENS_DTYPE or cls.shape != (shape[0], dim) or cls.dtype != np.float32):
        log.warning("ignoring token cache %s: key/shape mismatch; recomputing", entry.tokens)
        return None
    return TokenFeatures(cls=cls, tokens=tokens, geometry=geometry)


def _encode(image: Any, centres: np.ndarray, encoder: nn.Module, cls: np.ndarray, tokens: np.ndarray, *,
            side: int, batch_size: int, progress: bool, num_workers: int) -> None:
    """Fill ``cls`` and ``tokens`` (any writable array, a memory map included) batch by batch."""

    def consume(s: int, tiles: torch.Tensor) -> None:
        with torch.inference_mode():
            f, t = encoder.forward_tokens(tiles)
        t16 = t.to("cpu", torch.float16).numpy()
        if not np.isfinite(t16).all():
            peak = float(t.abs().max())
            raise InputError(f"encoder {encoder.spec.name!r}: tokens of tiles {s}…{s + len(tiles) - 1} are not "
                             f"finite in float16 (max |value| {peak:.3g}; float16 holds ±65504); this encoder's "
                             "tokens do not fit half precision — report it")
        cls[s : s + len(tiles)] = f.to("cpu", torch.float32).numpy()
        tokens[s : s + len(tiles)] = t16

    run_tile_batches(image, centres, consume, side=side, size=int(encoder.input_size), batch_size=batch_size,
                     device=encoder_device(encoder), progress=progress, num_workers=num_workers, desc="tokens")


def _write(entry: _Entry, fill: Any, cls: np.ndarray, shape: tuple[int, ...], extra: dict[str, Any]) -> None:
    """Write the tokens chunk by chunk (``fill(tokens_memmap)``) under a temporary name, then rename them,
    the features and the sidecar (last: a sidecar means a complete entry) into place."""
    entry.tokens.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_siblings(entry.tokens, "tmp")
    tmp = temp_sibling(entry.tokens, "tmp")
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=_TOKENS_DTYPE, shape=shape)
        fill(mm)
        mm.flush()
        del mm
        fsync_path(tmp)
        os.replace(tmp, entry.tokens)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    atomic_write(entry.cls, lambda f: np.save(f, cls, allow_pickle=False), fsync=True)
    meta = {"key": entry.key, "shape": list(shape), "dtype": np.dtype(_TOKENS_DTYPE).name,
            "feature_dim": int(cls.shape[1]), **extra, "inputs": entry.desc}
    atomic_write(entry.sidecar, json.dumps(meta, indent=1).encode(), fsync=True)


def extract_tokens(
    image: Any,
    centres_px: np.ndarray,
    *,
    encoder: nn.Module,
    mpp: float,
    geometry: TokenGeometry,
    batch_size: int = 64,
    cache_dir: str | os.PathLike[str] | None = None,
    image_key: str | None = None,
    progress: bool = False,
    num_workers: int = 2,
) -> TokenFeatures:
    """Pooled features and patch tokens of one ``geometry.tile_um``-µm tile around each centre.

    Args:
        image: RGB uint8 ``(H, W, 3)`` level-0 image (numpy or any lazily sliceable array).
        centres_px: ``[N, 2]`` tile centres (x, y) in level-0 pixels.
        encoder: an :class:`~hishrst_train.encoders.EncoderModule`, run where it is.
        mpp: µm per level-0 pixel; a tile spans ``round(geometry.tile_um / mpp)`` pixels before resizing.
        geometry: the tiles' token geometry — the encoder's ``spec.token_geometry(pitch_um=...)``; another input
            size or grid is a :class:`TokenGeometryMismatch`.
        batch_size: tiles per encoder call.
        cache_dir: folder of the token cache (``None``: none); see the module docstring.
        image_key: identity of the image for the cache key (e.g. its path; :func:`image_fingerprint`).
        progress: show a tqdm bar (tiles/s).
        num_workers: threads cutting tiles ahead of the encoder.
    """
    centres = _as_centres(centres_px)
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise InputError(f"mpp must be a positive number of µm per pixel, got {mpp!r}; give the slide's pixel size")
    dim, rows, cols, width = _check_geometry(encoder, geometry)
    shape = (len(centres), rows, cols, width)
    cls = np.empty((len(centres), dim), np.float32)
    if not len(centres):
        return TokenFeatures(cls=cls, tokens=np.empty(shape, _TOKENS_DTYPE), geometry=geometry)
    side = patch_side_px(geometry.tile_um, mpp)
    run = dict(side=side, batch_size=batch_size, progress=progress, num_workers=num_workers)
    if cache_dir is None:
        tokens = np.empty(shape, _TOKENS_DTYPE)
        _encode(image, centres, encoder, cls, tokens, **run)
        return TokenFeatures(cls=cls, tokens=tokens, geometry=geometry)
    entry = _entry(image, centres, encoder, mpp=mpp, geometry=geometry, cache_dir=cache_dir, image_key=image_key)
    hit = _read(entry, shape, dim, geometry)
    if hit is not None:
        log.info("tokens: cache hit %s (%s)", entry.tokens, shape)
        return hit
    extra = {"encoder_name": encoder.spec.name, "image_key": image_key, "mpp": float(mpp),
             "geometry": geometry.to_dict(), "n": len(centres)}
    _write(entry, lambda mm: _encode(image, centres, encoder, cls, mm, **run), cls, shape, extra)
    return TokenFeatures(cls=cls, tokens=np.load(entry.tokens, mmap_mode="r", allow_pickle=False), geometry=geometry)
