"""The HisHRST tasks, end to end: read one or several sections, select genes, extract features, train, predict.

* ``recovery``: a seeded random 50 % of each section's spots is used for training (gene selection
  included); the model predicts the held-out half, grouped among themselves exactly as the training
  spots were.
* ``generation``: train on all spots, then predict, per section, a grid ``densify`` times denser whose
  positions come from an array→pixel affine fitted on the measured spots.
* ``full``: train on all spots of all sections (for models meant to predict other sections: see
  ``hishrst evaluate RUN --on DATA`` and ``hishrst cv``); no predictions are written.

In every task a seeded ``val_frac`` of the training spots (whole neighbour groups) is kept aside for early stopping.

Several sections: genes are the intersection over sections (HVGs chosen on the pooled training spots,
Seurat v3 with the section as batch); normalisation is per spot; features are extracted (and cached)
per section at each section's own µm/px; neighbour groups never span sections.

A run directory holds ``model.safetensors`` + ``config.json`` (the checkpoint; a versioned
:class:`~hishrst_train.runconfig.RunConfig` listing the sections), ``split.json``, ``baseline.json``
(genes and their mean over the training spots), ``predictions.h5ad`` (held-out spots: X = prediction,
``layers['truth']`` = measured, ``obs['section']``) for recovery or ``dense.h5ad`` for generation, and
``history.json``. It is built aside and swapped in when the fit succeeds (:mod:`hishrst_train.rundir`);
an existing run is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hishrst_runtime.core.version import __version__
from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.geometry import apply_affine, dense_array_grid, fit_affine
from hishrst_runtime.core.grouping import GROUPING_METHOD, group_points
from hishrst_runtime.core.patches import DEFAULT_PATCH_UM, PAD_VALUE, RESIZE_FILTER
from hishrst_train.data.counts import CountsMode, check_counts_mode
from hishrst_train.data.errors import check_section_mpp
from hishrst_train.data.sections import Section, SectionSpec, check_distinct, load_adata, open_section, \
    parse_section, resolve_sections, section_names
from hishrst_runtime.core.tokens import DEFAULT_TOKEN_PITCH_UM
from hishrst_runtime.core.vocab import DEFAULT_HEAD_KIND, DEFAULT_POSITION_MODE, DEFAULT_TASK, HEAD_KINDS, \
    POSITION_MODES, TASKS, HeadKind
from hishrst_train.encoders.registry import DEFAULT_ENCODER, check_encoder_allowed
from hishrst_train.runconfig import POSITION_UNITS, PositionMode, RunConfig, Task
from hishrst_train.rundir import RunLayout, building_run, check_run_out, claim_output
from hishrst_train.outputs import gene_var as _gene_var, write_baseline as _write_baseline, \
    write_recovery as _write_recovery, write_split as _write_split
from hishrst_train.outputs import section_obs as _section_obs  # noqa: F401  (evaluate imports it from here)
from hishrst_train.targets import TARGET_SUM, FitError, Targets, build_targets, training_groups
from hishrst_train.fitting import AGGREGATION, section_features, spot_positions, train_spot_head, train_subspot_head
from hishrst_train.fitting import spot_features as _features
from hishrst_train.train import resolve_device, save_checkpoint  # torch: a missing [train] extra fails here

__all__ = ["load_section", "open_sections", "fit_run", "spot_positions", "section_features", "load_run_encoder",
           "TARGET_SUM", "FitError", "TASKS", "POSITION_MODES", "DataArg"]

log = logging.getLogger("hishrst")
#: One ``DATA`` argument (see :mod:`hishrst_train.data.sections`) or a parsed spec.
DataArg = str | Path | SectionSpec


def load_section(data: DataArg, *, image: str | Path | None = None, mpp: float | None = None,
                 counts: CountsMode = "raw") -> ad.AnnData:
    """Read one section — a Space Ranger ``outs`` directory, ``PATH.h5ad:IMAGE``, an ``.h5ad`` with ``image``,
    or a HEST-1k ``st/<id>.h5ad`` — as AnnData with ``uns['hishrst']``.

    ``image``: the full-resolution H&E image — required with a plain ``.h5ad``; otherwise it replaces the
    image found next to the data (spot pixel coordinates are checked against its size). ``mpp`` (µm per
    full-resolution pixel) overrides the recorded pixel size.
    """
    return load_adata(parse_section(data, image=image), mpp=mpp, counts=counts)


def open_sections(data: DataArg | Sequence[DataArg], *, image: str | Path | None = None,
                  mpp: float | None = None, counts: CountsMode = "raw") -> list[Section]:
    """Parse and open every section (unique names, images opened lazily; ``counts`` as ``--counts``)."""
    specs = resolve_sections(data, image=image)
    return [open_section(s, name=n, mpp=mpp, counts=counts) for s, n in zip(specs, section_names(specs))]


@dataclass(frozen=True)
class _Options:
    """Everything :func:`fit_run` needs besides the sections (see its docstring for units)."""

    task: Task
    encoder: str
    weights: str | Path | None
    epochs: int
    seed: int
    n_genes: int
    patch_um: float
    position_mode: PositionMode
    densify: float
    max_group: int
    batch_size: int
    image_features: bool
    val_frac: float
    cache_dir: str | Path | None
    progress: bool
    device: str
    lr: float = 1e-3
    counts: CountsMode = "raw"
    head: HeadKind = DEFAULT_HEAD_KIND
    token_pitch_um: float = DEFAULT_TOKEN_PITCH_UM


def _check_options(o: _Options) -> None:
    check_counts_mode(o.counts)
    checks = [(o.task in TASKS, "task", f"one of {', '.join(TASKS)}"),
              (o.position_mode in POSITION_MODES, "position", f"one of {', '.join(POSITION_MODES)}"),
              (o.epochs >= 1, "epochs", "≥ 1"), (o.n_genes >= 1, "n-genes", "≥ 1"),
              (0 <= o.val_frac < 1, "val-frac", "in [0, 1)"), (o.patch_um > 0, "patch-um", "> 0 µm"),
              (o.densify > 1, "densify", "> 1"), (o.batch_size >= 1, "batch-size", "≥ 1"),
              (o.max_group >= 1, "max-group", "≥ 1"), (0 < o.lr < 1, "lr", "in (0, 1)"),
              (o.head in HEAD_KINDS, "head", f"one of {', '.join(HEAD_KINDS)}"),
              (o.token_pitch_um > 0, "token-pitch-um", "> 0 µm")]
    for ok, name, want in checks:
        if not ok:
            value = getattr(o, name.replace("-", "_").replace("position", "position_mode"), None)
            raise FitError(f"--{name} {value!r}: must be {want}")
    if o.head == "subspot" and o.task == "generation":
        raise FitError("--head subspot --task generation: a sub-spot model makes dense maps at run time; fit with "
                       "--task recovery or full, export it, then `hishrst-run SLIDE --bundle B --resolution 8um`")


def _check_sections(secs: list[Section], o: _Options) -> None:
    for s in secs:
        if s.array_rc is None and (o.position_mode == "grid" or o.task == "generation"):
            what = "--position grid" if o.position_mode == "grid" else "--task generation"
            raise FitError(f"{s.spec.data}: {what} needs Visium array coordinates (obs array_row / array_col), which "
                           "this section lacks; use --position relative / --task recovery or full")


def fit_run(
    data: DataArg | Sequence[DataArg],
    *,
    out: str | Path,
    task: Task = DEFAULT_TASK,
    encoder: str = DEFAULT_ENCODER,
    weights: str | Path | None = None,
    image: str | Path | None = None,
    mpp: float | None = None,
    epochs: int = 100,
    seed: int = 0,
    n_genes: int = 1000,
    patch_um: float = DEFAULT_PATCH_UM,
    position_mode: PositionMode = DEFAULT_POSITION_MODE,
    densify: float = 4.0,
    max_group: int = 50,
    batch_size: int = 64,
    image_features: bool = True,
    val_frac: float = 0.1,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str = "cpu",
    lr: float = 1e-3,
    counts: CountsMode = "raw",
    allow_test_encoder: bool = False,
    head: HeadKind = DEFAULT_HEAD_KIND,
    token_pitch_um: float = DEFAULT_TOKEN_PITCH_UM,
) -> dict[str, Any]:
    """Train HisHRST on one or several sections and write a run directory (see the module docstring).

    ``data``: one ``DATA`` or a sequence of them (outs folder, ``PATH.h5ad:IMAGE``, HEST ``st/<id>.h5ad``).
    ``image`` replaces (or, for a plain ``.h5ad``, provides) the image of a single section; ``mpp``
    (µm/px) overrides every section's pixel size. ``patch_um`` is the patch side in µm; ``densify`` the
    density factor of the generation grid; ``image_features=False`` trains the position-only ablation.
    ``lr``: Adam's peak learning rate. ``counts``: what the sections' matrices hold — ``raw`` UMI counts
    (normalised here) or ``log``-normalised values used as given (:mod:`hishrst_train.data.counts`).
    ``val_frac`` of the training spots (seeded; never held-out spots) is kept aside for early stopping:
    ``epochs`` is then a maximum, and the weights of the best validation epoch are kept. ``device``:
    ``auto`` | ``cpu`` | ``cuda`` for feature extraction and training. An existing run at ``out`` is
    replaced only with ``overwrite`` (and only once the new fit is complete; only a directory hishrst wrote
    as a run, :mod:`hishrst_train.rundir`); a failed fit leaves nothing behind, and a second fit into the
    same ``out`` while this one runs fails at once. ``encoder``: a registered name (default ``uni``: real
    weights, resolved as in :func:`~hishrst_train.encoders.weights.resolve_weights`) or a generic form
    (:mod:`hishrst_train.encoders.generic`); a random test encoder is refused unless ``allow_test_encoder``.
    ``head``: ``spot`` or ``subspot`` (per ``token_pitch_um`` token). Returns a summary dict (also in config.json)."""
    from hishrst_train.encoders.generic import canonical_encoder_name

    t0 = time.perf_counter()
    check_encoder_allowed(encoder, allow_test_encoder=allow_test_encoder)
    o = _Options(task=task, encoder=canonical_encoder_name(encoder), weights=weights, epochs=epochs, seed=seed,
                 n_genes=n_genes, patch_um=patch_um, position_mode=position_mode, densify=densify, max_group=max_group,
                 batch_size=batch_size, image_features=image_features, val_frac=val_frac, cache_dir=cache_dir,
                 progress=progress, device=device, lr=lr, counts=counts, head=head, token_pitch_um=token_pitch_um)
    _check_options(o)
    specs = resolve_sections(data, image=image)
    if mpp is not None:
        mpp = check_section_mpp(mpp, where=specs[0].data, source="--mpp")
    with claim_output(Path(out), command="fit"):
        return _fit_claimed(Path(out), specs, o, mpp=mpp, overwrite=overwrite, t0=t0)


def _fit_claimed(out: Path, specs: list[SectionSpec], o: _Options, *, mpp: float | None, overwrite: bool,
                 t0: float) -> dict[str, Any]:
    """:func:`fit_run` once ``out`` is locked: check it, read the sections, fit and write the run."""
    check_run_out(out, overwrite=overwrite, inputs=[p for s in specs for p in (s.data, s.image)])
    o = _Options(**{**asdict(o), "device": resolve_device(o.device)})
    secs = [open_section(s, name=n, mpp=mpp, counts=o.counts) for s, n in zip(specs, section_names(specs))]
    check_distinct(secs)
    _check_sections(secs, o)
    with building_run(out) as work:
        summary, fields, model = _fit(work, secs, o)
        summary["seconds_total"] = round(time.perf_counter() - t0, 2)
        first = specs[0].record()
        config = RunConfig(**fields, summary=summary, data=first["data"], image=first["image"], mpp_override=mpp,
                           sections=[s.record() for s in secs])
        save_checkpoint(work, model, config)
    return summary


# ------------------------------------------------------------------------------------------ features


def load_run_encoder(name: str, *, weights: str | Path | None, device: str) -> Any:
    """:func:`~hishrst_train.encoders.module.load_encoder`, with an unreadable weights file (any error of the
    safetensors reader too) as a :class:`~hishrst_train.encoders.weights.WeightsError` naming the file."""
    from safetensors import SafetensorError

    from hishrst_train.encoders.module import load_encoder
    from hishrst_train.encoders.weights import WeightsError

    try:
        return load_encoder(name, weights=weights, device=device)
    except SafetensorError as e:
        raise WeightsError(f"{weights or name}: not a readable weights file ({e}); pass a complete .safetensors or "
                           "state-dict .bin file") from e


# ------------------------------------------------------------------------------------------ outputs


def _dense_section(model: Any, sec: Section, genes: list[str], enc: Any, o: _Options) -> ad.AnnData:
    from hishrst_train.train import predict

    if sec.array_rc is None:
        raise FitError(f"{sec.spec.data}: --task generation needs Visium array coordinates (obs array_row / array_col)")
    dense_rc = dense_array_grid(sec.array_rc[:, 0], sec.array_rc[:, 1], factor=o.densify)
    affine = fit_affine(sec.array_rc.astype(np.float64), sec.xy)
    dense_xy = apply_affine(affine, dense_rc)
    if o.position_mode == "grid":
        log.warning("grid position mode truncates fractional array coordinates (the reference behaviour)")
    dense_pos = spot_positions(dense_xy, mpp=sec.mpp, mode=o.position_mode, array_rc=dense_rc)
    pred = predict(model, _features(sec, dense_xy, enc, o), dense_pos, groups=group_points(dense_xy, max_size=o.max_group))
    dobs = pd.DataFrame({"array_row": dense_rc[:, 0], "array_col": dense_rc[:, 1], "section": sec.name},
                        index=[f"{sec.name}:d{i}" for i in range(len(dense_rc))])
    res = ad.AnnData(X=pred, obs=dobs, var=_gene_var(genes))
    res.obsm["spatial"] = dense_xy
    res.uns["array_to_pixel_affine"] = {sec.name: affine}
    return res


def _write_generation(work: Path, model: Any, secs: list[Section], genes: list[str], enc: Any, o: _Options
                      ) -> dict[str, Any]:
    """Predict a grid ``densify`` times denser than each section's spots → ``dense.h5ad``."""
    parts = [_dense_section(model, s, genes, enc, o) for s in secs]
    affines = {k: v for p in parts for k, v in p.uns["array_to_pixel_affine"].items()}
    if len(parts) == 1:  # one section: plain names and the matrix itself (as before)
        res = parts[0]
        res.obs_names = [f"d{i}" for i in range(res.n_obs)]
        res.uns["array_to_pixel_affine"] = affines[secs[0].name]
    else:
        res = ad.concat(parts)
        res.uns["array_to_pixel_affine"] = affines
    res.write_h5ad(RunLayout(work).dense)
    return {"n_dense": int(res.n_obs), "densify": float(o.densify)}


