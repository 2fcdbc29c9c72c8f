"""hishrst_runtime.bundle.integrity: the manifest's content hash and the head's gene names (torch-free).

Issue "Nothing silently wrong": two gene names swapped in a bundle's manifest used to load, putting every
value under the wrong gene. The bundles are the tiny ONNX bundle of ``tests/runtime/conftest.py``, whose
head records its genes in ``metadata_props`` as export does."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from hishrst_runtime.bundle.integrity import (
    CONTENT_KEYS,
    INTEGRITY_SINCE,
    META_CONTENT_SHA256,
    META_GENES,
    META_N_GENES,
    content_sha256,
    head_metadata,
)
from hishrst_runtime.bundle.manifest import SCHEMA_VERSION, BundleError, load_bundle, write_manifest
from hishrst_runtime.core.onnx_graph import read_onnx_graph
from hishrst_runtime.core.files import sha256_file
from tests.runtime.conftest import build_tiny_bundle

onnx = pytest.importorskip("onnx", reason="the test bundle is built with onnx.helper")


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "manifest.json").read_text())


def _edit(root: Path, fn: Any, *, reseal: bool = False) -> None:
    """Change the manifest by hand (``reseal``: and recompute its content hash, as a careful forger would)."""
    m = _manifest(root)
    fn(m)
    if reseal:
        write_manifest(root, m)
    else:
        (root / "manifest.json").write_text(json.dumps(m, indent=2))


def _set_head_props(root: Path, props: dict[str, str]) -> None:
    """Replace head.onnx's metadata_props and re-list its SHA-256 (manifest re-sealed)."""
    model = onnx.load(str(root / "head.onnx"))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(root / "head.onnx"))
    _edit(root, lambda m: m["files"]["head"].update(sha256=sha256_file(root / "head.onnx")), reseal=True)


def _as_schema_1(root: Path) -> None:
    """Rewrite the manifest as schema 1 wrote it: no integrity section."""

    def down(m: dict[str, Any]) -> None:
        m["schema_version"] = 1
        m.pop("integrity")

    _edit(root, down)


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return build_tiny_bundle(tmp_path / "b")


# ------------------------------------------------------------------------------------------ records


def test_schema_version_is_bumped_and_the_manifest_is_sealed(bundle: Path) -> None:
    m = _manifest(bundle)
    assert SCHEMA_VERSION == INTEGRITY_SINCE == 2 and m["schema_version"] == 2
    assert m["integrity"]["content_sha256"] == content_sha256(m)
    assert m["integrity"]["covers"] == [*CONTENT_KEYS, "files.encoder.precision", "files.head.precision"]
    assert load_bundle(bundle).source_schema_version == 2


