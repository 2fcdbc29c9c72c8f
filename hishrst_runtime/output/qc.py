"""The QC thumbnail of one slide (``OUT/S.qc.png``): what the run looked at and what it predicted, at a glance.

The slide's overview with the outline of the tissue mask used (cyan), every query point coloured by the
predicted expression of one gene (the bins of a sub-spot run painted as squares, :func:`render_qc_bins`), a
colour bar, and a scale bar in µm; a title band names the slide, the
gene and the rule that chose it. The rule (:data:`GENE_RULE`): the gene whose prediction varies most
across the slide's points (population variance; ties: the first in the bundle's order), so the picture
shows structure rather than a flat colour. Numpy and Pillow only; the X values are read chunk by chunk from
the complete AnnData store (:class:`~hishrst_runtime.output.encoding.XChunks`), twice (variance, then the
chosen gene's column), so memory stays bounded by one chunk.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.output.encoding import XChunks
from hishrst_runtime.output.errors import OutputExistsError

__all__ = ["GENE_RULE", "QcGene", "choose_gene", "render_qc", "bin_raster", "render_qc_bins", "write_qc_png",
           "foreign_qc_png", "nice_length_um"]

#: How the gene shown is chosen (written on the image and in the run report).
GENE_RULE = "highest variance across points"
_OUTLINE = (0, 200, 255)
#: Colour-map anchors (a viridis-like ramp: low = dark violet, high = yellow).
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
_BAND = 34  # title band height (pixels)


@dataclass(frozen=True)
class QcGene:
    """The gene a QC thumbnail shows: its column ``index``, ``name``, ``values`` ([N] float32, one per point),
    the ``variance`` that chose it and the ``rule``."""

    index: int
    name: str
    values: np.ndarray
    variance: float
    rule: str = GENE_RULE


def _chunks(x: XChunks):  # type: ignore[no-untyped-def]
    for k in range(math.ceil(x.n_obs / x.chunk_rows)):
        yield x.read(k, min(x.chunk_rows, x.n_obs - k * x.chunk_rows))


def choose_gene(store: str | os.PathLike[str], genes: list[str]) -> QcGene:
    """The gene of :data:`GENE_RULE` in the complete AnnData store ``store`` (its ``X``: [N, G] float32)."""
    x = XChunks(Path(store) / "X")
    total = np.zeros(x.n_vars)
    total_sq = np.zeros(x.n_vars)
    for block in _chunks(x):
        b = block.astype(np.float64)
        total += b.sum(axis=0)
        total_sq += (b * b).sum(axis=0)
    n = max(x.n_obs, 1)
    var = np.maximum(total_sq / n - (total / n) ** 2, 0.0)
    j = int(np.argmax(var)) if var.size else 0
    values = np.concatenate([b[:, j].copy() for b in _chunks(x)]) if x.n_obs else np.zeros(0, np.float32)
    return QcGene(j, str(genes[j]), values.astype(np.float32), float(var[j]) if var.size else 0.0)


def nice_length_um(target_um: float) -> float:
    """The 1, 2 or 5 × 10^k µm length nearest below ``target_um`` (at least the smallest such length)."""
    if not (math.isfinite(target_um) and target_um > 0):
        return 1.0
    k = math.floor(math.log10(target_um))
    for m in (5, 2, 1):
        if m * 10**k <= target_um:
            return float(m * 10**k)
    return float(10**k)


def _colours(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """RGB uint8 [N, 3] for ``values`` on the ramp between their 1st and 99th percentiles, and those bounds."""
    if not values.size:
        return np.zeros((0, 3), np.uint8), 0.0, 0.0
    lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
    t = np.zeros_like(values, dtype=np.float64) if hi <= lo else np.clip((values - lo) / (hi - lo), 0, 1)
    pos = t * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[:, None]
    return np.rint(_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).astype(np.uint8), lo, hi


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (inside, with an outside 4-neighbour)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _font(size: int):  # type: ignore[no-untyped-def]
    """(font, whether it draws µ): DejaVu Sans where installed, else Pillow's own font (without µ)."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), True
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default(), False


def _text(draw, xy, text, fill, font) -> None:  # type: ignore[no-untyped-def]
    face, has_mu = font
    draw.text(xy, text if has_mu else text.replace("µ", "u"), fill=fill, font=face)


