"""Writing a synthetic section to disk: Space Ranger ``outs`` (10x HDF5 matrix, spatial/), the pyramidal
TIFF, the hires/lowres PNGs and ``truth.npz`` (see :mod:`hishrst_train.synth` for the layout)."""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.core.geometry import VISIUM_SPOT_DIAMETER_UM, visium_array_to_um, visium_lattice
from hishrst_runtime.core.vocab import DEFAULT_PLATFORM, PLATFORMS, Platform
from hishrst_train.synth.model import (
    PRESETS,
    REGION_NAMES,
    SpotModel,
    SynthPreset,
    _barcodes,
    _gene_programme,
    _Tissue,
    spot_counts,
    spot_model,
)
from hishrst_train.synth.bins import BINS_FILE, BinModel, bin_inputs
from hishrst_train.synth.canvas import CanvasRenderer
from hishrst_train.synth.hd import write_visium_hd
from hishrst_train.synth.render import STRIP_ROWS, Renderer, downsample2, make_nuclei

__all__ = ["Layout", "canvas_px", "check_platform", "make_synthetic_visium", "load_truth", "png_scales", "resolve_preset", "write_section"]

log = logging.getLogger("hishrst")


@dataclass(frozen=True)
class _Geometry:
    """Lattice (``rows``, ``cols``, ``spot_um``) and the exact µm → px similarity affine of the image."""

    rows: np.ndarray
    cols: np.ndarray
    spot_um: np.ndarray
    spot_px: np.ndarray
    affine: np.ndarray  # [2, 3]: px = affine @ [x_um, y_um, 1]
    width: int
    height: int
    box: tuple[float, float, float, float]  # the image's extent in lattice µm (x0, y0, x1, y1)


def _geometry(p: SynthPreset, rng: np.random.Generator, *, rotation_deg: float | None = None) -> _Geometry:
    """Lattice µm → full-resolution px: scale ``1 / mpp``, a rotation (``rotation_deg``, counter-clockwise
    in lattice axes; ``None``: a small random one, ±0.6°) and a margin offset."""
    rows, cols = visium_lattice(p.n_rows, p.n_cols)
    spot_um = visium_array_to_um(rows, cols)
    rot = np.deg2rad(rng.uniform(-0.6, 0.6) if rotation_deg is None else float(rotation_deg))
    lin = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]]) / p.mpp
    lo_um, hi_um = spot_um.min(0) - p.margin_um, spot_um.max(0) + p.margin_um
    corners = np.array([[lo_um[0], lo_um[1]], [hi_um[0], lo_um[1]], [lo_um[0], hi_um[1]], [hi_um[0], hi_um[1]]])
    cpx = corners @ lin.T
    off = -cpx.min(0)
    width, height = (int(np.ceil(v)) + 1 for v in (cpx.max(0) - cpx.min(0)))
    affine = np.concatenate([lin, off[:, None]], axis=1)
    inv = np.linalg.inv(lin)
    img_box_um = (np.array([[0, 0], [width, 0], [0, height], [width, height]], float) - off) @ inv.T
    box = (*img_box_um.min(0), *img_box_um.max(0))
    return _Geometry(rows=rows, cols=cols, spot_um=spot_um, spot_px=spot_um @ lin.T + off, affine=affine,
                     width=width, height=height, box=box)


def _on_canvas(geo: _Geometry, layout: Layout) -> _Geometry:
    """``geo`` drawn at ``layout.shift_px`` on a canvas with ``layout.pad_px`` more background after it
    (``box`` stays the section's: rendering uses the section's own geometry)."""
    (sx, sy), (qx, qy) = layout.shift_px, layout.pad_px
    shift = np.array([sx, sy], np.float64)
    affine = geo.affine.copy()
    affine[:, 2] += shift
    return replace(geo, spot_px=geo.spot_px + shift, affine=affine, width=geo.width + sx + qx,
                   height=geo.height + sy + qy)


