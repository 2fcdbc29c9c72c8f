"""URL redaction (:mod:`hishrst_runtime.core.urls`): credentials and query strings never reach reports,
output metadata or messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hishrst_runtime.core.urls import redact_text, redact_url

SECRET_URL = ("https://alice:s3cr3t-token@slides.example.org:8443/cases/S1.ome.zarr"
              "?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA")


@pytest.mark.parametrize("url, want", [
    (SECRET_URL, "https://slides.example.org:8443/cases/S1.ome.zarr"),
    ("s3://key:secret@bucket/x.ome.zarr", "s3://bucket/x.ome.zarr"),
    ("https://host/a/b.zarr?sig=1#frag", "https://host/a/b.zarr"),
    ("https://host/a/b.zarr", "https://host/a/b.zarr"),
    ("/local/path?not-a-url.zarr", "/local/path?not-a-url.zarr"),  # only URLs are touched
    ("s3://bucket/x.zarr::he_image", "s3://bucket/x.zarr::he_image"),
])
def test_redact_url(url: str, want: str) -> None:
    assert redact_url(url) == want


def test_redact_text_finds_every_url_and_keeps_punctuation() -> None:
    text = f"{SECRET_URL}: cannot read (ClientError: 403 for url 'https://u:p@h/x/.zattrs?sig=abc'); check"
    got = redact_text(text)
    assert got == ("https://slides.example.org:8443/cases/S1.ome.zarr: cannot read (ClientError: 403 for url "
                   "'https://h/x/.zattrs'); check")
    assert redact_text("simplecache::s3://k:s@b/x.zarr") == "simplecache::s3://b/x.zarr"
    assert redact_text("no url here: /data/S.svs") == "no url here: /data/S.svs"


def test_errors_reports_and_metadata_are_redacted(tmp_path) -> None:
    from hishrst_runtime.inference.prepare import PreparedSlide
    from hishrst_runtime.jobs.report import build_report, summary_markdown, write_run_report
    from hishrst_runtime.jobs.results import SlideResult
    from hishrst_runtime.slides.errors import RemoteSlideError
    from hishrst_runtime.slides.remote import _one_line

    err = RemoteSlideError(f"{SECRET_URL}: cannot read the remote slide")
    assert str(err) == "https://slides.example.org:8443/cases/S1.ome.zarr: cannot read the remote slide"
    assert "s3cr3t" not in _one_line(OSError(f"refused {SECRET_URL}")) and "X-Amz" not in _one_line(OSError(SECRET_URL))
    res = SlideResult(slide=SECRET_URL, output=tmp_path / "S1.zarr", status="failed", reason=f"{err}; {SECRET_URL}")
    assert res.name == "S1.ome.zarr"
    report = build_report(results=[res], args={"slides": (SECRET_URL,), "out_dir": str(tmp_path)}, started=0.0,
                          finished=1.0, shard=None, error=f"stopped at {SECRET_URL}")
    paths = write_run_report(tmp_path, report)
    for text in [json.dumps(report), summary_markdown(report), *(p.read_text() for p in paths)]:
        assert "s3cr3t" not in text and "alice" not in text and "X-Amz" not in text and "deadbeef" not in text
    assert report["slides"][0]["slide"] == "https://slides.example.org:8443/cases/S1.ome.zarr"
    z = np.zeros((1, 2))
    prep = PreparedSlide(path=SECRET_URL, slide=None, level_index=0, points_px=z, grid_index=z,
                         tissue_fraction=z[:, 0], groups=[], thumbnail=np.zeros((1, 1, 3), np.uint8), thumbnail_scale=1.0,
                         tissue_mask=np.zeros((1, 1), bool), pitch_um=None)
    assert prep.location == "https://slides.example.org:8443/cases/S1.ome.zarr"  # the output's uns['hishrst_run']['slide']
    assert prep.name == "S1.ome.zarr"
