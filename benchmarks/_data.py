"""Synthetic data shared by the benchmarks, cached in a work directory (built once, reused):

* :func:`ensure_section` — a synthetic Visium section (``hishrst_train.synth``, seed 0);
* :func:`ensure_slides` — its image as OME-Zarr: ``1x`` and ``4x`` (the image tiled 2 × 2 through the
  lazy :class:`Tiled2x2` adapter, so it is never materialised);
* :func:`ensure_bundle` — a ``test-vit`` recovery run fitted on the section and its exported bundle;
* :func:`prepare_data` — all of them for a quick / full run (the preset chosen by :func:`data_plan`).

``python -m benchmarks._data prepare [--quick] [--workdir DIR]`` builds them ahead of timing.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks._common import base_parser, workdir_of

#: Bundle training used by the pipeline / reference benchmarks: (epochs, genes). Throughput does not
#: depend on the number of epochs; the gene count sets the head's output size (1000 = ``hishrst fit``'s default).
#: fit_run options of every benchmark fit: the random test encoder, allowed explicitly (never a user's default).
TEST_ENCODER: dict[str, Any] = {"encoder": "test-vit", "allow_test_encoder": True}
BUNDLE_FULL = (3, 1000)
BUNDLE_QUICK = (1, 50)



class Tiled2x2:
    """A lazy ``(2H, 2W, 3)`` view of an image tiled 2 × 2 (any ``[y0:y1, x0:x1]``-sliceable image):
    4× the area, never materialised (``write_ome_zarr`` reads it band by band)."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.h, self.w = int(image.shape[0]), int(image.shape[1])
        self.shape = (2 * self.h, 2 * self.w, 3)
        self.dtype = np.dtype(np.uint8)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        out = np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)
        for ty in (0, 1):
            a, b = max(y0, ty * self.h), min(y1, (ty + 1) * self.h)
            if a >= b:
                continue
            for tx in (0, 1):
                c, d = max(x0, tx * self.w), min(x1, (tx + 1) * self.w)
                if c >= d:
                    continue
                block = np.asarray(self.image[a - ty * self.h : b - ty * self.h, c - tx * self.w : d - tx * self.w])
                out[a - y0 : b - y0, c - x0 : d - x0] = block[..., :3]
        return out


def _build_dir(final: Path, build: Callable[[Path], Any]) -> Path:
    """Build ``final`` through a temporary sibling renamed into place (an interrupted build leaves nothing)."""
    if final.exists():
        return final
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _say(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def ensure_section(workdir: Path, preset: str) -> Path:
    """A synthetic Visium section (``hishrst_train.synth``, seed 0); returns its directory (``outs/``, ``image.tif``)."""
    final = workdir / f"synth-{preset}"
    if not final.exists():
        from hishrst_train.synth import make_synthetic_visium

        t0 = time.perf_counter()
        _build_dir(final, lambda d: make_synthetic_visium(d, preset=preset))  # type: ignore[arg-type]
        _say(f"synthetic {preset} section in {time.perf_counter() - t0:.1f} s -> {final}")
    return final


def ensure_slides(workdir: Path, preset: str) -> dict[str, Path]:
    """OME-Zarr slides of the section image: ``"1x"`` and ``"4x"`` (the image tiled 2 × 2, lazily)."""
    from hishrst_runtime.slides.convert import write_ome_zarr
    from hishrst_train.synth import PRESETS

    section = ensure_section(workdir, preset)
    mpp = float(PRESETS[preset].mpp)
    slides = {}
    for tag in ("1x", "4x"):
        final = workdir / "slides" / f"{preset}-{tag}.ome.zarr"
        if not final.exists():
            from hishrst_train.data import open_fullres_image

            final.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            img = open_fullres_image(section / "image.tif")
            src = img if tag == "1x" else Tiled2x2(img)
            tmp = final.with_name(f".{final.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write_ome_zarr(src, tmp, mpp=mpp)
                tmp.rename(final)
            finally:
                img.close()
                shutil.rmtree(tmp, ignore_errors=True)
            _say(f"{final.name} ({src.shape[1]}×{src.shape[0]} px) in {time.perf_counter() - t0:.1f} s")
        slides[tag] = final
    return slides


def ensure_bundle(workdir: Path, preset: str, *, epochs: int, n_genes: int) -> tuple[Path, Path]:
    """A ``test-vit`` recovery run fitted on the synthetic section and its exported fp32 bundle: (run, bundle)."""
    section = ensure_section(workdir, preset)
    tag = f"{preset}-e{epochs}-g{n_genes}"
    from hishrst_runtime.core.vocab import DEFAULT_TILE_LAYOUT

    # the bundle's name carries the tile layout its encoder takes (a bundle cached by an older version is NHWC)
    run_dir, bundle_dir = workdir / f"run-{tag}", workdir / f"bundle-{tag}-{DEFAULT_TILE_LAYOUT.lower()}"
    if not run_dir.exists():
        from hishrst_train.tasks import fit_run

        t0 = time.perf_counter()
        _build_dir(run_dir, lambda d: fit_run(section / "outs", out=d, epochs=epochs, n_genes=n_genes, progress=False,
                                                    **TEST_ENCODER))
        _say(f"fitted {run_dir.name} in {time.perf_counter() - t0:.1f} s")
    if not bundle_dir.exists():
        from hishrst_export.bundle import export_bundle

        t0 = time.perf_counter()
        tmp = bundle_dir.with_name(f"{bundle_dir.name}-tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        export_bundle(run_dir, out=tmp)
        tmp.rename(bundle_dir)
        _say(f"exported {bundle_dir.name} in {time.perf_counter() - t0:.1f} s")
    return run_dir, bundle_dir


def data_plan(quick: bool) -> tuple[str, int, int]:
    """(preset, bundle epochs, bundle genes) for quick / full runs."""
    return ("small", *BUNDLE_QUICK) if quick else ("dlpfc", *BUNDLE_FULL)


class BenchData(NamedTuple):
    """What :func:`prepare_data` built: the work directory, preset, its 1x/4x slides, fitted run and bundle."""

    work: Path
    preset: str
    slides: dict[str, Path]
    run_dir: Path | None
    bundle: Path | None


def prepare_data(args: argparse.Namespace, *, fit_bundle: bool = True) -> BenchData:
    """The synthetic data of a quick (``args.quick``) or full run in ``args``' work directory: the section's
    slides and, unless ``fit_bundle`` is false, the fitted run and its bundle."""
    work = workdir_of(args)
    preset, epochs, genes = data_plan(args.quick)
    slides = ensure_slides(work, preset)
    run_dir, bundle = ensure_bundle(work, preset, epochs=epochs, n_genes=genes) if fit_bundle else (None, None)
    return BenchData(work, preset, slides, run_dir, bundle)


def main(argv: Sequence[str] | None = None) -> None:
    p = base_parser("_data", "Build the cached synthetic data (section, 1x/4x slides, bundle) used by the benchmarks.")
    p.add_argument("command", choices=["prepare"])
    args = p.parse_args(argv)
    print(f"ready: {prepare_data(args).work}")


if __name__ == "__main__":
    main()
