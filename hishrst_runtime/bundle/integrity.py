"""Integrity of a bundle's contract: the manifest's content hash and the head's own record of its genes.

The manifest is plain JSON next to the models, and the head's ONNX graph has no gene names: without a
check, two gene names swapped in ``manifest.json`` would put every value under the wrong gene. Since
schema 2 two records protect the contract:

* ``integrity.content_sha256`` in the manifest: the SHA-256 of the canonical JSON
  (:func:`canonical_json`: keys sorted, no whitespace, UTF-8, no NaN/inf) of :func:`manifest_content`:
  the sections in :data:`CONTENT_KEYS` (every field that changes the numbers a bundle produces or what
  they mean: encoder incl. normalisation, patch, position, grouping, genes, output, head (its kind included),
  preprocessing, tokens — the token geometry of sub-spot bundles)
  and ``files.encoder.precision`` / ``files.head.precision``. File bytes are not in it (each listed file
  has its own SHA-256), nor is the hash itself, versions, timings, parity figures or the licence text.
* ``metadata_props`` of ``head.onnx`` (:func:`head_metadata`, written by export): the gene names in
  output order (:data:`META_GENES`, a JSON list), their count (:data:`META_N_GENES`) and the manifest
  content hash (:data:`META_CONTENT_SHA256`). The loader reads them without ``onnx``
  (:mod:`~hishrst_runtime.core.onnx_graph`).

:func:`check_integrity` runs at load. Bundles older than :data:`INTEGRITY_SINCE` have neither record; they
load with a logged warning that they are not integrity-protected. Whatever the manifest's version, a head
that carries the records is checked against it (relabelling a manifest as an older version hides nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hishrst_runtime.bundle.spec import BundleError

__all__ = ["CONTENT_KEYS", "INTEGRITY_SINCE", "META_CONTENT_SHA256", "META_GENES", "META_N_GENES", "canonical_json",
           "check_integrity", "content_sha256", "head_metadata", "integrity_section", "manifest_content"]

log = logging.getLogger(__name__)

#: First schema version whose bundles carry the content hash and the head's gene names.
INTEGRITY_SINCE = 2
#: Top-level manifest sections covered by the content hash (a missing one is left out).
CONTENT_KEYS = ("encoder", "patch", "position", "grouping", "genes", "output", "head", "preprocessing", "tokens")
#: Models whose ``precision`` is covered by the content hash.
_PRECISION_FILES = ("encoder", "head")
#: Keys of ``head.onnx``'s ``metadata_props``.
META_GENES = "hishrst.genes"
META_N_GENES = "hishrst.n_genes"
META_CONTENT_SHA256 = "hishrst.content_sha256"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CANONICAL = "JSON, keys sorted, separators (',', ':'), UTF-8 (ensure_ascii off), NaN/inf refused"


def canonical_json(obj: Any) -> bytes:
    """The canonical bytes hashed: sorted keys, no whitespace, UTF-8; ``ValueError`` for NaN/inf."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def manifest_content(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``manifest`` the content hash covers (see the module docstring)."""
    content = {k: manifest[k] for k in CONTENT_KEYS if k in manifest}
    files = manifest.get("files")
    files = files if isinstance(files, Mapping) else {}
    content["precision"] = {k: files[k].get("precision") if isinstance(files.get(k), Mapping) else None
                            for k in _PRECISION_FILES}
    return content


def content_sha256(manifest: Mapping[str, Any]) -> str:
    """Hex SHA-256 of :func:`canonical_json` of :func:`manifest_content` (values as JSON reads them back:
    tuples are lists). Raises ``ValueError`` for a NaN or infinite number in the covered sections."""
    content = json.loads(json.dumps(manifest_content(manifest)))  # as it will read back from the file
    return hashlib.sha256(canonical_json(content)).hexdigest()


