"""Issue "Nothing silently wrong", export side: bundle integrity records, NaN models, --overwrite ownership,
debris of killed exports and a full disk. Uses the ``small_run`` / ``small_bundle`` fixtures (test-vit)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from click.testing import CliRunner

from hishrst_export import onnx_export
from hishrst_export.bundle import ExportError, export_bundle
from hishrst_export.cli import export as export_cmd
from hishrst_export.onnx_export import ParityError, export_head_onnx, head_parity
from hishrst_export.parity import PARITY_TOLERANCE, compare, passes
from hishrst_runtime.bundle.integrity import META_CONTENT_SHA256, META_GENES, META_N_GENES, content_sha256
from hishrst_runtime.bundle.manifest import BundleError, load_bundle, write_manifest
from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import sha256_file
from hishrst_runtime.core.owned import OWNER_FILE, ForeignOutputError, owner_of

QUIET = {"echo": lambda s: None}


def _error_lines(res) -> list[str]:
    """The error lines of a failed command (besides them it prints its thread count and, for the test encoder,
    a warning); no traceback."""
    assert "Traceback" not in res.output, res.output
    return [ln for ln in res.output.strip().splitlines() if ln.startswith("Error")]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit(root: Path, fn: Any, *, reseal: bool = False) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    if reseal:
        write_manifest(root, m)
    else:
        (root / "manifest.json").write_text(json.dumps(m, indent=2))


def _swap_01(m: dict[str, Any]) -> None:
    m["genes"][0], m["genes"][1] = m["genes"][1], m["genes"][0]


def _dead_pid() -> int:
    """The id of a process that has exited (its debris counts as stale)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------------------------------- 1. integrity