def _scale_bar(draw, w: int, h: int, um_per_px: float, font) -> None:  # type: ignore[no-untyped-def]
    um = nice_length_um(w / 5 * um_per_px)
    px = max(1, round(um / um_per_px))
    x0, y0 = 10, _BAND + h - 18
    draw.rectangle([x0 - 3, y0 - 14, x0 + px + 3, y0 + 8], fill=(255, 255, 255))
    draw.rectangle([x0, y0, x0 + px, y0 + 5], fill=(0, 0, 0))
    _text(draw, (x0, y0 - 13), f"{um:g} µm", (0, 0, 0), font)


def _colour_bar(draw, w: int, h: int, lo: float, hi: float, font) -> None:  # type: ignore[no-untyped-def]
    bw, x0, y0 = min(120, w // 3), w - min(120, w // 3) - 10, _BAND + h - 18
    draw.rectangle([x0 - 3, y0 - 14, x0 + bw + 3, y0 + 8], fill=(255, 255, 255))
    ramp, _, _ = _colours(np.linspace(0, 1, bw))
    for i, c in enumerate(ramp):
        draw.line([x0 + i, y0, x0 + i, y0 + 5], fill=tuple(int(v) for v in c))
    _text(draw, (x0, y0 - 13), f"{lo:.3g}", (0, 0, 0), font)
    _text(draw, (x0 + bw - 28, y0 - 13), f"{hi:.3g}", (0, 0, 0), font)


def _frame(thumbnail: np.ndarray, tissue_mask: np.ndarray, overlay: np.ndarray | None = None) -> Any:
    """(canvas, its drawing context, overview width, height): the overview with the tissue outline (and, where
    ``overlay`` — RGB uint8 of the overview's shape, alpha in a 4th channel — is opaque, its colours) below the
    title band."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.ascontiguousarray(thumbnail[..., :3]))
    w, h = img.size
    mask = np.asarray(Image.fromarray(tissue_mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
    base = np.asarray(img).copy()
    if overlay is not None:
        opaque = overlay[..., 3] > 0
        base[opaque] = overlay[..., :3][opaque]
    base[_outline(mask)] = _OUTLINE
    canvas = Image.new("RGB", (w, h + _BAND), (255, 255, 255))
    canvas.paste(Image.fromarray(base), (0, _BAND))
    return canvas, ImageDraw.Draw(canvas), w, h


def _annotate(draw: Any, w: int, h: int, *, title: str, line: str, um_per_px: float, lo: float, hi: float) -> None:
    font = _font(11)
    _text(draw, (4, 3), title[:120], (0, 0, 0), font)
    _text(draw, (4, 18), line, (0, 0, 0), font)
    _scale_bar(draw, w, h, um_per_px, font)
    _colour_bar(draw, w, h, lo, hi, font)


def render_qc(thumbnail: np.ndarray, tissue_mask: np.ndarray, points_px: np.ndarray, values: np.ndarray, *,
              thumbnail_scale: float, mpp0: float, radius_px: float, title: str, gene: str,
              rule: str = GENE_RULE) -> np.ndarray:
    """The QC image (RGB uint8): ``thumbnail`` (overview, ``thumbnail_scale`` px per level-0 px) with the outline
    of ``tissue_mask`` (boolean, the overview's shape or resized to it), the ``points_px`` (level-0 (x, y))
    as dots of ``radius_px`` level-0 pixels coloured by ``values``, a title band naming ``title``, ``gene`` and
    ``rule``, a colour bar and a scale bar (``mpp0``: µm per level-0 pixel)."""
    canvas, draw, w, h = _frame(thumbnail, tissue_mask)
    colours, lo, hi = _colours(np.asarray(values, dtype=np.float64))
    r = max(1.0, radius_px * thumbnail_scale)
    for (x, y), c in zip(np.asarray(points_px, dtype=np.float64) * thumbnail_scale, colours):
        draw.ellipse([x - r, _BAND + y - r, x + r, _BAND + y + r], fill=tuple(int(v) for v in c))
    _annotate(draw, w, h, title=title, line=f"gene {gene} ({rule}); {len(colours)} points",
              um_per_px=mpp0 / thumbnail_scale, lo=lo, hi=hi)
    return np.asarray(canvas)


def bin_raster(xy_blocks: Iterable[np.ndarray], values: np.ndarray, *, shape0: tuple[int, int],
               cell_px: float) -> np.ndarray:
    """The mean of ``values`` ([N], one per bin) over square cells of ``cell_px`` level-0 pixels covering a
    ``shape0`` (H, W) slide, float64 ``(ceil(H / cell), ceil(W / cell))``, NaN where no bin centre falls; the
    bins' level-0 (x, y) centres come in row order as ``[m, 2]`` blocks (memory: the raster, whatever N)."""
    hc, wc = max(1, math.ceil(shape0[0] / cell_px)), max(1, math.ceil(shape0[1] / cell_px))
    sums, counts, lo = np.zeros(hc * wc), np.zeros(hc * wc), 0
    for xy in xy_blocks:
        xy = np.asarray(xy, dtype=np.float64)
        ix = np.clip(np.floor(xy[:, 0] / cell_px), 0, wc - 1).astype(np.int64)
        iy = np.clip(np.floor(xy[:, 1] / cell_px), 0, hc - 1).astype(np.int64)
        idx = iy * wc + ix
        sums += np.bincount(idx, weights=np.asarray(values[lo:lo + len(xy)], np.float64), minlength=hc * wc)
        counts += np.bincount(idx, minlength=hc * wc)
        lo += len(xy)
    out = np.full(hc * wc, np.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out.reshape(hc, wc)


def render_qc_bins(thumbnail: np.ndarray, tissue_mask: np.ndarray, raster: np.ndarray, *, thumbnail_scale: float,
                   mpp0: float, title: str, gene: str, n_bins: int, rule: str = GENE_RULE) -> np.ndarray:
    """The QC image of a bin output: as :func:`render_qc`, with the bins painted from ``raster`` (a
    :func:`bin_raster` over the whole slide, stretched to the overview with nearest-neighbour sampling)."""
    h, w = thumbnail.shape[:2]
    rows = np.minimum((np.arange(h) + 0.5) * raster.shape[0] / h, raster.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * raster.shape[1] / w, raster.shape[1] - 1).astype(np.int64)
    grid = raster[np.ix_(rows, cols)]
    have = np.isfinite(grid)
    colours, lo, hi = _colours(grid[have])
    overlay = np.zeros((h, w, 4), np.uint8)
    overlay[have, :3], overlay[have, 3] = colours, 255
    canvas, draw, w, h = _frame(thumbnail, tissue_mask, overlay)
    _annotate(draw, w, h, title=title, line=f"gene {gene} ({rule}); {n_bins} bins", um_per_px=mpp0 / thumbnail_scale,
              lo=lo, hi=hi)
    return np.asarray(canvas)


def foreign_qc_png(path: str | os.PathLike[str]) -> str | None:
    """The one-line reason ``path`` must not be written: it exists and is not a QC thumbnail hishrst wrote
    (a PNG whose ``Software`` text is ``hishrst``), else None."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not os.path.lexists(p):
        return None
    try:
        with Image.open(p) as png:
            if getattr(png, "text", {}).get("Software") == "hishrst":
                return None
    except (OSError, UnidentifiedImageError):
        pass
    return f"{p}: exists and was not written by hishrst-run; it is left as it is: move it away or choose another --out"


def write_qc_png(path: str | os.PathLike[str], image: np.ndarray, *, gene: str, rule: str = GENE_RULE) -> Path:
    """Write the QC ``image`` as a PNG at ``path`` (atomically), with the gene and rule as PNG text. Raises
    :class:`~hishrst_runtime.output.errors.OutputExistsError` when ``path`` is a file hishrst did not write."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    foreign = foreign_qc_png(path)
    if foreign is not None:
        raise OutputExistsError(foreign)

    info = PngInfo()
    info.add_text("Software", "hishrst")
    info.add_text("hishrst:gene", gene)
    info.add_text("hishrst:rule", rule)
    buf = io.BytesIO()
    # zlib level 1: ~5x faster than Pillow's default 6 for a somewhat larger file; the QC image is written on the
    # finishing thread while the next slide streams, so its CPU is taken from the readers
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info, compress_level=1)
    out = Path(path)
    atomic_write(out, buf.getvalue(), fsync=False)
    return out
