"""The benchmark scripts run end to end with ``--quick`` and write well-formed JSON lines.

Each script runs in a subprocess exactly as documented (``python -m benchmarks.<name> --quick``);
the synthetic section, slides and bundle they share are built once per session into a temporary work
directory. Only the shape and sanity of the measurements are checked (records present, numbers
positive and finite), never speed targets: timings on shared CI machines are noise.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.benchmark

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SCRIPT_TIMEOUT_S = 300


def _run(args: list[str], *, timeout: float = SCRIPT_TIMEOUT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _script(name: str, out: Path, workdir: Path, *extra: str) -> list[dict]:
    proc = _run(["-m", f"benchmarks.{name}", "--quick", "--out", str(out), "--workdir", str(workdir), *extra])
    assert out.is_file(), proc.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records, f"{out} is empty"
    for r in records:
        assert r["benchmark"] == name and r["quick"] is True
        assert r["status"] in ("ok", "skipped")
        if r["status"] == "skipped":
            assert r["reason"]
        m = r["machine"]
        assert m["cpu_model"] and m["cores_logical"] >= 1 and "gpu" in m
        assert "torch" in m["versions"] and "onnxruntime" in m["versions"]
        assert r["timestamp"] and r["command"].startswith("python")
    return records


def _positive(*values: object) -> None:
    for v in values:
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, v


@pytest.fixture(scope="session")
def bench_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic small section, its 1×/4× OME-Zarr slides and a 1-epoch bundle, shared by the tests."""
    work = tmp_path_factory.mktemp("bench-work")
    _run(["-m", "benchmarks._data", "prepare", "--quick", "--workdir", str(work)])
    return work


@pytest.fixture(scope="module")
def encoder_jsonl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("bench-encoder")
    out = tmp / "encoder.jsonl"
    return out, _script("encoder", out, tmp / "work")


# --------------------------------------------------------------------------------------------- scripts


def test_encoder_quick(encoder_jsonl: tuple[Path, list[dict]]) -> None:
    _, records = encoder_jsonl
    ok = [r for r in records if r["status"] == "ok"]
    for backend in ("torch-fp32", "torch-autocast", "ort-cpu"):
        sizes = {r["batch_size"] for r in ok if r["encoder"] == "test-vit" and r["backend"] == backend}
        assert len(sizes) >= 2, (backend, sizes)
    for r in ok:
        _positive(r["tiles_per_s"], r["ms_per_batch_median"], r["flops_per_tile"], r["tflops"])
        assert r["iters"] >= 1
    # every backend that was not measured says why
    measured = {r["backend"] for r in ok}
    skipped = {r.get("backend") for r in records if r["status"] == "skipped"}
    from benchmarks.encoder import BACKENDS

    assert set(BACKENDS) <= measured | skipped
    assert any(r["status"] == "skipped" and r["encoder"] == "uni" for r in records)  # quick: UNI skipped, with a reason


def test_plot_from_encoder_results(encoder_jsonl: tuple[Path, list[dict]], tmp_path: Path) -> None:
    src, _ = encoder_jsonl
    out, png = tmp_path / "plot.jsonl", tmp_path / "tiles.png"
    _run(["benchmarks/plot.py", "--quick", "--in", str(src), "--out", str(out), "--png", str(png)])  # path form
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["benchmark"] == "plot" and rec["lines"] >= 3 and rec["points"] >= 6


def test_report_renders_results(encoder_jsonl: tuple[Path, list[dict]], tmp_path: Path) -> None:
    src, records = encoder_jsonl
    (tmp_path / "encoder.jsonl").write_text(src.read_text())
    md = tmp_path / "tables.md"
    _run(["-m", "benchmarks.report", "--dir", str(tmp_path), "--md", str(md)])
    text = md.read_text()
    assert "### encoder" in text and "QUICK run" in text and records[0]["command"] in text
    assert sum(line.startswith("| test-vit |") for line in text.splitlines()) == sum(r["status"] == "ok" for r in records)


