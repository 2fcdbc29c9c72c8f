"""``hishrst export``: a fitted run + its encoder → a versioned, parity-checked model bundle.

The chain is ``export_encoder_onnx`` → ``export_head_onnx`` → parity checks (ONNX Runtime CPU vs PyTorch fp32, on
random tiles and on real tiles cut from the run's training section) → (``--precision int8``: the parity-checked
fp32 encoder quantised and gated, :mod:`hishrst_export.quantize`) → optional TensorRT engines → ``manifest.json``
→ validation with the runtime's own :func:`load_bundle`. The bundle is written into a temporary sibling directory
and renamed into place only when every step has passed, so a failed export never leaves a bundle (nor a
half-written one) behind, and ``--overwrite`` replaces an existing bundle only after the new one is complete.
Which directories may be replaced is the one ownership rule of :mod:`hishrst_runtime.core.owned`: every bundle is
marked as written by hishrst; ``--overwrite`` replaces only such a bundle (or one written before the marker
existed: a hishrst ``manifest.json`` and nothing but the files it lists), never a folder of other files, and
``--out`` may not overlap the run directory or another input. Debris of killed exports (hidden
``.<out>.partial-PID-…`` siblings) is removed by the next export; a full disk is a one-line :class:`ExportError`.

Integrity: ``head.onnx`` records its gene names, their count and the manifest content hash in its
``metadata_props`` (:mod:`hishrst_runtime.bundle.integrity`); a run whose weights hold NaN/inf is refused, and
parity fails on any non-finite output (:mod:`hishrst_export.parity`).

Bundle layout (schema :data:`hishrst_runtime.bundle.manifest.SCHEMA_VERSION`): ``manifest.json`` (the contract,
see hishrst_runtime.bundle.manifest); ``encoder.onnx`` (uint8 tiles [B, S, S, 3] → features [B, D], and tokens [B,
rows, cols, width] for sub-spot runs, :mod:`hishrst_export.subspot_export`); ``encoder.onnx.data`` (only for models
> ~1.9 GB, listed with its SHA-256); ``head.onnx`` (features [G, N, D], positions [G, N, 2] µm, mask [G, N] →
expression; a sub-spot head: tokens → expression per token); ``encoder.plan``, ``head.plan`` (only with --tensorrt).
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hishrst_runtime.bundle.manifest import (
    SCHEMA_NAME,
    load_bundle,
    sha256_file,
    write_manifest,
)
from hishrst_runtime.core.errors import HishrstError
from hishrst_runtime.core.files import clean_stale_siblings, read_json, remove_tree, swap_in, temp_sibling
from hishrst_runtime.core.owned import check_replaceable, mark_owned
from hishrst_runtime.core.patches import to_tile_layout
from hishrst_runtime.core.vocab import (DEFAULT_PRECISION, DEFAULT_TILE_LAYOUT, PRECISIONS, TENSORRT_PRECISIONS,
                                        TILE_LAYOUTS, Precision, TileLayout)
from hishrst_export.manifest import build_manifest, contract_sections, file_entry, file_precisions, head_metadata_for
from hishrst_export.manifest import listed_files
from hishrst_export.parity_inputs import parity_inputs
from hishrst_train.runconfig import RunConfig, RunConfigError

__all__ = ["LICENSE_NOTICES", "N_RANDOM", "N_REAL", "ExportError", "export_bundle"]

LICENSE_NOTICES = {
    "CC-BY-NC-ND-4.0": (
        "This bundle embeds weights of a gated model released under CC-BY-NC-ND 4.0 (e.g. UNI by the Mahmood "
        "Lab). Its licence forbids redistribution and commercial use: keep the bundle inside your organisation, "
        "do not publish it, and cite the model. hishrst never ships such bundles."
    ),
}
class ExportError(HishrstError, RuntimeError):
    """The export cannot proceed (bad run directory, output exists, TensorRT unavailable, …)."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

