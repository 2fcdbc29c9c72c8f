"""``hishrst export``: a fitted run + its encoder → a versioned, parity-checked model bundle.

The chain is ``export_encoder_onnx`` → ``export_head_onnx`` → parity checks → (``build_engine`` for
TensorRT) → ``manifest.json``. The bundle is written into a temporary sibling directory and renamed
into place only when every step has passed, so a failed export never leaves a bundle that looks
complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime import __version__
from hishrst_runtime.grouping import group_points, pad_groups
from hishrst_runtime.manifest import load_bundle, sha256_file, write_manifest
from hishrst_runtime.patches import cut_patches, patch_side_px

__all__ = ["export_bundle", "LICENSE_NOTICES", "ExportError"]

LICENSE_NOTICES = {
    "CC-BY-NC-ND-4.0": (
        "This bundle embeds weights of a gated model released under CC-BY-NC-ND 4.0 (e.g. UNI by the Mahmood "
        "Lab). Its licence forbids redistribution and commercial use: keep the bundle inside your organisation, "
        "do not publish it, and cite the model. hishrst never ships such bundles."
    ),
}
N_REAL = 64


class ExportError(RuntimeError):
    """The export cannot proceed (bad run directory, output exists, TensorRT unavailable, …)."""


def _real_inputs(config: dict[str, Any], encoder: Any, n: int = N_REAL) -> tuple[np.ndarray, np.ndarray] | None:
    """Up to ``n`` real tiles and their level-0 pixel centres from the run's training section."""
    from hishrst_train.io import open_fullres_image
    from hishrst_train.tasks import load_section

    try:
        adata = load_section(config["data"])
        img = open_fullres_image(adata.uns["hishrst"]["fullres_image"])
    except (OSError, ValueError, KeyError):
        return None
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    first = group_points(xy, max_size=config["grouping"]["max_size"])
    idx = np.concatenate(first)[:n]
    side = patch_side_px(config["patch"]["size_um"], config["patch"]["train_mpp"])
    return cut_patches(img, xy[idx], side=side, out_size=encoder.input_size), xy[idx]


