"""The model bundle manifest: schema, validation, upgrades and loading (torch-free).

A bundle is a directory holding ``manifest.json`` and the files it lists (``encoder.onnx``,
``head.onnx``, optional TensorRT engines, ONNX external-data files). The manifest is the contract
between ``hishrst export`` and the runtime; :func:`load_bundle` is the one loader and validates it.

Schema (``schema = "hishrst-bundle"``, ``schema_version`` = :data:`SCHEMA_VERSION` = 2)::

    hishrst_version, created_unix
    encoder     {name, input_size (px), feature_dim, input {dtype uint8, layout NHWC, channels RGB},
                 normalisation {scale, mean, std, in_graph}, gated, license}
    patch       {size_um (µm), train_mpp (µm/px), resize, pad_value}
    position    {mode ("continuous" | "relative" | "none": absolute µm fed to the head; "grid": Visium
                 array indices), units ("um"), pos_n_freqs, min_wavelength_um, max_wavelength_um}
    grouping    {method, max_size, coords ("level0_px")}
    genes       [names]                      (the head's output columns, in order)
    output      {name, meaning, target_sum, dtype}
    files       {key: {path, sha256, precision, format, [external_data: [{path, sha256}]],
                       [gpu, tensorrt_version] for engines}}   keys: encoder, head, [encoder_trt, head_trt]
    onnx_opset, max_batch, parity {precision, encoder {...}, head {...}}, license {...}
    integrity   {content_sha256, covers, canonical}   (since 2; see hishrst_runtime.bundle.integrity)
    head        {kind ("spot" | "subspot"), ...}   (optional: without ``kind`` a bundle is a ``spot`` bundle)
    tokens      {grid [rows, cols], input_size (px), pitch_um (µm), margin (tokens), [width]}
                (``TokenGeometry.to_dict()``; required when ``head.kind`` is ``subspot``: the encoder then also
                outputs ``tokens`` and the head maps tokens to expression per token, ``patch.size_um`` is the
                tile's side ``grid × pitch_um``; optional ``width``: the tokens' width, checked against both models)

Versioning: every schema change bumps :data:`SCHEMA_VERSION` and adds an upgrade function
``vN → vN+1`` to :data:`_UPGRADES`. :func:`load_bundle` applies the chain in memory, so bundles
written by older releases keep loading; manifests from a *newer* release are refused with a clear
error. Version 0 is the pre-release layout (no ``grouping.coords``, no ``output.target_sum``, and
external data as two parallel lists ``external_data`` / ``external_data_sha256``). Version 1 has no
``integrity`` section and its ``head.onnx`` no gene names: such bundles load with a warning that they are
not integrity-protected (:mod:`~hishrst_runtime.bundle.integrity`).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, cast

from hishrst_runtime.bundle.contract import check_onnx_file, check_token_width
from hishrst_runtime.bundle.integrity import check_integrity, integrity_section
from hishrst_runtime.bundle.spec import BundleError, BundleSpec, build_spec
from hishrst_runtime.core.files import atomic_write, sha256_file

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "Bundle",
    "BundleError",
    "BundleSpec",
    "load_bundle",
    "sha256_file",
    "upgrade_manifest",
    "write_manifest",
]

SCHEMA_NAME = "hishrst-bundle"
SCHEMA_VERSION = 2

_REQUIRED_TOP = ("schema", "schema_version", "encoder", "patch", "position", "grouping", "genes", "output", "files")
_REQUIRED_NESTED = {
    "encoder": ("name", "input_size", "feature_dim"),
    "patch": ("size_um", "train_mpp"),
    "position": ("mode",),
    "grouping": ("max_size",),
    "output": ("meaning",),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------------ upgrades


def _v0_to_v1(m: dict[str, Any]) -> dict[str, Any]:
    """Pre-release layout → 1: add ``grouping.coords`` and ``output.target_sum``; external data as dicts."""
    m.setdefault("grouping", {}).setdefault("coords", "level0_px")  # v0 always grouped level-0 pixels
    m.setdefault("output", {}).setdefault("target_sum", 1e4)  # v0 always normalised to 10k counts
    for entry in (m.get("files") or {}).values():
        if isinstance(entry, dict) and "external_data_sha256" in entry:
            names, hashes = entry.get("external_data", []), entry.pop("external_data_sha256")
            if not isinstance(names, list) or not isinstance(hashes, list) or len(names) != len(hashes):
                raise BundleError("schema 0 files entry lists external_data and external_data_sha256 of different lengths")
            entry["external_data"] = [{"path": p, "sha256": h} for p, h in zip(names, hashes)]
    return m


def _v1_to_v2(m: dict[str, Any]) -> dict[str, Any]:
    """1 → 2: nothing to add (2 adds the optional-for-old ``integrity`` section and the head's gene names;
    :func:`~hishrst_runtime.bundle.integrity.check_integrity` warns that a version 1 bundle lacks them)."""
    return m


#: ``{from_version: upgrade to from_version + 1}``; each function gets a deep copy and returns it.
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _v0_to_v1, 1: _v1_to_v2}
SUPPORTED_SCHEMA_VERSIONS = tuple(sorted({*_UPGRADES, SCHEMA_VERSION}))


def upgrade_manifest(manifest: dict[str, Any], *, path: Path | str = "manifest.json") -> dict[str, Any]:
    """Return ``manifest`` upgraded to :data:`SCHEMA_VERSION` (a new dict; the input is not modified).

    Raises :class:`BundleError` naming ``path`` for a missing, non-integer, newer or unknown version.
    """
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{path}: schema_version must be an integer, got {version!r}; re-export the bundle")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema_version {version} was written by a newer hishrst (this one, {_own_version()}, reads "
            f"versions {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); upgrade hishrst (pip install -U hishrst)"
        )
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(
            f"{path}: schema_version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); re-export the bundle with this hishrst"
        )
    m = copy.deepcopy(manifest)
    while version < SCHEMA_VERSION:
        try:
            m = _UPGRADES[version](m)
        except BundleError as e:
            raise BundleError(f"{path}: cannot upgrade schema {version} → {version + 1}: {e}") from e
        version += 1
        m["schema_version"] = version
    return m


def _own_version() -> str:
    from hishrst_runtime.core.version import __version__

    return __version__


# ------------------------------------------------------------------------------------------ the bundle


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its directory, the (upgraded) manifest and its typed view :attr:`spec`.

    ``source_schema_version`` is the version found on disk before any in-memory upgrade. Read the
    contract through ``spec`` (defaults live there); ``manifest`` is the raw dict, kept for reports.
    """

    root: Path
    manifest: dict[str, Any] = field(repr=False)
    source_schema_version: int = SCHEMA_VERSION

    @functools.cached_property
    def spec(self) -> BundleSpec:
        """The typed contract (built once; :func:`load_bundle` builds it while validating)."""
        return build_spec(self.manifest, path=self.root / "manifest.json")

    @property
    def genes(self) -> list[str]:
        """Gene names of the head's output columns, in order."""
        return list(self.spec.genes)

    @property
    def encoder(self) -> dict[str, Any]:
        """The raw ``encoder`` section (prefer ``spec.encoder``)."""
        return self.manifest["encoder"]

    @property
    def patch_um(self) -> float:
        """Patch side in µm."""
        return self.spec.patch.size_um

    @property
    def train_mpp(self) -> float:
        """µm/pixel of the images the model was trained on (level-0 resolution of the training slide)."""
        return self.spec.patch.train_mpp

    @property
    def max_group_size(self) -> int:
        """Most points in one neighbour group (the head's second dimension)."""
        return self.spec.grouping.max_size

    @property
    def max_batch(self) -> int:
        """Largest batch (tiles, or head groups) the bundle's TensorRT profiles cover."""
        return self.spec.max_batch

    def file_entry(self, key: str) -> dict[str, Any] | None:
        return self.manifest["files"].get(key)

    def path(self, key: str) -> Path:
        """Absolute path of the file listed under ``files[key]``."""
        entry = self.file_entry(key)
        if entry is None:
            raise BundleError(f"{self.root / 'manifest.json'}: the bundle has no '{key}' file")
        return _safe_join(self.root, entry["path"], where=f"files.{key}.path")

    def external_data(self, key: str) -> list[Path]:
        """Absolute paths of the ONNX external-data files of ``files[key]`` (empty for most models)."""
        entry = self.file_entry(key) or {}
        return [_safe_join(self.root, x["path"], where=f"files.{key}.external_data") for x in entry.get("external_data", [])]

    @property
    def sha256(self) -> str:
        """Hash of the manifest itself (identifies the bundle in outputs and caches)."""
        return sha256_file(self.root / "manifest.json")