def _legacy_bundle(path: Path) -> bool:
    """A bundle from before the ownership marker: a hishrst ``manifest.json`` and only the files it lists."""
    m = read_json(path / "manifest.json")
    if not isinstance(m, dict) or m.get("schema") != SCHEMA_NAME or not isinstance(m.get("files"), dict):
        return False
    names = {"manifest.json"}
    for entry in m["files"].values():
        if isinstance(entry, dict):
            names.add(str(entry.get("path")))
            names.update(str(x.get("path") if isinstance(x, dict) else x) for x in entry.get("external_data") or [])
    return {p.name for p in path.iterdir()} <= names


def export_bundle(run_dir: str | Path, *, out: str | Path, precision: Precision = DEFAULT_PRECISION,
                  max_batch: int = 64, tensorrt: bool = False, opset: int = 17, weights: str | Path | None = None,
                  data: str | Path | None = None, overwrite: bool = False, seed: int = 0,
                  tile_layout: TileLayout = DEFAULT_TILE_LAYOUT, echo: Callable[[str], None] = _stderr) -> dict[str, Any]:
    """Export ``run_dir`` (written by ``hishrst fit``) into the bundle directory ``out``.

    Args:
        run_dir: the fitted run (``config.json`` + ``model.safetensors``).
        out: bundle directory to create (must not exist unless ``overwrite``; only a bundle hishrst wrote or an empty
            directory is ever replaced; it may not overlap ``run_dir``, ``weights`` or ``data``).
        precision: ``"fp32"``, ``"fp16"`` (mixed precision; see ``hishrst_export.onnx_export``) or ``"int8"``
            (static int8 encoder for CPUs, fp32 head, gated: ``hishrst_export.quantize``; no TensorRT).
        max_batch: largest batch (tiles, or head groups) for TensorRT profiles; also a parity chunk size.
        tensorrt: also build TensorRT engines (needs TensorRT >= 10 and an NVIDIA GPU; checked first).
        opset: ONNX opset.
        weights: encoder weights file, if the run's has moved.
        data: the training section (Space Ranger ``outs``), if it moved since ``hishrst fit``; its tiles feed the
            real-tile parity check (and int8's calibration and gate).
        overwrite: replace an existing bundle.
        seed: seed of the random parity inputs (and of int8's choice of spots).
        tile_layout: how the encoder graph takes its uint8 tiles, ``"NHWC"`` ``[B, S, S, 3]`` or ``"NCHW"``
            ``[B, 3, S, S]`` (OME-Zarr's planes: ``hishrst-run`` copies whole plane rows, 55 instead of 130 µs a tile).
        echo: where notices (licence, missing real tiles) go; stderr by default.

    Returns the manifest. Raises :class:`ExportError` for unusable input (weights with NaN/inf included), a full disk
    or an int8 encoder that fails its gate, :class:`hishrst_runtime.core.owned.ForeignOutputError` /
    :class:`~hishrst_runtime.core.errors.OutputStateError` for an ``out`` that may not be written, and
    :class:`hishrst_export.onnx_export.ParityError` when a parity check fails; in every case nothing is written (an
    existing bundle at ``out`` is left as it was).
    """
    run_dir, out = Path(run_dir), Path(out).absolute()
    _check_args(precision=precision, max_batch=max_batch, tile_layout=tile_layout)
    trt_info = _tensorrt_preflight(precision) if tensorrt else None  # fail before reading or writing anything
    # killed exports' debris; a bundle a killed swap left aside is put back first, so the check below sees it
    clean_stale_siblings(out)
    check_replaceable(out, kind="bundle", overwrite=overwrite, what="a hishrst model bundle",
                      inputs=(run_dir, weights, data), legacy=_legacy_bundle)
    model, config, encoder = _load_run(run_dir, weights=weights)
    notice = _licence_notice(config, echo)
    if encoder.spec.test_only:
        echo(f"WARNING: encoder {encoder.spec.name!r} is a randomly initialised test encoder: this bundle predicts "
             "nothing real and is marked encoder.test_encoder in its manifest; use it for tests and smoke runs only")
    contract, head_meta = _contract(run_dir, model, config, encoder, precision=precision, layout=tile_layout)
    t0 = time.perf_counter()
    tmp = _make_tmp(out)
    try:
        files, parity = _export_models(tmp, model, config, encoder, precision=precision, max_batch=max_batch,
                                       opset=opset, data=data, seed=seed, trt_info=trt_info, echo=echo,
                                       head_meta=head_meta, contract=contract)
        manifest = build_manifest(model, config, encoder, files=files, parity=parity, opset=opset,
                                  max_batch=max_batch, notice=notice, contract=contract)
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        _finish(tmp, out, manifest)
    except BaseException as e:
        remove_tree(tmp)
        _raise_if_disk_full(e, out)
        raise
    return json.loads((out / "manifest.json").read_text())


