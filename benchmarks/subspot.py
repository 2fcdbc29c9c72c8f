"""Sub-spot density: does the 8 µm head beat the ways to get density from a spot model, on a section it never saw?

Per seed, three synthetic ``dlpfc`` sections with their 8 µm truth (``hishrst synth --preset dlpfc --sections 3``,
cached under ``--workdir``). Two runs are fitted on sections 0 and 1 with the same encoder (``test-vit-uni``: UNI's
token geometry, 224-px tiles of 16-px tokens, random weights), genes and seed: a spot run (``hishrst fit``) and a
sub-spot run (``hishrst fit --head subspot``, tokens of 8 µm). Section 2 is scored by
:func:`hishrst_train.bins_eval.score_bins` on a ``--window-um`` square of its tissue at 8 and 16 µm: the sub-spot
map, the spot run's predictions at the Visium spots interpolated to the bins, and the spot run at a 16 µm grid.
Also recorded: both runs' spot-level scores on section 2 (``evaluate --on``) and the encoder passes per mm².

The done-when of issue #17: at 8 µm, sub-spot mean per-gene PCC ≥ interpolated spots + 0.05 and ≥ the 16 µm grid;
encoder passes per mm² ≥ 10× fewer than the 16 µm grid.

    python -m benchmarks.subspot --seeds 0 --append       # the evidence (RESULTS.md)
    python -m benchmarks.subspot --quick                  # small preset, few epochs: a smoke run
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._common import JsonlWriter, base_parser, count_list, load_average, print_table, workdir_of

ENCODER = "test-vit-uni"


def _default_smoothness() -> float:
    from hishrst_train.subspot import SMOOTHNESS_DEFAULT

    return SMOOTHNESS_DEFAULT


def sections(work: Path, seed: int, preset: str) -> list[Path]:
    """Three sections of ``seed`` with ``truth_bins.npz`` (synthesized once, then reused)."""
    from hishrst_train.synth import make_synthetic_sections

    root = work / f"{preset}-seed{seed}-bins"
    outs = [root / f"section_{k}" / "outs" for k in range(3)]
    if not all((o.parent / "truth_bins.npz").is_file() for o in outs):
        t0 = time.perf_counter()
        make_synthetic_sections(root, 3, seed=seed, preset=preset)  # type: ignore[arg-type]
        print(f"synthesized {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return outs


@contextlib.contextmanager
def _smoothness(value: float | None) -> Iterator[None]:
    """Make the sub-spot fit's ``SubspotConfig(...)`` carry ``smoothness=value`` (None: the default)."""
    import hishrst_train.subspot as mod

    orig = mod.SubspotConfig
    if value is not None:
        mod.SubspotConfig = functools.partial(orig, smoothness=value)  # type: ignore[misc]
    try:
        yield
    finally:
        mod.SubspotConfig = orig


def fit_both(outs: list[Path], work: Path, tag: str, *, epochs: int | None, cache: Path,
             smoothness: float | None = None) -> dict[str, Any]:
    """Spot and sub-spot runs on sections 0 and 1; their paths and fit seconds."""
    from hishrst_train.tasks import fit_run

    runs: dict[str, Any] = {}
    for head in ("spot", "subspot"):
        run = work / "runs" / f"{tag}-{head}"
        t0 = time.perf_counter()
        with _smoothness(smoothness if head == "subspot" else None):
            s = fit_run(outs[:2], out=run, task="full", encoder=ENCODER, allow_test_encoder=True, head=head,  # type: ignore[arg-type]
                        cache_dir=cache, progress=False, overwrite=True, **({"epochs": epochs} if epochs else {}))
        runs[head] = {"run": run, "seconds_fit": round(time.perf_counter() - t0, 1), "epochs_run": s["epochs_run"],
                      "best_epoch": s["best_epoch"], "seconds_per_epoch": s["seconds_per_epoch"]}
    return runs


def spot_level(run: Path, section: Path, cache: Path) -> dict[str, Any]:
    from hishrst_train.evaluate import evaluate_on

    s = evaluate_on(run, [section], ssim=False, ari=False, cache_dir=cache, progress=False, name="unseen")
    return {"pcc": s["model"]["pcc_mean"], "mse": s["model"]["mse_mean"], "mean_mse": s["baseline_train_mean"]["mse_mean"],
            "ridge_pcc": s["baseline_ridge"]["pcc_mean"]}


