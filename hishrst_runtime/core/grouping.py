"""Spatially coherent neighbour groups (torch-free, shared by training and the runtime).

HisHRST's attention block mixes the spots of one group. The reference code grouped spots by barcode
order, which is spatially random; here a group is a compact patch of tissue: the points are split
recursively at the median of their longer extent (a k-d split) until every group holds at most
``max_size`` points. Groups therefore hold between ``max_size // 2`` and ``max_size`` points (fewer
only when there are fewer points overall).

The result depends only on the coordinates and their order, never on randomness, so training and
inference form identical groups for identical points.
"""

from __future__ import annotations

import numpy as np

__all__ = ["group_points", "pad_groups", "safe_index", "gather_groups", "scatter_groups", "local_groups", "GROUPING_METHOD"]

GROUPING_METHOD = "kd-median-v1"


def group_points(xy: np.ndarray, *, max_size: int = 50) -> list[np.ndarray]:
    """Split points into spatially coherent groups of at most ``max_size`` points.

    Parameters
    ----------
    xy
        ``[N, 2]`` coordinates (any unit, typically µm or level-0 pixels).
    max_size
        Largest group size (the reference used 50).

    Returns
    -------
    A list of int64 index arrays into ``xy``, each sorted ascending; together they partition
    ``range(N)``. Groups are ordered by a depth-first walk of the split tree (left/top first).
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"group_points needs [N, 2] coordinates, got shape {xy.shape}")
    if not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
    if not np.all(np.isfinite(xy)):
        raise ValueError("group_points: coordinates contain NaN or infinity")
    n = len(xy)
    if n == 0:
        return []
    groups: list[np.ndarray] = []
    stack = [np.arange(n, dtype=np.int64)]
    while stack:
        idx = stack.pop()
        if len(idx) <= max_size:
            groups.append(np.sort(idx))
            continue
        pts = xy[idx]
        ext = pts.max(axis=0) - pts.min(axis=0)
        axis = 0 if ext[0] >= ext[1] else 1
        # Stable total order: primary axis, then the other axis, then the original index.
        order = np.lexsort((idx, pts[:, 1 - axis], pts[:, axis]))
        # Split so that both halves hold a whole number of full-ish groups.
        n_groups = -(-len(idx) // max_size)
        left_groups = n_groups // 2
        cut = int(round(len(idx) * left_groups / n_groups))
        left, right = idx[order[:cut]], idx[order[cut:]]
        stack.append(right)
        stack.append(left)  # popped first: depth-first, left/top first
    return groups


def pad_groups(groups: list[np.ndarray], *, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stack groups into a padded ``[G, size]`` index array (``-1`` = padding) and a float32 mask.

    ``size`` defaults to the largest group. The mask is 1.0 for real points and 0.0 for padding; it is
    what the exported head takes as its ``mask`` input.
    """
    if not groups:
        return np.zeros((0, size or 0), dtype=np.int64), np.zeros((0, size or 0), dtype=np.float32)
    size = size or max(len(g) for g in groups)
    index = np.full((len(groups), size), -1, dtype=np.int64)
    for i, g in enumerate(groups):
        if len(g) > size:
            raise ValueError(f"group {i} has {len(g)} points, more than the padded size {size}")
        index[i, : len(g)] = g
    return index, (index >= 0).astype(np.float32)


def safe_index(index: np.ndarray) -> np.ndarray:
    """``index`` with padding (``-1``) replaced by 0, for gathering: ``values[safe_index(index)]`` is
    ``[G, S, ...]`` (padded slots hold row 0's values; the mask hides them). Works for numpy arrays and,
    via ``torch.from_numpy``, for tensors alike."""
    return np.where(index < 0, 0, index)


def gather_groups(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[N, ...]`` gathered into padded groups ``[G, S, ...]`` (see :func:`pad_groups`)."""
    return values[safe_index(index)]


def scatter_groups(out: np.ndarray, index: np.ndarray, grouped: np.ndarray) -> np.ndarray:
    """Write the real (unpadded) slots of ``grouped[G, S, ...]`` back to rows ``index`` of ``out[N, ...]``;
    returns ``out``."""
    valid = index >= 0
    out[index[valid]] = grouped[valid]
    return out


def local_groups(groups: list[np.ndarray], *, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated point indices of ``groups`` and their padded *local* index / mask.

    Returns ``(points, index, mask)``: ``points`` = ``np.concatenate(groups)``; ``index[G, size]``
    indexes into ``points`` (``-1`` = padding) so that ``gather_groups(values_of_points, index)``
    groups values already laid out in ``points`` order.
    """
    points = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    starts = np.cumsum([0] + [len(g) for g in groups[:-1]])
    index, mask = pad_groups([np.arange(s, s + len(g)) for s, g in zip(starts, groups)], size=size)
    return points, index, mask