def _check_args(*, precision: str, max_batch: int, tile_layout: str) -> None:
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be ≥ 1, got {max_batch}")
    if tile_layout not in TILE_LAYOUTS:
        raise ExportError(f"--tile-layout {tile_layout!r}: must be one of {', '.join(TILE_LAYOUTS)}")


def _finish(tmp: Path, out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest and the ownership marker into ``tmp``, validate it as the runtime will, swap it in."""
    write_manifest(tmp, manifest)
    mark_owned(tmp, "bundle")
    load_bundle(tmp)  # the runtime's own validation must accept what we wrote
    swap_in(tmp, out)


def _licence_notice(config: RunConfig, echo: Callable[[str], None]) -> str | None:
    """The licence notice of a gated encoder (echoed), or None."""
    gated = bool(config.encoder.get("gated"))
    license_ = config.encoder.get("license") or ""
    notice = LICENSE_NOTICES.get(license_, "gated weights: check the licence") if gated else None
    if notice:
        echo(f"NOTICE ({license_}): {notice}")
    return notice


def _contract(run_dir: Path, model: Any, config: RunConfig, encoder: Any, *, precision: str, layout: str
              ) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest's contract sections and the head's ``metadata_props`` (genes, content hash)."""
    contract = contract_sections(model, config, encoder, layout=layout)
    try:
        return contract, head_metadata_for(contract, precision)
    except ValueError as e:
        raise ExportError(f"{run_dir / 'config.json'}: a NaN or infinite number in the bundle's contract ({e}); "
                          "fix the run's config or re-fit the run") from e


def _raise_if_disk_full(e: BaseException, out: Path) -> None:
    """Turn a full disk (ENOSPC / EDQUOT behind ``e``) into a one-line :class:`ExportError`."""
    seen: BaseException | None = e
    for _ in range(8):  # the error itself or one of its causes
        if seen is None:
            return
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            what = Path(seen.filename).name if seen.filename else "the bundle"
            reason = (seen.strerror or os.strerror(seen.errno)).lower()
            raise ExportError(f"{out}: {reason} while writing {what}; free space on {out.parent} or choose another "
                              "--out (nothing was written)") from e
        seen = seen.__cause__ or seen.__context__


def _tensorrt_preflight(precision: str) -> dict[str, Any]:
    """TensorRT version and GPU of this machine, or :class:`ExportError` saying nothing was written."""
    from hishrst_export.tensorrt import TensorRTUnavailable, tensorrt_info

    if precision not in TENSORRT_PRECISIONS:
        raise ExportError(f"--precision {precision} --tensorrt: TensorRT engines are built in "
                          f"{', '.join(TENSORRT_PRECISIONS)} only, nothing was written; export {precision} (CPU "
                          "runtime) without --tensorrt, or export --precision fp16 --tensorrt for GPUs")
    try:
        return tensorrt_info()
    except TensorRTUnavailable as e:
        raise ExportError(f"--tensorrt: cannot build TensorRT engines on this machine: {e}. Nothing was "
                          "written; export without --tensorrt (the runtime can build engines itself with "
                          "--provider tensorrt), or run the export on the GPU machine") from e


def _load_run(run_dir: Path, *, weights: str | Path | None) -> tuple[Any, RunConfig, Any]:
    """The run's head, its :class:`RunConfig` and its encoder (the very weights it was trained with)."""
    from hishrst_train.encoders.module import encoder_fingerprint, load_encoder
    from hishrst_train.encoders.weights import WeightsError
    from hishrst_train.train import load_run

    try:
        model, config = load_run(run_dir)
    except RunConfigError as e:
        raise ExportError(str(e)) from e
    if config.position["mode"] == "grid":
        raise ExportError(
            f"{run_dir}: trained with grid position mode, which needs Visium array coordinates that whole slides "
            "do not have; re-fit with --position relative (or continuous) to deploy it"
        )
    name = config.encoder["name"]
    try:
        encoder = load_encoder(name, weights=weights or config.weights)
    except (WeightsError, KeyError) as e:
        raise ExportError(f"{run_dir}: cannot load encoder {name!r}: {e}") from e
    fingerprint = encoder_fingerprint(encoder)
    trained = config.encoder.get("fingerprint")
    if trained and trained != fingerprint:
        raise ExportError(
            f"{run_dir / 'config.json'}: the encoder weights differ from those the run was trained with (fingerprint "
            f"{fingerprint} vs {trained}), so the head would get features it was not trained on; "
            "pass the weights used by `hishrst fit` with --weights"
        )
    _check_finite(run_dir, model, encoder)
    return model, config, encoder


def _nonfinite_tensors(module: Any) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding NaN or ±inf."""
    import torch

    return [name for name, t in module.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _check_finite(run_dir: Path, model: Any, encoder: Any) -> None:
    """:class:`ExportError` when the head's or the encoder's weights hold NaN/inf (a bundle would predict NaN)."""
    bad = _nonfinite_tensors(model)
    if bad:
        raise ExportError(
            f"{run_dir / 'model.safetensors'}: {len(bad)} weight tensor(s) hold NaN/inf ({', '.join(bad[:3])}"
            f"{', …' if len(bad) > 3 else ''}): training diverged, typically on NaN in the training data — check the "
            "data (and the learning rate) and re-fit the run; a bundle of it would predict NaN"
        )
    bad = _nonfinite_tensors(encoder)
    if bad:
        raise ExportError(f"{run_dir}: the encoder weights hold NaN/inf ({', '.join(bad[:3])}); pass intact weights "
                          "(those used by `hishrst fit`) with --weights")


def _make_tmp(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` with the usual directory mode, to build the bundle in."""
    tmp = temp_sibling(out, "partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except PermissionError as e:
        raise ExportError(f"{out.parent}: not writable ({e.strerror}); choose another --out or fix its "
                          "permissions") from e
    except OSError as e:
        _raise_if_disk_full(e, out)
        raise
    return tmp


def _export_models(tmp: Path, model: Any, config: RunConfig, encoder: Any, *, precision: str, max_batch: int,
                   opset: int, data: str | Path | None, seed: int, trt_info: dict[str, Any] | None,
                   echo: Callable[[str], None], head_meta: dict[str, str], contract: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both ONNX models (and engines) in ``tmp``, parity-checked: the manifest's ``files`` and ``parity``;
    ``head_meta`` goes into the head's ``metadata_props``. int8: float graphs, then the encoder is quantised."""
    from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx, export_head_onnx, head_parity

    enc_prec, float_prec = file_precisions(precision).values()
    tiles, feeds, real_status = parity_inputs(config, encoder, rng=np.random.default_rng(seed), data=data)
    layout = contract["encoder"]["input"]["layout"]
    if "real" not in tiles:
        echo(f"WARNING: real-tile parity check skipped — {real_status}; pass --data OUTS_DIR to include it")
    batch_sizes = tuple(dict.fromkeys((1, 7, max_batch)))
    if config.head_kind == "subspot":
        from hishrst_export.subspot_export import export_subspot_bundle_models

        return export_subspot_bundle_models(tmp, model, encoder, precision=precision, opset=opset, tiles=tiles,
                                            head_meta=head_meta, seed=seed, batch_sizes=batch_sizes,
                                            real_status=real_status, trt_info=trt_info, max_batch=max_batch,
                                            layout=layout)
    enc_path = export_encoder_onnx(encoder, tmp / "encoder.onnx", opset=opset, precision=float_prec, layout=layout)
    enc_report = encoder_parity(encoder, enc_path, tiles=tiles, precision=float_prec, batch_sizes=batch_sizes)
    if enc_prec != float_prec:  # int8: quantise, gate; the figures go into contract["encoder"] (content hash)
        from hishrst_export.quantize import quantize_bundle_encoder

        head_meta = quantize_bundle_encoder(enc_path, model, config, encoder, contract=contract, precision=precision,
                                            data=data, seed=seed, echo=echo)
    head_path = export_head_onnx(model, tmp / "head.onnx", opset=opset, precision=float_prec, metadata=head_meta)
    head_report = head_parity(model, head_path, feeds=feeds, precision=float_prec)
    files = {"encoder": file_entry(enc_path, enc_prec), "head": file_entry(head_path, float_prec)}
    if trt_info is not None:
        files.update(_engines(tmp, enc_path, head_path, feeds=feeds, tiles=tiles, layout=layout, precision=precision,
                              max_batch=max_batch, d=int(model.config.feature_dim),
                              n=int(config.grouping["max_size"]), trt_info=trt_info))
    stray = sorted({p.name for p in tmp.iterdir()} - listed_files(files))
    if stray:
        raise ExportError(f"{tmp}: the export wrote files the manifest would not list ({stray}); report this bug")
    parity = {
        "reference": "PyTorch fp32 (CPU) vs ONNX Runtime CPU; for fp16 the figures are the accuracy cost "
                     "of half precision",
        "precision": precision, "seed": seed, "real_tiles": real_status, "encoder": enc_report, "head": head_report,
    }
    return files, parity


def _engines(tmp: Path, enc_path: Path, head_path: Path, *, feeds: dict[str, dict[str, np.ndarray]],
             tiles: dict[str, np.ndarray], layout: str, precision: str, max_batch: int, d: int, n: int, trt_info: dict[str, Any]
             ) -> dict[str, Any]:
    """Build and parity-check TensorRT engines for both models; manifest entries keyed ``<model>_trt``. The head's
    profile covers 1…``max_batch`` groups of 1…max(``n``, 64) points (``n`` = max group size)."""
    n_max = max(int(n), 64)
    opt = min(8, max_batch)
    from hishrst_export.tensorrt import (EngineParityError, TensorRTBuildError, TensorRTUnavailable, build_engine,
                                         engine_parity)

    entries: dict[str, Any] = {}
    try:
        for key, path in (("encoder", enc_path), ("head", head_path)):
            shapes = None if key == "encoder" else {
                k: ((1, 1) + tail, (opt, max(1, int(n))) + tail, (max_batch, n_max) + tail)
                for k, tail in (("features", (d,)), ("positions", (2,)), ("mask", ()))
            }
            eng = build_engine(path, out_path=tmp / f"{key}.plan", precision=precision,  # type: ignore[arg-type]
                               max_batch=max_batch, shapes=shapes, timing_cache=tmp / "timing.cache")
            sample = {"tiles": to_tile_layout(tiles["random"][:4], layout)} if key == "encoder" else feeds["random"]
            entries[f"{key}_trt"] = {
                "path": eng.name, "sha256": sha256_file(eng), "bytes": eng.stat().st_size, "format": "tensorrt",
                "precision": precision, "gpu": trt_info.get("gpu"), "tensorrt_version": trt_info.get("version"),
                "parity_vs_onnxruntime": engine_parity(eng, path, sample),
            }
    except (TensorRTUnavailable, TensorRTBuildError, EngineParityError) as e:
        raise ExportError(f"--tensorrt: {e}") from e
    finally:
        (tmp / "timing.cache").unlink(missing_ok=True)
    return entries
