"""Training sections named on the command line: what each ``DATA`` is, and opening it for fitting.

A ``DATA`` argument of ``hishrst fit`` / ``evaluate --on`` / ``cv`` is one of

* a Space Ranger ``outs`` folder (or the folder holding ``outs/``): the image is found next to it;
* ``PATH.h5ad:IMAGE`` — an ``.h5ad`` whose ``obsm['spatial']`` holds full-resolution pixel (x, y) of
  ``IMAGE`` (the colon pairs each ``.h5ad`` with its image, so several can be given at once);
* a HEST-1k sample addressed by its ``<root>/st/<id>.h5ad`` (:mod:`hishrst_train.data.hest` finds
  ``wsis/<id>.tif`` and ``metadata/<id>.json``);
* a Space Ranger 3 Visium HD output (``outs`` holding ``binned_outputs/``, ``binned_outputs/`` or a
  ``square_XXXum`` folder): its 16 µm bins, or the 8 µm ones with the suffix ``@8um`` (``outs@8um``; any
  :data:`~hishrst_runtime.core.vocab.RESOLUTIONS` value), read by :mod:`hishrst_train.data.visium_hd`; each
  bin is a spot. The spec then names the ``square_XXXum`` folder, so a run's record reopens the same bins.

``--image IMAGE`` is accepted with a single ``DATA`` only (the pre-multi-section syntax): it pairs a plain
``.h5ad`` with its image, or replaces the image of an ``outs`` folder / HEST sample.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.core.vocab import DEFAULT_PLATFORM, Platform

from hishrst_train.data.counts import CountsMode, check_counts, check_counts_mode, count_fingerprint
from hishrst_train.data.errors import DataError, check_section_mpp
from hishrst_train.data.hest import is_hest_sample
from hishrst_train.data.visium_hd import check_hd_bin_size, find_square_dir, hd_outs_dir, is_visium_hd, square_size_um

__all__ = ["SectionKind", "SectionSpec", "SectionError", "Section", "parse_section", "resolve_sections",
           "section_names", "load_adata", "open_section", "check_distinct"]

log = logging.getLogger("hishrst")

#: What a ``DATA`` argument is: a platform's Space Ranger output (Visium spots, Visium HD bins), an h5ad + image
#: pair or a HEST-1k sample.
SectionKind = Literal[Platform, Literal["h5ad", "hest"]]


class SectionError(DataError):
    """A ``DATA`` argument that names no readable section (the message says which syntax to use)."""


@dataclass(frozen=True)
class SectionSpec:
    """One section to read: its data path, an explicit full-resolution image (or None), its kind and, for
    Visium HD, the bin side in µm (``data`` is then the ``square_XXXum`` folder)."""

    data: Path
    image: Path | None
    kind: SectionKind
    bin_size_um: float | None = None

    def record(self) -> dict[str, Any]:
        """Resolved paths and kind (and the bin size of Visium HD bins), as written to a run's ``config.json``."""
        hd = {} if self.bin_size_um is None else {"bin_size_um": self.bin_size_um}
        return {"kind": self.kind, "data": str(self.data.resolve()),
                "image": str(self.image.resolve()) if self.image is not None else None, **hd}


_PAIR = re.compile(r"^(?P<h5ad>.+?\.h5ad):(?P<image>.+)$", re.IGNORECASE)
_BINS = re.compile(r"^(?P<path>.+)@(?P<bins>[0-9]+um)$")


