"""``hishrst synth OUT_DIR``: a synthetic data set written as hishrst's own output.

The data set is built in a hidden sibling of ``OUT_DIR`` and swapped in when complete; the folder carries
hishrst's ownership marker (kind ``synth``). An existing data set is replaced only with ``overwrite`` — and
only one hishrst wrote (the marker, or a legacy one: see :func:`is_legacy_synth`); a folder of other files
is never replaced. A lock beside ``OUT_DIR`` keeps two ``synth`` runs from writing it at once.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Literal

from hishrst_runtime.core.owned import check_replaceable
from hishrst_runtime.core.vocab import DEFAULT_PLATFORM, Platform
from hishrst_train.rundir import building_run, claim_output

__all__ = ["is_legacy_synth", "write_synth"]


def _is_synth_section(path: Path) -> bool:
    """``truth.npz`` with the generator's ``preset`` and ``seed`` arrays, beside an ``outs/`` folder."""
    try:
        with zipfile.ZipFile(path / "truth.npz") as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return {"preset.npy", "seed.npy"} <= names and (path / "outs").is_dir()


def is_legacy_synth(path: Path) -> bool:
    """A data set ``hishrst synth`` wrote before the ownership marker: one section (``truth.npz`` of the
    generator beside ``outs/``) or several (``sections.json`` with ``"generator": "hishrst.synth"``)."""
    try:
        meta = json.loads((path / "sections.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and meta.get("generator") == "hishrst.synth":
        return True
    return _is_synth_section(path)


def write_synth(out_dir: str | Path, *, sections: int = 1, preset: Literal["small", "dlpfc"] = "small", seed: int = 0,
                overwrite: bool = False, platform: Platform = DEFAULT_PLATFORM) -> list[Path]:
    """Write ``sections`` synthetic sections into ``out_dir`` (one: ``out_dir/outs``; several:
    ``out_dir/section_<k>/outs``, see :func:`~hishrst_train.synth.make_synthetic_sections`) in the layout of
    ``platform`` (Visium spots or Visium HD bins); returns the ``outs`` directories."""
    from hishrst_train.synth import make_synthetic_sections, make_synthetic_visium

    out = Path(out_dir).absolute()
    with claim_output(out, command="synth", option="OUT_DIR"):
        check_replaceable(out, kind="synth", overwrite=overwrite, what="a synthetic data set", option="OUT_DIR",
                          legacy=is_legacy_synth)
        with building_run(out, kind="synth", option="OUT_DIR") as work:
            if sections == 1:
                outs = [make_synthetic_visium(work, preset=preset, seed=seed, platform=platform)]
            else:
                outs = make_synthetic_sections(work, sections, seed=seed, preset=preset, platform=platform)
    return [out / o.relative_to(work) for o in outs]
