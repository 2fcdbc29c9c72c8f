"""``hishrst evaluate``: metrics of a fitted run, on its own held-out spots or on sections it never saw.

* :func:`evaluate_run` scores a recovery run on its held-out spots and writes ``metrics.json`` and
  ``per_gene_metrics.csv`` into the run directory. Generation and full runs have no held-out spots.
* :func:`evaluate_on` predicts every measured spot of other sections (``hishrst evaluate RUN --on DATA``)
  and writes ``predictions.h5ad``, ``metrics.json`` and ``per_gene_metrics.csv`` into
  ``RUN/eval/<name>/`` — the run's own files are never touched.

Metrics: per gene PCC (constant genes counted, and scored 0 in ``pcc_mean_constant_as_zero``), MSE and
MAE pooled over all scored spots; SSIM of gene maps and k-means ARI against ``obs['layer']`` computed
per section (where array coordinates / layers exist) and averaged. Baselines beside the model:
``baseline_train_mean`` (each gene's mean over the run's training spots, from ``baseline.json``) and
``baseline_mean`` (the measured mean of the scored spots — optimistic, it sees the truth), and — when
the run has them — ``baseline_ridge`` (PCA-256 + ridge on the same embeddings, fitted on training spots:
:mod:`hishrst_train.baselines`) and, within a section, ``baseline_knn`` (position-only nearest training
spots). The per-gene table carries ``pcc_<baseline>`` / ``mse_<baseline>`` columns; ``warnings`` lists
where the model is worse than the training mean (MSE) or the ridge (PCC), and by how much.
:func:`format_scores` turns a summary into console lines (model and baselines side by side, then the warnings).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime.core.errors import InputError, OutputStateError
from hishrst_runtime.core.files import atomic_write
from hishrst_train.baselines import RIDGE_FILE, RidgeBaseline, baseline_warnings
from hishrst_train.metrics import gene_map_ssim, kmeans_ari, per_gene_metrics, summarise
from hishrst_runtime.core.vocab import TRANSFERABLE_POSITION_MODES
from hishrst_train.runconfig import RunConfig
from hishrst_train.rundir import RunLayout

__all__ = ["evaluate_run", "evaluate_on", "EvaluateError", "BASELINE_LAYERS", "format_scores", "score_rows"]

#: Layers of a predictions AnnData holding baseline predictions, by the baseline's name in the summary.
BASELINE_LAYERS = {"ridge": "baseline_ridge", "knn": "baseline_knn"}


class EvaluateError(InputError):
    """The run directory cannot be scored (generation/full run, missing predictions, not writable)."""


class MissingPredictionsError(EvaluateError, FileNotFoundError):
    """``predictions.h5ad`` is missing: the run is not a finished recovery run."""


def _read_h5ad(path: Path) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as e:
        raise EvaluateError(f"{path}: unreadable ({type(e).__name__}: {e}); re-run `hishrst fit`") from e


def _train_mean(run_dir: Path, genes: Sequence[str]) -> np.ndarray | None:
    """Each gene's training-spot mean from ``baseline.json`` (None for runs written before it existed)."""
    path = RunLayout(run_dir).baseline
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        means = dict(zip(d["genes"], d["train_mean"]))
        return np.array([means[g] for g in genes], dtype=np.float64)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluateError(f"{path}: unreadable ({type(e).__name__}: {e}); re-run `hishrst fit`") from e


def _by_section(obs: pd.DataFrame) -> list[np.ndarray]:
    if "section" not in obs:
        return [np.arange(len(obs))]
    sec = obs["section"].astype(str).to_numpy()
    return [np.flatnonzero(sec == s) for s in pd.unique(sec)]


def _ssim(pred: np.ndarray, truth: np.ndarray, obs: pd.DataFrame) -> np.ndarray | None:
    if not {"array_row", "array_col"} <= set(obs.columns):
        return None
    per = [gene_map_ssim(pred[r], truth[r], obs["array_row"].to_numpy()[r], obs["array_col"].to_numpy()[r])
           for r in _by_section(obs) if len(r) > 1]
    return np.nanmean(np.stack(per), axis=0) if per else None


def _ari(pred: np.ndarray, truth: np.ndarray, obs: pd.DataFrame) -> tuple[float, float] | None:
    if "layer" not in obs:
        return None
    labels = obs["layer"].astype(str).to_numpy()
    rows = [r for r in _by_section(obs) if len(np.unique(labels[r])) > 1 and len(r) > 2]
    if not rows:
        return None
    return (float(np.mean([kmeans_ari(pred[r], labels[r]) for r in rows])),
            float(np.mean([kmeans_ari(truth[r], labels[r]) for r in rows])))