def export_bundle(
    run_dir: str | Path,
    *,
    out: str | Path,
    precision: Literal["fp32", "fp16"] = "fp32",
    max_batch: int = 64,
    tensorrt: bool = False,
    opset: int = 17,
    weights: str | Path | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``run_dir`` (written by ``hishrst fit``) into the bundle directory ``out``.

    Returns the manifest. Raises :class:`ExportError` for unusable input and
    :class:`hishrst_export.onnx_export.ParityError` when a parity check fails (nothing is written).
    """
    import torch

    from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx, export_head_onnx, head_parity
    from hishrst_train.encoders import load_encoder
    from hishrst_train.train import load_checkpoint

    run_dir, out = Path(run_dir), Path(out)
    if precision not in ("fp32", "fp16"):
        raise ExportError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be ≥ 1, got {max_batch}")
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; pass --overwrite to replace it, or choose another --out")
    trt_info = None
    if tensorrt:  # fail before writing anything
        from hishrst_export.tensorrt import TensorRTUnavailable, tensorrt_info

        try:
            trt_info = tensorrt_info()
        except TensorRTUnavailable as e:
            raise ExportError(f"--tensorrt: {e}") from e
    try:
        model, config = load_checkpoint(run_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from e
    if config["position"]["mode"] != "continuous":
        raise ExportError(
            f"{run_dir}: trained with grid position mode, which needs Visium array coordinates that whole slides "
            "do not have; re-fit with --position continuous to deploy it"
        )
    enc_cfg = config["encoder"]
    encoder = load_encoder(enc_cfg["name"], weights=weights or enc_cfg.get("weights"))
    if enc_cfg["gated"]:
        print(f"NOTICE ({enc_cfg['license']}): {LICENSE_NOTICES.get(enc_cfg['license'], 'gated weights: check the licence')}")

    t0 = time.perf_counter()
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        enc_path = export_encoder_onnx(encoder, tmp / "encoder.onnx", opset=opset, precision=precision)
        head_path = export_head_onnx(model, tmp / "head.onnx", opset=opset, precision=precision)

        rng = np.random.default_rng(seed)
        s = encoder.input_size
        tiles = {"random": rng.integers(0, 256, (16, s, s, 3), dtype=np.uint8)}
        real = _real_inputs(config, encoder)
        if real is not None:
            tiles["real"] = real[0]
        enc_report = encoder_parity(encoder, enc_path, tiles=tiles, precision=precision)

        d = model.config.feature_dim
        rf = rng.standard_normal((3, 50, d)).astype(np.float32)
        rp = (rng.random((3, 50, 2)) * 6000).astype(np.float32)
        rm = np.ones((3, 50), np.float32)
        rm[1, 37:] = 0
        feeds = {"random": {"features": rf, "positions": rp, "mask": rm}}
        if real is not None:
            with torch.no_grad():
                feats = encoder(torch.from_numpy(real[0])).numpy()
            groups = group_points(real[1], max_size=config["grouping"]["max_size"])
            index, mask = pad_groups(groups)
            safe = np.where(index < 0, 0, index)
            pos = (real[1] * config["patch"]["train_mpp"]).astype(np.float32)
            feeds["real"] = {"features": feats[safe], "positions": pos[safe], "mask": mask}
        head_report = head_parity(model, head_path, feeds=feeds, precision=precision)

        files: dict[str, Any] = {}
        for key, path in (("encoder", enc_path), ("head", head_path)):
            entry: dict[str, Any] = {"path": path.name, "sha256": sha256_file(path), "format": "onnx", "precision": precision}
            data = path.with_name(path.name + ".data")
            if data.exists():
                entry["external_data"] = [data.name]
                entry["external_data_sha256"] = [sha256_file(data)]
            files[key] = entry
        if tensorrt:
            from hishrst_export.tensorrt import build_engine, engine_parity

            for key, path in (("encoder", enc_path), ("head", head_path)):
                shapes = None if key == "encoder" else {
                    k: ((1, 1) + tail, (8, 50) + tail, (max_batch, 64) + tail)
                    for k, tail in (("features", (d,)), ("positions", (2,)), ("mask", ()))
                }
                eng = build_engine(path, out_path=tmp / f"{key}.plan", precision=precision, max_batch=max_batch,
                                   shapes=shapes, timing_cache=tmp / "timing.cache")
                sample = {"tiles": tiles["random"][:4]} if key == "encoder" else feeds["random"]
                files[f"{key}_trt"] = {
                    "path": eng.name, "sha256": sha256_file(eng), "format": "tensorrt", "precision": precision,
                    "gpu": trt_info["gpu"], "tensorrt_version": trt_info["version"],
                    "parity_vs_onnxruntime": engine_parity(eng, path, sample),
                }
            (tmp / "timing.cache").unlink(missing_ok=True)

        manifest = {
            "hishrst_version": __version__,
            "created_unix": int(time.time()),
            "encoder": {
                "name": enc_cfg["name"], "fingerprint": enc_cfg["fingerprint"], "input_size": int(encoder.input_size),
                "feature_dim": int(encoder.feature_dim), "input": {"name": "tiles", "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
                "normalisation": {"scale": 1 / 255, "mean": enc_cfg["mean"], "std": enc_cfg["std"], "in_graph": True},
                "gated": bool(enc_cfg["gated"]), "license": enc_cfg["license"],
            },
            "patch": config["patch"],
            "position": {**config["position"], **{k: model.config.to_dict()[k] for k in ("pos_n_freqs", "min_wavelength_um", "max_wavelength_um")}},
            "grouping": config["grouping"],
            "genes": config["genes"],
            "output": {"name": "expression", "meaning": "log1p of counts per 10k (normalize_total to 1e4, then log1p)",
                       "target_sum": config["preprocessing"]["target_sum"], "dtype": "float32"},
            "head": {"inputs": ["features", "positions", "mask"], "max_group_size": config["grouping"]["max_size"]},
            "preprocessing": config["preprocessing"],
            "files": files,
            "onnx_opset": opset,
            "max_batch": max_batch,
            "parity": {"reference": "PyTorch (CPU) vs ONNX Runtime CPU", "precision": precision,
                       "encoder": enc_report, "head": head_report},
            "license": {"gated": bool(enc_cfg["gated"]), "redistributable": not enc_cfg["gated"],
                        "notice": LICENSE_NOTICES.get(enc_cfg["license"]) if enc_cfg["gated"] else None},
            "source_run": {"task": config["task"], "hishrst_version": config["hishrst_version"]},
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        write_manifest(tmp, manifest)
        load_bundle(tmp)  # the runtime's own validation must accept what we wrote
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads((out / "manifest.json").read_text())