def _safe_join(root: Path, rel: Any, *, where: str) -> Path:
    """Join a manifest path to the bundle root, refusing anything that could leave the bundle."""
    mpath = root / "manifest.json"
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{mpath}: {where} must be a non-empty relative path, got {rel!r}; re-export the bundle")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or ":" in rel or any(part == ".." for part in p.parts):
        raise BundleError(
            f"{mpath}: {where} = {rel!r} points outside the bundle; "
            "manifest paths must be plain relative paths inside the bundle directory — re-export the bundle"
        )
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(
            f"{mpath}: {where} = {rel!r} resolves to {full}, outside the bundle (a symlink?); "
            "copy the real file into the bundle directory"
        )
    return full


def _check_file(root: Path, rel: Any, want: Any, *, where: str, verify: bool) -> None:
    mpath = root / "manifest.json"
    full = _safe_join(root, rel, where=f"{where}.path")
    if not isinstance(want, str) or not _SHA256.match(want):
        raise BundleError(f"{mpath}: {where}.sha256 must be a 64-digit hex SHA-256, got {want!r}; re-export the bundle")
    if not full.is_file():
        raise BundleError(f"{full}: listed in the manifest as {where} but missing; copy the whole bundle directory")
    if verify:
        digest = sha256_file(full)
        if digest != want:
            raise BundleError(
                f"{full}: SHA-256 {digest[:12]}… does not match the manifest ({want[:12]}…, {where}); "
                "the file was modified or corrupted — re-copy or re-export the bundle"
            )