def _score(res: ad.AnnData, *, train_mean: np.ndarray | None, ssim: bool, ari: bool
           ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Summary and per-gene table of ``res`` (X = prediction, ``layers['truth']`` = measured)."""
    pred = np.asarray(res.X, dtype=np.float64)
    truth = np.asarray(res.layers["truth"], dtype=np.float64)
    m = per_gene_metrics(pred, truth)
    summary: dict[str, Any] = {"model": summarise(m), "n_heldout_spots": int(res.n_obs)}
    per_gene = pd.DataFrame({"gene": res.var_names, "pcc": m["pcc"], "mse": m["mse"], "mae": m["mae"],
                             "constant": m["constant"]})
    s = _ssim(pred, truth, res.obs) if ssim else None
    if s is not None:
        per_gene["ssim"] = s
        summary["model"]["ssim_mean"] = float(np.nanmean(s))
    a = _ari(pred, truth, res.obs) if ari else None
    if a is not None:
        summary["ari_prediction"], summary["ari_measured"] = a
    summary["baseline_mean"] = summarise(per_gene_metrics(np.broadcast_to(truth.mean(0), truth.shape), truth))
    if train_mean is not None:
        tm = per_gene_metrics(np.broadcast_to(train_mean, truth.shape), truth)
        summary["baseline_train_mean"] = summarise(tm)
        per_gene["mse_train_mean"] = tm["mse"]
    for name, layer in BASELINE_LAYERS.items():
        if layer in res.layers:
            bm = per_gene_metrics(np.asarray(res.layers[layer], dtype=np.float64), truth)
            summary[f"baseline_{name}"] = summarise(bm)
            per_gene[f"pcc_{name}"], per_gene[f"mse_{name}"] = bm["pcc"], bm["mse"]
    summary["warnings"] = baseline_warnings(summary)
    return summary, per_gene


#: Rows of :func:`format_scores`: summary section → label (in this order; missing sections are skipped).
SCORE_ROWS = (("model", "model"), ("baseline_train_mean", "training mean"), ("baseline_ridge", "ridge (embeddings)"),
              ("baseline_knn", "kNN (positions)"), ("baseline_mean", "measured mean*"))


def score_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, metrics)`` of the model and each baseline present in ``summary``, in :data:`SCORE_ROWS` order."""
    return [(label, summary[key]) for key, label in SCORE_ROWS if isinstance(summary.get(key), dict)]


def format_scores(summary: dict[str, Any]) -> list[str]:
    """Console lines for a summary of :func:`evaluate_run` / :func:`evaluate_on`: the model beside the training
    mean, the ridge and (within a section) the kNN baseline — mean PCC (constant genes left out, and counted
    as 0: ``c=0``), MSE, MAE — then SSIM / ARI when computed, then one ``warning:`` line per warning."""
    def num(m: dict[str, Any], k: str) -> str:
        v = m.get(k)
        return f"{v:>12.4f}" if isinstance(v, (int, float)) and np.isfinite(v) else f"{'n/a':>12}"

    m = summary["model"]
    lines = [f"scored spots: {summary.get('n_heldout_spots', '?')}, genes: {m.get('n_genes', '?')} "
             f"(constant predictions: {m.get('n_constant', '?')})",
             f"{'':<22}{'PCC':>12}{'PCC (c=0)':>12}{'MSE':>12}{'MAE':>12}"]
    for label, r in score_rows(summary):
        lines.append(f"{label:<22}{num(r, 'pcc_mean')}{num(r, 'pcc_mean_constant_as_zero')}{num(r, 'mse_mean')}"
                     f"{num(r, 'mae_mean')}")
    lines.append("(* the measured mean of the scored spots: sees the truth, not a fair competitor)")
    if "ssim_mean" in m:
        lines.append(f"{'SSIM (mean)':<22}{m['ssim_mean']:>12.4f}")
    if "ari_prediction" in summary:
        lines.append(f"{'ARI k-means vs layers':<22}{summary['ari_prediction']:>12.4f}   (measured expression: "
                     f"{summary.get('ari_measured', float('nan')):.4f})")
    extra = [summary[k] for k in ("warning", "warning_genes") if summary.get(k)]
    lines += [f"warning: {w}" for w in list(summary.get("warnings", [])) + extra]
    return lines


def _ridge(run_dir: Path) -> RidgeBaseline | None:
    """The run's ridge baseline (None for runs written before it existed)."""
    path = run_dir / RIDGE_FILE
    if not path.is_file():
        return None
    try:
        return RidgeBaseline.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise EvaluateError(f"{path}: unreadable ({type(e).__name__}: {e}); re-run `hishrst fit`") from e


def _write(folder: Path, summary: dict[str, Any], per_gene: pd.DataFrame) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "per_gene_metrics.csv", per_gene.to_csv(index=False).encode())
        atomic_write(folder / "metrics.json", (json.dumps(summary, indent=2) + "\n").encode())
    except PermissionError as e:
        raise EvaluateError(f"{folder}: not writable ({e.strerror}); fix its permissions or copy the run") from e
    except OSError as e:
        raise OutputStateError(f"{folder}: cannot write the metrics ({e.strerror or e}); free space or copy the "
                               "run elsewhere") from e


