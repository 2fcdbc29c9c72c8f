"""The sub-spot figure: one gene on a window of an unseen section — H&E, the 8 µm truth, the spot model's
predictions interpolated to the bins, and the sub-spot map — on one colour scale, with a scale bar.

The gene is chosen by a stated rule that does not look at any prediction: the gene whose 8 µm truth varies
most over the window's tissue bins (ties: the first in the run's gene order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GENE_RULE", "choose_gene", "subspot_figure"]

GENE_RULE = "the gene whose 8 µm truth varies most over the window's tissue bins (no prediction is looked at)"


def choose_gene(truth: np.ndarray, valid: np.ndarray) -> int:
    """Index of the gene of :data:`GENE_RULE` in ``truth [rows, cols, genes]`` over the bins ``valid``."""
    return int(np.argmax(truth[valid].var(axis=0)))


def _he_crop(sec: Any, box_px: tuple[float, float, float, float], side: int = 512) -> np.ndarray:
    """The H&E pixels of ``box_px`` (x0, y0, x1, y1) resized to ``side`` px (white outside the image)."""
    from hishrst_runtime.core.patches import cut_patch, resize_patch

    x0, y0, x1, y1 = box_px
    span = int(round(max(x1 - x0, y1 - y0)))
    return resize_patch(cut_patch(sec.img, ((x0 + x1) / 2, (y0 + y1) / 2), span), side)


def subspot_figure(path: str | Path, *, sec: Any, window: Any, truth: np.ndarray, maps: dict[str, np.ndarray],
                   genes: list[str], title: str = "") -> dict[str, Any]:
    """Write the four-panel PNG to ``path``; returns the gene, the rule and the panels' PCC against the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = choose_gene(truth, window.valid)
    panels = [("truth (8 µm)", truth[..., g]), ("spot model, interpolated", maps["interpolated_spots"][..., g]),
              ("sub-spot head (8 µm)", maps["subspot"][..., g])]
    lo, hi = np.nanpercentile(truth[window.valid][:, g], [1, 99])
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    axes[0].imshow(_he_crop(sec, window.box_px()))
    axes[0].set_title("H&E (unseen section)")
    pcc: dict[str, float] = {}
    for ax, (name, img) in zip(axes[1:], panels):
        shown = np.where(window.valid, img, np.nan)
        im = ax.imshow(shown, cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        if name != panels[0][0]:
            ok = window.valid & np.isfinite(img)
            pcc[name] = float(np.corrcoef(img[ok], truth[..., g][ok])[0, 1])
            name = f"{name}\nPCC {pcc[name]:.2f} (this gene)"
        ax.set_title(name)
    fig.colorbar(im, ax=axes[1:], shrink=0.8, label=f"{genes[g]}, log1p(CP10k)")
    side_um = window.shape[1] * window.bin_px * window.mpp
    for ax, n in zip(axes, (512, *(window.shape[1],) * 3)):
        bar = n * 500.0 / side_um  # 500 µm in panel pixels
        ax.plot([n * 0.05, n * 0.05 + bar], [n * 0.95, n * 0.95], color="white" if ax is axes[0] else "black", lw=4)
        ax.text(n * 0.05, n * 0.92, "500 µm", color="white" if ax is axes[0] else "black", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}{genes[g]} — gene rule: {GENE_RULE}", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return {"gene": genes[g], "rule": GENE_RULE, "pcc": pcc, "figure": str(path)}