def test_report_renders_every_committed_result() -> None:
    """Every benchmark's section of RESULTS.md renders from the committed results (one table or more each)."""
    from benchmarks._common import RESULTS_DIR, read_jsonl
    from benchmarks.report import section

    names = ("encoder", "pipeline", "reference", "training", "direct_wsi", "transfer")
    files = [f for f in sorted(RESULTS_DIR.glob("*.jsonl")) if f.stem.split("-")[0] in names and f.stat().st_size]
    if not files:
        pytest.skip(f"no committed results in {RESULTS_DIR}")
    for f in files:
        text = section(f.stem.split("-")[0], read_jsonl(f), title=f.stem)
        assert text.startswith(f"### {f.stem}\n") and "*Command*" in text
        assert sum(line.startswith("|---") for line in text.splitlines()) >= 1, f


def test_pipeline_quick(bench_work: Path, tmp_path: Path) -> None:
    records = _script("pipeline", tmp_path / "pipeline.jsonl", bench_work)
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("kind", ""), []).append(r)
    assert {r["slide"] for r in by_kind["end_to_end"]} == {"small-1x", "small-4x"}
    assert {r["slide"] for r in by_kind["noop"]} == {"small-1x", "small-4x"}
    e2e = {r["slide"]: r for r in by_kind["end_to_end"]}
    assert e2e["small-4x"]["points"] > 3 * e2e["small-1x"]["points"]  # 4× the area
    for r in by_kind["end_to_end"] + by_kind["noop"]:
        _positive(r["tiles_per_s"], r["stream_tiles_per_s"], r["slide_seconds"], r["points"])
        if r["kind"] == "end_to_end":  # peak RSS of the fresh process, taken right after the real-engine run
            _positive(r["peak_rss_mb"])
        for stage in ("read_decode", "cut_resample", "encoder", "head", "write"):
            assert stage in r["stages"] and math.isfinite(r["stages"][stage]) and r["stages"][stage] >= 0
        assert r["torch_imported"] is False  # the runtime's memory, not torch's
    assert all(r["engine"] == "noop" for r in by_kind["noop"])
    (eng,) = by_kind["engine_only"]
    _positive(eng["tiles_per_s"], eng["tiles"])
    (s,) = by_kind["summary"]
    _positive(s["ratio_1x"], s["ratio_4x"], s["stream_ratio_1x"], s["peak_rss_mb_1x"], s["peak_rss_mb_4x"])
    assert math.isfinite(s["rss_growth"]) and isinstance(s["rss_flat"], bool)


def test_reference_quick(bench_work: Path, tmp_path: Path) -> None:
    records = _script("reference", tmp_path / "reference.jsonl", bench_work, "--ref-workers", "0")
    ours = [r for r in records if r.get("pipeline") == "ours"]
    refs = [r for r in records if r.get("pipeline") == "reference"]
    (s,) = [r for r in records if r.get("kind") == "summary"]
    assert len(ours) == 1 and [r["num_workers"] for r in refs] == [0]
    assert ours[0]["points"] == refs[0]["points"] > 0  # the same points
    for r in ours + refs:
        _positive(r["tiles_per_s"], r["seconds"], r["peak_rss_mb"])
    _positive(s["speedup"], s["rss_ratio_ref_over_ours"])


def test_training_quick(bench_work: Path, tmp_path: Path) -> None:
    records = _script("training", tmp_path / "training.jsonl", bench_work)
    feats = [r for r in records if r["kind"] == "features"]
    fits = [r for r in records if r["kind"] == "fit"]
    assert feats and fits and {r["device"] for r in fits} >= {"cpu"}
    for r in feats:
        _positive(r["tiles_per_s"], r["tiles"], r["batch_size"])
    for r in fits:
        _positive(r["seconds_per_epoch"], r["epochs"], r["train_spots"])


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HISHRST_BENCH_UNI"), reason="set HISHRST_BENCH_UNI=1: builds and exports "
                    "the full UNI architecture (minutes on a small CPU)")
