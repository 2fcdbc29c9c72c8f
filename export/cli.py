"""``hishrst export`` command."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["export"]


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle directory to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch for TensorRT profiles.")
@click.option("--tensorrt", is_flag=True, help="Also build TensorRT engines (needs TensorRT and a GPU).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Encoder weights file, if the run used one that has moved.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
def export(run_dir: Path, out: Path, precision: str, max_batch: int, tensorrt: bool, opset: int,
           weights: Path | None, overwrite: bool) -> None:
    """Export a fitted RUN_DIR to an ONNX (and optionally TensorRT) model bundle, parity-checked."""
    from hishrst_export.bundle import ExportError, export_bundle
    from hishrst_export.onnx_export import ParityError

    try:
        m = export_bundle(run_dir, out=out, precision=precision, max_batch=max_batch, tensorrt=tensorrt,  # type: ignore[arg-type]
                          opset=opset, weights=weights, overwrite=overwrite)
    except (ExportError, ParityError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"\nbundle written to {out} ({m['export_seconds']} s)")
    click.echo(f"  encoder  {m['encoder']['name']} ({m['encoder']['input_size']} px → {m['encoder']['feature_dim']}-d), genes {len(m['genes'])}")
    for key, f in m["files"].items():
        click.echo(f"  {key:<12} {f['path']:<14} {f['precision']}  sha256 {f['sha256'][:12]}…")
    click.echo(f"  parity ({m['parity']['precision']}, ONNX Runtime CPU vs PyTorch):")
    for part in ("encoder", "head"):
        for label, r in m["parity"][part].items():
            click.echo(f"    {part:<8}{label:<8} max|Δ| {r['max_abs']:.2e}  scaled {r['scaled_max_abs']:.2e} "
                       f"(≤ {r['tolerance']['scaled_max_abs']:g})  min PCC {r['min_gene_pcc']:.6f}")
    if m["license"]["gated"]:
        click.echo(f"  LICENCE: {m['license']['notice']}")
