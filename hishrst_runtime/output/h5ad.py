"""A complete output store copied to ``.h5ad`` (``hishrst-run --h5ad``).

Every copy carries the root HDF5 attribute ``hishrst_status`` (as hishrst's zarr stores do; AnnData
ignores it), and copies made by ``hishrst-run`` also hold ``uns['hishrst']`` (the run identity): that is how
:func:`h5ad_written_by_hishrst` recognises one. An existing ``.h5ad`` with neither is someone else's (a
points file, a Visium section) and is never replaced.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hishrst_runtime.core.files import temp_sibling
from hishrst_runtime.output.errors import IncompleteOutputError, OutputExistsError, writing
from hishrst_runtime.output.layout import STATUS_ATTR, output_status

__all__ = ["write_h5ad", "h5ad_written_by_hishrst", "foreign_h5ad", "MARK_KEY"]

#: The ``uns`` key of the run identity ``hishrst-run`` stores in every output (and so in every copy).
MARK_KEY = "hishrst"


def h5ad_written_by_hishrst(path: str | os.PathLike[str]) -> bool:
    """Whether the file ``path`` is an HDF5 ``.h5ad`` hishrst wrote: the root attribute ``hishrst_status``
    or ``uns['hishrst']`` (read with h5py, lazily)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            uns = f.get("uns")
            return STATUS_ATTR in f.attrs or (isinstance(uns, h5py.Group) and MARK_KEY in uns)
    except (OSError, ValueError):
        return False


def _mark(path: Path) -> None:
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs[STATUS_ATTR] = "complete"


def foreign_h5ad(path: str | os.PathLike[str]) -> str | None:
    """The one-line reason ``path`` must not be replaced when it exists but hishrst did not write it, else None."""
    p = Path(path)
    if not os.path.lexists(p) or (p.is_file() and h5ad_written_by_hishrst(p)):
        return None
    return (f"{p}: exists and was not written by hishrst-run (no uns['{MARK_KEY}']); it is left as it is: move it "
            "away or choose another --out")


def write_h5ad(zarr_path: str | os.PathLike[str], h5ad_path: str | os.PathLike[str]) -> Path:
    """Convert the complete output ``zarr_path`` to ``h5ad_path`` via a temporary sibling and an atomic
    rename (an earlier ``h5ad_path`` stays until the new one is whole). Raises IncompleteOutputError
    for an output that is not complete, OutputExistsError when ``h5ad_path`` exists but is not a copy
    hishrst wrote (:func:`foreign_h5ad`), OutputNotWritableError when it cannot be written."""
    import anndata as ad

    src, dst = Path(zarr_path), Path(h5ad_path)
    state = output_status(src)
    if state != "complete":
        raise IncompleteOutputError(f"{src}: output is {state}; finish it before converting to h5ad")
    foreign = foreign_h5ad(dst)
    if foreign is not None:
        raise OutputExistsError(foreign)
    adata = ad.read_zarr(src)
    with writing(dst, "write the h5ad copy"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dst, "tmp")
        try:
            adata.write_h5ad(tmp)
            _mark(tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return dst
