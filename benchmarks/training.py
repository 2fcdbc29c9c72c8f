"""Training-stage throughput on a synthetic section: feature extraction tiles/s
(:func:`hishrst_train.features.extract_features`, no cache) by batch size, and HisHRST fit seconds per
epoch (:func:`hishrst_train.train.train_model`, the recovery task's training half, groups of ≤ 50).

    python -m benchmarks.training            # dlpfc preset (≈ 4,000 spots, 1,000 genes), 10 epochs
    python -m benchmarks.training --quick    # small preset, 2 epochs
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import warnings
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, int_list, print_table, str_list, workdir_of
from benchmarks._data import ensure_section


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = base_parser("training", __doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["small", "dlpfc"], default=None, help="synthetic preset (default dlpfc; --quick: small)")
    p.add_argument("--encoders", type=str_list, default=["test-vit"], help="encoders for feature extraction "
                   "(test-vit, uni with random weights; default test-vit)")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="feature-extraction batch sizes (default 32,64,128; --quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="epochs timed for the fit (default 10; --quick 2)")
    p.add_argument("--n-genes", type=int, default=1000, help="genes predicted (HVGs, default 1000 as `hishrst fit`)")
    p.add_argument("--devices", type=str_list, default=None, help="cpu and/or cuda (default: cuda if present, and cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    return p.parse_args(argv)


@dataclasses.dataclass
class _Section:
    """The synthetic section both stages run on, with the recovery task's training split."""

    img: Any
    mpp: float
    xy: np.ndarray
    train_mask: np.ndarray
    genes: Any
    expr: np.ndarray

    @property
    def n(self) -> int:
        return len(self.xy)


def _load_section(args: argparse.Namespace, preset: str) -> _Section:
    from hishrst_train.data import open_fullres_image
    from hishrst_train.preprocess import normalize_log1p, select_hvgs
    from hishrst_train.tasks import load_section

    adata = load_section(ensure_section(workdir_of(args), preset) / "outs")
    meta = adata.uns["hishrst"]
    img = open_fullres_image(meta["fullres_image"])
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    n = len(xy)
    train_mask = np.zeros(n, bool)
    train_mask[np.random.default_rng(0).permutation(n)[: n // 2]] = True  # the recovery task's split
    with warnings.catch_warnings():  # the small preset has fewer genes than n_top: all are used
        warnings.simplefilter("ignore", UserWarning)
        genes = select_hvgs(adata, n_top=min(args.n_genes, adata.n_vars), train_mask=train_mask)
    expr = normalize_log1p(adata[:, genes].X)
    expr = np.asarray(expr.toarray() if hasattr(expr, "toarray") else expr, dtype=np.float32)
    return _Section(img, float(meta["mpp"]), xy, train_mask, genes, expr)


def _time_features(out: JsonlWriter, d: _Section, args: argparse.Namespace, devices: list[str], batches: list[int],
                   common: dict[str, Any]) -> np.ndarray:
    """Feature-extraction tiles/s per encoder, device and batch size; returns test-vit's features."""
    import torch

    from hishrst_train.encoders import load_encoder
    from hishrst_train.features import extract_features

    feats = None
    for name in args.encoders:
        enc = load_encoder(name, random_init=True)
        for dev in devices:
            enc.to(dev)
            extract_features(d.img, d.xy[: min(d.n, 2 * max(batches))], encoder=enc, mpp=d.mpp, batch_size=max(batches),
                             progress=False)  # warm-up
            for bs in batches:
                t0 = time.perf_counter()
                f = extract_features(d.img, d.xy, encoder=enc, mpp=d.mpp, batch_size=bs, cache_dir=None, progress=False)
                s = time.perf_counter() - t0
                out.write({**common, "kind": "features", "status": "ok", "encoder": name, "device": dev,
                           "batch_size": bs, "tiles": d.n, "seconds": s, "tiles_per_s": d.n / s, "threads": torch.get_num_threads()})
                print(f"  features {name:<9} {dev:<5} batch {bs:>4}: {d.n / s:9.1f} tiles/s", flush=True)
                if feats is None and name == "test-vit":
                    feats = f
        enc.to("cpu")
        del enc
    if feats is None:  # the fit needs features of the deployed dimension; use test-vit's
        feats = extract_features(d.img, d.xy, encoder=load_encoder("test-vit"), mpp=d.mpp, progress=False)
    return feats


def _time_fit(out: JsonlWriter, d: _Section, feats: np.ndarray, devices: list[str], epochs: int,
              common: dict[str, Any]) -> None:
    """HisHRST fit seconds per epoch on the training half, per device (after a one-epoch warm-up)."""
    import torch

    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.model import HisHRSTConfig
    from hishrst_train.train import TrainConfig, train_model

    pos = d.xy * d.mpp
    train_idx = np.flatnonzero(d.train_mask)
    groups = [train_idx[g] for g in group_points(d.xy[train_idx], max_size=50)]
    mcfg = HisHRSTConfig(feature_dim=feats.shape[1], n_genes=len(d.genes), position_mode="continuous")
    for dev in devices:
        train_model(feats, pos, d.expr, groups=groups, model_config=mcfg, train_config=TrainConfig(epochs=1),
                    progress=False, device=dev)  # warm-up
        t0 = time.perf_counter()
        _, history = train_model(feats, pos, d.expr, groups=groups, model_config=mcfg,
                                 train_config=TrainConfig(epochs=epochs), progress=False, device=dev)
        s = time.perf_counter() - t0
        ran = len(history)  # one loss per epoch run (no validation groups: no early stop)
        out.write({**common, "kind": "fit", "status": "ok", "device": dev, "epochs": ran, "seconds": s,
                   "seconds_per_epoch": s / ran, "train_spots": int(d.train_mask.sum()), "groups": len(groups),
                   "n_genes": len(d.genes), "feature_dim": int(feats.shape[1]), "threads": torch.get_num_threads()})
        print(f"  fit {dev:<5}: {s / ran:.3f} s/epoch ({len(groups)} groups, {len(d.genes)} genes)", flush=True)


def _print_tables(args: argparse.Namespace, recs: list[dict[str, Any]], preset: str) -> None:
    print_table([r for r in recs if r["kind"] == "features"],
                [("encoder", "encoder"), ("device", "device"), ("batch_size", "batch"), ("tiles", "tiles"),
                 ("seconds", "seconds"), ("tiles_per_s", "tiles/s")],
                title=f"feature extraction, {preset} preset ({'quick' if args.quick else 'full'} run)")
    print_table([r for r in recs if r["kind"] == "fit"],
                [("device", "device"), ("train_spots", "train spots"), ("groups", "groups"), ("n_genes", "genes"),
                 ("epochs", "epochs"), ("seconds_per_epoch", "s/epoch")], title="HisHRST fit")
    print(f"-> {args.out}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = _parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("small" if args.quick else "dlpfc")
    batches = args.batch_sizes or ([64] if args.quick else [32, 64, 128])
    epochs = args.epochs or (2 if args.quick else 10)
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    d = _load_section(args, preset)
    common = {"preset": preset, "spots": d.n, "mpp": d.mpp}
    with JsonlWriter(args.out, benchmark="training", quick=args.quick, append=args.append) as out:
        feats = _time_features(out, d, args, devices, batches, common)
        _time_fit(out, d, feats, devices, epochs, common)
        d.img.close()
        _print_tables(args, out.records, preset)
        return out.records


if __name__ == "__main__":
    main()