def _validate(root: Path, manifest: dict[str, Any], *, verify_hashes: bool) -> None:
    mpath = root / "manifest.json"
    missing = [k for k in _REQUIRED_TOP if k not in manifest]
    if missing:
        raise BundleError(f"{mpath}: missing required field(s) {', '.join(missing)}; re-export the bundle")
    for section, keys in _REQUIRED_NESTED.items():
        value = manifest[section]
        absent = [k for k in keys if not isinstance(value, dict) or k not in value]
        if absent:
            raise BundleError(f"{mpath}: missing field(s) {', '.join(f'{section}.{k}' for k in absent)}; re-export the bundle")
    if not isinstance(manifest["genes"], list) or not manifest["genes"]:
        raise BundleError(f"{mpath}: 'genes' must be a non-empty list of gene names; re-export the bundle")
    files = manifest["files"]
    if not isinstance(files, dict) or "encoder" not in files or "head" not in files:
        raise BundleError(f"{mpath}: 'files' must list at least 'encoder' and 'head'; re-export the bundle")
    for key, entry in files.items():
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise BundleError(f"{mpath}: files.{key} must have 'path' and 'sha256'; re-export the bundle")
        _check_file(root, entry["path"], entry["sha256"], where=f"files.{key}", verify=verify_hashes)
        ext = entry.get("external_data", [])
        if not isinstance(ext, list):
            raise BundleError(f"{mpath}: files.{key}.external_data must be a list of {{path, sha256}}; re-export the bundle")
        for i, x in enumerate(ext):
            where = f"files.{key}.external_data[{i}]"
            if not isinstance(x, dict) or "path" not in x or "sha256" not in x:
                raise BundleError(f"{mpath}: {where} must have 'path' and 'sha256'; re-export the bundle")
            _check_file(root, x["path"], x["sha256"], where=where, verify=verify_hashes)


def load_bundle(root: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle directory.

    Checks the schema name and version (upgrading older versions in memory), the required fields and
    their values (:func:`~hishrst_runtime.bundle.spec.build_spec`), that every listed file (external
    data included) stays inside the bundle and exists, (``verify_hashes=True``) that each file's
    SHA-256 matches, that ``encoder.onnx`` / ``head.onnx`` have their roles' tensors (by ``head.kind``) with the
    manifest's sizes (a sub-spot bundle's token grid and width included) and reference no unlisted external data
    (:func:`~hishrst_runtime.bundle.contract.check_onnx_file`), and that the manifest's genes are the head's
    and its content hash holds (:func:`~hishrst_runtime.bundle.integrity.check_integrity`; older bundles
    without them load with a logged warning). Every failure raises
    :class:`BundleError` naming the offending file or field and the fix.
    """
    root = Path(root)
    mpath = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory written by `hishrst export`")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {root} is not a hishrst bundle (run `hishrst export` to make one)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_NAME:
        raise BundleError(f"{mpath}: not a hishrst bundle manifest (schema is not {SCHEMA_NAME!r}); re-export the bundle")
    raw, source_version = manifest, cast(int, manifest.get("schema_version"))  # checked by the upgrade
    manifest = upgrade_manifest(manifest, path=mpath)
    _validate(root, manifest, verify_hashes=verify_hashes)
    bundle = Bundle(root=root, manifest=manifest, source_schema_version=source_version)
    graphs = {}
    for role in ("encoder", "head"):
        graphs[role] = check_onnx_file(bundle.spec, role, bundle.path(role), listed_external=bundle.external_data(role),
                                       root=root, where=f"{mpath}: files.{role} ({manifest['files'][role]['path']})")
    if bundle.spec.subspot:
        check_token_width(graphs["encoder"], graphs["head"], where=str(mpath))
    check_integrity(raw, graphs["head"].metadata, source_version=source_version, mpath=mpath,
                    head_where=f"files.head ({manifest['files']['head']['path']})")
    return bundle


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (current schema, with its ``integrity`` section computed here) atomically and
    durably (temp file, fsync, rename) and return its path. Raises ``ValueError`` for a NaN or infinite
    number in a section the content hash covers, ``OSError`` when the file cannot be written."""
    root = Path(root)
    body = {k: v for k, v in manifest.items() if k not in ("schema", "schema_version", "integrity")}
    body = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **body}
    body["integrity"] = integrity_section(body)
    data = (json.dumps(body, indent=2, sort_keys=False) + "\n").encode("utf-8")
    atomic_write(root / "manifest.json", data, fsync=True)
    return root / "manifest.json"