def _write_spaceranger(outs: Path, *, p: SynthPreset, geo: _Geometry, spots: SpotModel, gp: dict[str, np.ndarray],
                       barcodes: np.ndarray, order: np.ndarray, counts: np.ndarray, library_id: str) -> tuple[float, float]:
    """The 10x HDF5 matrix and ``spatial/`` (positions, layers, scale factors); returns (hires, lowres) scales."""
    import pandas as pd

    from hishrst_train.data.tenx import _write_10x_arrays

    _write_10x_arrays(
        outs / "filtered_feature_bc_matrix.h5", counts, barcodes=barcodes[order], names=gp["names"], ids=gp["ids"],
        feature_types=np.full(p.n_genes, "Gene Expression"), genomes=np.full(p.n_genes, "GRCh38"),
        library_id=library_id, chemistry_description="Spatial 3' v1",
        software_version="spaceranger-2.0.0 (hishrst synthetic)",
    )
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": spots.in_tissue.astype(int), "array_row": geo.rows,
                        "array_col": geo.cols, "pxl_row_in_fullres": geo.spot_px[:, 1],
                        "pxl_col_in_fullres": geo.spot_px[:, 0]})
    pos = pos.sort_values("barcode", kind="stable")
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False, float_format="%.6f")
    majority = np.asarray(REGION_NAMES)[np.argmax(spots.frac[order], axis=1)]
    pd.DataFrame({"barcode": barcodes[order], "layer": majority}).to_csv(
        outs / "spatial" / "ground_truth_layers.csv", index=False)
    hires_s, lowres_s = png_scales(geo.width, geo.height)
    sf = {"spot_diameter_fullres": VISIUM_SPOT_DIAMETER_UM / p.mpp,
          "fiducial_diameter_fullres": 1.5 * VISIUM_SPOT_DIAMETER_UM / p.mpp,
          "tissue_hires_scalef": hires_s, "tissue_lowres_scalef": lowres_s}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf, indent=2))
    return hires_s, lowres_s


def png_scales(width: int, height: int) -> tuple[float, float]:
    """(hires, lowres) scale factors of Space Ranger's PNGs: longest side 2000 px and 600 px."""
    return 2000.0 / max(width, height), 600.0 / max(width, height)


