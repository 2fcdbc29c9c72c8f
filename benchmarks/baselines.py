"""Does HisHRST beat the baselines on a section it never saw?

Per seed, three synthetic ``dlpfc`` sections (``hishrst synth DIR --preset dlpfc --sections 3 --seed S``,
cached under ``--workdir``): a ``--task full`` fit on sections 0 and 1 (``fit_run``, the random ``test-vit``
encoder, relative positions), scored on section 2 with ``evaluate_on`` — the model beside the training
mean (each gene's mean over the training spots) and the PCA-256 + ridge baseline on the same embeddings
(α by 5-fold CV on the training spots; :mod:`hishrst_train.baselines`). The done-when of the issue "Models a
lab can trust": model PCC ≥ ridge PCC and model MSE < training-mean MSE on every seed.

Configurations (``--config``) change hyper-parameters of the fit: ``default`` is exactly ``hishrst fit``;
named presets (:data:`PRESETS`) and ``NAME:key=value,...`` with keys ``model.<HisHRSTConfig field>``,
``train.<TrainConfig field>`` or ``fit.<fit_run argument>`` (e.g. ``wd:train.weight_decay=0.01``). Model
and training overrides are applied by wrapping the two config classes while the fit runs; everything
else (genes, features, groups, validation, ridge, scoring) is the code path of ``hishrst fit`` /
``hishrst evaluate --on``.

    python -m benchmarks.baselines --seeds 0,1,2 --config default --append   # the evidence (BASELINES.md)
    python -m benchmarks.baselines --seeds 0 --config paper --config default --append
    python -m benchmarks.baselines --preset small --seeds 0,1,2 --heldout 0,1,2 --config paper --config default
    python -m benchmarks.baselines --quick      # small preset, 1 seed, few epochs: a smoke run
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._common import JsonlWriter, base_parser, count_list, print_table, workdir_of

#: Named configurations: the pre-change defaults (``paper``: 2048-wide head, dropout 0.1, no weight decay,
#: raw targets, bias initialised by PyTorch) and single changes from them.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"model.head_hidden": 2048, "model.dropout": 0.1, "train.target_scaling": "none",
              "train.feature_norm": "dimension", "train.init_output": "default", "train.weight_decay": 0.0,
              "train.patience": 10, "fit.lr": 1e-3},
}


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` (a preset) or ``NAME:key=value,key=value`` (on top of ``default``, or of preset NAME's base
    ``BASE+...``: ``paper+wd:train.weight_decay=0.01`` starts from ``paper``)."""
    name, _, rest = text.partition(":")
    base = name.split("+")[0]
    over = dict(PRESETS.get(base, {})) if (base in PRESETS and base != name) or not rest else {}
    if not rest:
        if name not in PRESETS:
            raise SystemExit(f"--config {text!r}: unknown preset; known: {', '.join(PRESETS)}, or NAME:key=value,...")
        return name, dict(PRESETS[name])
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        if not eq or key.split(".")[0] not in ("model", "train", "fit"):
            raise SystemExit(f"--config {text!r}: {item!r} is not model.KEY=V, train.KEY=V or fit.KEY=V")
        over[key.strip()] = _parse_value(value.strip())
    return name, over


@contextlib.contextmanager
def _overrides(model: dict[str, Any], train: dict[str, Any]) -> Iterator[None]:
    """Make ``HisHRSTConfig(...)`` / ``TrainConfig(...)`` as ``_fit`` builds them carry ``model`` / ``train``."""
    import hishrst_train.model as model_mod
    import hishrst_train.train as train_mod

    orig_m, orig_t = model_mod.HisHRSTConfig, train_mod.TrainConfig
    for cls, keys in ((orig_m, model), (orig_t, train)):
        bad = [k for k in keys if k not in cls.__dataclass_fields__]
        if bad:
            raise SystemExit(f"{cls.__name__} has no field {', '.join(bad)}")
    model_mod.HisHRSTConfig = functools.partial(orig_m, **model)  # type: ignore[misc]
    train_mod.TrainConfig = functools.partial(orig_t, **train)  # type: ignore[misc]
    try:
        yield
    finally:
        model_mod.HisHRSTConfig, train_mod.TrainConfig = orig_m, orig_t


