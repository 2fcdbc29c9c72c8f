"""What a slide argument names (:func:`hishrst_runtime.slides.sources.parse_source`): files that are not
slides are refused naming the file, ``file://`` URLs are local paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from hishrst_runtime.slides.errors import SlideError
from hishrst_runtime.slides.sources import file_url_path, parse_source


@pytest.mark.parametrize("name, hint", [
    ("slides.txt", True), ("slides.csv", True), ("slides.list", True),
    ("meta.json", False), ("mask.geojson", False), ("points.h5ad", False), ("thumb.png", False),
    ("photo.JPG", False),
])
def test_files_that_are_not_slides_are_named(tmp_path: Path, name: str, hint: bool) -> None:
    f = tmp_path / name
    f.write_text("not a slide\n")
    with pytest.raises(SlideError) as e:
        parse_source(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}: not a slide") and "\n" not in msg and "hishrst[openslide]" not in msg
    assert ("--slides-from" in msg) == hint


def test_other_files_still_go_to_openslide(tmp_path: Path) -> None:
    f = tmp_path / "scan.mrxs"
    f.write_bytes(b"\0" * 16)
    assert parse_source(f).kind == "openslide"


def test_file_urls_are_local_paths() -> None:
    assert file_url_path("file:///data/a%20b.svs") == "/data/a b.svs"
    assert file_url_path("file://localhost/data/s.ome.zarr::he") == "/data/s.ome.zarr::he"
    assert file_url_path("https://h/x") is None and file_url_path("/data/x") is None
    src = parse_source("file:///nowhere/s.ome.zarr")
    assert src.kind == "zarr" and src.location == "/nowhere/s.ome.zarr"