def test_encoder_uni(tmp_path: Path) -> None:
    records = _script("encoder", tmp_path / "encoder.jsonl", tmp_path / "work", "--encoders", "uni",
                      "--batch-sizes", "1", "--backends", "torch-fp32,ort-cpu")
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"torch-fp32", "ort-cpu"}
    assert all(abs(r["flops_per_tile"] / 123.2e9 - 1) < 0.01 for r in ok)


# --------------------------------------------------------------------------------------------- helpers


def test_vit_flops_match_uni_reference() -> None:
    from benchmarks.encoder import vit_flops_per_tile
    from hishrst_train.encoders import build_backbone, get_encoder_spec

    spec = get_encoder_spec("uni")
    flops = vit_flops_per_tile(build_backbone(spec, device="meta"), spec.input_size)
    assert abs(flops / 123.2e9 - 1) < 0.005  # ViT-L/16 at 224 px: 61.6 GMAC per tile


def test_gpu_peak_lookup() -> None:
    from benchmarks.encoder import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA L40S") == 362.0
    assert gpu_peak_tflops("NVIDIA L4") == 121.0
    assert gpu_peak_tflops("Some Future GPU") is None and gpu_peak_tflops(None) is None


def test_tiled_2x2_matches_numpy_tile() -> None:
    from benchmarks._data import Tiled2x2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    big, want = Tiled2x2(img), np.tile(img, (2, 2, 1))
    assert big.shape == want.shape
    for _ in range(50):
        y0, y1 = sorted(rng.integers(0, want.shape[0] + 1, 2))
        x0, x1 = sorted(rng.integers(0, want.shape[1] + 1, 2))
        np.testing.assert_array_equal(big[y0:y1, x0:x1], want[y0:y1, x0:x1])


def test_time_call_counts_and_skips_warmup_when_slow() -> None:
    from benchmarks._common import time_call

    calls = []
    t = time_call(lambda: calls.append(1), warmup=2, min_time=0.0, min_iters=3)
    assert t["iters"] == 3 and len(calls) == 5 and 0 <= t["min_s"] <= t["median_s"]
    import time as _time

    slow = []
    t = time_call(lambda: (slow.append(1), _time.sleep(0.03)), warmup=3, min_time=0.0, min_iters=5, slow_s=0.01)
    assert len(slow) == 3 and t["iters"] == 2  # one warm-up call, then the minimum of 2


def test_transfer_quick(bench_work: Path, tmp_path: Path) -> None:
    records = _script("transfer", tmp_path / "transfer.jsonl", bench_work, "--modes", "relative")
    (r,) = records
    assert r["mode"] == "relative" and r["genes"] > 0
    # through export and `hishrst-run --points`: the same slide moved 5 mm scores the same (exact invariance)
    assert abs(r["moved_minus_here"]) <= 1e-3, r
    for key in ("pcc_within_recovery", "pcc_unseen_section", "pcc_unseen_moved_5mm", "ridge_colour_pcc"):
        assert math.isfinite(r[key]) and -1 <= r[key] <= 1


def test_direct_wsi_quick(bench_work: Path, tmp_path: Path) -> None:
    records = _script("direct_wsi", tmp_path / "direct_wsi.jsonl", bench_work)
    if records[0]["status"] == "skipped":
        pytest.skip(records[0]["reason"])
    sources = {r["source"]: r for r in records if r.get("kind") == "source"}
    assert set(sources) == {"direct", "ome-zarr"}
    for r in sources.values():
        _positive(r["tiles_per_s"], r["median_tiles_per_s"], r["decode_mpix_per_s"])
    (e2e,) = [r for r in records if r.get("kind") == "end_to_end"]
    _positive(e2e["direct"]["tiles_per_s"], e2e["ome_zarr"]["tiles_per_s"], e2e["direct_over_omezarr"])


