"""Training-stage throughput on a synthetic section: feature extraction tiles/s
(:func:`hishrst_train.features.extract_features`, no cache) by batch size, and HisHRST fit seconds per
epoch (:func:`hishrst_train.train.train_model`, the recovery task's training half, groups of ≤ 50).

    python -m benchmarks.training            # dlpfc preset (≈ 4,000 spots, 1,000 genes), 10 epochs
    python -m benchmarks.training --quick    # small preset, 2 epochs
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, int_list, print_table, str_list, workdir_of
from benchmarks._data import ensure_section


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = base_parser("training", __doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["small", "dlpfc"], default=None, help="synthetic preset (default dlpfc; --quick: small)")
    p.add_argument("--encoders", type=str_list, default=["test-vit"], help="encoders for feature extraction "
                   "(test-vit, uni with random weights; default test-vit)")
    p.add_argument("--batch-sizes", type=int_list, default=None, help="feature-extraction batch sizes (default 32,64,128; --quick 64)")
    p.add_argument("--epochs", type=int, default=None, help="epochs timed for the fit (default 10; --quick 2)")
    p.add_argument("--n-genes", type=int, default=1000, help="genes predicted (HVGs, default 1000 as `hishrst fit`)")
    p.add_argument("--devices", type=str_list, default=None, help="cpu and/or cuda (default: cuda if present, and cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    args = p.parse_args(argv)

    import torch

    from hishrst_runtime.core.grouping import group_points
    from hishrst_train.encoders import load_encoder
    from hishrst_train.features import extract_features
    from hishrst_train.data import open_fullres_image
    from hishrst_train.model import HisHRSTConfig
    from hishrst_train.preprocess import normalize_log1p, select_hvgs
    from hishrst_train.tasks import load_section
    from hishrst_train.train import TrainConfig, train_model

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("small" if args.quick else "dlpfc")
    batches = args.batch_sizes or ([64] if args.quick else [32, 64, 128])
    epochs = args.epochs or (2 if args.quick else 10)
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    section = ensure_section(workdir_of(args), preset)
    adata = load_section(section / "outs")
    meta = adata.uns["hishrst"]
    mpp = float(meta["mpp"])
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
    common = {"preset": preset, "spots": n, "mpp": mpp}
    with JsonlWriter(args.out, benchmark="training", quick=args.quick, append=args.append) as out:
        feats = None
        for name in args.encoders:
            enc = load_encoder(name, random_init=True)
            for dev in devices:
                enc.to(dev)
                extract_features(img, xy[: min(n, 2 * max(batches))], encoder=enc, mpp=mpp, batch_size=max(batches),
                                 progress=False)  # warm-up
                for bs in batches:
                    t0 = time.perf_counter()
                    f = extract_features(img, xy, encoder=enc, mpp=mpp, batch_size=bs, cache_dir=None, progress=False)
                    s = time.perf_counter() - t0
                    out.write({**common, "kind": "features", "status": "ok", "encoder": name, "device": dev,
                               "batch_size": bs, "tiles": n, "seconds": s, "tiles_per_s": n / s, "threads": torch.get_num_threads()})
                    print(f"  features {name:<9} {dev:<5} batch {bs:>4}: {n / s:9.1f} tiles/s", flush=True)
                    if feats is None and name == "test-vit":
                        feats = f
            enc.to("cpu")
            del enc
        if feats is None:  # the fit needs features of the deployed dimension; use test-vit's
            feats = extract_features(img, xy, encoder=load_encoder("test-vit"), mpp=mpp, progress=False)
        pos = xy * mpp
        train_idx = np.flatnonzero(train_mask)
        groups = [train_idx[g] for g in group_points(xy[train_idx], max_size=50)]
        mcfg = HisHRSTConfig(feature_dim=feats.shape[1], n_genes=len(genes), position_mode="continuous")
        for dev in devices:
            train_model(feats, pos, expr, groups=groups, model_config=mcfg, train_config=TrainConfig(epochs=1),
                        progress=False, device=dev)  # warm-up
            t0 = time.perf_counter()
            _, history = train_model(feats, pos, expr, groups=groups, model_config=mcfg,
                                     train_config=TrainConfig(epochs=epochs), progress=False, device=dev)
            s = time.perf_counter() - t0
            ran = len(history)  # one loss per epoch run (no validation groups: no early stop)
            out.write({**common, "kind": "fit", "status": "ok", "device": dev, "epochs": ran, "seconds": s,
                       "seconds_per_epoch": s / ran, "train_spots": int(train_mask.sum()), "groups": len(groups),
                       "n_genes": len(genes), "feature_dim": int(feats.shape[1]), "threads": torch.get_num_threads()})
            print(f"  fit {dev:<5}: {s / ran:.3f} s/epoch ({len(groups)} groups, {len(genes)} genes)", flush=True)
        img.close()
        recs = out.records
        print_table([r for r in recs if r["kind"] == "features"],
                    [("encoder", "encoder"), ("device", "device"), ("batch_size", "batch"), ("tiles", "tiles"),
                     ("seconds", "seconds"), ("tiles_per_s", "tiles/s")],
                    title=f"feature extraction, {preset} preset ({'quick' if args.quick else 'full'} run)")
        print_table([r for r in recs if r["kind"] == "fit"],
                    [("device", "device"), ("train_spots", "train spots"), ("groups", "groups"), ("n_genes", "genes"),
                     ("epochs", "epochs"), ("seconds_per_epoch", "s/epoch")], title="HisHRST fit")
        print(f"-> {args.out}")
        return recs


if __name__ == "__main__":
    main()
