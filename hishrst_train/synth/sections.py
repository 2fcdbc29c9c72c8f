"""Several synthetic sections of one expression model, laid out differently on their slides.

:func:`make_synthetic_sections` writes ``n_sections`` complete Space-Ranger-like datasets (see
:mod:`hishrst_train.synth`) that share the genes, the gene programme (region → expression, gradients,
dispersions) and the rendering of each region — so one image → expression relation holds on all of them —
but differ in what a model should not depend on: tissue shape (blob and pia curvature), arrangement (the
direction in which cortical depth increases), rotation of the spot array on the image and placement of the
section on a larger slide (an offset of up to ``max_shift_um`` µm of background glass).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from hishrst_runtime.core.vocab import DEFAULT_PLATFORM, Platform
from hishrst_train.synth.model import SynthPreset, _gene_programme
from hishrst_train.synth.writer import Layout, canvas_px, check_platform, load_truth, resolve_preset, write_section

__all__ = ["make_synthetic_sections", "SECTIONS_FILE"]

#: Summary of a multi-section dataset, written in its root directory.
SECTIONS_FILE = "sections.json"


def _layout(rng: np.random.Generator, p: SynthPreset, *, max_shift_um: float, rotate: bool) -> Layout:
    """A random layout: rotation in [-180°, 180°) (``rotate``), any depth direction, blob 0.45–0.65 of the
    lattice extent, offset on the slide uniform in [0, ``max_shift_um``] µm per axis."""
    rotation = float(rng.uniform(-180.0, 180.0)) if rotate else None
    alpha = float(rng.uniform(0.0, 360.0))
    blob = (float(rng.uniform(0.45, 0.65)), float(rng.uniform(0.45, 0.65)))
    shift = canvas_px(tuple(rng.uniform(0.0, max_shift_um, 2)), p.mpp, what="shift")  # type: ignore[arg-type]
    return Layout(rotation_deg=rotation, alpha_range_deg=(alpha, alpha), blob_scale=blob, shift_px=shift)


def make_synthetic_sections(
    out_dir: str | Path,
    n_sections: int,
    *,
    seed: int = 0,
    preset: Literal["small", "dlpfc"] | SynthPreset = "small",
    max_shift_um: float = 2000.0,
    rotate: bool = True,
    compression: Literal["jpeg", "zlib"] = "jpeg",
    platform: Platform = DEFAULT_PLATFORM,
) -> list[Path]:
    """Write ``n_sections`` sections sharing one expression model; return their ``outs`` directories.

    Section ``k`` is written to ``out_dir/section_<k>/`` (``image.tif``, ``truth.npz``, ``outs/``), each
    readable on its own by :func:`hishrst_train.data.read_visium`; ``out_dir/sections.json`` lists them
    with their layouts. The gene programme is that of ``make_synthetic_visium(seed=seed)`` with the same
    preset. Per section (deterministic from ``seed`` and ``k``): tissue shape and arrangement, array
    rotation (any angle if ``rotate``, else a small random one, ±0.6°), offset on the slide (uniform in
    [0, ``max_shift_um``] µm per axis, whole pixels), nuclei, texture and counts.
    ``preset``: a name or a :class:`SynthPreset`; ``compression``: the TIFF tiles'; ``platform``: the
    layout of each section's ``outs`` (``visium`` spots or ``visium-hd`` bins, see
    :func:`~hishrst_train.synth.make_synthetic_visium`).
    """
    if int(n_sections) < 1:
        raise ValueError(f"n_sections must be ≥ 1, got {n_sections}")
    if not max_shift_um >= 0:
        raise ValueError(f"max_shift_um must be ≥ 0 µm, got {max_shift_um}")
    p, name = resolve_preset(preset)
    platform = check_platform(platform)
    out_dir = Path(out_dir)
    gp = _gene_programme(p.n_genes, np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]).spawn(5)[3]))
    outs, summary = [], []
    for k in range(int(n_sections)):
        ss = np.random.SeedSequence([int(seed), 0x5EED, 1 + k])
        rng_layout, rng_geo, rng_nuc, rng_tex, rng_count = (np.random.default_rng(s) for s in ss.spawn(5))
        layout = _layout(rng_layout, p, max_shift_um=max_shift_um, rotate=rotate)
        render_seed = int(ss.generate_state(1)[0])
        o = write_section(out_dir / f"section_{k}", p=p, gp=gp, rngs=(rng_geo, rng_nuc, rng_tex, rng_count),
                          layout=layout, seed=int(seed), name=name, compression=compression,
                          library_id=f"synthetic_{name}_{seed}_section{k}", render_seed=render_seed,
                          extra_truth={"section": np.int64(k), "n_sections": np.int64(n_sections)}, platform=platform)
        outs.append(o)
        rotation = float(load_truth(o)["rotation_deg"])
        summary.append({"section": k, "outs": str(o.relative_to(out_dir)), "rotation_deg": rotation,
                        "depth_direction_deg": layout.alpha_range_deg[0], "blob_scale": list(layout.blob_scale),
                        "shift_px": list(layout.shift_px), "shift_um": [v * p.mpp for v in layout.shift_px]})
    (out_dir / SECTIONS_FILE).write_text(json.dumps(
        {"generator": "hishrst.synth", "preset": name, "seed": int(seed), "mpp": p.mpp, "n_genes": p.n_genes,
         **({} if platform == DEFAULT_PLATFORM else {"platform": platform}),
         "shared": "genes, gene programme and region rendering (one image → expression relation)",
         "sections": summary}, indent=2))
    return outs