def run_seed(outs: list[Path], work: Path, tag: str, *, epochs: int | None, window_um: float,
             smoothness: float | None = None) -> dict[str, Any]:
    from hishrst_train.bins_eval import score_bins

    cache = work / "cache"
    runs = fit_both(outs, work, tag, epochs=epochs, cache=cache, smoothness=smoothness)
    t0 = time.perf_counter()
    scores = score_bins(runs["subspot"]["run"], outs[2].parent, spot_run=runs["spot"]["run"], window_um=window_um,
                        out=work / "runs" / f"{tag}-bins")
    t_score = time.perf_counter() - t0
    rec: dict[str, Any] = {"window_um": window_um, "n_bins_8um": scores["n_bins"]["8um"], "seconds_score": round(t_score, 1)}
    for size in ("8um", "16um"):
        for method, s in scores[size].items():
            rec[f"pcc_{size}_{method}"] = s["pcc_mean"]
            rec[f"ssim_{size}_{method}"] = s["ssim_mean"]
            rec[f"mse_{size}_{method}"] = s["mse_mean"]
    per = scores["cost"]["passes_per_mm2"]
    rec.update(passes_per_mm2_subspot=per["subspot"], passes_per_mm2_grid16=per["spot_grid_16um"],
               passes_ratio=per["spot_grid_16um"] / per["subspot"])
    rec["gain_vs_interpolated"] = rec["pcc_8um_subspot"] - rec["pcc_8um_interpolated_spots"]
    rec["meets_pcc"] = rec["gain_vs_interpolated"] >= 0.05 and rec["pcc_8um_subspot"] >= rec["pcc_8um_spot_grid_16um"]
    for head in ("spot", "subspot"):
        rec[f"fit_{head}"] = {k: v for k, v in runs[head].items() if k != "run"}
        rec[f"spots_{head}"] = spot_level(runs[head]["run"], outs[2], cache)
    return rec


COLUMNS = [("seed", "seed"), ("pcc_8um_subspot", "sub-spot PCC 8µm"), ("pcc_8um_interpolated_spots", "interp. spots"),
           ("pcc_8um_spot_grid_16um", "spot @16µm grid"), ("gain_vs_interpolated", "gain"),
           ("pcc_16um_subspot", "sub-spot 16µm"), ("pcc_16um_interpolated_spots", "interp. 16µm"),
           ("ssim_8um_subspot", "SSIM sub-spot"), ("ssim_8um_interpolated_spots", "SSIM interp."),
           ("passes_ratio", "passes ratio"), ("meets_pcc", "meets"), ("load_avg_1m", "load")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("subspot", __doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=count_list, default=[0], help="seeds of the synthetic sections")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: fit's; --quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    p.add_argument("--window-um", type=float, default=2000.0, help="side of the scored window (µm)")
    p.add_argument("--preset", choices=["dlpfc", "small"], default=None, help="default dlpfc; --quick: small")
    p.add_argument("--smoothness", type=float, default=None,
                   help="the sub-spot head's total-variation weight (default: SubspotConfig's)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    epochs = args.epochs or (3 if args.quick else None)
    preset = args.preset or ("small" if args.quick else "dlpfc")
    window = min(args.window_um, 600.0) if args.quick else args.window_um
    work = workdir_of(args)
    writer = JsonlWriter(args.out, benchmark="subspot", quick=args.quick, append=args.append)
    rows = []
    for seed in args.seeds[:1] if args.quick else args.seeds:
        outs = sections(work, seed, preset)
        t0 = time.perf_counter()
        rec = run_seed(outs, work, f"subspot-{preset}-seed{seed}", epochs=epochs, window_um=window,
                       smoothness=args.smoothness)
        rec = writer.write({"status": "ok", "seed": seed, "preset": preset, "encoder": ENCODER, "epochs_max": epochs,
                            "smoothness": args.smoothness if args.smoothness is not None else _default_smoothness(),
                            "threads": args.threads, "pid": os.getpid(), "seconds_wall": round(time.perf_counter() - t0, 1),
                            "load_avg_end": load_average(), **rec})
        rows.append(rec)
    writer.close()
    print_table(rows, COLUMNS, title="unseen section at 8 µm (train on two sections, score the third)")
    return rows


if __name__ == "__main__":
    main()