def _encoder_record(name: str, enc: Any, weights: str | Path | None) -> dict[str, Any]:
    from hishrst_train.encoders.module import encoder_fingerprint

    return {"name": name, "fingerprint": encoder_fingerprint(enc), "input_size": enc.input_size,
            "feature_dim": enc.feature_dim, "mean": list(enc.spec.mean), "std": list(enc.spec.std),
            "gated": bool(enc.spec.gated), "license": enc.spec.license, "weights": str(weights) if weights else None,
            "test_encoder": bool(enc.spec.test_only), "pooling": enc.spec.pooling}


# ------------------------------------------------------------------------------------------ fitting


def _fit(work: Path, secs: list[Section], o: _Options) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Features, training, predictions, ``split.json``, ``baseline.json``, ``baseline_ridge.npz`` (the PCA + ridge
    baseline, fitted on the training spots only; recovery predictions carry its and the position-kNN baseline's
    predictions as layers) and ``history.json`` into ``work``; returns the summary, the :class:`RunConfig`
    fields known after training, and the trained model (spot or sub-spot head, ``o.head``)."""
    from hishrst_train.outputs import write_ridge

    t = build_targets(secs, task=o.task, seed=o.seed, n_genes=o.n_genes, counts=o.counts)
    enc = load_run_encoder(o.encoder, weights=o.weights, device=o.device)
    train_idx, groups, val_groups = training_groups(secs, t, seed=o.seed, val_frac=o.val_frac, max_group=o.max_group)
    if o.head == "subspot":
        fit, pos = train_subspot_head(secs, t, enc, o, train_idx, val_groups), None
    else:
        fit, pos = train_spot_head(secs, t, enc, o, groups, val_groups)
    ridge = write_ridge(work, fit.features, t, seed=o.seed)  # baseline_ridge.npz: PCA + ridge on training spots only
    summary: dict[str, Any] = {"task": o.task, "head": o.head, "n_sections": len(secs), "n_spots": int(len(t.train_mask)),
                               "n_train": int(len(train_idx)), "n_val": int(t.train_mask.sum()) - int(len(train_idx)),
                               "ridge_alpha": ridge.alpha}
    if o.task == "recovery":
        summary.update(_write_recovery(work, fit.model, secs, t, fit.features, pos, max_group=o.max_group, ridge=ridge,
                                       predictions=fit.predictions))
    elif o.task == "generation":
        summary.update(_write_generation(work, fit.model, secs, t.genes, enc, o))
    _write_split(work, secs, t, train_idx, o.seed)
    _write_baseline(work, t)
    atomic_write(work / "history.json", json.dumps(fit.hist).encode())
    summary.update(
        final_train_mse=fit.history[-1], epochs_run=len(fit.history), best_epoch=int(fit.hist["best_epoch"][0]),
        best_val_mse=min(fit.hist["val_mse"]) if fit.hist.get("val_mse") else None,
        seconds_features=round(fit.seconds_features, 2), seconds_train=round(fit.seconds_train, 2),
        seconds_per_epoch=round(fit.seconds_train / max(1, len(fit.history)), 4), device=o.device,
    )
    fields = _config_fields(secs, t, enc, fit.model.config, fit.train_config, o)
    if fit.geometry is not None:  # a sub-spot run: its head, token geometry, and the tile as the patch
        fields.update(head={"kind": "subspot", "aggregation": AGGREGATION}, tokens=fit.geometry.to_dict())
        fields["patch"]["size_um"] = fit.geometry.tile_um
    return summary, fields, fit.model


def _config_fields(secs: list[Section], t: Targets, enc: Any, mcfg: Any, tcfg: Any, o: _Options) -> dict[str, Any]:
    import torch

    train_mpp = float(np.median([s.mpp for s in secs]))
    return {
        "hishrst_version": __version__, "task": o.task, "genes": t.genes,
        "encoder": _encoder_record(o.encoder, enc, o.weights),
        "patch": {"size_um": float(o.patch_um), "train_mpp": train_mpp, "resize": RESIZE_FILTER, "pad_value": PAD_VALUE},
        "position": {"mode": o.position_mode, "units": POSITION_UNITS[o.position_mode]},
        "grouping": {"method": GROUPING_METHOD, "max_size": int(o.max_group), "coords": "level0_px"},
        "preprocessing": {"counts": o.counts, "hvg_flavor": "seurat_v3" if o.counts == "raw" else "seurat",
                          "n_top_genes": int(o.n_genes), "target_sum": TARGET_SUM, "log1p": True,
                          "normalised_by": "hishrst" if o.counts == "raw" else "input",
                          "genes": "intersection" if len(secs) > 1 else "all",
                          "genes_dropped": {"count": len(t.dropped_genes), "examples": t.dropped_genes[:20]},
                          "hvg_batch": "section" if len(secs) > 1 else None},
        "image_features": bool(o.image_features), "train": {**tcfg.__dict__, "val_frac": float(o.val_frac)},
        "torch_version": torch.__version__, "model": mcfg.to_dict(),
    }