def _strips(ren: Renderer, height: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(y0, strip)`` in order; strips are rendered ahead by a small thread pool (numpy releases the GIL)."""
    starts = iter(range(0, height, STRIP_ROWS))
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()

        def submit() -> None:
            y = next(starts, None)
            if y is not None:
                pending.append((y, pool.submit(ren.strip, y, min(height, y + STRIP_ROWS))))

        for _ in range(workers + 1):
            submit()
        while pending:
            y0, fut = pending.popleft()
            submit()
            yield y0, fut.result()


def _write_tiff(path: Path, ren: Renderer | CanvasRenderer, *, geo: _Geometry, p: SynthPreset, description: str,
                compression: Literal["jpeg", "zlib"]) -> list[np.ndarray]:
    """The tiled pyramidal TIFF (level 0 streamed from strips, 2× levels as SubIFDs); returns the pyramid
    levels kept in memory (level 0 only for small images, then every reduced level) for the PNGs."""
    import tifffile

    width, height = geo.width, geo.height
    level1 = np.empty(((height + 1) // 2, (width + 1) // 2, 3), np.uint8)
    level0 = np.empty((height, width, 3), np.uint8) if max(height, width) < 4000 else None  # small: keep for PNGs

    def tiles() -> Iterator[np.ndarray]:
        for y0, s in _strips(ren, height):
            y1 = y0 + s.shape[0]
            level1[y0 // 2 : (y1 + 1) // 2] = downsample2(s)
            if level0 is not None:
                level0[y0:y1] = s
            for x0 in range(0, width, STRIP_ROWS):
                yield s[:, x0 : x0 + STRIP_ROWS]

    comp: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": 90}} if compression == "jpeg" else {
        "compression": "zlib", "compressionargs": {"level": 6}}
    n_sub = max(1, int(np.ceil(np.log2(max(width, height) / 1024.0))))
    tile = (STRIP_ROWS, STRIP_ROWS)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(height, width, 3), dtype=np.uint8, tile=tile, photometric="rgb",
                  subifds=n_sub, resolution=(1e4 / p.mpp, 1e4 / p.mpp), resolutionunit="CENTIMETER",
                  description=description, metadata=None, **comp)
        levels = [level1]
        for i in range(1, n_sub + 1):
            if i > 1:
                levels.append(downsample2(levels[-1]))
            m = p.mpp * 2**i
            tif.write(levels[-1], tile=tile, photometric="rgb", subfiletype=1,
                      resolution=(1e4 / m, 1e4 / m), resolutionunit="CENTIMETER", metadata=None, **comp)
    return ([level0] if level0 is not None else []) + levels


def _write_pngs(spatial: Path, pyramid: list[np.ndarray], *, geo: _Geometry, scales: tuple[float, float]) -> None:
    """``tissue_hires_image.png`` / ``tissue_lowres_image.png`` from the smallest level still large enough."""
    for name, s in zip(("hires", "lowres"), scales):
        size = (max(1, round(geo.width * s)), max(1, round(geo.height * s)))
        src = [lv for lv in pyramid if max(lv.shape[:2]) >= max(size)]
        _save_png(_resize(src[-1] if src else pyramid[0], size), spatial / f"tissue_{name}_image.png")


@dataclass(frozen=True)
class Layout:
    """How a synthetic section lies on its slide (the defaults give the classic single section).

    ``rotation_deg``: rotation of the spot array on the image (degrees; ``None``: a small random one).
    ``alpha_range_deg``: range (degrees) of the direction in which cortical depth increases (tissue
    arrangement). ``blob_scale``: (x, y) half-axes of the tissue blob as fractions of the lattice extent.
    ``shift_px``: (x, y) background pixels before the section on the canvas (its placement on the slide);
    ``pad_px``: (x, y) background pixels after it.
    """

    rotation_deg: float | None = None
    alpha_range_deg: tuple[float, float] = (40.0, 60.0)
    blob_scale: tuple[float, float] = (0.6, 0.6)
    shift_px: tuple[int, int] = (0, 0)
    pad_px: tuple[int, int] = (0, 0)


def resolve_preset(preset: str | SynthPreset) -> tuple[SynthPreset, str]:
    """``(preset, name)`` for a preset name or a :class:`SynthPreset` (named ``"custom"``)."""
    if isinstance(preset, SynthPreset):
        return preset, "custom"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset], preset


def check_platform(platform: str) -> Platform:
    """``platform`` if it is one of :data:`~hishrst_runtime.core.vocab.PLATFORMS`, else a ``ValueError``."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose one of {list(PLATFORMS)}")
    return platform  # type: ignore[return-value]


def canvas_px(um: tuple[float, float], mpp: float, *, what: str) -> tuple[int, int]:
    """(x, y) µm → whole pixels at ``mpp`` µm/px (rounded); ``ValueError`` for negative values."""
    if len(um) != 2 or min(um) < 0:
        raise ValueError(f"{what} must be two non-negative µm values (x, y), got {um!r}")
    return int(round(um[0] / mpp)), int(round(um[1] / mpp))


