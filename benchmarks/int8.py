"""int8 vs fp32 encoder on the CPU: ONNX Runtime speed-up and embedding parity (``hishrst export --precision int8``).

For each encoder (the tiny random ``test-vit`` and the UNI architecture, timm ``vit_large_patch16_224`` with
random weights: ``load_encoder("uni", random_init=True)``, no download) the fp32 ONNX graph is exported as the
bundle exports it, quantised exactly as ``hishrst export --precision int8`` does
(:func:`hishrst_export.quantize.quantize_encoder`: static QDQ, per-channel int8 weights, uint8 activations,
MinMax), calibrated on synthetic H&E-like tiles (:mod:`hishrst_train.synth` section, tiles cut at its spots as
training cuts them), then timed with ONNX Runtime CPU sessions (``--threads`` intra-op threads, ``--batch``
tiles a call, one warm-up call each, then ``--repeats`` calls of fp32 and int8 in alternation; best and median).

Parity on held-out tiles (other spots): cosine similarity of each tile's int8 embedding with its fp32 one
(mean, min); the same after subtracting the fp32 mean embedding (``centred``: random-weight ViTs give nearly
the same embedding for every tile, so the raw cosine alone says little); per-feature Pearson correlation
across tiles (mean, min). Random weights only: parity on real UNI weights is not measured here.

    python -m benchmarks.int8                              # test-vit and UNI ViT-L (minutes on 2 cores)
    python -m benchmarks.int8 --quick                      # sub-minute smoke run (test-vit only)
    python -m benchmarks.int8 --encoders uni --repeats 5 --calibration 64
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import JsonlWriter, base_parser, print_table, str_list, workdir_of

ENCODERS = ("test-vit", "uni")
#: µm per tile side for the synthetic tiles (UNI's 224 px at ~0.5 µm/px).
PATCH_UM = 112.0


def _tiles(workdir: Path, size: int, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` uint8 tiles of ``size`` px cut at spots of the synthetic section (random order, seeded)."""
    from benchmarks._data import ensure_section
    from hishrst_train.data import open_fullres_image
    from hishrst_train.features import cut_patches_for
    from hishrst_train.tasks import load_section

    adata = load_section(str(ensure_section(workdir, "small") / "outs"))
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    idx = np.random.default_rng(seed).permutation(len(xy))[:n]
    if len(idx) < n:
        raise SystemExit(f"the synthetic section has {len(xy)} spots, fewer than the {n} tiles asked for")
    img = open_fullres_image(adata.uns["hishrst"]["fullres_image"])
    return cut_patches_for(img, xy[idx], mpp=float(adata.uns["hishrst"]["mpp"]), patch_um=PATCH_UM, input_size=size)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _embed(sess: Any, tiles: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([sess.run(None, {"tiles": tiles[i : i + batch]})[0] for i in range(0, len(tiles), batch)])


def _parity(f8: np.ndarray, f32: np.ndarray) -> dict[str, float]:
    from hishrst_export.parity import compare
    from hishrst_export.quantize import embedding_cosine

    cos = embedding_cosine(f8, f32)
    mean = f32.mean(0, keepdims=True)
    centred = embedding_cosine(f8 - mean, f32 - mean)
    st = compare(f8, f32)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "centred_cosine_mean": float(centred.mean()), "centred_cosine_min": float(centred.min()),
            "feature_pcc_mean": st["mean_gene_pcc"], "feature_pcc_min": st["min_gene_pcc"],
            "scaled_max_abs": st["scaled_max_abs"], "n_tiles": int(len(f32))}