def evaluate_run(run_dir: str | Path, *, ssim: bool = True, ari: bool = True) -> dict[str, Any]:
    """Score a recovery run on its held-out spots (per-gene PCC/MSE/MAE, SSIM, ARI); write and return the summary."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    pred_path, cfg_path = layout.predictions, layout.config
    task = RunConfig.from_json(cfg_path).task if cfg_path.is_file() else None
    if task == "generation" or (not pred_path.is_file() and layout.dense.is_file()):
        raise EvaluateError(f"{run_dir}: a generation run has no held-out spots to score; evaluate a "
                            "`--task recovery` run, or score other sections with --on DATA")
    if task == "full":
        raise EvaluateError(f"{run_dir}: a `--task full` run trained on every spot; score sections it never saw with "
                            f"`hishrst evaluate {run_dir} --on DATA`")
    if not pred_path.is_file():
        raise MissingPredictionsError(f"{pred_path}: missing; run `hishrst fit DATA --out {run_dir} --task recovery` "
                                      "first")
    res = _read_h5ad(pred_path)
    summary, per_gene = _score(res, train_mean=_train_mean(run_dir, list(res.var_names)), ssim=ssim, ari=ari)
    _write(run_dir, summary, per_gene)
    return summary


# ------------------------------------------------------------------------------------------ other sections


def _check_unseen(config: RunConfig, secs: list[Any]) -> None:
    trained = {str(Path(s["data"]).resolve()) for s in config.sections if s.get("data")}
    for s in secs:
        if str(s.spec.data.resolve()) in trained:
            raise EvaluateError(f"{s.spec.data}: the run was trained on this section; score its held-out spots with "
                                "`hishrst evaluate RUN` (recovery) or pass a section the run never saw")


def _load_encoder(config: RunConfig, device: str) -> Any:
    from hishrst_train.encoders.module import encoder_fingerprint
    from hishrst_train.tasks import load_run_encoder

    enc = load_run_encoder(config.encoder["name"], weights=config.weights, device=device)
    want = config.encoder.get("fingerprint")
    if want and encoder_fingerprint(enc) != want:
        raise EvaluateError(f"encoder {config.encoder['name']!r}: its weights ({config.weights or 'registry default'}) "
                            "differ from those the run was trained with; restore the original weights file")
    return enc


def _spot_predictions(model: Any, config: RunConfig, sec: Any, enc: Any, *, batch_size: int,
                      cache_dir: str | Path | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(CLS features, predictions) of every spot of ``sec``: the spot head in neighbour groups, or a sub-spot
    head's disk aggregate of the tokens of a tile around each spot."""
    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.tasks import section_features, spot_positions
    from hishrst_train.train import predict

    if config.head_kind == "subspot":
        from hishrst_runtime.core.tokens import TokenGeometry
        from hishrst_train.subspot_fit import section_tokens, section_weights
        from hishrst_train.subspot_train import TokenRows, predict_spots

        tok = section_tokens(sec, sec.xy, encoder=enc, geometry=TokenGeometry.from_dict(config.tokens or {}),
                             batch_size=batch_size, cache_dir=cache_dir)
        weights = section_weights(model.config, [sec])
        return np.asarray(tok.cls, np.float32), predict_spots(model, TokenRows([tok.tokens]), weights=weights)
    feats = section_features(sec, sec.xy, encoder=enc, patch_um=config.patch["size_um"], batch_size=batch_size,
                             cache_dir=cache_dir, progress=progress)
    if not config.image_features:
        feats = np.zeros_like(feats)
    pos = spot_positions(sec.xy, mpp=sec.mpp, mode=config.position["mode"], array_rc=sec.array_rc)
    return feats, predict(model, feats, pos, groups=group_points(sec.xy, max_size=config.grouping["max_size"]))


