"""Naming the rows of an output store after explicit points (``--points`` ids, Space Ranger barcodes).

:meth:`hishrst_runtime.output.OutputStore.create` numbers rows ``p0, p1, ...``. :func:`name_rows`
replaces that obs index in the incomplete store (``OUT.zarr.partial``) before any row is predicted: the
new index is written aside and swapped in (:func:`hishrst_runtime.core.files.swap_in`), so the store
always holds a whole index, and the consolidated metadata written at finalize describes it. It runs on
every (re)open of the store, so a run killed in between and resumed ends with the names too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hishrst_runtime.core.files import remove_tree, swap_in, temp_sibling
from hishrst_runtime.output import encoding

__all__ = ["name_rows"]

_INDEX_ATTRS = {"encoding-type": "string-array", "encoding-version": "0.2.0"}


def name_rows(work: Path, names: Sequence[str]) -> None:
    """Set the obs names (index) of the incomplete store ``work`` to ``names`` (one per row, unique)."""
    index = Path(work) / "obs" / "_index"
    tmp = temp_sibling(index, "names")
    try:
        encoding.write_array(tmp, np.array([str(n) for n in names], dtype=object), _INDEX_ATTRS)
        swap_in(tmp, index)
    except BaseException:
        remove_tree(tmp)
        raise
