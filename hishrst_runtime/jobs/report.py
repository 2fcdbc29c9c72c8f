"""The run report of one ``hishrst-run`` invocation: ``hishrst_run.json`` and ``summary.md`` in ``--out``.

File names (all written atomically, :func:`hishrst_runtime.core.files.atomic_write`):

- an unsharded run writes ``OUT/hishrst_run.json`` and ``OUT/summary.md``;
- shard ``I`` of ``N`` (``--shard I/N`` or a Slurm job array) writes ``OUT/hishrst_run.shard-I-of-N.json``
  and ``OUT/summary.shard-I-of-N.md``, so the jobs of an array sharing ``OUT`` never write the same file;
- these stable names always hold the *latest* invocation (of that shard); every invocation also keeps its
  own copy, never overwritten, as ``OUT/hishrst_runs/<run id>.json`` with the run id
  ``<UTC start, YYYYmmddTHHMMSSZ>-<all | shard-I-of-N>-<host>-<pid>``.

The JSON (``schema`` 1) holds the run id, start / finish times (UTC, ISO 8601) and wall seconds, the
command's arguments, the shard, host and pid, the versions of hishrst, Python, ONNX Runtime, numpy, zarr and
anndata, per-slide results (:class:`~hishrst_runtime.jobs.results.SlideResult`: status, reason, points,
engine, tiles/s, seconds, per-stage timings), the counts per status, and ``errors``: one line per failed
and interrupted slide, plus the invocation's own error when it stopped (``error``), ``interrupted`` (the
signal that stopped it, or null), and per slide ``chunks_recomputed`` (output chunks of a resumed partial that
failed verification), ``filled_chunks`` (``count`` and the ``first`` 10 names of slide chunks read as
fill under ``--allow-missing-chunks``), ``points_dropped`` (explicit points outside the slide, ``--points-outside
drop``) and ``qc`` (the QC thumbnail's ``path``, the ``gene`` it shows and the ``rule`` that chose it; null when
none was written), and for a sub-spot run (bins) its ``resolution``, ``tiles`` (its lattice's) and ``encoder_passes``
(this run's; ``points`` / ``computed`` then count bins). ``summary.md`` links every QC thumbnail. Every string in it
(arguments, slides, reasons) has its URLs' credentials and query strings removed
(:func:`hishrst_runtime.core.urls.redact_text`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from hishrst_runtime.core.files import atomic_write
from hishrst_runtime.core.jsonutil import json_default
from hishrst_runtime.core.urls import redact_text
from hishrst_runtime.jobs.results import SlideResult

__all__ = ["REPORT_SCHEMA", "HISTORY_DIR", "report_names", "run_id", "versions", "build_report", "summary_markdown",
           "write_run_report"]

REPORT_SCHEMA = 1
#: Folder (inside ``--out``) holding every invocation's report under its run id.
HISTORY_DIR = "hishrst_runs"
_PACKAGES = {"hishrst": ("hishrst",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "numpy": ("numpy",),
             "zarr": ("zarr",), "anndata": ("anndata",)}


def report_names(shard: tuple[int, int] | None) -> tuple[str, str]:
    """(JSON, Markdown) file names of the latest report of a run (``shard`` = (I, N), or None)."""
    if shard is None:
        return "hishrst_run.json", "summary.md"
    tag = f"shard-{shard[0]}-of-{shard[1]}"
    return f"hishrst_run.{tag}.json", f"summary.{tag}.md"


def run_id(started: float, shard: tuple[int, int] | None) -> str:
    """``<UTC start>-<all | shard-I-of-N>-<host>-<pid>``: unique per invocation (``started``: epoch s)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname().split(".")[0]) or "host"
    part = "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"
    return f"{stamp}-{part}-{host}-{os.getpid()}"