def test_feed_quick(tmp_path: Path) -> None:
    """Feed rate at UNI geometry on the three synthetic slide kinds × 1, 2 reader threads, then the
    latency engine's busy share over a 5-slide run (injected through ``run_slides(engines=...)``)."""
    records = _script("feed", tmp_path / "feed.jsonl", tmp_path / "work")
    feed = [r for r in records if r.get("kind") == "feed"]
    kinds = {f"ome-zarr {mpp} µm/px, {codec}" for mpp in ("0.5", "0.25") for codec in ("zstd", "lz4")}
    kinds.add("tiff-jpeg 40× single level")
    layouts = ("NHWC", "NCHW")
    assert {(r["slide_kind"], r["layout"], r["workers"]) for r in feed} == {
        (k, lay, n) for k in kinds for lay in layouts for n in (1, 2)}
    assert {r["codec"] for r in feed} == {"zstd", "lz4", "jpeg"}
    tiles = {r["tiles"] for r in feed}
    assert len(tiles) == 1 and tiles.pop() > 0  # the same tissue at every pixel size: the same tiles
    for r in feed:
        _positive(r["tiles_per_s"], r["median_tiles_per_s"], r["seconds"])
        assert r["batch_size"] == 256 and r["input_size"] == 224 and r["level_mpp"] == 0.5
        assert r["patch_side_px"] == 224 and r["threads"]["cores_usable"] >= 1
        assert "OMP_NUM_THREADS" in r["threads"]["env"] and "load_avg_before" in r
    scaling = {(r["slide_kind"], r["layout"]): r for r in records if r.get("kind") == "scaling"}
    assert set(scaling) == {(k, lay) for k in kinds for lay in layouts}
    for s in scaling.values():
        assert s["scaling"]["1"] == 1.0 and s["scaling"]["2"] > 0
    (busy,) = [r for r in records if r.get("kind") == "engine_busy"]
    assert busy["slides"] == 5 and len(busy["per_slide"]) == 5 and busy["tiles_per_s_set"] == 4000.0
    assert busy["items"] == busy["tiles"] > 0 and busy["requested_s"] == pytest.approx(busy["tiles"] / 4000.0)
    assert 0 < busy["busy_fraction_of_wall"] <= busy["busy_fraction"] <= 1.05
    assert busy["busy_s"] >= busy["requested_s"] * 0.999 and busy["wall_s"] >= busy["span_s"]
    assert busy["hook"].startswith("hishrst_runtime.jobs.runner.run_slides(engines=")


def test_report_renders_feed_and_gpu_sections(tmp_path: Path) -> None:
    """``benchmarks.report`` has tables for ``feed`` and ``gpu`` records (feed: from a hand-made record)."""
    from benchmarks.report import SECTIONS, section

    assert {"feed", "gpu"} <= set(SECTIONS)
    machine = {"cpu_model": "cpu", "cores_usable": 2, "cores_logical": 2, "memory_gb": 8, "gpu": None, "versions": {}}
    stamp = {"timestamp": "t", "command": "python -m benchmarks.feed", "machine": machine, "load_avg_1m": 1.0}
    threads = {"env": {"OMP_NUM_THREADS": "1"}, "cores_usable": 2, "physical_cores": 2, "runtime_default_workers": 2}
    recs = [{**stamp, "kind": "feed", "status": "ok", "slide_kind": "ome-zarr 0.5 µm/px, lz4", "layout": "NCHW",
             "workers": 1, "tiles_per_s": 500.0, "threads": threads},
            {**stamp, "kind": "scaling", "status": "ok", "slide_kind": "ome-zarr 0.5 µm/px, lz4", "layout": "NCHW",
             "tiles_per_s_by_threads": {"1": 500.0, "2": 900.0}, "scaling": {"1": 1.0, "2": 1.8}},
            {**stamp, "kind": "engine_busy", "status": "ok", "codec": "lz4", "layout": "NCHW", "overlap": True,
             "slides": 5, "tiles": 100, "busy_fraction_of_wall": 0.25, "busy_fraction": 0.5,
             "idle": {"start_s": 0.4, "between_slides_s": 0.2, "within_slides_s": 0.1, "end_s": 0.3}},
            {**stamp, "kind": "cpu_engine", "status": "ok", "encoder_onnx": "enc.onnx", "overlap": True,
             "engine_threads": 1, "tiles_per_s": 90.0, "engine_only_tiles_per_s": 100.0,
             "end_to_end_over_engine_only": 0.9, "busy_fraction_of_wall": 0.8, "busy_fraction": 0.9}]
    text = section("feed", recs)
    assert "| ome-zarr 0.5 µm/px, lz4 | NCHW | 1 | 500 |" in text
    assert "| ome-zarr 0.5 µm/px, lz4 | NCHW | 500 | 900 | 1.80 |" in text
    assert "| engine_busy | lz4 | NCHW | yes | 100 |" in text and "| 25.0 | 50.0 | 0.4 | 0.2 | 0.1 | 0.3 |" in text
    assert "| enc.onnx | yes | 1 | 90.0 | 100 | 0.9 |" in text and "OMP_NUM_THREADS=1" in text