def parse_section(text: str | Path | SectionSpec, *, image: str | Path | None = None) -> SectionSpec:
    """Turn a ``DATA`` argument (see the module docstring) into a :class:`SectionSpec`; ``image`` is ``--image``."""
    if isinstance(text, SectionSpec):
        return text
    raw, bins = str(text), None
    mb = _BINS.match(raw)
    if mb and not Path(raw).exists():
        raw, bins = mb["path"], check_hd_bin_size(mb["bins"], where=raw)
    m = _PAIR.match(raw)
    path, paired = (Path(m["h5ad"]), Path(m["image"])) if m and not Path(raw).exists() else (Path(raw), None)
    if paired is not None and image is not None:
        raise SectionError(f"{raw}: the image is given twice (after ':' and with --image); keep one")
    img = paired if paired is not None else (Path(image) if image is not None else None)
    if not path.exists():
        raise SectionError(f"{path}: does not exist; pass a Space Ranger outs folder, PATH.h5ad:IMAGE or a HEST "
                           "st/<id>.h5ad")
    if img is not None and not img.is_file():
        raise SectionError(f"{img}: the full-resolution image does not exist; check the path after ':' / --image")
    if path.is_dir() and is_visium_hd(path):
        square = find_square_dir(path, bin_size_um=bins)
        return SectionSpec(square, img, "visium-hd", bin_size_um=square_size_um(square))
    if bins is not None:
        raise SectionError(f"{raw}@{bins:g}um: a bin size applies to Visium HD outputs (binned_outputs/) only; drop "
                           f"the @{bins:g}um suffix")
    if path.is_dir():
        return SectionSpec(path, img, DEFAULT_PLATFORM)
    if path.suffix.lower() != ".h5ad":
        raise SectionError(f"{path}: not a Space Ranger outs folder or an .h5ad; pass outs/, PATH.h5ad:IMAGE or a HEST "
                           "st/<id>.h5ad")
    if is_hest_sample(path):
        return SectionSpec(path, img, "hest")
    if img is None:
        raise SectionError(f"{path}: an .h5ad needs its full-resolution image; write {path}:IMAGE.tif (or pass "
                           "--image PATH with a single DATA)")
    return SectionSpec(path, img, "h5ad")


def resolve_sections(data: str | Path | SectionSpec | Sequence[str | Path | SectionSpec], *,
                     image: str | Path | None = None) -> list[SectionSpec]:
    """Parse one or several ``DATA`` arguments; ``image`` (``--image``) is refused with more than one."""
    items = [data] if isinstance(data, (str, Path, SectionSpec)) else list(data)
    if not items:
        raise SectionError("no DATA given; pass at least one section (outs folder, PATH.h5ad:IMAGE or HEST st/<id>.h5ad)")
    if image is not None and len(items) > 1:
        raise SectionError(f"--image {image}: applies to a single DATA, got {len(items)}; pair each .h5ad with its "
                           "image as PATH.h5ad:IMAGE instead")
    return [parse_section(x, image=image) for x in items]


def _base_name(spec: SectionSpec) -> str:
    p = spec.data.resolve()
    if spec.kind == "visium-hd":
        p = hd_outs_dir(p)
    if spec.kind != "h5ad" and spec.kind != "hest":
        p = p.parent if p.name == "outs" else p
        return p.name or "section"
    return p.stem


def section_names(specs: Sequence[SectionSpec]) -> list[str]:
    """Short unique names: the sample folder (``outs``' parent) or the ``.h5ad`` stem; repeats get ``-2``, ``-3``…"""
    names: list[str] = []
    for spec in specs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", _base_name(spec))
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _matrix_file(spec: SectionSpec) -> Path:
    """The file holding the section's expression matrix (named in errors about its values)."""
    name = "filtered_feature_bc_matrix.h5"
    if spec.kind == "visium-hd":
        return spec.data / name
    if spec.kind != DEFAULT_PLATFORM:
        return spec.data
    outs = spec.data
    if not (outs / name).exists() and (outs / "outs" / name).exists():
        outs = outs / "outs"
    return outs / name


def _in_tissue_only(adata: Any, source: Path) -> Any:
    """Drop spots Space Ranger's positions file marks ``in_tissue == 0`` (as ``hishrst-run --points outs/`` does)."""
    if "in_tissue" not in adata.obs:
        return adata
    keep = adata.obs["in_tissue"].to_numpy() != 0
    if keep.all():
        return adata
    log.warning("%s: %d of %d matrix spots lie outside the tissue (in_tissue = 0 in tissue_positions); using the "
                "%d in-tissue spots only", source, int((~keep).sum()), adata.n_obs, int(keep.sum()))
    return adata[keep].copy()