def versions() -> dict[str, str | None]:
    """Installed versions of hishrst, Python, ONNX Runtime, numpy, zarr and anndata (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dists in _PACKAGES.items():
        out[key] = None
        for dist in dists:
            try:
                out[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    if out["hishrst"] is None:
        from hishrst_runtime.core.version import __version__

        out["hishrst"] = __version__
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="seconds")


#: Names of filled slide chunks listed per slide in the report (the count is always complete).
FILLED_CHUNKS_SHOWN = 10
#: Said wherever a bundle made from a random test encoder is used (report, summary, console, ``uns``).
TEST_ENCODER_WARNING = ("TEST ENCODER: this bundle was made from a randomly initialised test encoder; its "
                        "predictions carry no biological meaning")


def _slide_entry(r: SlideResult) -> dict[str, Any]:
    return {"slide": r.slide, "output": None if r.output is None else str(r.output), "status": r.status,
            "reason": r.reason or None, "points": r.points, "computed": r.computed, "engine": r.engine,
            "tiles_per_s": r.tiles_per_s, "seconds": r.seconds, "resumed": r.resumed, "timings": dict(r.timings),
            "chunks_recomputed": r.chunks_recomputed, "points_dropped": r.points_dropped,
            "test_encoder": r.test_encoder, "resolution": r.resolution, "tiles": r.tiles,
            "encoder_passes": r.encoder_passes,
            "qc": None if r.qc is None else {"path": str(r.qc), "gene": r.qc_gene, "rule": r.qc_rule},
            "filled_chunks": {"count": len(r.filled_chunks), "first": list(r.filled_chunks[:FILLED_CHUNKS_SHOWN])}}


def build_report(*, results: Sequence[SlideResult], args: Mapping[str, Any], started: float, finished: float,
                 shard: tuple[int, int] | None, error: str | None = None, command: str = "hishrst-run",
                 interrupted: str | None = None) -> dict[str, Any]:
    """The report of one invocation (see the module docstring); ``started`` / ``finished``: epoch seconds;
    ``error``: the one-line error that stopped the invocation, if any; ``interrupted``: the signal's name
    (``SIGTERM``, ``SIGINT``) when one stopped it."""
    counts = Counter(r.status for r in results)
    errors = [f"{r.slide}: {r.reason}" for r in results if r.status in ("failed", "interrupted")]
    errors += [error] if error else []
    return _redacted({
        "schema": REPORT_SCHEMA, "run_id": run_id(started, shard), "command": command,
        "argv": list(sys.argv[1:]), "args": json.loads(json.dumps(dict(args), default=_jsonable)),
        "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
        "host": socket.gethostname(), "pid": os.getpid(), "versions": versions(),
        "started_at": _iso(started), "finished_at": _iso(finished), "seconds": round(finished - started, 3),
        "counts": {"ok": counts["ok"], "skipped": counts["skipped"], "failed": counts["failed"],
                   "interrupted": counts["interrupted"], "slides": len(results)},
        "slides": [_slide_entry(r) for r in results], "error": error, "errors": errors, "interrupted": interrupted,
        "test_encoder": any(r.test_encoder for r in results),
    })


def _redacted(o: Any) -> Any:
    """``o`` (JSON-like) with :func:`redact_text` applied to every string."""
    if isinstance(o, str):
        return redact_text(o)
    if isinstance(o, dict):
        return {k: _redacted(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_redacted(v) for v in o]
    return o


def _jsonable(o: Any) -> Any:
    try:
        return json_default(o)
    except TypeError:
        return str(o)


def _cell(v: Any) -> str:
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def _note(entry: Mapping[str, Any]) -> str:
    """A slide's reason, and the chunks a resume recomputed or the slide read as fill, if any."""
    parts = [entry["reason"]] if entry.get("reason") else []
    if entry.get("resolution"):
        parts.append(f"{entry['resolution']} bins from {entry.get('tiles')} tiles "
                     f"({entry.get('encoder_passes')} encoder passes this run)")
    if entry.get("points_dropped"):
        parts.append(f"{entry['points_dropped']} point(s) outside the slide dropped")
    if entry.get("chunks_recomputed"):
        parts.append(f"{entry['chunks_recomputed']} output chunk(s) failed verification and were recomputed")
    filled = entry.get("filled_chunks") or {}
    if filled.get("count"):
        parts.append(f"{filled['count']} slide chunk(s) read as fill ({', '.join(filled['first'])}"
                     + (", ..." if filled["count"] > len(filled["first"]) else "") + ")")
    return "; ".join(parts)


def _qc_lines(report: Mapping[str, Any]) -> list[str]:
    """One QC thumbnail link per slide that has one (path relative to ``--out`` when inside it)."""
    out_dir = report["args"].get("out_dir")
    lines = []
    for s in report["slides"]:
        qc = s.get("qc")
        if not qc:
            continue
        path = Path(qc["path"])
        with contextlib.suppress(ValueError, TypeError):
            path = path.relative_to(out_dir) if out_dir else path
        lines.append(f"- {_cell(s['slide'])}: [{path.as_posix()}]({path.as_posix()}) — gene {qc['gene']} "
                     f"({qc['rule']})")
    return ["", "## QC thumbnails", "", *lines] if lines else []


def summary_markdown(report: Mapping[str, Any]) -> str:
    """A short Markdown summary of ``report``: when, what, versions, one table row per slide, failures."""
    c, v, args = report["counts"], report["versions"], report["args"]
    shard = report["shard"]
    lines = [
        f"# {report['command']} {report['run_id']}", "",
        f"- {report['started_at']} → {report['finished_at']} ({report['seconds']} s) on {report['host']}",
        f"- bundle `{args.get('bundle_dir')}`, output `{args.get('out_dir')}`"
        + ("" if shard is None else f", shard {shard['index']}/{shard['count']}"),
        f"- hishrst {v.get('hishrst')}, Python {v.get('python')}, onnxruntime {v.get('onnxruntime')}, "
        f"numpy {v.get('numpy')}",
        f"- **{c['ok']} ok, {c['skipped']} skipped, {c['failed']} failed"
        + (f", {c['interrupted']} interrupted" if c.get("interrupted") else "") + f"** (of {c['slides']} slides)", "",
    ]
    if report.get("test_encoder"):
        lines += [f"**{TEST_ENCODER_WARNING}**", ""]
    if report["slides"]:
        lines += ["| slide | status | points | tiles/s | seconds | note |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| {_cell(s['slide'])} | {s['status']} | {_cell(s['points'])} | {_cell(s['tiles_per_s'])} | "
                  f"{_cell(s['seconds'])} | {_cell(_note(s))} |" for s in report["slides"]]
    lines += _qc_lines(report)
    if report["error"]:
        lines += ["", f"**Stopped:** {_cell(report['error'])}"]
    return "\n".join(lines) + "\n"


def write_run_report(out_dir: Path, report: Mapping[str, Any]) -> list[Path]:
    """Write ``report`` into ``out_dir`` (latest JSON and Markdown, and the history copy), atomically;
    returns the paths written. ``out_dir`` must exist."""
    shard = report["shard"]
    json_name, md_name = report_names(None if shard is None else (shard["index"], shard["count"]))
    data = (json.dumps(report, indent=2, default=_jsonable) + "\n").encode("utf-8")
    history = Path(out_dir) / HISTORY_DIR
    history.mkdir(exist_ok=True)
    paths = [history / f"{report['run_id']}.json", Path(out_dir) / json_name, Path(out_dir) / md_name]
    atomic_write(paths[0], data, fsync=True)
    atomic_write(paths[1], data, fsync=True)
    atomic_write(paths[2], summary_markdown(report).encode("utf-8"), fsync=True)
    return paths