def make_synthetic_visium(
    out_dir: str | Path,
    *,
    preset: Literal["small", "dlpfc"] | SynthPreset = "small",
    seed: int = 0,
    compression: Literal["jpeg", "zlib"] = "jpeg",
    shift_um: tuple[float, float] = (0.0, 0.0),
    canvas_pad_um: tuple[float, float] = (0.0, 0.0),
    rotation_deg: float | None = None,
    platform: Platform = DEFAULT_PLATFORM,
) -> Path:
    """Write a synthetic Visium section under ``out_dir`` and return its ``outs`` directory.

    ``preset="small"``: 18 × 30 lattice (270 spots, ≈ 230 in tissue), 300 genes, 0.6 µm/px,
    ≈ 2.8k × 2.8k-px image. ``preset="dlpfc"``: 78 × 128 lattice (≈ 4,000 of 4,992 spots in
    tissue), 2,000 genes, 0.5705 µm/px (``spot_diameter_fullres`` ≈ 96.4 px), ≈ 11.7k × 12.3k image,
    < 1 GB RAM, ~90 MB on disk. A :class:`SynthPreset` may be passed instead of a name.
    ``compression`` is that of the TIFF tiles. Files and arrays are identical for identical arguments.

    ``shift_um`` (x, y; µm, ≥ 0) places the section that far from the image origin on a larger canvas
    of background glass, and ``canvas_pad_um`` (x, y; µm, ≥ 0) adds background after it: the section's
    pixels are those of the unshifted section (rounded to whole pixels, so the shift actually applied,
    ``truth["shift_um"]``, is a multiple of the pixel size; use ``compression="zlib"`` for pixel-exact
    copies — JPEG blocks depend on the tile grid). ``rotation_deg`` sets the rotation of the spot array
    on the image (degrees; default: a small random one). ``platform="visium-hd"`` writes Space Ranger 3's
    ``outs/binned_outputs/square_008um`` and ``square_016um`` instead of the spot ``outs``
    (:mod:`hishrst_train.synth.hd`); every section also gets ``truth_bins.npz`` (:mod:`hishrst_train.synth.bins`).
    """
    p, name = resolve_preset(preset)
    ss = np.random.SeedSequence([int(seed), 0x5EED])
    rng_geo, rng_nuc, rng_tex, rng_gene, rng_count = (np.random.default_rng(s) for s in ss.spawn(5))
    gp = _gene_programme(p.n_genes, rng_gene)
    layout = Layout(rotation_deg=rotation_deg, shift_px=canvas_px(shift_um, p.mpp, what="shift_um"),
                    pad_px=canvas_px(canvas_pad_um, p.mpp, what="canvas_pad_um"))
    return write_section(out_dir, p=p, gp=gp, rngs=(rng_geo, rng_nuc, rng_tex, rng_count), layout=layout,
                         seed=int(seed), name=name, compression=compression, library_id=f"synthetic_{name}_{seed}",
                         platform=check_platform(platform))


def write_section(out_dir: str | Path, *, p: SynthPreset, gp: dict[str, np.ndarray],
                  rngs: tuple[np.random.Generator, ...], layout: Layout, seed: int, name: str,
                  compression: Literal["jpeg", "zlib"], library_id: str, render_seed: int | None = None,
                  extra_truth: dict[str, Any] | None = None, platform: Platform = DEFAULT_PLATFORM) -> Path:
    """Write one section with the gene programme ``gp`` (shared by sections of one expression model).

    ``rngs``: generators for geometry and tissue, nuclei, texture and counts; ``render_seed`` keys the
    image grain (default ``seed``) and the Visium HD counts. ``platform``: ``visium`` writes Space Ranger's
    spot ``outs``, ``visium-hd`` its ``outs/binned_outputs/`` (:mod:`hishrst_train.synth.hd`); both write
    ``truth.npz`` and ``truth_bins.npz``. Returns the ``outs`` directory.
    """
    rng_geo, rng_nuc, rng_tex, rng_count = rngs
    out_dir = Path(out_dir)
    outs = out_dir / "outs"
    outs.mkdir(parents=True, exist_ok=True)
    sec = _geometry(p, rng_geo, rotation_deg=layout.rotation_deg)
    tissue = _Tissue(p, rng_geo, sec.box, alpha_range_deg=layout.alpha_range_deg, blob_scale=layout.blob_scale)
    geo = _on_canvas(sec, layout)
    spots = spot_model(tissue, geo.spot_um)
    barcodes = _barcodes(len(geo.rows))
    order = np.flatnonzero(spots.in_tissue)  # in-tissue spots, sorted by barcode like Space Ranger
    order = order[np.argsort(barcodes[order], kind="stable")]
    mean, lib, counts = spot_counts(p, tissue, gp, spots, geo.spot_um, order, rng_count)
    (sx, sy) = layout.shift_px
    bins = bin_inputs(tissue, affine=geo.affine, image_wh=(geo.width, geo.height), mpp=p.mpp,
                      section_box_px=(sx, sy, sx + sec.width, sy + sec.height))
    model = BinModel.from_programme(gp, float(sum(p.layer_um)))
    rseed = seed if render_seed is None else int(render_seed)
    if platform == DEFAULT_PLATFORM:
        (outs / "spatial").mkdir(exist_ok=True)
        scales = _write_spaceranger(outs, p=p, geo=geo, spots=spots, gp=gp, barcodes=barcodes, order=order,
                                    counts=counts, library_id=library_id)
        png_dirs = [outs / "spatial"]
    else:
        scales = png_scales(geo.width, geo.height)
        png_dirs = write_visium_hd(outs, p=p, gp=gp, bins=bins, model=model, scales=scales, library_id=library_id,
                                   rng=np.random.default_rng(np.random.SeedSequence([int(seed), 0x4844, rseed])))
    ren: Any = Renderer(tissue, make_nuclei(tissue, sec.box, rng_nuc), sec.affine, (sec.height, sec.width), p.mpp,
                        rng_tex, sec.box, rseed)
    if (geo.width, geo.height) != (sec.width, sec.height):
        ren = CanvasRenderer(ren, shape=(geo.height, geo.width), offset_px=layout.shift_px, seed=rseed)
    desc = json.dumps({"mpp": p.mpp, "generator": "hishrst.synth", "preset": name, "seed": int(seed)})
    pyramid = _write_tiff(out_dir / "image.tif", ren, geo=geo, p=p, description=desc, compression=compression)
    for d in png_dirs:
        _write_pngs(d, pyramid, geo=geo, scales=scales)
    truth = _truth_arrays(p=p, gp=gp, geo=geo, sec=sec, layout=layout, spots=spots, barcodes=barcodes, order=order,
                          mean=mean, lib=lib, seed=seed, name=name)
    _save_npz(out_dir / "truth.npz", {**truth, **(extra_truth or {})})
    _save_npz(out_dir / BINS_FILE, {**bins, **model.arrays()})
    log.info("synthetic %s %s (seed %d): %d/%d spots in tissue, %d bins of 8 µm with tissue, image %d×%d px",
             platform, name, seed, len(order), len(geo.rows), len(bins["bin_rc"]), geo.width, geo.height)
    return outs