def _predict_section(model: Any, config: RunConfig, sec: Any, genes: list[str], enc: Any, *, batch_size: int,
                     cache_dir: str | Path | None, progress: bool, ridge: RidgeBaseline | None = None) -> ad.AnnData:
    from hishrst_train.preprocess import log_expression
    from hishrst_train.tasks import TARGET_SUM, _section_obs

    feats, pred = _spot_predictions(model, config, sec, enc, batch_size=batch_size, cache_dir=cache_dir,
                                    progress=progress)
    col = [config.genes.index(g) for g in genes]
    truth = log_expression(sec.adata, genes, target_sum=TARGET_SUM)
    keys = np.array([f"{sec.name}:{b}" for b in sec.adata.obs_names])
    res = ad.AnnData(X=pred[:, col], obs=_section_obs(sec, np.arange(sec.adata.n_obs), keys),
                     var=pd.DataFrame(index=pd.Index(genes, name="gene")))
    res.layers["truth"] = truth
    if ridge is not None:
        res.layers[BASELINE_LAYERS["ridge"]] = ridge.predict(feats)[:, col]
    res.obsm["spatial"] = sec.xy
    return res


def evaluate_on(run_dir: str | Path, data: Any, *, image: str | Path | None = None, mpp: float | None = None,
                ssim: bool = True, ari: bool = True, device: str = "cpu", batch_size: int = 64,
                cache_dir: str | Path | None = None, name: str | None = None, progress: bool = True,
                counts: str | None = None) -> dict[str, Any]:
    """Predict every measured spot of ``data`` (one or several sections the run never trained on) and score it.

    ``data`` takes the ``DATA`` forms of ``hishrst fit``; ``image`` / ``mpp`` (µm/px) as there. Genes the
    sections lack are predicted but not scored (``n_genes_missing``). Writes ``predictions.h5ad``,
    ``metrics.json`` and ``per_gene_metrics.csv`` into ``run_dir/eval/<name>`` (``name`` defaults to the
    section names joined by ``+``) and returns the summary (``folder`` names where it went).
    """
    from hishrst_train.tasks import open_sections
    from hishrst_train.train import load_run, resolve_device

    run_dir = Path(run_dir)
    model, config = load_run(run_dir)
    secs = open_sections(data, image=image, mpp=mpp, counts=counts or config.counts)  # --counts (default: the run's)
    _check_unseen(config, secs)
    have = set(config.genes)
    for s in secs:
        have &= set(map(str, s.adata.var_names))
    genes = [g for g in config.genes if g in have]
    if not genes:
        raise EvaluateError(f"{', '.join(str(s.spec.data) for s in secs)}: none of the run's {len(config.genes)} genes "
                            "were measured; evaluate on sections with the same gene annotation")
    enc = _load_encoder(config, resolve_device(device))
    ridge = _ridge(run_dir)
    parts = [_predict_section(model, config, s, genes, enc, batch_size=batch_size, cache_dir=cache_dir,
                              progress=progress, ridge=ridge) for s in secs]
    res = ad.concat(parts, merge="same") if len(parts) > 1 else parts[0]
    summary, per_gene = _score(res, train_mean=_train_mean(run_dir, genes), ssim=ssim, ari=ari)
    label = re.sub(r"[^A-Za-z0-9._+-]+", "_", name or "+".join(s.name for s in secs))[:120]
    folder = RunLayout(run_dir).eval_dir(label)
    summary.update(sections=[s.record() for s in secs], n_genes_missing=len(config.genes) - len(genes),
                   position_mode=config.position["mode"], folder=str(folder))
    if len(genes) < len(config.genes):
        summary["warning_genes"] = (f"{len(config.genes) - len(genes)} of the run's genes were not measured here: "
                                    "the measured truth is normalised over the remaining genes only, so absolute "
                                    "errors (MSE, MAE) are shifted; PCC is less affected")
    if config.position["mode"] not in TRANSFERABLE_POSITION_MODES:
        summary["warning"] = (f"position mode {config.position['mode']!r} encodes absolute placement on the training "
                              "slide; it does not transfer to other sections (train with --position relative)")
    _write(folder, summary, per_gene)
    try:
        res.write_h5ad(folder / "predictions.h5ad")
    except OSError as e:
        raise OutputStateError(f"{folder / 'predictions.h5ad'}: cannot write ({e.strerror or e}); free space") from e
    return summary
