"""A complete output store copied to ``.h5ad`` (``hishrst-run --h5ad``)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hishrst_runtime.core.files import temp_sibling
from hishrst_runtime.output.errors import IncompleteOutputError, writing
from hishrst_runtime.output.layout import output_status

__all__ = ["write_h5ad"]


def write_h5ad(zarr_path: str | os.PathLike[str], h5ad_path: str | os.PathLike[str]) -> Path:
    """Convert the complete output ``zarr_path`` to ``h5ad_path`` via a temporary sibling and an atomic
    rename (an earlier ``h5ad_path`` stays until the new one is whole). Raises IncompleteOutputError
    for an output that is not complete, OutputNotWritableError when ``h5ad_path`` cannot be written."""
    import anndata as ad

    src, dst = Path(zarr_path), Path(h5ad_path)
    state = output_status(src)
    if state != "complete":
        raise IncompleteOutputError(f"{src}: output is {state}; finish it before converting to h5ad")
    adata = ad.read_zarr(src)
    with writing(dst, "write the h5ad copy"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_sibling(dst, "tmp")
        try:
            adata.write_h5ad(tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return dst
