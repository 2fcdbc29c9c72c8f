"""``hishrst export`` command: prints a summary with the parity figures of the new bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hishrst_runtime.cli.errors import command_errors
from hishrst_runtime.core.vocab import DEFAULT_PRECISION, DEFAULT_TILE_LAYOUT, PRECISIONS, TILE_LAYOUTS
from hishrst_train.cli import threads_option, training_module, use_threads

__all__ = ["export", "format_summary"]


def _mb(n: int | None) -> str:
    return f"{n / 1e6:.1f} MB" if n is not None else "?"


def format_summary(m: dict[str, Any], out: Path) -> list[str]:
    """Human-readable summary lines of a bundle manifest ``m`` written to ``out``."""
    enc = m["encoder"]
    par = m["parity"]
    lines = [
        f"bundle written to {out} ({m['export_seconds']} s, schema {m['schema_version']}, opset {m['onnx_opset']})",
        (f"  encoder  {enc['name']} ({enc['input_size']} px uint8 RGB → {enc['feature_dim']}-d), "
         f"patch {m['patch']['size_um']:g} µm at {m['patch']['train_mpp']:g} µm/px, genes {len(m['genes'])}"),
    ]
    if "integrity" in m:
        lines.append(f"  integrity    manifest content sha256 {m['integrity']['content_sha256'][:12]}… "
                     "(also recorded in head.onnx with its gene names)")
    for key, f in m["files"].items():
        lines.append(f"  {key:<12} {f['path']:<14} {f['precision']}  {_mb(f.get('bytes'))}  sha256 {f['sha256'][:12]}…")
        for x in f.get("external_data", []):
            lines.append(f"  {'':<12} {x['path']:<14} external data  {_mb(x.get('bytes'))}  sha256 {x['sha256'][:12]}…")
    q = enc.get("quantization")
    lines.append(f"  parity ({'fp32 graphs, before int8 quantisation' if q else par['precision']}, "
                 "ONNX Runtime CPU vs PyTorch fp32 on the CPU):")
    for part in ("encoder", "head"):
        for label, r in par[part].items():
            tol = r["tolerance"]
            lines.append(
                f"    {part:<8}{label:<8} max|Δ| {r['max_abs']:.2e}  scaled {r['scaled_max_abs']:.2e} "
                f"(≤ {tol['scaled_max_abs']:g})  min PCC {r['min_gene_pcc']:.6f} (≥ {tol['min_gene_pcc']:g})"
            )
    if "real" not in par["encoder"]:
        lines.append(f"    real tiles: {par.get('real_tiles', 'unavailable')}")
    if par["precision"] == "fp16":
        worst = max(r["scaled_max_abs"] for part in ("encoder", "head") for r in par[part].values())
        pcc = min(r["min_gene_pcc"] for part in ("encoder", "head") for r in par[part].values())
        lines.append(f"  fp16 accuracy cost vs PyTorch fp32: worst scaled error {worst:.2e}, worst per-gene PCC {pcc:.6f}")
    if q:
        g, tol = q["gate"], q["gate"]["thresholds"]
        lines.append(f"  int8 encoder ({q['format']}, {q['calibration']['tiles']} calibration tiles) vs fp32 on "
                     f"{g['n_tiles']} held-out training tiles: cosine mean {g['cosine_mean']:.4f} (≥ {tol['cosine_mean']:g})"
                     f" min {g['cosine_min']:.4f} (≥ {tol['cosine_min']:g}); per-gene PCC mean {g['gene_pcc_mean']:.4f} "
                     f"(≥ {tol['gene_pcc_mean']:g}) min {g['gene_pcc_min']:.4f} (≥ {tol['gene_pcc_min']:g})")
    for key, f in m["files"].items():
        if f.get("format") == "tensorrt":
            lines.append(f"  {key}: TensorRT {f.get('tensorrt_version')} on {f.get('gpu')} (runs only there)")
    if enc.get("test_encoder"):
        lines.append(f"  TEST ENCODER: {enc['name']} has random weights — this bundle predicts nothing real")
    if m["license"]["gated"]:
        lines.append(f"  LICENCE ({m['encoder'].get('license')}): {m['license']['notice']}")
    return lines


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle directory to write.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=DEFAULT_PRECISION, show_default=True,
              help="fp16: half-precision weights/activations (LayerNorm, softmax, positions kept fp32), for GPUs. "
                   "int8: static int8 encoder (calibrated on training tiles, accuracy-gated; head fp32) for CPUs; "
                   "not with --tensorrt.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch for TensorRT profiles.")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines (needs TensorRT and a GPU).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Encoder weights file, if the run used one that has moved.")
@click.option("--data", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training section (Space Ranger outs), if it moved since `hishrst fit` (real-tile parity check).")
@click.option("--tile-layout", type=click.Choice(TILE_LAYOUTS), default=DEFAULT_TILE_LAYOUT, show_default=True,
              help="How the encoder graph takes its uint8 tiles: NHWC [B,S,S,3] or NCHW [B,3,S,S] (OME-Zarr's channel "
                   "planes: hishrst-run copies whole plane rows, 55 instead of 130 us a tile; the default).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
@threads_option
def export(run_dir: Path, out: Path, precision: str, max_batch: int, tensorrt: bool, opset: int,
           weights: Path | None, data: Path | None, tile_layout: str, overwrite: bool, threads: int | None) -> None:
    """Export a fitted RUN_DIR to an ONNX (and optionally TensorRT) model bundle, parity-checked."""
    with command_errors():
        bundle = training_module("hishrst_export.bundle", command="export", extra="export")
        onnx_export = training_module("hishrst_export.onnx_export", command="export", extra="export")
        use_threads(threads)
        try:
            m = bundle.export_bundle(run_dir, out=out, precision=precision, max_batch=max_batch, tensorrt=tensorrt,
                                     opset=opset, weights=weights, data=data, overwrite=overwrite,
                                     tile_layout=tile_layout, echo=lambda s: click.echo(s, err=True))
        except onnx_export.ParityError as e:
            raise onnx_export.ParityError(f"parity check failed, no bundle written: {e}") from e
    click.echo("")
    for line in format_summary(m, out):
        click.echo(line)
