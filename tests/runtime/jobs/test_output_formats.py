"""Output formats as a registry (``--format anndata,spatialdata,h5ad``), the one object naming a slide's
output files (:class:`SlideOutputs`), and named choices imported from ``core/vocab.py``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from hishrst_runtime.core import vocab
from hishrst_runtime.core.errors import InputError
from hishrst_runtime.jobs import formats as fmts
from hishrst_runtime.jobs.formats import OUTPUT_FORMATS, OutputFormat, finish_formats, is_done, parse_formats
from hishrst_runtime.jobs.options import RunOptions
from hishrst_runtime.output.names import SlideOutputs


def test_slide_outputs_name_every_file() -> None:
    o = SlideOutputs(Path("OUT/p1/S.zarr"))
    assert (o.stem, o.partial, o.lock, o.spatialdata, o.h5ad, o.tissue_geojson, o.qc) == (
        "S", Path("OUT/p1/S.zarr.partial"), Path("OUT/p1/S.zarr.lock"), Path("OUT/p1/S.sdata.zarr"),
        Path("OUT/p1/S.h5ad"), Path("OUT/p1/S.tissue.geojson"), Path("OUT/p1/S.qc.png"))
    assert SlideOutputs.named("OUT", "p1/S") == o and len(set(o.all())) == len(o.all())
    from hishrst_runtime.jobs.locks import lock_path
    from hishrst_runtime.output.store import partial_path
    from hishrst_runtime.output.spatialdata_store import spatialdata_path

    assert (lock_path(o.store), partial_path(o.store), spatialdata_path(o.store)) == (o.lock, o.partial, o.spatialdata)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.store = Path("x")  # type: ignore[misc]


@pytest.mark.parametrize("value, h5ad, want", [
    ("anndata", False, ("anndata",)), ("both", False, ("anndata", "spatialdata")),
    ("h5ad, anndata", False, ("anndata", "h5ad")), ("anndata,spatialdata,h5ad", False, ("anndata", "spatialdata", "h5ad")),
    ("spatialdata", True, ("spatialdata", "h5ad")), (("anndata",), True, ("anndata", "h5ad")),
])
def test_parse_formats(value: object, h5ad: bool, want: tuple[str, ...]) -> None:
    assert parse_formats(value, h5ad=h5ad) == want  # type: ignore[arg-type]


def test_bad_formats_name_the_option() -> None:
    with pytest.raises(InputError, match="--format: unknown format 'zip'.*anndata, spatialdata, h5ad, both"):
        parse_formats("anndata,zip")
    with pytest.raises(InputError, match="--format names no format"):
        parse_formats(" , ")
    opts = RunOptions(output_format="both", h5ad=True)
    assert opts.formats == ("anndata", "spatialdata", "h5ad") and opts.h5ad


def test_registry_entries_are_complete() -> None:
    o = SlideOutputs(Path("OUT/S.zarr"))
    paths = {name: f.path(o) for name, f in OUTPUT_FORMATS.items()}
    assert paths == {"anndata": o.store, "spatialdata": o.spatialdata, "h5ad": o.h5ad}
    assert all(f.description and f.name == name for name, f in OUTPUT_FORMATS.items())
    assert OUTPUT_FORMATS["spatialdata"].extra == "spatialdata"


def _complete_store(path: Path) -> None:
    from hishrst_runtime.output.store import OutputStore

    n = 4
    store = OutputStore.create(path, obs_xy_px=np.arange(2 * n, dtype=float).reshape(n, 2),
                               grid_index=np.zeros((n, 2), np.int64), tissue_fraction=np.ones(n, np.float32),
                               genes=["A", "B"], uns={}, fsync=False)
    store.write_rows(np.arange(n), np.ones((n, 2), np.float32))
    store.finalize()


def test_adding_a_format_is_one_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new entry is parsed, written from the complete store, counted done, and lets the store go."""
    def write(o: SlideOutputs, levels: object, replace: bool) -> str:
        o.store.with_name(o.stem + ".txt").write_text(json.dumps({"from": o.store.name}))
        return "wrote txt"

    entry = OutputFormat("txt", "a text note <slide>.txt", path=lambda o: o.store.with_name(o.stem + ".txt"),
                         done=lambda o: o.store.with_name(o.stem + ".txt").is_file(),
                         current=lambda o: o.store.with_name(o.stem + ".txt").is_file(), write=write)
    monkeypatch.setitem(fmts.OUTPUT_FORMATS, "txt", entry)
    assert parse_formats("txt,anndata") == ("anndata", "txt")
    outs = SlideOutputs(tmp_path / "s.zarr")
    _complete_store(outs.store)
    assert fmts.formats_pending(outs, ("txt",))
    assert finish_formats(outs, ("txt",)) == ["wrote txt", "removed s.zarr (--format txt)"]
    assert not outs.store.exists() and is_done(outs, ("txt",)) and not is_done(outs, ("anndata", "txt"))


def test_h5ad_format_and_the_deprecated_flag(tmp_path: Path, tiny_bundle: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("anndata")
    import hishrst_runtime.jobs.runner as runner
    from hishrst_runtime.inference.engines import noop_engines
    from tests.runtime.jobs.test_cohorts import _disc, invoke

    monkeypatch.setattr(runner, "load_engines", lambda bundle, provider, **kw: noop_engines(bundle))
    slide = _disc(tmp_path / "disc.ome.zarr")
    base = [slide, "--bundle", tiny_bundle, "--no-qc"]
    r = invoke([*base, "--out", tmp_path / "a", "--format", "anndata,h5ad"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "a").glob("disc.*")) == ["disc.h5ad", "disc.zarr"]
    r = invoke([*base, "--out", tmp_path / "b", "--h5ad"])
    assert r.exit_code == 0 and "--h5ad is deprecated; use --format anndata,h5ad" in r.output, r.output
    assert (tmp_path / "b" / "disc.h5ad").is_file()
    r = invoke([*base, "--out", tmp_path / "c", "--format", "h5ad"])  # the AnnData store is removed
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "c").glob("disc.*")) == ["disc.h5ad"]
    r = invoke([*base, "--out", tmp_path / "c", "--format", "h5ad"])
    assert r.exit_code == 0 and "already complete" in r.output  # the h5ad counts as done
    r = invoke([*base, "--out", tmp_path / "d", "--format", "anndata,zip"])
    assert r.exit_code == 2 and "unknown format 'zip'" in r.output


def test_named_choices_come_from_vocab() -> None:
    from hishrst_runtime.cli.run import run
    from hishrst_runtime.inference import prepare
    from hishrst_runtime.jobs import options, runner

    assert options.PROVIDERS is vocab.PROVIDERS and prepare.GridKind is vocab.GridKind
    assert runner.RUNNABLE_POSITION_MODES == vocab.UM_POSITION_MODES
    choices = {p.name: getattr(p.type, "choices", None) for p in run.params}
    assert tuple(choices["grid"]) == vocab.GRID_KINDS and tuple(choices["provider"]) == vocab.PROVIDERS
    assert RunOptions().grid == vocab.DEFAULT_GRID and RunOptions().provider == vocab.DEFAULT_PROVIDER
