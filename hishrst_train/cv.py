"""``hishrst cv``: leave-one-section-out cross-validation.

With sections ``S1 … Sk`` (k ≥ 2), fold ``i`` trains a ``--task full`` run on every section but ``Si``
(written to ``<out>/fold<i>-<name>/``, a complete run directory) and scores it on ``Si`` with
:func:`hishrst_train.evaluate.evaluate_on` (``<out>/fold<i>-<name>/eval/<name>/``). The per-fold table
and its mean go to ``<out>/cv_metrics.csv`` and ``<out>/cv.json``: the model's PCC / MSE / MAE beside the
training mean's MSE and the ridge baseline's PCC / MSE (:mod:`hishrst_train.baselines`); ``cv.json``'s
``warnings`` (also ``table.attrs['warnings']``) lists every fold, and the mean, where the model is worse
than the training mean (MSE) or the ridge (PCC).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hishrst_runtime.core.errors import InputError, OutputStateError
from hishrst_runtime.core.files import atomic_write, clean_stale_siblings
from hishrst_runtime.core.owned import check_replaceable, mark_owned
from hishrst_train.rundir import claim_output

__all__ = ["cv_run", "CvError", "CV_COLUMNS", "is_legacy_cv", "cv_warnings"]

#: Columns of ``cv_metrics.csv`` after ``fold`` and ``heldout``.
CV_COLUMNS = ("n_spots", "pcc_mean", "pcc_mean_constant_as_zero", "mse_mean", "mae_mean", "mse_train_mean_baseline",
              "pcc_ridge_baseline", "mse_ridge_baseline", "ssim_mean", "ari_prediction")


class CvError(InputError):
    """Cross-validation inputs that cannot work (fewer than two sections, an --out that is not free)."""


def is_legacy_cv(path: Path) -> bool:
    """A cross-validation folder written before the ownership marker: ``cv.json`` parses as an object with
    hishrst's ``status`` (``running`` / ``complete``) and the list of section ``names``."""
    try:
        meta = json.loads((path / "cv.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("status") in ("running", "complete") and isinstance(meta.get("names"), list)


def _row(fold: int, name: str, s: dict[str, Any]) -> dict[str, Any]:
    m, ridge = s["model"], s.get("baseline_ridge", {})
    return {"fold": fold, "heldout": name, "n_spots": s["n_heldout_spots"], "pcc_mean": m["pcc_mean"],
            "pcc_mean_constant_as_zero": m["pcc_mean_constant_as_zero"], "mse_mean": m["mse_mean"],
            "mae_mean": m["mae_mean"],
            "mse_train_mean_baseline": s.get("baseline_train_mean", {}).get("mse_mean", np.nan),
            "pcc_ridge_baseline": ridge.get("pcc_mean", np.nan), "mse_ridge_baseline": ridge.get("mse_mean", np.nan),
            "ssim_mean": m.get("ssim_mean", np.nan), "ari_prediction": s.get("ari_prediction", np.nan)}


def cv_warnings(table: pd.DataFrame) -> list[str]:
    """:func:`~hishrst_train.baselines.baseline_warnings` for every fold row and the ``mean`` row of ``table``
    (model MSE above the training mean's, model PCC below the ridge's), each prefixed with the row."""
    from hishrst_train.baselines import baseline_warnings

    out = []
    for r in table.to_dict("records"):
        s = {"model": {"mse_mean": r["mse_mean"], "pcc_mean": r["pcc_mean"]},
             "baseline_train_mean": {"mse_mean": r["mse_train_mean_baseline"]},
             "baseline_ridge": {"pcc_mean": r["pcc_ridge_baseline"]}}
        if not np.isfinite(r["mse_train_mean_baseline"]):
            del s["baseline_train_mean"]
        if not np.isfinite(r["pcc_ridge_baseline"]):
            del s["baseline_ridge"]
        where = "mean over folds" if r["fold"] == "mean" else f"fold {r['fold']} ({r['heldout']})"
        out += [f"{where}: {w}" for w in baseline_warnings(s)]
    return out


def cv_run(data: Sequence[Any], *, out: str | Path, overwrite: bool = False, mpp: float | None = None,
           ssim: bool = True, ari: bool = True, counts: str = "raw", **fit_options: Any) -> pd.DataFrame:
    """Leave-one-section-out over ``data`` (the ``DATA`` forms of ``hishrst fit``; at least two sections).

    ``fit_options`` go to :func:`hishrst_train.tasks.fit_run` (``task`` is always ``full``; a random test
    encoder needs ``allow_test_encoder=True``, checked before anything is read); ``mpp``
    (µm/px) overrides every section's pixel size; ``counts`` (``raw`` | ``log``) as ``--counts``. Every
    section is read and checked before the first fold; a section given twice is refused. ``out`` is
    replaced (fold by fold) only with ``overwrite``, and only when hishrst wrote it as a cross-validation.
    Returns the table (one row per fold, then ``mean``).
    """
    from hishrst_train.data.counts import check_counts_mode
    from hishrst_train.data.sections import check_distinct, resolve_sections
    from hishrst_train.tasks import open_sections

    from hishrst_train.encoders.registry import DEFAULT_ENCODER, check_encoder_allowed

    check_encoder_allowed(fit_options.get("encoder", DEFAULT_ENCODER),
                          allow_test_encoder=bool(fit_options.get("allow_test_encoder", False)))
    specs = resolve_sections(data)
    if len(specs) < 2:
        raise CvError(f"leave-one-section-out needs at least 2 sections, got {len(specs)}; pass more DATA")
    counts = check_counts_mode(counts)
    out = Path(out)
    with claim_output(out, command="cv"):
        check_replaceable(out, kind="cv", overwrite=overwrite, what="a cross-validation", option="--out",
                          inputs=[p for s in specs for p in (s.data, s.image)], legacy=is_legacy_cv)
        check_distinct(open_sections(specs, mpp=mpp, counts=counts))  # every section valid and given once
        for name in ("cv.json", "cv_metrics.csv"):
            clean_stale_siblings(out / name)
        table = _folds(specs, out, overwrite=overwrite, mpp=mpp, counts=counts, ssim=ssim, ari=ari,
                       fit_options={k: v for k, v in fit_options.items() if k != "task"})
    return table


def _folds(specs: list[Any], out: Path, *, overwrite: bool, mpp: float | None, counts: str, ssim: bool, ari: bool,
           fit_options: dict[str, Any]) -> pd.DataFrame:
    """Train and score every fold into ``out`` (marked as hishrst's ``cv`` output); write the table."""
    from hishrst_train.data.sections import section_names
    from hishrst_train.evaluate import evaluate_on
    from hishrst_train.tasks import fit_run

    names = section_names(specs)
    _write_json(out, {"status": "running", "sections": [s.record() for s in specs], "names": names})
    mark_owned(out, "cv")
    rows = []
    for i, (spec, name) in enumerate(zip(specs, names)):
        run = out / f"fold{i}-{name}"
        train = [s for j, s in enumerate(specs) if j != i]
        fit_run(train, out=run, task="full", mpp=mpp, overwrite=overwrite, counts=counts, **fit_options)
        s = evaluate_on(run, [spec], mpp=mpp, ssim=ssim, ari=ari, name=name, device=fit_options.get("device", "cpu"),
                        cache_dir=fit_options.get("cache_dir"), progress=fit_options.get("progress", True),
                        counts=counts)
        rows.append(_row(i, name, s))
    table = pd.DataFrame(rows)
    mean = {"fold": "mean", "heldout": "", **{c: float(table[c].mean()) for c in CV_COLUMNS}}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    table.attrs["warnings"] = warnings = cv_warnings(table)
    try:
        atomic_write(out / "cv_metrics.csv", table.to_csv(index=False).encode())
    except OSError as e:
        raise OutputStateError(f"{out}: cannot write the cross-validation table ({e.strerror or e}); free space or "
                               "fix its permissions") from e
    _write_json(out, {"status": "complete", "sections": [s.record() for s in specs], "names": names,
                      "folds": rows, "mean": mean, "warnings": warnings})
    return table


def _write_json(out: Path, record: dict[str, Any]) -> None:
    """``cv.json``: written at the start (``status: running``, so an interrupted cross-validation is still
    recognised as one and ``--overwrite`` can redo it) and again with the table at the end."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "cv.json", (json.dumps(record, indent=2, default=float) + "\n").encode())
    except OSError as e:
        raise OutputStateError(f"{out}: cannot write cv.json ({e.strerror or e}); free space or fix its "
                               "permissions") from e