def _time(sessions: dict[str, Any], feed: np.ndarray, repeats: int) -> dict[str, dict[str, float]]:
    """One warm-up call per session, then ``repeats`` calls of each in alternation (load drifts hit both)."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"tiles": feed})
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, {"tiles": feed})
            times[k].append(time.perf_counter() - t0)
    out = {}
    for k, t in times.items():
        best, med = min(t), float(np.median(t))
        out[k] = {"best_s": best, "median_s": med, "tiles_per_s_best": len(feed) / best,
                  "tiles_per_s_median": len(feed) / med, "calls": len(t)}
    return out


def _export(name: str, work: Path, calibration: np.ndarray) -> tuple[Path, Path, float, float]:
    """fp32 ONNX export and its int8 quantisation (seconds of each)."""
    from hishrst_export.onnx_export import export_encoder_onnx
    from hishrst_export.quantize import quantize_encoder
    from hishrst_train.encoders.module import load_encoder

    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    enc = load_encoder(name, random_init=name != "test-vit")
    lay = DEFAULT_TILE_LAYOUT.lower()
    fp32, int8 = work / f"{name}-fp32-{lay}.onnx", work / f"{name}-int8-calib{len(calibration)}-{lay}.onnx"
    t0 = time.perf_counter()
    if not fp32.exists():
        export_encoder_onnx(enc, fp32)
    t1 = time.perf_counter()
    quantize_encoder(fp32, int8, calibration)
    return fp32, int8, t1 - t0, time.perf_counter() - t1


def measure(name: str, work: Path, *, threads: int, batch: int, repeats: int, n_calib: int, n_held: int
            ) -> dict[str, Any]:
    """One record: speed of fp32 vs int8 and their embedding parity for encoder ``name``."""
    from hishrst_train.encoders.registry import ENCODERS as SPECS

    size = int(SPECS[name].input_size)
    tiles = _tiles(work, size, n_calib + n_held)
    calibration, held = tiles[:n_calib], tiles[n_calib:]
    fp32, int8, export_s, quant_s = _export(name, work / "int8", calibration)
    from hishrst_runtime.core.patches import to_tile_layout
    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    held = to_tile_layout(held, DEFAULT_TILE_LAYOUT)  # the export's own input layout
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    parity = _parity(_embed(sessions["int8"], held, batch), _embed(sessions["fp32"], held, batch))
    load_before = os.getloadavg()[0]
    timing = _time(sessions, np.ascontiguousarray(held[:batch]), repeats)
    return {
        "status": "ok", "encoder": name, "weights": "random" if name != "test-vit" else "test encoder (random)",
        "threads": threads, "batch": batch, "repeats": repeats, "calibration_tiles": n_calib,
        "fp32": timing["fp32"], "int8": timing["int8"],
        "speedup_best": timing["fp32"]["best_s"] / timing["int8"]["best_s"],
        "speedup_median": timing["fp32"]["median_s"] / timing["int8"]["median_s"],
        "parity": parity, "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size},
        "export_s": round(export_s, 1), "quantize_s": round(quant_s, 1),
        "load_avg_1m_before_timing": round(load_before, 2), "load_avg_1m_after_timing": round(os.getloadavg()[0], 2),
    }


def _row(r: dict[str, Any]) -> dict[str, Any]:
    p = r["parity"]
    return {"encoder": r["encoder"], "fp32 tiles/s": f"{r['fp32']['tiles_per_s_best']:.2f}",
            "int8 tiles/s": f"{r['int8']['tiles_per_s_best']:.2f}", "speed-up best": f"{r['speedup_best']:.2f}x",
            "median": f"{r['speedup_median']:.2f}x", "cos mean/min": f"{p['cosine_mean']:.4f}/{p['cosine_min']:.4f}",
            "centred cos": f"{p['centred_cosine_mean']:.3f}/{p['centred_cosine_min']:.3f}",
            "feat PCC": f"{p['feature_pcc_mean']:.3f}/{p['feature_pcc_min']:.3f}",
            "load": f"{r['load_avg_1m_before_timing']}→{r['load_avg_1m_after_timing']}"}


def main(argv: list[str] | None = None) -> None:
    p = base_parser("int8", __doc__.splitlines()[0])
    p.add_argument("--encoders", type=str_list, default=list(ENCODERS), help="test-vit and/or uni")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    p.add_argument("--batch", type=int, default=8, help="tiles per call")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per precision (default 5; quick 2)")
    p.add_argument("--calibration", type=int, default=None, help="calibration tiles (default: test-vit 128, uni 32)")
    p.add_argument("--heldout", type=int, default=None, help="held-out parity tiles (default 32; quick 16)")
    args = p.parse_args(argv)
    work = workdir_of(args)
    (work / "int8").mkdir(exist_ok=True)
    encoders = ["test-vit"] if args.quick else args.encoders
    repeats = args.repeats or (2 if args.quick else 5)
    held = args.heldout or (16 if args.quick else 32)
    rows = []
    with JsonlWriter(args.out, benchmark="int8", quick=args.quick, append=args.append) as w:
        if args.quick and "uni" in args.encoders:
            w.skip("quick run: the ViT-L export and calibration take minutes", encoder="uni")
        for name in encoders:
            calib = args.calibration or (16 if args.quick else 128 if name == "test-vit" else 32)
            rec = measure(name, work, threads=args.threads, batch=args.batch, repeats=repeats, n_calib=calib,
                          n_held=held)
            rows.append(_row(w.write(rec)))
    print_table(rows, [(k, k) for k in rows[0]] if rows else [])


if __name__ == "__main__":
    main()
