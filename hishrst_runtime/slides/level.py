"""One pyramid level of a slide: box reads, whole-chunk reads and chunk-aligned tiling (torch-free).

Where the pixels come from — a zarr-like array (built in) or a reader's
:class:`~hishrst_runtime.slides.boxes.BoxSource` — is described in :mod:`hishrst_runtime.slides.boxes`.

Coordinates are ``(x, y)``; a region ``(x0, y0, x1, y1)`` is half-open and in the pixels of the
level it is read from (level-0 pixels × ``1 / downsample``). Reads are safe from several threads
(zarr-python 3 keeps no per-read state on the array). Every read — whole chunks and boxes — applies the
one rule for chunks with no data or that do not decode (:mod:`hishrst_runtime.slides.integrity`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from PIL import Image

from hishrst_runtime.slides.boxes import BoxSource, LevelImage, direct_ok, iter_chunk_regions
from hishrst_runtime.slides.chunks import ChunkAbsent
from hishrst_runtime.slides.errors import ChunkDecodeError, MissingChunkError, SlideError

__all__ = ["Level", "LevelImage", "BoxSource", "iter_chunk_regions", "direct_ok"]

#: What zarr's codec pipeline raises for a chunk that does not decode (zstd/blosc, gzip/zlib, shapes).
_DECODE_ERRORS = (RuntimeError, ValueError, TypeError, OSError, EOFError, zlib.error)


@dataclass(eq=False)
class Level:
    """One pyramid level of a slide.

    ``mpp`` is in µm / pixel (the mean of the y and x pixel sizes, ``mpp_yx`` holds both),
    ``downsample`` is relative to level 0 (from the scales), ``shape`` = (H, W) and ``chunks`` =
    (ch, cw) are in this level's pixels. A Level can be passed to
    :func:`hishrst_runtime.core.patches.cut_patch` directly (it reads ``shape[0:2]`` and slices
    ``level[y0:y1, x0:x1]``); :attr:`image` is the same view with ``shape == (H, W, 3)``.

    The pixels come from ``_array`` (a zarr-like array in ``_axes`` order, with the optional direct chunk
    reader ``_direct``) or, when given, from ``source`` (a :class:`~hishrst_runtime.slides.boxes.BoxSource`;
    ``_axes`` is then ``y, x, c``). ``computed``: the level is computed from another one (pooled), so it has
    no chunks of its own to lose.
    """

    index: int
    mpp: float
    mpp_yx: tuple[float, float]
    downsample: float
    shape: tuple[int, int]
    chunks: tuple[int, int]
    path: str
    _array: Any = field(default=None, repr=False)
    _axes: tuple[str, ...] = field(default=("y", "x", "c"), repr=False)
    _n_channels: int = field(default=3, repr=False)
    _direct: Any = field(default=None, repr=False)
    #: The store's path or URL (for messages).
    store: str = field(default="", repr=False)
    #: What a chunk that does not decode means and the fix (the end of :class:`ChunkDecodeError` messages).
    corrupt_hint: str = field(default="the slide store is corrupt, convert the slide again", repr=False)
    #: The slide's missing-data rule (:class:`~hishrst_runtime.slides.chunks.MissingChunks`), set by the Slide.
    _missing: Any = field(default=None, repr=False)
    #: The next coarser *stored* level (the evidence for absent chunks), set by the Slide; None on the coarsest.
    _coarser: Any = field(default=None, repr=False)
    _verdicts: dict = field(default_factory=dict, repr=False)
    #: Where the pixels come from when not from ``_array`` (the public extension point).
    source: BoxSource | None = field(default=None, repr=False)
    #: Whether the level is computed from another one (then it has no chunks of its own to lose).
    computed: bool = False
    _closed: bool = field(default=False, repr=False)

    def _index(self, y: slice, x: slice) -> tuple[Any, ...]:
        return tuple(y if a == "y" else x if a == "x" else slice(0, 3) if a == "c" else 0 for a in self._axes)

    def _open_array(self) -> Any:
        if self._closed or (self._array is None and self.source is None):
            raise ValueError("the slide is closed; open it again with open_slide()")
        return self._array

    def close(self) -> None:
        """Drop the pixel handles (further reads raise); the Slide closes the files themselves."""
        self._closed, self._array, self.source = True, None, None

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` (half-open, inside the level, non-empty) as uint8 RGB ``(h, w, 3)``: from
        the ``source`` when the level has one, else from the array (:meth:`_array_read`). This makes a Level
        a :class:`~hishrst_runtime.slides.boxes.BoxSource` itself."""
        self._open_array()
        if self.source is not None:
            return self.source.read_box(y0, y1, x0, x1)
        data = self._array_read(y0, y1, x0, x1)
        kept = self._kept()
        if "c" in kept:
            data = np.moveaxis(data, kept.index("c"), -1)
            if kept.index("y") > kept.index("x"):  # (x, y, c) -> (y, x, c)
                data = data.swapaxes(0, 1)
        else:  # pragma: no cover - rejected at open (needs 3 or 4 channels)
            data = np.repeat(data[..., None], 3, axis=-1)
        return np.ascontiguousarray(data[..., :3], dtype=np.uint8)

    def _array_read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Box read from the array in its kept axis order (direct chunk reads when possible, else zarr); a chunk
        with no data is judged by the slide's missing-data rule and a chunk that does not decode is a
        :class:`ChunkDecodeError` naming it."""
        arr = self._open_array()
        if self._direct is not None:
            return self._direct_box(y0, y1, x0, x1)
        try:
            return self._zarr_box(arr, y0, y1, x0, x1, retries=0)
        except ChunkAbsent as e:  # judge it, then read the box one storage unit at a time (each fetched once)
            self._absent_key(arr, e.key, y0, y1, x0, x1)
        kept, (uh, uw) = self._kept(), self._unit(arr)
        iy, ix = kept.index("y"), kept.index("x")
        shape = [y1 - y0 if a == "y" else x1 - x0 if a == "x" else min(3, self._n_channels) for a in kept]
        out = np.empty(shape, dtype=np.uint8)
        for uy in range(y0 // uh, (y1 - 1) // uh + 1):
            for ux in range(x0 // uw, (x1 - 1) // uw + 1):
                a0, a1, b0, b1 = max(y0, uy * uh), min(y1, (uy + 1) * uh), max(x0, ux * uw), min(x1, (ux + 1) * uw)
                sl: list[slice] = [slice(None)] * len(kept)
                sl[iy], sl[ix] = slice(a0 - y0, a1 - y0), slice(b0 - x0, b1 - x0)
                out[tuple(sl)] = self._zarr_box(arr, a0, a1, b0, b1, retries=8)
        return out

    def _zarr_box(self, arr: Any, y0: int, y1: int, x0: int, x1: int, *, retries: int) -> np.ndarray:
        """One zarr read of the box; up to ``retries`` absent chunks are judged and admitted on the way."""
        for attempt in range(retries + 1):
            try:
                return np.asarray(arr[self._index(slice(y0, y1), slice(x0, x1))])
            except ChunkAbsent as e:
                if attempt == retries:
                    raise
                self._absent_key(arr, e.key, y0, y1, x0, x1)
            except SlideError:  # already names its file or URL (a remote read, a TIFF tile)
                raise
            except _DECODE_ERRORS as e:
                raise self._decode_error(y0, y1, x0, x1, e) from e
        raise AssertionError("unreachable")  # pragma: no cover

    def _unit(self, arr: Any) -> tuple[int, int]:
        """(rows, columns) of one stored object of the array: a chunk, or a shard of a sharded array."""
        grid = getattr(getattr(arr.metadata, "chunk_grid", None), "chunk_shape", None) or arr.chunks
        return int(grid[self._axes.index("y")]), int(grid[self._axes.index("x")])

    def _kept(self) -> list[str]:
        return [a for a in self._axes if a in ("y", "x", "c")]

    def _direct_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The box ``[y0:y1, x0:x1]`` in the kept axis order, assembled from directly decoded chunks."""
        (ch, cw), (h, w), kept = self.chunks, self.shape, self._kept()
        iy, ix = kept.index("y"), kept.index("x")
        rows = []
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            row = []
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                oy, ox = cy * ch, cx * cw
                block = self._direct_block(cy, cx, min(ch, h - oy), min(cw, w - ox), kept)
                sl = [slice(None)] * 3
                sl[iy], sl[ix] = slice(max(y0, oy) - oy, min(y1, oy + ch) - oy), slice(max(x0, ox) - ox, min(x1, ox + cw) - ox)
                row.append(block[tuple(sl)])
            rows.append(row[0] if len(row) == 1 else np.concatenate(row, axis=ix))
        return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=iy)

    # --- the missing-data rule (hishrst_runtime.slides.integrity describes it) ---------------------------

    def _where(self, cy: int, cx: int) -> str:
        return f"chunk ({cy}, {cx}) of pyramid level {self.index} ({self.path}) of {self.store}"

    def _absent(self, cy: int, cx: int, name: str, unit: tuple[int, int] | None = None) -> bool:
        """Chunk (cy, cx) (or the storage ``unit`` box (ch, cw) at it) has no data: False when it is background,
        True when it is not but missing chunks are allowed (it is counted); else :class:`MissingChunkError`."""
        uh, uw = unit or self.chunks
        y0, x0 = cy * uh, cx * uw
        if self._is_background(y0, min(y0 + uh, self.shape[0]), x0, min(x0 + uw, self.shape[1])):
            return False
        if self._missing is not None and self._missing.allow:
            self._missing.record(f"{name} [level {self.index}, chunk ({cy}, {cx}), missing]")
            return True
        evidence = "the next coarser level" if self._coarser is not None else "the pixels around it"
        raise MissingChunkError(
            f"{name}: {self._where(cy, cx)} has no data (missing) and {evidence} is not plain background there; "
            "restore the chunk / tile (copy or convert the slide again), or pass --allow-missing-chunks to read "
            "missing chunks as the fill value (they are counted in the run report)")

    def _corrupt(self, cy: int, cx: int, e: ChunkDecodeError) -> None:
        """A chunk that does not decode: counted as fill when missing chunks are allowed, else ``e`` is raised."""
        if self._missing is None or not self._missing.allow:
            raise e
        self._missing.record(f"{str(e).split(':', 1)[0]} [level {self.index}, chunk ({cy}, {cx}), corrupt]")

    def _absent_key(self, arr: Any, key: str, y0: int, y1: int, x0: int, x1: int) -> None:
        """Judge the absent store object ``key`` met by a zarr read of the box, then let the store fill it."""
        meta = arr.metadata
        unit = tuple(int(c) for c in getattr(getattr(meta, "chunk_grid", None), "chunk_shape", None) or arr.chunks)
        uh, uw = self._unit(arr)
        grid = [-(-int(n) // int(c)) for n, c in zip(arr.shape, unit)]
        prefix = f"{arr.path}/" if getattr(arr, "path", "") else ""
        for uy in range(y0 // uh, (y1 - 1) // uh + 1):
            for ux in range(x0 // uw, (x1 - 1) // uw + 1):
                for k in range(grid[self._axes.index("c")] if "c" in self._axes else 1):
                    coords = tuple(uy if a == "y" else ux if a == "x" else k if a == "c" else 0 for a in self._axes)
                    if prefix + meta.encode_chunk_key(coords) == key:
                        self._absent(uy, ux, f"{self.store}/{key}", (uh, uw))
                        arr.store.admit_absent(key)
                        return
        raise SlideError(f"{self.store}/{key}: an object the read did not ask for is missing; check the store")

    def _is_background(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether the evidence for the box ``[y0:y1, x0:x1]`` is uniform fill: the same region of the next
        coarser stored level, or on the coarsest stored level the one-pixel ring around the box."""
        key = (y0, y1, x0, x1)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = self._verdicts[key] = all(lv._is_fill(*box, self._fill_value()) for lv, box in self._evidence(*key))
        return verdict

    def _evidence(self, y0: int, y1: int, x0: int, x1: int) -> list[tuple[Level, tuple[int, int, int, int]]]:
        c, (h, w) = self._coarser, self.shape
        if c is not None:
            (chh, cww), fy, fx = c.shape, c.shape[0] / h, c.shape[1] / w
            a0, b0 = min(math.ceil(y0 * fy), chh - 1), min(math.ceil(x0 * fx), cww - 1)
            a1, b1 = min(max(math.floor(y1 * fy), a0 + 1), chh), min(max(math.floor(x1 * fx), b0 + 1), cww)
            return [(c, (a0, a1, b0, b1))]
        xa, xb = max(x0 - 1, 0), min(x1 + 1, w)
        boxes = [(y0 - 1, y0, xa, xb)] if y0 > 0 else []
        boxes += [(y1, y1 + 1, xa, xb)] if y1 < h else []
        boxes += [(y0, y1, x0 - 1, x0)] if x0 > 0 else []
        boxes += [(y0, y1, x1, x1 + 1)] if x1 < w else []
        return [(self, b) for b in boxes]

    def _fill_value(self) -> int:
        if self._direct is not None:
            return int(self._direct.fill_value)
        fill = getattr(self._array, "fill_value", None)
        return int(fill) if fill is not None else 0

    def _is_fill(self, y0: int, y1: int, x0: int, x1: int, fill: int) -> bool:
        """Whether the box is uniform ``fill`` (±2, lossy codecs) with absent chunks counted as fill; a chunk
        that does not decode is not fill."""
        (ch, cw), arr = self.chunks, self._open_array()
        for cy in range(y0 // ch, (y1 - 1) // ch + 1):
            for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                sy = slice(max(y0, cy * ch), min(y1, (cy + 1) * ch))
                sx = slice(max(x0, cx * cw), min(x1, (cx + 1) * cw))
                try:
                    if self._direct is not None:
                        parts = self._direct_parts(cy, cx, judged=False)
                        kept = self._kept()
                        data = None if parts is None else [p[tuple(
                            slice(sy.start - cy * ch, sy.stop - cy * ch) if a == "y" else slice(
                                sx.start - cx * cw, sx.stop - cx * cw) if a == "x" else slice(None) for a in kept)]
                            for p in parts]
                    elif self.source is not None:
                        data = [self.source.read_box(sy.start, sy.stop, sx.start, sx.stop)]
                    else:
                        data = [np.asarray(arr[self._index(sy, sx)])]
                except ChunkAbsent:
                    data = None
                except (SlideError, *_DECODE_ERRORS):
                    return False
                if data is not None and any((np.abs(d.astype(np.int16) - fill) > 2).any() for d in data):
                    return False
        return True

    def _decode_error(self, y0: int, y1: int, x0: int, x1: int, e: BaseException) -> ChunkDecodeError:
        ch, cw = self.chunks
        if self._direct is not None:  # find the culprit chunk file by decoding the box's chunks directly
            for cy in range(y0 // ch, (y1 - 1) // ch + 1):
                for cx in range(x0 // cw, (x1 - 1) // cw + 1):
                    try:
                        self.read_chunk(cy, cx)
                    except ChunkDecodeError as named:
                        return named
        spans = ((y0 // ch, (y1 - 1) // ch), (x0 // cw, (x1 - 1) // cw))
        rows, cols = (f"{a}" if a == b else f"{a}–{b}" for a, b in spans)
        return ChunkDecodeError(
            f"{self.store}/{self.path}: a chunk in chunk-grid row(s) {rows}, column(s) {cols} does not decode "
            f"({type(e).__name__}: {e}); {self.corrupt_hint}")

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Read the half-open box ``[y0:y1, x0:x1]`` (this level's pixels) as uint8 RGB ``(h, w, 3)``.

        The box is **clipped** to the level bounds, so the result can be smaller than requested
        (empty, ``(0, 0, 3)``, for a box entirely outside). Use ``cut_patch`` for white padding.
        """
        self._open_array()
        h, w = self.shape
        cx0, cy0 = min(max(int(x0), 0), w), min(max(int(y0), 0), h)
        cx1, cy1 = min(max(int(x1), cx0), w), min(max(int(y1), cy0), h)
        if cx1 <= cx0 or cy1 <= cy0:
            return np.zeros((max(cy1 - cy0, 0), max(cx1 - cx0, 0), 3), dtype=np.uint8)
        return self.read_box(cy0, cy1, cx0, cx1)

    def _direct_parts(self, cy: int, cx: int, *, judged: bool) -> list[np.ndarray] | None:
        """The channel chunks of chunk (cy, cx), decoded directly. ``judged``: a chunk with no data or that
        does not decode goes through the slide's rule (fill, or an error); else None when any is absent."""
        cc = self._direct.chunk_shape[self._axes.index("c")]
        parts = []
        for k in range(math.ceil(3 / cc)):
            coords = tuple(cy if a == "y" else cx if a == "x" else k if a == "c" else 0 for a in self._axes)
            try:
                block = self._direct.read_or_none(coords)
            except ChunkDecodeError as e:
                if not judged:
                    raise
                self._corrupt(cy, cx, e)  # raises unless allowed; then the fill value, counted
                block = np.full(self._direct.chunk_shape, self._direct.fill_value, dtype=np.uint8)
            if block is None:
                if not judged:
                    return None
                self._absent(cy, cx, self._direct.name(coords))
                block = np.full(self._direct.chunk_shape, self._direct.fill_value, dtype=np.uint8)
            parts.append(block.reshape([n for a, n in zip(self._axes, block.shape) if a in ("y", "x", "c")]))
        return parts

    def _direct_block(self, cy: int, cx: int, bh: int, bw: int, kept: list[str]) -> np.ndarray:
        """Chunk (cy, cx) decoded directly, all channel chunks joined, cropped to (bh, bw) in ``kept`` order."""
        parts = self._direct_parts(cy, cx, judged=True) or []
        data = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=kept.index("c"))
        return data[tuple(slice(0, bh) if a == "y" else slice(0, bw) if a == "x" else slice(0, 3) for a in kept)]

    def read_chunk(self, cy: int, cx: int) -> Image.Image:
        """Chunk ``(cy, cx)`` of this level (chunk-grid row and column) as a Pillow RGB image.

        The image covers level pixels ``[cy*ch : (cy+1)*ch, cx*cw : (cx+1)*cw]`` clipped to the
        level, so edge chunks are smaller. For a simple local store the chunk file is decompressed directly
        (and its checksum verified) (:class:`hishrst_runtime.slides.chunks.DirectChunkReader`), and planar
        ``c, y, x`` data becomes an RGB image without a strided numpy transpose.
        """
        y0, x0, bh, bw = self._chunk_box(cy, cx)
        if self.source is not None and hasattr(self.source, "read_image"):  # a source that gives Pillow images
            return self.source.read_image(y0, y0 + bh, x0, x0 + bw)
        data, planar = self.read_chunk_array(cy, cx)
        if planar:
            planes = [np.ascontiguousarray(data[i]) for i in range(3)]
            return Image.merge("RGB", [Image.frombuffer("L", (bw, bh), p, "raw", "L", 0, 1) for p in planes])
        return Image.fromarray(np.ascontiguousarray(data))

    def read_chunk_array(self, cy: int, cx: int) -> tuple[np.ndarray, bool]:
        """Chunk ``(cy, cx)``, clipped like :meth:`read_chunk`, as uint8 pixels and whether they are planar:
        ``((3, h, w), True)`` when the level stores ``c, y, x`` (the decoded chunk as it is, no interleave), else
        ``((h, w, 3), False)``. The streaming pipeline's read primitive (the chunk cache keeps these arrays and
        copies patches from them straight into the encoder's batch); may be a read-only view."""
        y0, x0, bh, bw = self._chunk_box(cy, cx)
        kept = self._kept()
        if self.source is not None and hasattr(self.source, "read_image"):
            return np.asarray(self.source.read_image(y0, y0 + bh, x0, x0 + bw)), False
        if self.source is not None or kept not in (["c", "y", "x"], ["y", "x", "c"]):  # a box source, unusual orders
            return self.read_box(y0, y0 + bh, x0, x0 + bw), False
        if self._direct is not None:  # both orders have a c axis; it may be chunked by fewer than 3
            data = self._direct_block(int(cy), int(cx), bh, bw, kept)
        else:
            data = self._array_read(y0, y0 + bh, x0, x0 + bw)
        data = data if data.dtype == np.uint8 else data.astype(np.uint8)
        return (data[:3], True) if kept == ["c", "y", "x"] else (data[..., :3], False)

    def _chunk_box(self, cy: int, cx: int) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) of chunk (cy, cx) clipped to the level; IndexError outside the chunk grid."""
        self._open_array()
        (ch, cw), (h, w) = self.chunks, self.shape
        y0, x0 = int(cy) * ch, int(cx) * cw
        if not (0 <= y0 < h and 0 <= x0 < w):
            raise IndexError(f"chunk ({cy}, {cx}) is outside the level's {math.ceil(h / ch)} x {math.ceil(w / cw)} chunks")
        return y0, x0, min(ch, h - y0), min(cw, w - x0)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        """``level[y0:y1, x0:x1]`` → uint8 RGB ``(h, w, 3)`` (step-less slices, clipped to bounds)."""
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("a Level is indexed as level[y0:y1, x0:x1]")
        ys, xs = key
        if (ys.step not in (None, 1)) or (xs.step not in (None, 1)):
            raise TypeError("a Level does not support strided slices")
        h, w = self.shape
        y0, y1, _ = ys.indices(h)
        x0, x1, _ = xs.indices(w)
        return self.read_region(x0, y0, x1, y1)

    @property
    def image(self) -> LevelImage:
        """This level as an array-like with ``shape == (H, W, 3)`` and ``[y-slice, x-slice]`` reads."""
        return LevelImage(self)

    def iter_regions(self, region_size_px: int | None = None) -> Iterator[tuple[int, int, int, int]]:
        """Chunk-aligned boxes covering the level; see :func:`iter_chunk_regions`."""
        return iter_chunk_regions(self, region_size_px)
