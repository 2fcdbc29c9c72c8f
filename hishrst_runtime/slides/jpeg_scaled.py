"""Computed 2×, 4× and 8× levels of a JPEG-tiled TIFF level, decoded at reduced scale (torch-free).

A single-level 40× slide (0.25 µm / pixel) has no 0.5 µm / pixel level; :mod:`hishrst_runtime.slides.pooled`
computes it as the 2 × 2 mean of the decoded 40× tiles. When those tiles are JPEG, libjpeg can decode them
straight at 1/2, 1/4 or 1/8 scale (its DCT scaling: only the low-frequency coefficients are inverse
transformed), which skips most of the inverse DCT, the colour conversion of 4× the pixels and the pooling.
:func:`attach_scaled_sources` gives each computed level that is 2, 4 or 8 × a stored JPEG-tiled level a
:class:`ScaledJpegBoxes` source doing that with Pillow's JPEG decoder at ``Image.draft`` scales (called
directly, without Pillow's Python file parser; it releases the GIL, so reader threads decode in parallel); the
level keeps its shape, µm / pixel and downsample, its chunks become a whole number of scaled tiles.

* **Speed** (tissue tiles, one core): the synthetic slide's 256-px tiles 1.1 ms (tifffile decode + 2 × 2 mean)
  → 0.52 ms at 1/2, 0.42 ms at 1/8 (its noisy texture makes entropy decoding, which no scale skips, most of
  the cost); the SVS's 240-px tiles 0.80 → 0.21 ms at 1/2, 0.17 ms at 1/8.

* **Streams.** A TIFF JPEG tile is often an abbreviated stream whose tables are in the page's
  ``JPEGTables``; the decoded stream is SOI + the tables without their SOI / EOI + the tile without its SOI.
* **Colour.** As tifffile decodes: ``Photometric`` YCbCr, or RGB with a JFIF marker, is YCbCr converted to
  RGB by libjpeg; ``Photometric`` RGB without JFIF (Aperio's SVS) is RGB data, decoded without a colour
  transform. Other layouts (not 8-bit 3-sample chunky RGB / YCbCr, old-style JPEG, NDPI, strips, tiles not
  a multiple of 8 pixels) keep the pooled path.
* **Fallback.** A tile with no data, one :func:`~hishrst_runtime.slides.tiff.jpeg_problem` rejects (cut short,
  junk after a marker), one whose frame is not the tile's size, one Pillow cannot decode, and the tiles on
  the right / bottom edge whose pixels inside the image are not a multiple of the scale are read through
  the pooled path (:class:`~hishrst_runtime.slides.pooled.PooledBoxes` of the level above), so the missing /
  corrupt tile rule (:mod:`hishrst_runtime.slides.integrity`) and its one-line errors are exactly today's.
* **Parity** with the pooled path (2 × 2 means of tifffile's full decode, what ``hishrst convert`` writes),
  |difference| in grey levels (0–255) over whole levels. The synthetic 40× slide of ``benchmarks.feed``
  (1.5 mm, JPEG quality 85, YCbCr 4:2:0, 256-px tiles, a noisy high-entropy texture): 2× max 24, mean 0.56
  (blue 1.0, its chroma is subsampled), 99.9th percentile 9, 95 % of values within 2; 4× max 10, mean 0.53;
  8× max 4, mean 0.55. The real Aperio SVS ``shared/data/cmu_small_region.svs`` (RGB JPEG, 240-px tiles,
  abbreviated streams): 2× max 19, mean 0.10, 99.3 % within 2; 4× max 9, mean 0.13. The large differences
  are single pixels at sharp edges (the scaled inverse DCT low-passes where the box mean aliases); the mean
  signed difference (−0.13 at 2× to −0.43 at 8× on the synthetic slide) is mostly the pooled path's own
  round-half-up bias, 1/8 level per pooling. For comparison, re-encoding the pooled 2× level as JPEG at
  quality 95 changes it by mean 1.6 (synthetic) and 2.7 (SVS), max 33 and 80: the reduced-scale decode is
  far below a JPEG re-encoding and below scanner or stain variation, so a model sees no systematic change.
  The levels are not bit-identical to a converted store's, and the tissue mask of an overview read from
  them can differ at its boundary (the SVS with the tiny test bundle at a 60 µm pitch: 174 points instead
  of 173, 172 in common). ``HISHRST_JPEG_SCALED=0`` (:data:`ENV`) gives exact 2 × 2 means.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from hishrst_runtime.slides.level import Level
from hishrst_runtime.slides.tiff import jpeg_problem

__all__ = ["ENV", "SCALES", "ScaledJpegTiles", "ScaledJpegBoxes", "attach_scaled_sources", "scaled_enabled"]

#: Environment variable: ``0`` (or ``false`` / ``no`` / ``off``) reads computed levels as exact 2 × 2 means.
ENV = "HISHRST_JPEG_SCALED"
#: The reduced scales libjpeg decodes to that are used here (computed levels of these downsamples).
SCALES = (2, 4, 8)
#: Computed levels read through a scaled source get chunks of about this many pixels, a whole number of tiles.
CHUNK_PX = 512
_SOF = frozenset({0xC0, 0xC1, 0xC2})


def scaled_enabled() -> bool:
    """Whether reduced-scale JPEG decoding is on (``HISHRST_JPEG_SCALED`` is not ``0`` / ``false`` / ``no`` / ``off``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def sof_frame(raw: bytes) -> tuple[int, int, int, int] | None:
    """(precision bits, height, width, components) of the first SOF0/1/2 segment of a JPEG stream, or None."""
    i, n = 2, len(raw)
    while i + 4 <= n:
        if raw[i] != 0xFF:
            return None
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF and i + 10 <= n:
            return raw[i + 4], (raw[i + 5] << 8) | raw[i + 6], (raw[i + 7] << 8) | raw[i + 8], raw[i + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        i += 2 + ((raw[i + 2] << 8) | raw[i + 3])
    return None


class ScaledJpegTiles:
    """The JPEG tiles of one TIFF page, decoded at 1/2, 1/4 or 1/8 scale with Pillow (thread-safe).

    Built by :meth:`for_reader` from the page's :class:`~hishrst_runtime.slides.tiffslide.TileReader`;
    ``tile`` = (rows, columns) of a stored tile. ``counts`` tallies tiles decoded scaled (``"scaled"``) and
    tiles handed to the fallback (``"fallback"``), for tests and benchmarks.
    """

    def __init__(self, reader: Any, tile: tuple[int, int], image: tuple[int, int], tables: bytes | None,
                 jpegmode: str) -> None:
        self.reader, self.tile, self.image = reader, tile, image
        self._prefix = tables[:-2] if tables else b"\xff\xd8"  # SOI + tables, without the tables' EOI
        self._jpegmode = jpegmode
        self.counts = {"scaled": 0, "fallback": 0}
        self._lock = threading.Lock()

    @classmethod
    def for_reader(cls, reader: Any) -> ScaledJpegTiles | None:
        """Scaled decoding for the page of ``reader`` (a TileReader), or None when its layout is not one this
        module decodes (see the module docstring)."""
        page = getattr(reader, "page", None)
        if page is None or not getattr(page, "is_tiled", False) or int(page.compression) != 7:
            return None
        if getattr(page, "is_ndpi", False) or getattr(page, "jpegheader", None) is not None:
            return None
        photometric, jfif = int(page.photometric), bool(page.is_jfif)
        if photometric not in (2, 6) or tuple(page.extrasamples or ()) or int(page.planarconfig) != 1:
            return None
        if int(page.samplesperpixel) != 3 or int(page.bitspersample) != 8:
            return None
        th, tw = int(page.tilelength), int(page.tilewidth)
        if th % 8 or tw % 8 or reader.chunk_shape[:2] != (th, tw):
            return None
        tables = None if page.jpegtables is None else bytes(page.jpegtables)
        if tables is not None and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
            return None
        jpegmode = "RGB" if photometric == 2 and not jfif else ""  # Aperio: RGB data, no colour transform
        return cls(reader, (th, tw), (int(page.imagelength), int(page.imagewidth)), tables, jpegmode)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def stream(self, cy: int, cx: int) -> bytes | None:
        """The complete JPEG stream of tile (cy, cx), or None when it has no data, is damaged
        (:func:`~hishrst_runtime.slides.tiff.jpeg_problem`) or its frame is not an 8-bit, 3-component tile."""
        try:
            raw = self.reader.raw(cy, cx)
        except (OSError, EOFError):
            return None
        if raw is None or jpeg_problem(raw) is not None:
            return None
        if sof_frame(raw) != (8, self.tile[0], self.tile[1], 3):  # the frame header is in the tile's own stream
            return None
        return self._prefix + raw[2:]

    def decode_into(self, out: Image.Image, at: tuple[int, int], cy: int, cx: int, scale: int) -> bool:
        """Decode tile (cy, cx) at ``1 / scale`` into ``out`` with its top-left corner at pixel ``at`` = (x, y)
        (the whole scaled tile must fit); False, with ``out`` untouched or partly written, when the tile
        must be read by the fallback instead."""
        stream = self.stream(cy, cx)
        if stream is None:
            self._count("fallback")
            return False
        w, h = self.tile[1] // scale, self.tile[0] // scale
        try:
            decoder = Image._getdecoder("RGB", "jpeg", ("RGB", self._jpegmode, scale, 0))
            decoder.setimage(out.im, (at[0], at[1], at[0] + w, at[1] + h))
            n, err = decoder.decode(stream)
            decoder.cleanup()
        except (OSError, ValueError, TypeError, AttributeError, MemoryError):
            n, err = 0, -1
        ok = n < 0 and err >= 0
        self._count("scaled" if ok else "fallback")
        return ok

    def edge_ok(self, cy: int, cx: int, scale: int) -> bool:
        """Whether tile (cy, cx)'s pixels inside the image are a whole number of ``scale`` × ``scale`` blocks
        (always true inside the image; on the right / bottom edge only when the image size allows)."""
        vh = min(self.tile[0], self.image[0] - cy * self.tile[0])
        vw = min(self.tile[1], self.image[1] - cx * self.tile[1])
        return vh % scale == 0 and vw % scale == 0


@dataclass(frozen=True)
class ScaledJpegBoxes:
    """The :class:`~hishrst_runtime.slides.boxes.BoxSource` of a level ``scale`` × coarser than the stored
    JPEG-tiled level ``tiles`` belongs to, decoding each tile at ``1 / scale``; ``fallback`` (the level's
    pooled source) reads what cannot be decoded so. :meth:`read_image` gives the box as a Pillow image (the
    chunk cache's form) without a numpy round trip."""

    tiles: ScaledJpegTiles
    scale: int
    shape: tuple[int, int]
    fallback: Any

    @property
    def parent(self) -> Level:
        """The level above (the pooled path's parent)."""
        return self.fallback.parent

    def read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.array(self.read_image(y0, y1, x0, x1))  # a writable copy, like every other source

    def read_image(self, y0: int, y1: int, x0: int, x1: int) -> Image.Image:
        """Level pixels ``[y0:y1, x0:x1]`` (inside the level) as a Pillow RGB image."""
        th, tw = self.tiles.tile[0] // self.scale, self.tiles.tile[1] // self.scale
        out = Image.new("RGB", (x1 - x0, y1 - y0))
        for cy in range(y0 // th, (y1 - 1) // th + 1):
            for cx in range(x0 // tw, (x1 - 1) // tw + 1):
                ty0, tx0 = cy * th, cx * tw
                a0, a1 = max(y0, ty0), min(y1, ty0 + th, self.shape[0])
                b0, b1 = max(x0, tx0), min(x1, tx0 + tw, self.shape[1])
                self._tile_into(out, cy, cx, (a0, a1, b0, b1), (ty0, tx0), (y0, x0))
        return out

    def _tile_into(self, out: Image.Image, cy: int, cx: int, box: tuple[int, int, int, int],
                   origin: tuple[int, int], corner: tuple[int, int]) -> None:
        """Tile (cy, cx)'s part ``box`` = (a0, a1, b0, b1) (level pixels; the tile starts at ``origin``) into
        ``out``, whose pixel (0, 0) is level pixel ``corner``."""
        (a0, a1, b0, b1), (ty0, tx0), (y0, x0) = box, origin, corner
        th, tw = self.tiles.tile[0] // self.scale, self.tiles.tile[1] // self.scale
        if self.tiles.edge_ok(cy, cx, self.scale):
            whole = (a0, a1, b0, b1) == (ty0, ty0 + th, tx0, tx0 + tw)
            if whole and self.tiles.decode_into(out, (tx0 - x0, ty0 - y0), cy, cx, self.scale):
                return
            if not whole:
                tile = Image.new("RGB", (tw, th))
                if self.tiles.decode_into(tile, (0, 0), cy, cx, self.scale):
                    out.paste(tile.crop((b0 - tx0, a0 - ty0, b1 - tx0, a1 - ty0)), (b0 - x0, a0 - y0))
                    return
        else:
            self.tiles._count("fallback")
        part = self.fallback.read_box(a0, a1, b0, b1)  # today's path: the integrity rule, exact pooling
        out.paste(Image.fromarray(np.ascontiguousarray(part)), (b0 - x0, a0 - y0))


def _chunk_side(tile: int, scale: int, side: int) -> int:
    """A chunk side (pixels) of a whole number of scaled tiles, about :data:`CHUNK_PX`, at most ``side``."""
    step = tile // scale
    return min(side, step * max(1, CHUNK_PX // step))


def attach_scaled_sources(levels: list[Level]) -> int:
    """Give each computed (pooled) level of ``levels`` that is 2, 4 or 8 × the stored level above it a
    :class:`ScaledJpegBoxes` source when that level's tiles are JPEG this module decodes (and
    :func:`scaled_enabled`); returns how many levels got one. Chunks become whole scaled tiles."""
    if not scaled_enabled():
        return 0
    done, tiles, scale = 0, None, 1
    for lv in levels:
        if not lv.computed:
            tiles, scale = (None if lv._direct is None else ScaledJpegTiles.for_reader(lv._direct)), 1
            continue
        scale *= 2
        if tiles is None or scale not in SCALES or getattr(lv.source, "parent", None) is None:
            continue
        lv.source = ScaledJpegBoxes(tiles, scale, lv.shape, lv.source)
        lv.chunks = (_chunk_side(tiles.tile[0], scale, lv.shape[0]), _chunk_side(tiles.tile[1], scale, lv.shape[1]))
        done += 1
    return done
