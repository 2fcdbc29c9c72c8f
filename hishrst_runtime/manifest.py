"""The model bundle manifest: schema, validation and loading (torch-free).

A bundle is a directory holding ``manifest.json`` and the files it lists (``encoder.onnx``,
``head.onnx``, optional TensorRT engines, ONNX external-data files). The manifest is the contract
between export and the runtime. It is versioned (``schema_version``); loaders upgrade older versions
in memory so that bundles written by earlier releases keep loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "BundleError",
    "Bundle",
    "load_bundle",
    "sha256_file",
    "write_manifest",
]

SCHEMA_NAME = "hishrst-bundle"
SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)

_REQUIRED_TOP = ("schema", "schema_version", "encoder", "patch", "position", "grouping", "genes", "output", "files")


class BundleError(ValueError):
    """A model bundle is missing, malformed, tampered with or unsupported."""


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: its directory and the (upgraded) manifest."""

    root: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def patch_um(self) -> float:
        return float(self.manifest["patch"]["size_um"])

    @property
    def train_mpp(self) -> float:
        """µm/pixel of the images the model was trained on (level-0 resolution of the training slide)."""
        return float(self.manifest["patch"]["train_mpp"])

    @property
    def max_group_size(self) -> int:
        return int(self.manifest["grouping"]["max_size"])

    def file_entry(self, key: str) -> dict[str, Any] | None:
        return self.manifest["files"].get(key)

    def path(self, key: str) -> Path:
        """Absolute path of the file listed under ``files[key]``."""
        entry = self.file_entry(key)
        if entry is None:
            raise BundleError(f"{self.root / 'manifest.json'}: the bundle has no '{key}' file")
        return _safe_join(self.root, entry["path"], where=f"files.{key}.path")

    @property
    def sha256(self) -> str:
        """Hash of the manifest itself (identifies the bundle in outputs and caches)."""
        return sha256_file(self.root / "manifest.json")


def _safe_join(root: Path, rel: str, *, where: str) -> Path:
    """Join a manifest path to the bundle root, refusing anything that could leave the bundle."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{root / 'manifest.json'}: {where} must be a non-empty relative path, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or "\\" in rel or ":" in rel or any(part == ".." for part in p.parts):
        raise BundleError(
            f"{root / 'manifest.json'}: {where} = {rel!r} points outside the bundle; "
            "manifest paths must be plain relative paths inside the bundle directory"
        )
    full = (root / p).resolve()
    if not full.is_relative_to(root.resolve()):
        raise BundleError(f"{root / 'manifest.json'}: {where} = {rel!r} resolves outside the bundle (symlink?)")
    return full


def _upgrade(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """Upgrade an older manifest to the current schema in memory (no-op for version 1)."""
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(
            f"{path}: schema_version {version!r} is not supported by hishrst "
            f"(supports {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); "
            "upgrade hishrst to load bundles written by newer releases"
        )
    return manifest


def load_bundle(root: str | Path, *, verify_hashes: bool = True) -> Bundle:
    """Load and validate a bundle directory.

    Checks the schema name and version, the required fields, that every listed file stays inside the
    bundle and exists, and (``verify_hashes=True``) that each file's SHA-256 matches. Every failure
    raises :class:`BundleError` naming the file and the fix.
    """
    root = Path(root)
    mpath = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory; pass the bundle directory written by `hishrst export`")
    if not mpath.is_file():
        raise BundleError(f"{mpath}: missing; {root} is not a hishrst bundle (run `hishrst export` to make one)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e}); re-export the bundle") from e
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_NAME:
        raise BundleError(f"{mpath}: not a hishrst bundle manifest (schema is not {SCHEMA_NAME!r})")
    manifest = _upgrade(manifest, mpath)
    missing = [k for k in _REQUIRED_TOP if k not in manifest]
    if missing:
        raise BundleError(f"{mpath}: missing required field(s) {', '.join(missing)}; re-export the bundle")
    files = manifest["files"]
    if not isinstance(files, dict) or "encoder" not in files or "head" not in files:
        raise BundleError(f"{mpath}: 'files' must list at least 'encoder' and 'head'")
    for key, entry in files.items():
        if not isinstance(entry, dict) or "path" not in entry or "sha256" not in entry:
            raise BundleError(f"{mpath}: files.{key} must have 'path' and 'sha256'")
        paths = [entry["path"], *entry.get("external_data", [])]
        for i, rel in enumerate(paths):
            full = _safe_join(root, rel, where=f"files.{key}.path" if i == 0 else f"files.{key}.external_data")
            if not full.is_file():
                raise BundleError(f"{full}: listed in the manifest as files.{key} but missing; copy the whole bundle directory")
        if verify_hashes:
            full = _safe_join(root, entry["path"], where=f"files.{key}.path")
            digest = sha256_file(full)
            if digest != entry["sha256"]:
                raise BundleError(
                    f"{full}: SHA-256 {digest[:12]}… does not match the manifest ({str(entry['sha256'])[:12]}…); "
                    "the file was modified or corrupted — re-copy or re-export the bundle"
                )
            for rel, want in zip(entry.get("external_data", []), entry.get("external_data_sha256", [])):
                full = _safe_join(root, rel, where=f"files.{key}.external_data")
                if sha256_file(full) != want:
                    raise BundleError(f"{full}: SHA-256 does not match the manifest; re-copy or re-export the bundle")
    if not isinstance(manifest["genes"], list) or not manifest["genes"]:
        raise BundleError(f"{mpath}: 'genes' must be a non-empty list of gene names")
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (temp file + rename) and return its path."""
    root = Path(root)
    manifest = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **manifest}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(root / "manifest.json")
    return root / "manifest.json"