def test_claim_quick(tmp_path: Path) -> None:
    """4 concurrent ``hishrst-run`` workers on 12 mixed slides, ``--claim`` and ``--shard I/4``: every slide run
    exactly once per mode, makespans and the load average recorded."""
    records = _script("claim", tmp_path / "claim.jsonl", tmp_path / "work")
    runs = [r for r in records if r.get("kind") == "makespan"]
    assert {r["mode"] for r in runs} == {"claim", "shard"}
    for r in runs:
        assert r["workers"] == 4 and r["slides"] == 12 and r["slides_run"] == 12
        assert sum(w["slides"] for w in r["per_worker"]) == 12 and len(r["exit_after_s"]) == 4
        _positive(r["makespan_s"], r["lower_bound_s"], r["work_s"])
        assert r["makespan_s"] >= max(r["exit_after_s"]) - 0.1 and "load_avg_before" in r
        if r["mode"] == "shard":
            assert [w["slides"] for w in r["per_worker"]] == [3, 3, 3, 3]
    (summary,) = [r for r in records if r.get("kind") == "summary"]
    _positive(summary["shard_over_claim"], *summary["median_makespan_s"].values())


def test_threads_quick(tmp_path: Path) -> None:
    """``hishrst fit`` idle, with every core busy at the default thread count, and with --threads = all cores:
    three timed fits, the chosen thread count and the load recorded."""
    records = _script("threads", tmp_path / "threads.jsonl", tmp_path / "work")
    assert [(r["busy_cores"], r["threads_option"]) for r in records] == [
        (0, "default"), (records[0]["cores"], "default"), (records[0]["cores"], records[0]["cores"])]
    for r in records:
        _positive(r["wall_s"])
        assert r["chosen"].startswith("threads: ") and "load_avg_1m" in r
    assert records[2]["chosen"].startswith(f"threads: {records[0]['cores']} ")


def test_subspot_and_bins_run_quick(tmp_path: Path) -> None:
    """The sub-spot benchmark (spot and sub-spot fits, bin scoring with its three methods and the figure) and the
    run-time bins benchmark (bins/s, peak RSS, torch never imported) on the small preset."""
    work = tmp_path / "work"
    (rec,) = _script("subspot", tmp_path / "subspot.jsonl", work)
    for k in ("pcc_8um_subspot", "pcc_8um_interpolated_spots", "pcc_8um_spot_grid_16um", "pcc_16um_subspot"):
        assert -1 <= rec[k] <= 1
    assert rec["passes_ratio"] > 10 and rec["n_bins_8um"] > 1000 and isinstance(rec["meets_pcc"], bool)
    assert (work / "runs" / "subspot-small-seed0-bins" / "figure.png").is_file()
    records = _script("bins_run", tmp_path / "bins_run.jsonl", work)
    runs = {r["run"]: r for r in records}
    assert set(runs) == {"spot-50um", "subspot-8um", "subspot-8um-large", "ratios"}
    for name in ("spot-50um", "subspot-8um", "subspot-8um-large"):
        _positive(runs[name]["points"], runs[name]["rate"], runs[name]["peak_rss_mb"])
        assert runs[name]["torch_imported"] is False
    _positive(runs["ratios"]["bins_per_s_over_points_per_s"], runs["ratios"]["large_rss_over_spot_rss"])
