"""The demo's sub-spot part: 8 µm expression of the unseen section from one encoder pass per tile.

fit ``--head subspot`` on sections 0 and 1 (``test-vit-uni``: UNI's token geometry, random weights — allowed here
on purpose) → export its bundle → ``hishrst-run --resolution 8um`` over section 2's slide → on a 2 mm window of
its tissue, the runtime's 8 µm bins and the spot model's predictions at the section's spots (interpolated to the
bins) are scored against the generator's 8 µm truth, and one gene is drawn (H&E, truth, interpolated, sub-spot;
the gene chosen by :data:`hishrst_train.bins_figure.GENE_RULE`, never by a score).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SUBSPOT_ENCODER", "run_subspot_steps"]

SUBSPOT_ENCODER = "test-vit-uni"
#: Side of the scored and drawn window of the unseen section's tissue (µm).
WINDOW_UM = 2000.0


def _bins_map(store: Path, window: Any, genes: list[str]) -> np.ndarray:
    """The runtime's 8 µm bins of ``genes`` on the window (NaN where the run wrote no bin). Only the window's rows
    of X are read (a slide's X is hundreds of thousands of bins × all genes)."""
    import zarr
    from anndata.io import read_elem

    root = zarr.open_group(str(store), mode="r")
    obs = read_elem(root["obs"])
    names = list(read_elem(root["var"]).index)
    rc = np.stack([obs["array_row"].to_numpy(), obs["array_col"].to_numpy()], axis=1) - [window.r0, window.c0]
    rows, cols = window.shape
    inside = np.flatnonzero((rc >= 0).all(axis=1) & (rc[:, 0] < rows) & (rc[:, 1] < cols))
    out = np.full((rows, cols, len(genes)), np.nan, np.float32)
    if len(inside):
        x = root["X"].oindex[inside, :]
        out[rc[inside, 0], rc[inside, 1]] = np.asarray(x, np.float32)[:, [names.index(g) for g in genes]]
    return out


def _score(out: Path, section: Path, at_spots: Path, bins: Path, genes: list[str]) -> dict[str, Any]:
    """Scores of both maps on the window, and the figure."""
    import anndata as ad

    from hishrst_train.bins_eval import window_truth, choose_window, interpolated_bin_map, score_maps
    from hishrst_train.bins_figure import subspot_figure
    from hishrst_train.synth import bin_truth
    from hishrst_train.tasks import open_sections

    sec = open_sections([str(section / "outs")])[0]
    table, _ = bin_truth(section, genes[:1])
    window = choose_window(table, mpp=sec.mpp, window_um=WINDOW_UM)
    truth = window_truth(section, genes, table, window)
    spots = ad.read_zarr(at_spots)
    maps = {"subspot": _bins_map(bins, window, genes),
            "interpolated_spots": interpolated_bin_map(np.asarray(spots[:, genes].X, np.float32),
                                                       np.asarray(spots.obsm["spatial"]), window)}
    scores = score_maps(truth, maps, window)
    fig = subspot_figure(out / "demo_subspot.png", sec=sec, window=window, truth=truth, maps=maps, genes=genes,
                         title="unseen section: ")
    return {"pcc_8um": {k: v["pcc_mean"] for k, v in scores["8um"].items()},
            "pcc_16um": {k: v["pcc_mean"] for k, v in scores["16um"].items()}, "figure": fig}


def run_subspot_steps(out: Path, *, sections: list[Path], slide: Path, at_spots: Path, genes: list[str],
                      epochs: int, seed: int, progress: bool, step: Any) -> dict[str, Any]:
    """The sub-spot steps (see the module docstring) into ``out``; returns the demo summary's ``subspot`` part."""
    from hishrst_export.bundle import export_bundle
    from hishrst_runtime.jobs.runner import run_slides
    from hishrst_train.runconfig import RunConfig
    from hishrst_train.tasks import fit_run

    t: dict[str, float] = {}
    t0 = step(f"8/9 sub-spot head: training on sections 0 and 1 at 8 µm tokens ({SUBSPOT_ENCODER}, ≤ {epochs} epochs), "
              "exporting its bundle")
    fit_run(sections[:2], out=out / "run_subspot", task="full", encoder=SUBSPOT_ENCODER, allow_test_encoder=True,
            head="subspot", epochs=epochs, seed=seed, progress=progress, overwrite=True)
    export_bundle(out / "run_subspot", out=out / "bundle_subspot", overwrite=True)
    t["fit_export"] = time.perf_counter() - t0
    trained = set(RunConfig.from_json(out / "run_subspot" / "config.json").genes)
    genes = [g for g in genes if g in trained]  # the same sections and seed select the same genes
    t0 = step("9/9 hishrst-run --resolution 8um over section 2's slide; scoring 8 µm bins against the truth")
    res = run_slides([slide], bundle_dir=out / "bundle_subspot", out_dir=out / "predictions_8um", provider="cpu",
                     overwrite=True, progress=progress, resolution="8um")[0]
    if res.status != "ok":
        raise RuntimeError(f"hishrst-run --resolution 8um failed on the demo slide: {res.reason}")
    t["run_8um"] = time.perf_counter() - t0
    scored = _score(out, sections[2].parent, at_spots, Path(res.output), genes)
    return {**scored, "bins": int(res.points), "bins_per_s": round(res.points / max(t["run_8um"], 1e-9)),
            "seconds": {k: round(v, 1) for k, v in t.items()}}