def integrity_section(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's ``integrity`` section: the content hash and, for readers, what it covers and how."""
    covers = [*CONTENT_KEYS, *(f"files.{k}.precision" for k in _PRECISION_FILES)]
    return {"content_sha256": content_sha256(manifest), "covers": covers, "canonical": _CANONICAL}


def head_metadata(manifest: Mapping[str, Any]) -> dict[str, str]:
    """``metadata_props`` export writes into ``head.onnx``: genes (JSON list), their count, the content hash."""
    genes = list(manifest["genes"])
    return {META_GENES: json.dumps(genes, ensure_ascii=False), META_N_GENES: str(len(genes)),
            META_CONTENT_SHA256: content_sha256(manifest)}


def _own_hash(raw: Mapping[str, Any], mpath: Path) -> str:
    try:
        return content_sha256(raw)
    except ValueError as e:
        raise BundleError(f"{mpath}: a covered section holds a number JSON cannot state exactly ({e}); "
                          "re-export the bundle") from e


def _head_genes(meta: Mapping[str, str], where: str) -> list[str] | None:
    if META_GENES not in meta:
        return None
    try:
        genes = json.loads(meta[META_GENES])
        n = int(meta.get(META_N_GENES, len(genes)))
    except (ValueError, TypeError) as e:
        raise BundleError(f"{where}: the head's metadata {META_GENES}/{META_N_GENES} is malformed ({e}); "
                          "re-export the bundle") from e
    if not isinstance(genes, list) or not all(isinstance(g, str) for g in genes) or n != len(genes):
        raise BundleError(f"{where}: the head's metadata {META_GENES} is not a list of {n} gene names; "
                          "re-export the bundle")
    return genes


def _check_genes(manifest_genes: list[str], head_genes: list[str], mpath: Path, where: str) -> None:
    if len(head_genes) != len(manifest_genes):
        raise BundleError(f"{mpath}: genes lists {len(manifest_genes)} names but {where} was exported for "
                          f"{len(head_genes)} genes; the manifest belongs to another model — re-export the bundle")
    wrong = [i for i, (a, b) in enumerate(zip(manifest_genes, head_genes)) if a != b]
    if wrong:
        i = wrong[0]
        raise BundleError(
            f"{mpath}: genes[{i}] is {manifest_genes[i]!r} but {where} was exported with {head_genes[i]!r} in that "
            f"column ({len(wrong)} of {len(head_genes)} genes differ); every value would land under the wrong gene "
            "— restore the original manifest.json or re-export the bundle"
        )


def _check_sealed(raw: Mapping[str, Any], own: str, mpath: Path) -> None:
    section = raw.get("integrity")
    want = section.get("content_sha256") if isinstance(section, Mapping) else None
    if not isinstance(want, str) or not _SHA256.match(want):
        raise BundleError(f"{mpath}: schema {raw.get('schema_version')} needs integrity.content_sha256 (a 64-digit hex "
                          f"SHA-256), got {want!r}; re-export the bundle")
    if own != want:
        raise BundleError(
            f"{mpath}: the content hash {own[:12]}… does not match integrity.content_sha256 ({want[:12]}…): genes, "
            "normalisation, patch, position, grouping, output or precision were edited after export — restore the "
            "original manifest.json or re-export the bundle"
        )


def check_integrity(raw: Mapping[str, Any], head_meta: Mapping[str, str], *, source_version: int, mpath: Path,
                    head_where: str) -> None:
    """Check the manifest ``raw`` (as read from ``mpath``, before upgrades) against its content hash and the
    head's ``metadata_props`` ``head_meta``; ``head_where`` names the head file in messages.

    Raises :class:`BundleError` naming the first mismatching gene, a changed content hash, or (schema ≥
    :data:`INTEGRITY_SINCE`) a missing record. Older bundles without the records only log a warning.
    """
    genes = raw.get("genes")
    head_genes = _head_genes(head_meta, head_where)
    if head_genes is not None and isinstance(genes, list):
        _check_genes(genes, head_genes, mpath, head_where)
    own = _own_hash(raw, mpath)
    if source_version >= INTEGRITY_SINCE:
        if head_genes is None:
            raise BundleError(f"{head_where}: carries no gene names (metadata {META_GENES}), which every schema "
                              f"{INTEGRITY_SINCE}+ head has: the head file was replaced — re-export the bundle")
        _check_sealed(raw, own, mpath)
    head_hash = head_meta.get(META_CONTENT_SHA256)
    if head_hash is not None and head_hash != own:
        raise BundleError(
            f"{mpath}: its content hashes to {own[:12]}…, but {head_where} was exported with manifest content "
            f"{head_hash[:12]}…: the manifest was edited (or belongs to another export) — restore the original "
            "manifest.json or re-export the bundle"
        )
    if source_version < INTEGRITY_SINCE:
        log.warning("%s: schema %s bundle is not integrity-protected (no manifest content hash%s): edits to its "
                    "genes or parameters cannot be detected; re-export it with this hishrst to protect it", mpath,
                    source_version, "" if head_genes is not None else ", no gene names in the head")