def load_adata(spec: SectionSpec, *, mpp: float | None = None, counts: CountsMode = "raw") -> Any:
    """The section as AnnData (in-tissue spots, ``obsm['spatial']`` in full-resolution px, ``uns['hishrst']``).

    ``mpp`` (µm per full-resolution pixel) overrides the recorded pixel size; every pixel size is checked
    for plausibility (:func:`hishrst_train.data.errors.check_section_mpp`). ``counts`` says what ``X``
    holds (``raw`` UMI counts or ``log``-normalised values, :mod:`hishrst_train.data.counts`); values that
    do not fit are refused, and ``uns['hishrst']['counts']`` records it.
    """
    from hishrst_train import data as io
    from hishrst_train.data.hest import read_hest
    from hishrst_train.data.visium_hd import read_visium_hd

    counts = check_counts_mode(counts)
    if mpp is not None:
        mpp = check_section_mpp(mpp, where=spec.data, source="--mpp")
    if spec.kind == "hest":
        adata = read_hest(spec.data, image=spec.image, mpp=mpp)
    elif spec.kind == "h5ad":
        adata = io.read_h5ad_with_image(spec.data, spec.image, mpp=mpp)
    elif spec.kind == "visium-hd":
        adata = read_visium_hd(spec.data, bin_size_um=spec.bin_size_um, fullres_image=spec.image, mpp=mpp)
        adata = _in_tissue_only(adata, spec.data / "spatial")
    else:
        adata = io.read_visium(spec.data, fullres_image=spec.image, mpp=mpp)
        adata = _in_tissue_only(adata, _matrix_file(spec).parent / "spatial")
    check_counts(adata, source=_matrix_file(spec), mode=counts)
    adata.uns["hishrst"]["counts"] = counts
    return adata


@dataclass(frozen=True)
class Section:
    """A section opened for fitting or prediction: spots, pixel size (µm/px) and the lazily read image;
    ``platform`` and, for Visium HD, ``bin_size_um`` (µm) say what a spot is (Visium HD bins are spots here)."""

    name: str
    spec: SectionSpec
    adata: Any
    mpp: float
    img_path: str
    img: Any
    xy: np.ndarray  # [N, 2] full-resolution px
    array_rc: np.ndarray | None  # [N, 2] Visium (array_row, array_col), None when the data has none
    fingerprint: str = ""  # content (:func:`~hishrst_train.data.counts.count_fingerprint`)
    platform: str = DEFAULT_PLATFORM
    bin_size_um: float | None = None

    def record(self) -> dict[str, Any]:
        """What a run's ``config.json`` records about this section."""
        return {"name": self.name, **self.spec.record(), "fullres_image": self.img_path, "mpp": self.mpp,
                "n_spots": int(self.adata.n_obs), "counts": self.adata.uns["hishrst"].get("counts", "raw"),
                "fingerprint": self.fingerprint}


def open_section(spec: SectionSpec, *, name: str, mpp: float | None = None, counts: CountsMode = "raw") -> Section:
    """Read ``spec`` (see :func:`load_adata`) and open its full-resolution image (errors name the file and the fix)."""
    from hishrst_train.data.image import open_fullres_image

    adata = load_adata(spec, mpp=mpp, counts=counts)
    meta = adata.uns["hishrst"]
    img_path = meta.get("fullres_image")
    if not img_path:
        raise SectionError(f"{spec.data}: no full-resolution image found; pass --image PATH (one DATA) or put "
                           "image.tif next to outs/")
    if adata.n_obs < 2:
        raise SectionError(f"{spec.data}: {adata.n_obs} spots in the tissue; a section needs at least 2")
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    array_rc = None
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        array_rc = np.stack([adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()], axis=1)
    mpp_um = check_section_mpp(meta["mpp"], where=spec.data, source="the section's pixel size")
    size = meta.get("bin_size_um")
    return Section(name=name, spec=spec, adata=adata, mpp=mpp_um, img_path=str(img_path),
                   img=open_fullres_image(img_path), xy=xy, array_rc=array_rc, fingerprint=count_fingerprint(adata),
                   platform=str(meta.get("platform", DEFAULT_PLATFORM)), bin_size_um=None if size is None else float(size))


def _identity(spec: SectionSpec) -> str:
    """The resolved path of a section's expression matrix (``outs`` and its parent are one section)."""
    return str(_matrix_file(spec).resolve())


def check_distinct(secs: Sequence[Section]) -> None:
    """Refuse a section given twice: the same resolved file, or the same content (a copy of it)."""
    seen: dict[str, Section] = {}
    for s in secs:
        for key, how in ((_identity(s.spec), "is the same file as"), (s.fingerprint, "has the same content as")):
            if not key:
                continue
            if key in seen:
                raise SectionError(f"{s.spec.data}: {how} {seen[key].spec.data} (given twice); pass each section "
                                   "once — training on a duplicate weights it double and can leak into held-out spots")
            seen[key] = s

