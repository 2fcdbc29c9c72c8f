"""``hishrst cv``: leave-one-section-out cross-validation.

With sections ``S1 … Sk`` (k ≥ 2), fold ``i`` trains a ``--task full`` run on every section but ``Si``
(written to ``<out>/fold<i>-<name>/``, a complete run directory) and scores it on ``Si`` with
:func:`hishrst_train.evaluate.evaluate_on` (``<out>/fold<i>-<name>/eval/<name>/``). The per-fold table
and its mean go to ``<out>/cv_metrics.csv`` and ``<out>/cv.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hishrst_runtime.core.errors import InputError, OutputStateError
from hishrst_runtime.core.files import atomic_write

__all__ = ["cv_run", "CvError", "CV_COLUMNS"]

#: Columns of ``cv_metrics.csv`` after ``fold`` and ``heldout``.
CV_COLUMNS = ("n_spots", "pcc_mean", "pcc_mean_constant_as_zero", "mse_mean", "mae_mean", "mse_train_mean_baseline",
              "ssim_mean", "ari_prediction")


class CvError(InputError):
    """Cross-validation inputs that cannot work (fewer than two sections, an --out that is not free)."""


def _check_out(out: Path, *, overwrite: bool) -> None:
    if not os.path.lexists(out) or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise CvError(f"{out}: exists and is not a directory; choose another --out")
    if not (out / "cv.json").is_file() and not (out / "cv_metrics.csv").is_file():
        raise CvError(f"{out}: exists and is not a hishrst cv folder; choose another --out")
    if not overwrite:
        raise CvError(f"{out}: already holds a cross-validation; pass --overwrite to replace its folds, or choose "
                      "another --out")


def _row(fold: int, name: str, s: dict[str, Any]) -> dict[str, Any]:
    m = s["model"]
    return {"fold": fold, "heldout": name, "n_spots": s["n_heldout_spots"], "pcc_mean": m["pcc_mean"],
            "pcc_mean_constant_as_zero": m["pcc_mean_constant_as_zero"], "mse_mean": m["mse_mean"],
            "mae_mean": m["mae_mean"],
            "mse_train_mean_baseline": s.get("baseline_train_mean", {}).get("mse_mean", np.nan),
            "ssim_mean": m.get("ssim_mean", np.nan), "ari_prediction": s.get("ari_prediction", np.nan)}


def cv_run(data: Sequence[Any], *, out: str | Path, overwrite: bool = False, mpp: float | None = None,
           ssim: bool = True, ari: bool = True, **fit_options: Any) -> pd.DataFrame:
    """Leave-one-section-out over ``data`` (the ``DATA`` forms of ``hishrst fit``; at least two sections).

    ``fit_options`` go to :func:`hishrst_train.tasks.fit_run` (``task`` is always ``full``); ``mpp``
    (µm/px) overrides every section's pixel size. Returns the table (one row per fold, then ``mean``).
    """
    from hishrst_train.data.sections import resolve_sections, section_names
    from hishrst_train.evaluate import evaluate_on
    from hishrst_train.tasks import fit_run

    specs = resolve_sections(data)
    if len(specs) < 2:
        raise CvError(f"leave-one-section-out needs at least 2 sections, got {len(specs)}; pass more DATA")
    out = Path(out)
    _check_out(out, overwrite=overwrite)
    fit_options = {k: v for k, v in fit_options.items() if k != "task"}
    names = section_names(specs)
    _write_json(out, {"status": "running", "sections": [s.record() for s in specs], "names": names})
    rows = []
    for i, (spec, name) in enumerate(zip(specs, names)):
        run = out / f"fold{i}-{name}"
        train = [s for j, s in enumerate(specs) if j != i]
        fit_run(train, out=run, task="full", mpp=mpp, overwrite=overwrite, **fit_options)
        s = evaluate_on(run, [spec], mpp=mpp, ssim=ssim, ari=ari, name=name, device=fit_options.get("device", "cpu"),
                        cache_dir=fit_options.get("cache_dir"), progress=fit_options.get("progress", True))
        rows.append(_row(i, name, s))
    table = pd.DataFrame(rows)
    mean = {"fold": "mean", "heldout": "", **{c: float(table[c].mean()) for c in CV_COLUMNS}}
    table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    try:
        atomic_write(out / "cv_metrics.csv", table.to_csv(index=False).encode())
    except OSError as e:
        raise OutputStateError(f"{out}: cannot write the cross-validation table ({e.strerror or e}); free space or "
                               "fix its permissions") from e
    _write_json(out, {"status": "complete", "sections": [s.record() for s in specs], "names": names,
                      "folds": rows, "mean": mean})
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