def test_head_onnx_records_genes_and_the_manifest_content_hash(small_bundle: Path) -> None:
    m = json.loads((small_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 2 and m["integrity"]["content_sha256"] == content_sha256(m)
    props = {p.key: p.value for p in onnx.load(str(small_bundle / "head.onnx")).metadata_props}
    assert json.loads(props[META_GENES]) == m["genes"] and props[META_N_GENES] == str(len(m["genes"]))
    assert props[META_CONTENT_SHA256] == m["integrity"]["content_sha256"]
    assert owner_of(small_bundle) == "bundle"


def test_swapped_genes_in_an_exported_bundle_are_refused(small_bundle: Path, tmp_path: Path) -> None:
    g0, g1 = json.loads((small_bundle / "manifest.json").read_text())["genes"][:2]
    for reseal in (False, True):
        b = _copy(small_bundle, tmp_path / f"swapped{int(reseal)}")
        _edit(b, _swap_01, reseal=reseal)
        with pytest.raises(BundleError, match=rf"manifest\.json: genes\[0\] is '{g1}' but files\.head \(head\.onnx\) was "
                                              rf"exported with '{g0}' .*2 of \d+ genes differ"):
            load_bundle(b)


def test_edited_or_relabelled_manifest_of_an_exported_bundle_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    b = _copy(small_bundle, tmp_path / "edited")
    _edit(b, lambda m: m["patch"].update(size_um=m["patch"]["size_um"] * 2))
    with pytest.raises(BundleError, match=r"content hash .* does not match integrity\.content_sha256"):
        load_bundle(b)
    _edit(b, lambda m: m.update(schema_version=1), reseal=False)  # posing as an unprotected schema 1 bundle
    with pytest.raises(BundleError, match=r"was exported with manifest content"):
        load_bundle(b)


def test_schema_1_bundle_loads_with_a_warning(small_bundle: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    b = _copy(small_bundle, tmp_path / "v1")
    model = onnx.load(str(b / "head.onnx"))
    del model.metadata_props[:]  # as schema 1 export wrote it
    onnx.save(model, str(b / "head.onnx"))

    def down(m: dict[str, Any]) -> None:
        m.update(schema_version=1)
        m.pop("integrity")
        m["files"]["head"]["sha256"] = sha256_file(b / "head.onnx")

    _edit(b, down)
    with caplog.at_level(logging.WARNING):
        assert load_bundle(b).source_schema_version == 1
    assert any("not integrity-protected" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- 2. NaN


def test_parity_fails_on_nan_even_where_both_agree() -> None:
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    want[1, 2] = np.nan
    got = want.copy()
    stats = compare(got, want)  # same NaN in both: it used to be left out, and parity passed
    assert stats["nonfinite"] == 1 and stats["nonfinite_reference"] == 1 and stats["nonfinite_output"] == 1
    assert not passes(stats, PARITY_TOLERANCE["onnx"]["fp32"])
    assert not passes(compare(np.full((4, 3), np.inf), np.full((4, 3), np.inf)), PARITY_TOLERANCE["tensorrt"]["fp32"])
    stats = compare(np.ones((4, 3)), np.where(np.eye(4, 3) > 0, np.nan, 1.0))
    assert stats["nonfinite_reference"] == 3 and stats["nonfinite_output"] == 0 and not passes(stats, PARITY_TOLERANCE["onnx"]["fp32"])


def test_head_parity_fails_for_a_model_that_outputs_nan(small_run: Path, tmp_path: Path) -> None:
    from hishrst_train.train import load_run

    model, _ = load_run(small_run)
    with torch.no_grad():
        next(p for p in model.parameters() if p.ndim == 2).fill_(float("nan"))
    path = export_head_onnx(model, tmp_path / "head.onnx")
    rng = np.random.default_rng(0)
    d = model.config.feature_dim
    feeds = {"random": {"features": rng.standard_normal((2, 5, d)).astype(np.float32),
                        "positions": (rng.random((2, 5, 2)) * 1000).astype(np.float32), "mask": np.ones((2, 5), np.float32)}}
    with pytest.raises(ParityError, match=r"head\.onnx \(random inputs\): \d+ non-finite values \(NaN/inf\) in PyTorch's "
                                          r"reference output and \d+ in ONNX Runtime's.*re-fit"):
        head_parity(model, path, feeds=feeds)


def test_export_refuses_weights_with_nan(small_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    run = _copy(small_run, tmp_path / "run")
    state = load_file(str(run / "model.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[name][0, 0] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=rf"run/model\.safetensors: 1 weight tensor\(s\) hold NaN/inf \({name}\).*re-fit"):
        export_bundle(run, out=out, **QUIET)
    assert not out.exists() and _siblings(out) == []
    res = CliRunner().invoke(export_cmd, [str(run), "--out", str(out)])
    assert res.exit_code == 1 and "NaN/inf" in res.output and len(_error_lines(res)) == 1


# ------------------------------------------------------------------------------------- 3. ownership


def test_overwrite_never_deletes_a_folder_of_user_files(small_run: Path, small_bundle: Path, tmp_path: Path) -> None:
    user = tmp_path / "results"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    bundle_plus = _copy(small_bundle, tmp_path / "bundle_plus")  # a pre-marker bundle with a user's file added
    (bundle_plus / OWNER_FILE).unlink()
    (bundle_plus / "notes.txt").write_text("mine")
    other_kind = _copy(small_bundle, tmp_path / "other_kind")
    (other_kind / OWNER_FILE).write_text(json.dumps({"written_by": "hishrst", "kind": "fit-run"}))
    for out in (user, bundle_plus, other_kind):
        before = _snapshot(out)
        res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out), "--overwrite"])
        assert res.exit_code == 1 and "never replaced, even with --overwrite" in res.output, res.output
        assert _snapshot(out) == before and _siblings(out) == []


@pytest.mark.parametrize("where", ["run", "inside", "parent"])
def test_out_overlapping_the_run_directory_is_refused(small_run: Path, tmp_path: Path, where: str) -> None:
    run = _copy(small_run, tmp_path / "parent" / "run")
    out = {"run": run, "inside": run / "bundle", "parent": tmp_path / "parent"}[where]
    before = _snapshot(tmp_path)
    with pytest.raises(ForeignOutputError, match=r"--out would overlap the input"):
        export_bundle(run, out=out, overwrite=True, **QUIET)
    assert _snapshot(tmp_path) == before and not (run / "bundle").exists()


def test_overwrite_replaces_bundles_hishrst_wrote_and_cleans_debris(small_run: Path, small_bundle: Path,
                                                                     tmp_path: Path) -> None:
    out = _copy(small_bundle, tmp_path / "bundle")
    (out / OWNER_FILE).unlink()  # written before the marker existed: a manifest and the files it lists
    with pytest.raises(OutputStateError, match=r"already holds a hishrst model bundle; pass --overwrite"):
        export_bundle(small_run, out=out, **QUIET)
    dead = _dead_pid()
    debris = [tmp_path / f".bundle.partial-{dead}-0badc0de", tmp_path / f".bundle.tmp-{dead}-0badc0de"]
    debris[0].mkdir()
    (debris[0] / "encoder.onnx").write_bytes(b"half")
    debris[1].write_bytes(b"half")
    live = tmp_path / f".bundle.partial-{os.getpid()}-1ive1ive"  # a running export's: kept
    live.mkdir()
    m = export_bundle(small_run, out=out, overwrite=True, **QUIET)
    assert owner_of(out) == "bundle" and m["integrity"]["content_sha256"]
    assert not any(p.exists() for p in debris) and live.is_dir()
    live.rmdir()
    export_bundle(small_run, out=out, overwrite=True, **QUIET)  # a marked bundle: replaced again
    load_bundle(out)
    assert _siblings(out) == []


# ------------------------------------------------------------------------------------- 5. full disk


def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_while_writing_onnx_is_one_line(small_run: Path, small_bundle: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "_save", _enospc)
    out = tmp_path / "fresh"
    res = CliRunner().invoke(export_cmd, [str(small_run), "--out", str(out)])
    assert res.exit_code == 1, res.output + repr(res.exception)
    (line,) = _error_lines(res)
    assert "no space left on device" in line and "nothing was written" in line and "--out" in line
    assert not out.exists() and _siblings(out) == []


def test_full_disk_while_writing_the_manifest_keeps_the_old_bundle(small_run: Path, small_bundle: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import hishrst_runtime.bundle.manifest as manifest_mod
    from hishrst_runtime.core import files

    real = files.atomic_write

    def full(path: Path, data: Any, **kw: Any) -> None:
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data, **kw)

    monkeypatch.setattr(manifest_mod, "atomic_write", full)
    out = _copy(small_bundle, tmp_path / "bundle")
    before = _snapshot(out)
    with pytest.raises(ExportError, match=r"bundle: no space left on device while writing manifest\.json; free space .*nothing was written"):
        export_bundle(small_run, out=out, overwrite=True, **QUIET)
    assert _snapshot(out) == before and _siblings(out) == []