def test_head_metadata_is_read_without_onnx(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # the runtime's reader must not need it
    meta = read_onnx_graph(bundle / "head.onnx").metadata
    assert json.loads(meta[META_GENES]) == ["G0", "G1", "G2"] and meta[META_N_GENES] == "3"
    assert read_onnx_graph(bundle / "encoder.onnx").metadata == {}
    load_bundle(bundle)


def test_content_hash_is_canonical() -> None:
    m = json.loads(json.dumps({"schema_version": 2, "genes": ["A", "B"], "patch": {"size_um": 32.0, "train_mpp": 0.5},
                               "files": {"head": {"precision": "fp32", "sha256": "0" * 64}}}))
    reordered = {"files": {"head": {"sha256": "1" * 64, "precision": "fp32"}}, "patch": {"train_mpp": 0.5, "size_um": 32.0},
                 "genes": ["A", "B"], "schema_version": 7, "hishrst_version": "x"}
    assert content_sha256(m) == content_sha256(reordered)  # key order, versions and file bytes are not content
    assert content_sha256(m) == content_sha256({**m, "patch": {"size_um": 32.0, "train_mpp": 0.5}, "parity": {}})
    assert content_sha256(m) != content_sha256({**m, "genes": ["B", "A"]})
    assert content_sha256(m) != content_sha256({**m, "files": {"head": {"precision": "fp16"}}})
    assert content_sha256({**m, "patch": (1, 2)}) == content_sha256({**m, "patch": [1, 2]})  # as JSON reads it back
    with pytest.raises(ValueError):
        content_sha256({**m, "patch": {"size_um": float("nan")}})
    assert head_metadata(m) == {META_GENES: '["A", "B"]', META_N_GENES: "2", META_CONTENT_SHA256: content_sha256(m)}


# ------------------------------------------------------------------------------------------ refusals


def test_swapped_genes_are_refused_naming_the_first_mismatch(bundle: Path) -> None:
    def swap(m: dict[str, Any]) -> None:
        m["genes"][1], m["genes"][2] = m["genes"][2], m["genes"][1]

    for reseal in (False, True):  # a re-computed content hash does not help: the head knows its genes
        _edit(bundle, swap, reseal=reseal)
        with pytest.raises(BundleError) as e:
            load_bundle(bundle)
        assert str(e.value).startswith(str(bundle / "manifest.json"))
        assert "genes[1] is 'G2' but files.head (head.onnx) was exported with 'G1'" in str(e.value)
        assert "2 of 3 genes differ" in str(e.value) and "re-export" in str(e.value)
        _edit(bundle, swap, reseal=True)  # back to the original order
        load_bundle(bundle)


def test_renamed_gene_is_refused(bundle: Path) -> None:
    _edit(bundle, lambda m: m["genes"].__setitem__(2, "CD4"), reseal=True)
    with pytest.raises(BundleError, match=r"genes\[2\] is 'CD4' but files\.head \(head\.onnx\) was exported with 'G2'"):
        load_bundle(bundle)


@pytest.mark.parametrize("edit", [
    lambda m: m["patch"].update(size_um=64.0),
    lambda m: m["patch"].update(train_mpp=0.25),
    lambda m: m["encoder"]["normalisation"].update(mean=[0.5, 0.5, 0.5]),
    lambda m: m["position"].update(mode="relative"),
    lambda m: m["grouping"].update(max_size=4),
    lambda m: m["output"].update(target_sum=1e6),
    lambda m: m["files"]["head"].update(precision="fp16"),
], ids=["patch_um", "mpp", "normalisation", "position", "grouping", "target_sum", "precision"])
def test_edited_contract_breaks_the_content_hash(bundle: Path, edit: Any) -> None:
    _edit(bundle, edit)
    with pytest.raises(BundleError, match=r"manifest\.json: the content hash \w+… does not match integrity\.content_sha256"):
        load_bundle(bundle)


def test_fields_outside_the_contract_may_change(bundle: Path) -> None:
    _edit(bundle, lambda m: m.update(hishrst_version="9.9", max_batch=4, license={"notice": "internal use"}))
    load_bundle(bundle)


def test_missing_or_malformed_integrity_is_refused(bundle: Path) -> None:
    _edit(bundle, lambda m: m.pop("integrity"))
    with pytest.raises(BundleError, match=r"manifest\.json: schema 2 needs integrity\.content_sha256 .* got None"):
        load_bundle(bundle)
    _edit(bundle, lambda m: m.update(integrity={"content_sha256": "abc"}))
    with pytest.raises(BundleError, match=r"needs integrity\.content_sha256 .* got 'abc'"):
        load_bundle(bundle)


def test_schema_2_head_without_gene_names_is_refused(bundle: Path) -> None:
    _set_head_props(bundle, {})
    with pytest.raises(BundleError, match=r"files\.head \(head\.onnx\): carries no gene names .* head file was replaced"):
        load_bundle(bundle)


def test_head_gene_metadata_must_be_well_formed(bundle: Path) -> None:
    _set_head_props(bundle, {META_GENES: '["G0", "G1"]', META_N_GENES: "2"})
    with pytest.raises(BundleError, match=r"genes lists 3 names but files\.head \(head\.onnx\) was exported for 2 genes"):
        load_bundle(bundle)
    _set_head_props(bundle, {META_GENES: "G0,G1,G2", META_N_GENES: "3"})
    with pytest.raises(BundleError, match=r"files\.head \(head\.onnx\): the head's metadata hishrst\.genes/hishrst\.n_genes is malformed"):
        load_bundle(bundle)
    _set_head_props(bundle, {META_GENES: '["G0", "G1", "G2"]', META_N_GENES: "4"})
    with pytest.raises(BundleError, match=r"is not a list of 4 gene names"):
        load_bundle(bundle)


def test_head_content_hash_ties_the_head_to_its_manifest(bundle: Path) -> None:
    _set_head_props(bundle, head_metadata(_manifest(bundle)))  # what export writes
    load_bundle(bundle)
    _edit(bundle, lambda m: m["patch"].update(size_um=40.0), reseal=True)  # re-sealed edit
    with pytest.raises(BundleError, match=r"manifest\.json: its content hashes to \w+…, but files\.head \(head\.onnx\) "
                                          r"was exported with manifest content \w+…"):
        load_bundle(bundle)
    _as_schema_1(bundle)  # relabelled as an old, unprotected manifest: the head still knows
    with pytest.raises(BundleError, match=r"was exported with manifest content"):
        load_bundle(bundle)


# ------------------------------------------------------------------------------------------ older bundles


def test_schema_1_bundle_loads_with_a_warning(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    _set_head_props(bundle, {})  # schema 1 heads carried no metadata
    _as_schema_1(bundle)
    with caplog.at_level(logging.WARNING, logger="hishrst_runtime.bundle.integrity"):
        b = load_bundle(bundle)
    assert b.source_schema_version == 1 and b.manifest["schema_version"] == SCHEMA_VERSION
    assert b.genes == ["G0", "G1", "G2"]
    (record,) = [r for r in caplog.records if "integrity" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "schema 1 bundle is not integrity-protected" in record.getMessage() and "re-export" in record.getMessage()
    assert "no gene names in the head" in record.getMessage()


def test_schema_1_manifest_is_still_checked_against_a_head_that_knows_its_genes(bundle: Path) -> None:
    _as_schema_1(bundle)
    _edit(bundle, lambda m: m.update(genes=["G0", "G2", "G1"]))
    with pytest.raises(BundleError, match=r"genes\[1\] is 'G2'"):
        load_bundle(bundle)
