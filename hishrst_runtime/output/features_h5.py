"""Per-slide encoder features as one HDF5 file in TRIDENT's patch-feature layout: :class:`FeaturesFile`.

``OUT/S.h5`` holds

* ``features``: float32 ``[N, D]``, the bundle encoder's embedding of each patch (row ``i`` is point ``i``);
* ``coords``: int64 ``[N, 2]``, the level-0 pixel (x, y) of each patch's *top-left* corner (TRIDENT / CLAM
  convention), with TRIDENT's attributes ``patch_size`` (encoder input, px), ``patch_size_level0`` (the
  patch side in level-0 px), ``level0_magnification``, ``target_magnification``, ``overlap`` and ``name``;
* ``coords_center``: float64 ``[N, 2]``, the exact level-0 pixel (x, y) patch centres hishrst used;
* ``obs_names`` (explicit points with names only): the points' names, UTF-8;

and root attributes ``encoder``, ``feature_dim``, ``patch_size_um``, ``patch_size_level0``, ``patch_size_px``
(encoder input), ``mpp`` (µm per level-0 px), ``level``, ``level_mpp``, ``bundle_sha256``, ``hishrst_version``,
``slide``, ``points``, ``test_encoder`` and :data:`~hishrst_runtime.core.owned.OWNER_ATTR` (JSON:
``{"written_by": "hishrst", "kind": "features", ...}``), the mark without which a file at ``OUT/S.h5`` is never
replaced. The file is built as ``OUT/S.h5.partial`` (rows written per work unit) and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hishrst_runtime.core.errors import OutputStateError
from hishrst_runtime.core.files import fsync_path
from hishrst_runtime.core.owned import OWNER_ATTR
from hishrst_runtime.core.patches import patch_origins

__all__ = ["FEATURES_SUFFIX", "FEATURES_KIND", "FeaturesFile", "features_status", "partial_path", "magnification"]

FEATURES_SUFFIX = ".h5"
#: The ``kind`` in the owner mark of a features file.
FEATURES_KIND = "features"
FeaturesState = Literal["missing", "complete", "foreign"]


def partial_path(path: Path) -> Path:
    """``OUT/S.h5.partial``: the file while it is being written."""
    return Path(path).with_name(Path(path).name + ".partial")


def magnification(mpp: float) -> float:
    """The objective magnification conventionally meant by ``mpp`` µm/px (10 / mpp: 0.25 → 40×, 0.5 → 20×)."""
    return round(10.0 / float(mpp), 3)


def features_status(path: Path) -> FeaturesState:
    """``missing`` (nothing at ``path``), ``complete`` (a features file hishrst wrote), or ``foreign`` (anything
    else: a file hishrst did not write, or that cannot be read as HDF5; it is never replaced)."""
    import h5py

    path = Path(path)
    if not os.path.lexists(path):
        return "missing"
    if path.is_symlink() or not path.is_file():
        return "foreign"
    try:
        with h5py.File(path, "r") as f:
            mark = json.loads(str(f.attrs.get(OWNER_ATTR, "{}")))
    except (OSError, ValueError):
        return "foreign"
    ok = isinstance(mark, dict) and mark.get("written_by") == "hishrst" and mark.get("kind") == FEATURES_KIND
    return "complete" if ok else "foreign"


class FeaturesFile:
    """One slide's features, written as ``partial_path(path)``: :meth:`create`, :meth:`write_rows` per unit,
    :meth:`finalize` (flush, fsync, rename over ``path``). Rows may come in any order; each is written once."""

    def __init__(self, path: Path, h5: Any) -> None:
        self.path, self.work_path, self.h5 = Path(path), partial_path(path), h5
        self.features = h5["features"]

    @classmethod
    def create(cls, path: Path, *, points_px: np.ndarray, feature_dim: int, patch_side_level0: int,
               attrs: dict[str, Any], coords_attrs: dict[str, Any], obs_names: list[str] | None = None
               ) -> FeaturesFile:
        """A new ``OUT/S.h5.partial`` (any old one is replaced) for ``points_px`` (``[N, 2]`` level-0 px centres)
        with ``feature_dim`` features per row; ``attrs`` go on the root (with the owner mark), ``coords_attrs``
        on ``coords``. Raises :class:`OutputStateError` when it cannot be written."""
        import h5py

        from hishrst_runtime.core.version import __version__

        work = partial_path(path)
        n = len(points_px)
        try:
            work.unlink(missing_ok=True)
            h5 = h5py.File(work, "w")
        except OSError as e:
            raise OutputStateError(f"{work}: cannot be written ({e}); check the permissions of --out or choose "
                                   "another") from e
        rows = max(1, min(n, (4 << 20) // (4 * max(1, feature_dim))))
        h5.create_dataset("features", shape=(n, feature_dim), dtype="float32", chunks=(rows, feature_dim) if n else None)
        coords = h5.create_dataset("coords", data=patch_origins(points_px, patch_side_level0).reshape(n, 2))
        coords.attrs.update(coords_attrs)
        h5.create_dataset("coords_center", data=np.asarray(points_px, dtype=np.float64).reshape(n, 2))
        if obs_names is not None:
            h5.create_dataset("obs_names", data=[str(s) for s in obs_names], dtype=h5py.string_dtype())
        h5.attrs.update(attrs)
        h5.attrs[OWNER_ATTR] = json.dumps({"written_by": "hishrst", "kind": FEATURES_KIND,
                                           "hishrst_version": __version__})
        return cls(path, h5)

    def write_rows(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (float32 ``[len(rows), D]``) at ``rows`` (int64 point indices)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], np.asarray(values, dtype=np.float32)[order]
        if rows[-1] - rows[0] + 1 == len(rows):  # grid points: one contiguous run
            self.features[int(rows[0]): int(rows[-1]) + 1] = values
        else:
            self.features[rows] = values

    def close(self) -> None:
        """Close the partial file (it stays, incomplete)."""
        if self.h5.id.valid:
            self.h5.close()

    def finalize(self, extra: dict[str, Any]) -> Path:
        """Add root attributes ``extra``, close, fsync and rename the partial file to ``path`` (over an older
        output only once this one is complete). Returns ``path``."""
        self.h5.attrs.update(extra)
        self.close()
        fsync_path(self.work_path)
        os.replace(self.work_path, self.path)
        fsync_path(self.path.parent, directory=True)
        return self.path
