"""The bundle's ``manifest.json`` as export writes it: file entries (hashes, external data), the encoder,
patch, position, grouping, genes and output sections, parity figures, licence and versions. The runtime reads
it back through :mod:`hishrst_runtime.bundle` (schema, upgrades, validation).

The sections that define the numbers (:func:`contract_sections`) are built before the head is exported, so
the head's ONNX ``metadata_props`` can record its genes and the manifest content hash
(:func:`head_metadata_for`; the hash itself is defined in :mod:`hishrst_runtime.bundle.integrity`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hishrst_runtime.bundle.integrity import head_metadata
from hishrst_runtime.bundle.manifest import sha256_file
from hishrst_runtime.core.version import __version__
from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT
from hishrst_train.runconfig import RunConfig

__all__ = ["POSITION_PARAMS", "build_manifest", "contract_sections", "file_entry", "file_precisions",
           "head_metadata_for", "listed_files"]


def file_entry(path: Path, precision: str) -> dict[str, Any]:
    """Manifest entry of an ONNX file: path, SHA-256, size, precision and its external-data files."""
    from hishrst_export.onnx_export import external_data_files

    entry: dict[str, Any] = {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                             "format": "onnx", "precision": precision}
    ext = external_data_files(path)
    if ext:
        entry["external_data"] = [
            {"path": rel, "sha256": sha256_file(path.parent / rel), "bytes": (path.parent / rel).stat().st_size}
            for rel in ext
        ]
    return entry


def listed_files(files: dict[str, Any]) -> set[str]:
    """Every file name the ``files`` section lists (models and their external data)."""
    names = set()
    for entry in files.values():
        names.add(entry["path"])
        names.update(x["path"] for x in entry.get("external_data", []))
    return names


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"hishrst": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def contract_sections(model: Any, config: RunConfig, encoder: Any, *, layout: str = DEFAULT_TILE_LAYOUT) -> dict[str, Any]:
    """The manifest sections that define what the bundle computes: encoder (with its tile ``layout``, normalisation,
    pooling and ``test_encoder`` — true for a randomly initialised test encoder), patch, position, grouping, genes,
    output, head and preprocessing (all covered by the content hash)."""
    from hishrst_train.encoders.module import encoder_fingerprint

    mcfg = model.config.to_dict()
    spot = config.head_kind != "subspot"
    out = {
        "encoder": {
            "name": config.encoder["name"], "architecture": encoder.spec.arch,
            "fingerprint": encoder_fingerprint(encoder),
            "input_size": int(encoder.input_size), "feature_dim": int(encoder.feature_dim),
            "input": {"name": "tiles", "dtype": "uint8", "layout": layout, "channels": "RGB"},
            "normalisation": {"scale": 1 / 255, "mean": list(encoder.spec.mean), "std": list(encoder.spec.std),
                              "formula": "(tiles / 255 - mean) / std, per RGB channel", "in_graph": True},
            "gated": bool(config.encoder.get("gated")), "license": config.encoder.get("license"),
            "pooling": encoder.spec.pooling, "test_encoder": bool(encoder.spec.test_only),
        },
        "patch": config.patch,
        "position": _position_manifest(mcfg, config.position) if spot else {},
        "grouping": config.grouping,
        "genes": list(config.genes),
        "output": {"name": "expression", "meaning": "log1p of counts per 10k (normalize_total to 1e4, then log1p)",
                   "target_sum": config.preprocessing.get("target_sum", 1e4), "dtype": "float32",
                   "shape": "[groups, points, genes]"},
        "head": {"inputs": ["features", "positions", "mask"], "max_group_size": config.grouping["max_size"]},
        "preprocessing": config.preprocessing,
    }
    if config.head_kind == "subspot":  # per-token head: its head, tokens, position and output sections
        from hishrst_export.subspot_export import subspot_contract

        out.update(subspot_contract(model, config))
        out["output"]["shape"] = "[tiles, rows, cols, genes]"
    return out


#: Bundle precisions whose head is exported at another precision: int8 quantises the encoder only (the
#: head is small, and its position encoding needs fp32).
HEAD_PRECISION: dict[str, str] = {"int8": "fp32"}


def file_precisions(precision: str) -> dict[str, str]:
    """``{"encoder": …, "head": …}``: the precision of each model in a bundle exported at ``precision``."""
    return {"encoder": precision, "head": HEAD_PRECISION.get(precision, precision)}


def head_metadata_for(contract: dict[str, Any], precision: str) -> dict[str, str]:
    """``head.onnx``'s ``metadata_props`` for a bundle of ``contract`` exported at ``precision``
    (:func:`file_precisions`): genes, their count and the content hash the finished manifest will carry.
    Raises ``ValueError`` for a NaN or infinite number in the contract."""
    return head_metadata({**contract, "files": {k: {"precision": p} for k, p in file_precisions(precision).items()}})


def build_manifest(model: Any, config: RunConfig, encoder: Any, *, files: dict[str, Any], parity: dict[str, Any],
                   opset: int, max_batch: int, notice: str | None,
                   contract: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's ``manifest.json`` contents (without ``export_seconds``; ``write_manifest`` adds the
    schema and the ``integrity`` section). ``contract``: :func:`contract_sections`, if already built."""
    from hishrst_export.onnx_export import EXTERNAL_DATA_THRESHOLD

    contract = contract_sections(model, config, encoder) if contract is None else contract
    gated = bool(config.encoder.get("gated"))
    return {
        "hishrst_version": __version__,
        "created_unix": int(time.time()),
        **contract,
        "files": files,
        "onnx_opset": opset,
        "max_batch": max_batch,
        "external_data_threshold_bytes": EXTERNAL_DATA_THRESHOLD,
        "parity": parity,
        "license": {"gated": gated, "redistributable": not gated, "notice": notice},
        "source_run": {"task": config.task, "hishrst_version": config.hishrst_version, "data": config.data},
        "exporter": _versions(),
    }


#: Model config keys recorded in the manifest's ``position`` section, per position mode.
POSITION_PARAMS: dict[str, tuple[str, ...]] = {
    "continuous": ("pos_n_freqs", "min_wavelength_um", "max_wavelength_um"),
    "relative": ("rel_n_freqs", "rel_min_wavelength_um", "rel_max_wavelength_um", "rel_eps_um2"),
}


def _position_manifest(mcfg: dict[str, Any], position: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``position`` section: the run's mode, ``units: "um"`` (every deployable head takes µm;
    ``relative`` uses only distances within a group, ``none`` ignores them) and that mode's parameters."""
    out = {**position, "mode": mcfg["position_mode"], "units": "um"}
    out.update({k: mcfg[k] for k in POSITION_PARAMS.get(out["mode"], ())})
    if out["mode"] == "relative":
        out.update(frame="group centroid", invariant_to=["translation", "rotation", "reflection"])
    return out