def _truth_arrays(*, p: SynthPreset, gp: dict[str, np.ndarray], geo: _Geometry, sec: _Geometry, layout: Layout,
                  spots: SpotModel, barcodes: np.ndarray, order: np.ndarray, mean: np.ndarray, lib: np.ndarray,
                  seed: int, name: str) -> dict[str, Any]:
    """The arrays of ``truth.npz`` (see :mod:`hishrst_train.synth`)."""
    return {
        "barcodes": barcodes[order].astype(str), "region_names": np.asarray(REGION_NAMES),
        "region_fractions": spots.frac[order].astype(np.float32), "tissue_fraction": spots.tfrac[order].astype(np.float32),
        "depth_um": spots.depth[order].astype(np.float32), "expected_means": mean.astype(np.float32),
        "library_size": lib.astype(np.float32), "spot_xy_px": geo.spot_px[order],
        "gene_names": gp["names"].astype(str), "gene_ids": gp["ids"].astype(str), "gene_kind": gp["kind"].astype(str),
        "marker_region": gp["marker_region"], "region_log_means": gp["logmu"].astype(np.float32),
        "affine_um_to_px": geo.affine, "mpp": np.float64(p.mpp), "image_shape": np.array([geo.height, geo.width, 3]),
        "seed": np.int64(seed), "preset": np.str_(name),
        "shift_px": np.array(layout.shift_px, np.int64), "shift_um": np.array(layout.shift_px, np.float64) * p.mpp,
        "canvas_pad_px": np.array(layout.pad_px, np.int64),
        "rotation_deg": np.float64(np.degrees(np.arctan2(sec.affine[1, 0], sec.affine[0, 0]))),
    }


def _resize(a: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(a).resize(size_wh, Image.Resampling.LANCZOS))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fast (level-1) deflate; readable by ``np.load``."""
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, val in arrays.items():
            with zf.open(f"{key}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(val), allow_pickle=False)


def _save_png(a: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(a).save(path, compress_level=1)


def load_truth(out_dir: str | Path) -> dict[str, np.ndarray]:
    """The generator's ground truth (``out_dir/truth.npz``, or next to an ``outs`` dir) as a dict."""
    path = Path(out_dir)
    if path.name == "outs":
        path = path.parent
    with np.load(path / "truth.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
