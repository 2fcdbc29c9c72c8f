"""Scoring sub-spot maps against the synthetic 8 µm truth, beside the two ways to get density without them.

On a window of a synthetic section (``hishrst synth`` writes the expected expression of every 8 µm bin,
:func:`hishrst_train.synth.bin_truth`), three predictions of the same bins are scored per gene (PCC, MSE,
SSIM of the gene maps) at 8 µm and at 16 µm (2 × 2 bins pooled in count space):

* ``subspot`` — the sub-spot run's tiles on the bin lattice (one encoder pass per tile, the central
  ``keep × keep`` tokens become bins; the runtime's :func:`~hishrst_runtime.core.tokens.tile_lattice`);
* ``interpolated_spots`` — a spot run's predictions at the section's Visium spots, linearly interpolated to
  the bin centres (nearest spot outside their convex hull): the cheap alternative;
* ``spot_grid_16um`` — the spot run at a 16 µm grid of query points (one encoder pass per 16 µm block,
  each 8 µm bin taking its block's value): today's way to get density.

The window is a square of ``window_um`` µm around the centroid of the section's tissue; bins count when at
least half of their area is tissue. Costs are reported as encoder passes per mm² of the window's tissue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.core.errors import InputError
from hishrst_runtime.core.tokens import TokenGeometry, lattice_shape, pool_bins_log1p, tile_lattice
from hishrst_train.metrics import gene_map_ssim, per_gene_metrics, summarise

__all__ = ["BinWindow", "choose_window", "subspot_bin_map", "interpolated_bin_map", "grid16_bin_map", "score_maps",
           "score_bins", "write_scores", "format_bin_scores", "window_truth", "METHODS"]

METHODS = ("subspot", "interpolated_spots", "spot_grid_16um")


@dataclass(frozen=True)
class BinWindow:
    """Bins ``[r0, r0 + rows) × [c0, c0 + cols)`` of a section's 8 µm truth lattice (side ``bin_px`` px at
    ``mpp`` µm/px; rows and columns even, so 16 µm blocks tile it); ``valid`` marks bins that are tissue."""

    r0: int
    c0: int
    valid: np.ndarray
    bin_px: float
    mpp: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.valid.shape  # type: ignore[return-value]

    def box_px(self) -> tuple[float, float, float, float]:
        rows, cols = self.shape
        return (self.c0 * self.bin_px, self.r0 * self.bin_px, (self.c0 + cols) * self.bin_px,
                (self.r0 + rows) * self.bin_px)

    def centres_px(self, size: int = 1) -> np.ndarray:
        """``[rows/size, cols/size, 2]`` (x, y) px centres of the window's bins (``size=2``: 16 µm blocks)."""
        rows, cols = self.shape
        r = (self.r0 + (np.arange(rows // size) + 0.5) * size) * self.bin_px
        c = (self.c0 + (np.arange(cols // size) + 0.5) * size) * self.bin_px
        return np.stack(np.meshgrid(c, r), axis=-1)

    @property
    def tissue_mm2(self) -> float:
        return float(self.valid.sum()) * (self.bin_px * self.mpp) ** 2 * 1e-6


def choose_window(bins: Any, *, mpp: float, bin_um: float = 8.0, window_um: float = 2000.0) -> BinWindow:
    """The ``window_um`` square (bins, an even number per side) around the tissue centroid of the truth
    table ``bins`` (``array_row``, ``array_col``, ``tissue_fraction``: :func:`hishrst_train.synth.bin_truth`)."""
    tissue = bins[bins["tissue_fraction"].to_numpy() >= 0.5]
    if len(tissue) == 0:
        raise InputError("the section's 8 µm truth has no tissue bins; is it a hishrst synth section?")
    n = max(2, int(round(window_um / bin_um)) // 2 * 2)
    rc = tissue[["array_row", "array_col"]].to_numpy()
    r0, c0 = (np.round(rc.mean(0)).astype(int) - n // 2).clip(0)
    valid = np.zeros((n, n), bool)
    inside = (rc[:, 0] >= r0) & (rc[:, 0] < r0 + n) & (rc[:, 1] >= c0) & (rc[:, 1] < c0 + n)
    valid[rc[inside, 0] - r0, rc[inside, 1] - c0] = True
    return BinWindow(r0=int(r0), c0=int(c0), valid=valid, bin_px=bin_um / mpp, mpp=float(mpp))


def subspot_bin_map(model: Any, geometry: TokenGeometry, sec: Any, encoder: Any, window: BinWindow, *,
                    batch_size: int = 32) -> tuple[np.ndarray, int]:
    """The sub-spot head's ``[rows, cols, genes]`` map of ``window`` (NaN off the tiles) and its encoder passes."""
    from hishrst_train.subspot_fit import section_tokens
    from hishrst_train.subspot_train import predict_tokens

    if abs(geometry.pitch_um - window.bin_px * window.mpp) > 1e-6:
        raise InputError(f"the run's tokens are {geometry.pitch_um} µm, the truth's bins {window.bin_px * window.mpp} µm")
    box = window.box_px()
    k = geometry.keep
    need = np.zeros(lattice_shape(box, geometry, mpp=sec.mpp), bool)
    vr, vc = np.nonzero(window.valid)
    need[vr // k, vc // k] = True
    lat = tile_lattice(box, geometry, mpp=sec.mpp, keep_tile=need)
    rows, cols = window.shape
    out = np.full((lat.n_bins[0], lat.n_bins[1], model.config.n_genes), np.nan, np.float32)
    m = geometry.margin
    for i in range(0, len(lat.centres_px), batch_size):
        tok = section_tokens(sec, lat.centres_px[i:i + batch_size], encoder=encoder, geometry=geometry,
                             batch_size=batch_size, cache_dir=None)
        pred = predict_tokens(model, tok.tokens)[:, m:m + k, m:m + k]
        for j, p in enumerate(pred):
            tr, tc = lat.tile_rc[i + j]
            out[tr * k:(tr + 1) * k, tc * k:(tc + 1) * k] = p
    return out[:rows, :cols], len(lat.centres_px)


def interpolated_bin_map(spot_pred: np.ndarray, spot_xy_px: np.ndarray, window: BinWindow) -> np.ndarray:
    """Spot predictions ``[n_spots, genes]`` at ``spot_xy_px`` linearly interpolated to the window's bins
    (nearest spot outside the spots' convex hull) → ``[rows, cols, genes]``."""
    from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

    xy = window.centres_px().reshape(-1, 2)
    lin = LinearNDInterpolator(spot_xy_px, spot_pred)(xy)
    miss = np.isnan(lin).any(axis=1)
    if miss.any():
        lin[miss] = NearestNDInterpolator(spot_xy_px, spot_pred)(xy[miss])
    return lin.reshape(*window.shape, -1).astype(np.float32)


def grid16_bin_map(predict_points: Any, window: BinWindow) -> tuple[np.ndarray, int]:
    """``predict_points(centres_px [n, 2]) -> [n, genes]`` (the spot run at query points) at the centres of the
    window's 16 µm blocks that hold tissue; each 8 µm bin takes its block's value → map and encoder passes."""
    centres = window.centres_px(2)
    rows, cols = window.shape
    block = window.valid.reshape(rows // 2, 2, cols // 2, 2).any(axis=(1, 3))
    pred = predict_points(centres[block])
    out = np.full((rows // 2, cols // 2, pred.shape[1]), np.nan, np.float32)
    out[block] = pred
    return np.repeat(np.repeat(out, 2, axis=0), 2, axis=1), int(block.sum())


def _score(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray, *, ssim_genes: np.ndarray) -> dict[str, Any]:
    m = per_gene_metrics(pred[valid], truth[valid])
    out = summarise(m)
    rr, cc = np.nonzero(valid)
    ssim = gene_map_ssim(pred[valid][:, ssim_genes], truth[valid][:, ssim_genes], rr, cc, lattice="square")
    out["ssim_mean"] = float(np.nanmean(ssim)) if len(ssim) else float("nan")
    out["pcc_per_gene"] = m["pcc"]
    return out


def score_maps(truth: np.ndarray, maps: dict[str, np.ndarray], window: BinWindow, *, n_ssim_genes: int = 50
               ) -> dict[str, Any]:
    """Per-method scores at 8 µm and (pooled 2 × 2 in count space) 16 µm over the window's tissue bins;
    SSIM over the ``n_ssim_genes`` genes whose truth varies most (a stated rule, the same for every method)."""
    valid8 = window.valid & np.all([np.isfinite(m).all(axis=-1) for m in maps.values()], axis=0)
    var = np.nanvar(np.where(valid8[..., None], truth, np.nan), axis=(0, 1))
    ssim_genes = np.argsort(-var)[:n_ssim_genes]
    rows, cols = window.shape
    valid16 = valid8.reshape(rows // 2, 2, cols // 2, 2).all(axis=(1, 3))
    fill = lambda a: np.where(valid8[..., None], a, 0.0)  # noqa: E731 - pooling needs finite values
    out: dict[str, Any] = {"8um": {}, "16um": {}}
    for name, m in maps.items():
        out["8um"][name] = _score(m, truth, valid8, ssim_genes=ssim_genes)
        out["16um"][name] = _score(pool_bins_log1p(fill(m), 2), pool_bins_log1p(fill(truth), 2), valid16,
                                   ssim_genes=ssim_genes)
    out["n_bins"] = {"8um": int(valid8.sum()), "16um": int(valid16.sum())}
    return out


def write_scores(folder: Path, scores: dict[str, Any], genes: list[str]) -> None:
    """``metrics.json`` (summaries) and ``per_gene.csv`` (PCC per gene, method and bin size) into ``folder``."""
    import json

    import pandas as pd

    from hishrst_runtime.core.files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame({f"pcc_{size}_{name}": s["pcc_per_gene"] for size in ("8um", "16um")
                          for name, s in scores[size].items()}, index=pd.Index(genes, name="gene"))
    atomic_write(folder / "per_gene.csv", table.to_csv().encode())
    slim = {k: ({m: {kk: vv for kk, vv in s.items() if kk != "pcc_per_gene"} for m, s in v.items()}
                if k in ("8um", "16um") else v) for k, v in scores.items()}
    atomic_write(folder / "metrics.json", json.dumps(slim, indent=2).encode())


def _run_with_encoder(run_dir: str | Path, *, device: str) -> tuple[Any, Any, Any]:
    from hishrst_train.evaluate import _load_encoder
    from hishrst_train.train import load_run

    model, config = load_run(run_dir)
    return model, config, _load_encoder(config, device)


def _grid_predictor(model: Any, config: Any, sec: Any, enc: Any, *, batch_size: int) -> Any:
    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.fitting import section_features, spot_positions
    from hishrst_train.train import predict

    def run(centres: np.ndarray) -> np.ndarray:
        feats = section_features(sec, centres, encoder=enc, patch_um=config.patch["size_um"], batch_size=batch_size,
                                 cache_dir=None, progress=False)
        pos = spot_positions(centres, mpp=sec.mpp, mode=config.position["mode"])
        return predict(model, feats, pos, groups=group_points(centres, max_size=config.grouping["max_size"]))

    return run


def score_bins(subspot_run: str | Path, section: str | Path, *, spot_run: str | Path, window_um: float = 2000.0,
               out: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
               figure: bool = True) -> dict[str, Any]:
    """Score a sub-spot run on a synthetic section's 8 µm truth beside a spot run's two alternatives (module
    docstring). ``section``: a ``hishrst synth`` section folder (or its ``outs``). Writes ``metrics.json`` and
    ``per_gene.csv`` (and, with ``figure``, ``figure.png``: :mod:`hishrst_train.bins_figure`) into ``out``
    (default ``SUBSPOT_RUN/eval_bins/<section>``) and returns the scores."""
    from hishrst_train.evaluate import _spot_predictions
    from hishrst_train.synth import bin_truth
    from hishrst_train.tasks import open_sections

    sub_model, sub_cfg, sub_enc = _run_with_encoder(subspot_run, device=device)
    if sub_cfg.head_kind != "subspot":
        raise InputError(f"{subspot_run}: a {sub_cfg.head_kind} run; bin scoring needs a `hishrst fit --head subspot` run")
    spot_model, spot_cfg, spot_enc = _run_with_encoder(spot_run, device=device)
    genes = [g for g in sub_cfg.genes if g in set(spot_cfg.genes)]
    if not genes:
        raise InputError(f"{subspot_run} and {spot_run} share no genes; train both on the same sections")
    sec = open_sections([str(section)])[0]
    geometry = TokenGeometry.from_dict(sub_cfg.tokens or {})
    table, _ = bin_truth(section, genes[:1])
    window = choose_window(table, mpp=sec.mpp, bin_um=geometry.pitch_um, window_um=window_um)
    truth = window_truth(section, genes, table, window)
    sub_map, tiles = subspot_bin_map(sub_model, geometry, sec, sub_enc, window, batch_size=batch_size)
    spot_pred = _spot_predictions(spot_model, spot_cfg, sec, spot_enc, batch_size=batch_size, cache_dir=None,
                                  progress=False)[1]
    grid_map, points = grid16_bin_map(_grid_predictor(spot_model, spot_cfg, sec, spot_enc, batch_size=batch_size), window)
    si, pi = [sub_cfg.genes.index(g) for g in genes], [spot_cfg.genes.index(g) for g in genes]
    maps = {"subspot": sub_map[..., si], "interpolated_spots": interpolated_bin_map(spot_pred[:, pi], sec.xy, window),
            "spot_grid_16um": grid_map[..., pi]}
    scores = score_maps(truth, maps, window)
    mm2 = window.tissue_mm2
    scores["cost"] = {"window_tissue_mm2": round(mm2, 4), "encoder_passes": {"subspot": tiles, "spot_grid_16um": points},
                      "passes_per_mm2": {"subspot": tiles / mm2, "spot_grid_16um": points / mm2}}
    scores["window"] = {"um": window_um, "r0": window.r0, "c0": window.c0, "shape": list(window.shape)}
    folder = Path(out) if out is not None else Path(subspot_run) / "eval_bins" / Path(sec.name).name
    if figure:
        from hishrst_train.bins_figure import subspot_figure

        scores["figure"] = subspot_figure(folder / "figure.png", sec=sec, window=window, truth=truth, maps=maps,
                                          genes=genes, title=f"{sec.name}: ")
    write_scores(folder, scores, genes)
    return scores


def window_truth(section: str | Path, genes: list[str], table: Any, window: BinWindow) -> np.ndarray:
    """The expected log-expression ``[rows, cols, genes]`` of the window's bins (NaN where no truth bin)."""
    from hishrst_train.synth import bin_truth

    rc = table[["array_row", "array_col"]].to_numpy() - np.array([window.r0, window.c0])
    rows, cols = window.shape
    inside = np.flatnonzero((rc[:, 0] >= 0) & (rc[:, 0] < rows) & (rc[:, 1] >= 0) & (rc[:, 1] < cols))
    _, values = bin_truth(section, genes, rows=inside, renormalise=True)  # the targets' scale: over the run's genes
    out = np.full((rows, cols, len(genes)), np.nan, np.float32)
    out[rc[inside, 0], rc[inside, 1]] = values
    return out


def format_bin_scores(scores: dict[str, Any]) -> list[str]:
    """The console table of :func:`score_bins`: mean per-gene PCC and SSIM per method and bin size, the cost."""
    lines = [f"{'method':<22} {'PCC 8µm':>8} {'SSIM 8µm':>9} {'PCC 16µm':>9} {'SSIM 16µm':>10}"]
    for m in METHODS:
        a, b = scores["8um"][m], scores["16um"][m]
        lines.append(f"{m:<22} {a['pcc_mean']:>8.3f} {a['ssim_mean']:>9.3f} {b['pcc_mean']:>9.3f} {b['ssim_mean']:>10.3f}")
    per = scores["cost"]["passes_per_mm2"]
    lines.append(f"encoder passes per mm² of tissue: sub-spot {per['subspot']:.0f}, spot head at 16 µm "
                 f"{per['spot_grid_16um']:.0f} ({per['spot_grid_16um'] / per['subspot']:.1f}× more)")
    if "figure" in scores:
        lines.append(f"figure: {scores['figure']['figure']} (gene {scores['figure']['gene']}: {scores['figure']['rule']})")
    return lines