def sections(work: Path, seed: int, preset: str) -> list[Path]:
    """The three sections of ``seed`` (synthesized once, then reused)."""
    from hishrst_train.synth import make_synthetic_sections

    root = work / f"{preset}-seed{seed}"
    outs = [root / f"section_{k}" / "outs" for k in range(3)]
    if not (root / "sections.json").is_file():
        t0 = time.perf_counter()
        make_synthetic_sections(root, 3, seed=seed, preset=preset)  # type: ignore[arg-type]
        print(f"synthesized {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return outs


def _test_encoder_kw(fn: Any) -> dict[str, Any]:
    """``allow_test_encoder=True`` where the API asks for it (the random encoder is refused otherwise)."""
    return {"allow_test_encoder": True} if "allow_test_encoder" in inspect.signature(fn).parameters else {}


def run_one(outs: list[Path], run: Path, cache: Path, over: dict[str, Any], *, epochs: int | None,
            heldout: int = 2) -> dict[str, Any]:
    """Fit on the sections but ``outs[heldout]`` with the overrides, score ``outs[heldout]``; the record's numbers."""
    from hishrst_train.evaluate import evaluate_on
    from hishrst_train.tasks import fit_run

    model = {k[6:]: v for k, v in over.items() if k.startswith("model.")}
    train = {k[6:]: v for k, v in over.items() if k.startswith("train.")}
    fit = {k[4:]: v for k, v in over.items() if k.startswith("fit.")}
    if epochs is not None:
        fit["epochs"] = epochs
    t0 = time.perf_counter()
    with _overrides(model, train):
        fs = fit_run([o for k, o in enumerate(outs) if k != heldout], out=run, task="full", encoder="test-vit", cache_dir=cache, progress=False,
                     overwrite=True, **_test_encoder_kw(fit_run), **fit)
    t_fit = time.perf_counter() - t0
    s = evaluate_on(run, [outs[heldout]], ssim=False, ari=False, cache_dir=cache, progress=False, name="unseen",
                    **_test_encoder_kw(evaluate_on))
    m, mean, ridge = s["model"], s["baseline_train_mean"], s["baseline_ridge"]
    cfg = json.loads((run / "config.json").read_text())  # the settings the fit really used
    used = {"model": {k: cfg["model"][k] for k in ("head_hidden", "dropout", "position_mode")}, "train": cfg["train"]}
    return {"pcc": m["pcc_mean"], "pcc_const0": m["pcc_mean_constant_as_zero"], "mse": m["mse_mean"],
            "mae": m["mae_mean"], "mean_mse": mean["mse_mean"], "ridge_pcc": ridge["pcc_mean"],
            "ridge_mse": ridge["mse_mean"], "beats_mean_mse": m["mse_mean"] < mean["mse_mean"],
            "beats_ridge_pcc": m["pcc_mean"] >= ridge["pcc_mean"], "n_constant": m["n_constant"],
            "epochs_run": fs["epochs_run"], "best_epoch": fs["best_epoch"], "best_val_mse": fs["best_val_mse"],
            "n_train": fs["n_train"], "genes": m["n_genes"], "seconds_fit": round(t_fit, 1),
            "seconds_wall": round(time.perf_counter() - t0, 1), "warnings": s["warnings"], "settings": used}


COLUMNS = [("seed", "seed"), ("heldout", "unseen"), ("config", "config"), ("pcc", "PCC"), ("ridge_pcc", "ridge PCC"), ("mse", "MSE"),
           ("mean_mse", "mean MSE"), ("ridge_mse", "ridge MSE"), ("beats_mean_mse", "MSE<mean"),
           ("beats_ridge_pcc", "PCC≥ridge"), ("epochs_run", "epochs"), ("seconds_wall", "s"),
           ("load_avg_1m", "load")]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("baselines", __doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=count_list, default=[0, 1, 2], help="seeds of the synthetic sections")
    p.add_argument("--config", action="append", default=None, help="configuration (repeatable; default: default)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: fit's default; --quick 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    p.add_argument("--preset", choices=["dlpfc", "small"], default=None,
                   help="synthetic preset (default dlpfc; --quick: small): small has ≈ 230 spots a section")
    p.add_argument("--heldout", type=count_list, default=[2],
                   help="unseen section(s), each scored by a fit on the other two (0,1,2: every fold, as `hishrst cv`)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    epochs = args.epochs or (5 if args.quick else None)
    preset = args.preset or ("small" if args.quick else "dlpfc")
    configs = [parse_config(c) for c in (args.config or ["default"])]
    work = workdir_of(args)
    writer = JsonlWriter(args.out, benchmark="baselines", quick=args.quick, append=args.append)
    rows = []
    for seed in (args.seeds[:1] if args.quick else args.seeds):
        outs = sections(work, seed, preset)
        for name, over in configs:
            for k in args.heldout:
                tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
                rec = run_one(outs, work / "runs" / f"{preset}-seed{seed}-h{k}-{tag}", work / "cache", over,
                              epochs=epochs, heldout=k)
                rec = writer.write({"seed": seed, "heldout": k, "config": name, "overrides": over, "preset": preset,
                                    "epochs_max": epochs, "threads": args.threads, "pid": os.getpid(), **rec})
                print_table([rec], COLUMNS)
                rows.append(rec)
    writer.close()
    print_table(rows, COLUMNS, title="unseen section (train on the two others, score it)")
    return rows


if __name__ == "__main__":
    main()
