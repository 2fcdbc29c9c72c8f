"""Training and prediction of the sub-spot head from spot-level measurements.

Each training spot contributes one tile of encoder tokens (cut around the spot, :mod:`hishrst_train.tokens`)
and its measured log-normalised expression. The head predicts every token inside the spot's 55 µm disk;
the spot's prediction is their count-space aggregate with the disk's overlap weights
(:func:`hishrst_runtime.core.tokens.disk_token_weights`, :func:`~hishrst_train.subspot.aggregate_tokens`),
and the loss is its squared error in per-gene standardised units — the spot trainer's recipe
(:mod:`hishrst_train.train`: AdamW, warm-up then cosine decay, early stopping on validation spots, the
output starting at each gene's training mean) with the aggregate in between. Only the tokens a loss needs
(those inside the disk) go through the attention queries and the gene head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hishrst_runtime.core.geometry import VISIUM_SPOT_DIAMETER_UM
from hishrst_runtime.core.tokens import disk_token_weights, square_token_weights
from hishrst_train.subspot import SOFTPLUS_BETA, SubspotConfig, SubspotHead, aggregate_tokens
from hishrst_train.train import BestEpoch, TrainConfig, _optimiser, seed_everything

__all__ = ["TokenRows", "spot_weights", "train_subspot", "predict_spots", "predict_tokens"]


@dataclass(frozen=True)
class TokenRows:
    """Token tiles of several sections seen as one ``[N, rows, cols, width]`` array without copying them
    (each part may be a read-only float16 memmap); ``take(index)`` gathers float32 rows."""

    parts: Sequence[np.ndarray]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_offsets", np.cumsum([0, *[len(p) for p in self.parts]]))

    def __len__(self) -> int:
        return int(self._offsets[-1])  # type: ignore[attr-defined]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    def part_of(self, index: np.ndarray) -> np.ndarray:
        """Which part (section) each row of ``index`` belongs to."""
        return np.searchsorted(self._offsets, np.asarray(index, np.int64), side="right") - 1  # type: ignore[attr-defined]

    def take(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index, np.int64)
        part = self.part_of(index)
        out = np.empty((len(index), *self.shape[1:]), np.float32)
        for k in np.unique(part):
            sel = part == k
            local = index[sel] - self._offsets[k]  # type: ignore[attr-defined]
            order = np.argsort(local)
            rows = np.asarray(self.parts[k][local[order]], np.float32)
            out[np.flatnonzero(sel)[order]] = rows
        return out


def spot_weights(config: SubspotConfig, *, bin_size_um: float | None = None) -> np.ndarray:
    """Overlap weights ``[rows·cols]`` of a measurement centred in its tile: a Visium spot's 55 µm disk, or with
    ``bin_size_um`` a Visium HD square bin of that side (8 or 16 µm: trained on the bins directly)."""
    geom = config.token_geometry
    if bin_size_um is not None:
        return square_token_weights(geom, float(bin_size_um)).reshape(-1)
    return disk_token_weights(geom, VISIUM_SPOT_DIAMETER_UM / 2.0).reshape(-1)


def _query(weights: np.ndarray) -> np.ndarray:
    """Tokens any measurement needs: nonzero in ``weights`` ``[T]`` or in any row of ``[parts, T]``."""
    return np.flatnonzero(np.atleast_2d(weights).max(axis=0) > 0)


def _row_weights(tokens: TokenRows, rows: np.ndarray, weights: np.ndarray, query: np.ndarray) -> torch.Tensor:
    """``[Q]`` (one measurement shape) or ``[len(rows), Q]`` (per part: spots and bins mixed) on the query."""
    if weights.ndim == 1:
        return torch.from_numpy(weights[query].astype(np.float32))
    return torch.from_numpy(weights[tokens.part_of(rows)][:, query].astype(np.float32))


def _softplus_inverse(y: np.ndarray) -> np.ndarray:
    y = np.clip(np.asarray(y, np.float64), 1e-3, None)
    return np.log(np.expm1(SOFTPLUS_BETA * y)) / SOFTPLUS_BETA


def _new_head(config: SubspotConfig, tokens: TokenRows, targets: np.ndarray, rows: np.ndarray, tc: TrainConfig,
              device: str) -> SubspotHead:
    """A fresh head with token statistics of (up to 256) training tiles and its output at the training mean."""
    model = SubspotHead(config)
    rng = np.random.default_rng(tc.seed)
    sample = rng.choice(rows, size=min(256, len(rows)), replace=False)
    model.set_feature_stats(torch.from_numpy(tokens.take(np.sort(sample))))
    last = model.gene_head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    y = np.asarray(targets[rows], np.float64)
    model = model.to(device)
    model.output_affine = (torch.tensor(y.std(0).clip(1e-3), dtype=torch.float32, device=device),
                           torch.tensor(_softplus_inverse(y.mean(0)), dtype=torch.float32, device=device))
    return model


def _spot_batch(model: SubspotHead, tokens: TokenRows, rows: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    q = _query(weights)
    x = torch.from_numpy(tokens.take(rows))
    x = x.reshape(len(rows), -1, x.shape[-1])
    return aggregate_tokens(model.forward_selected(x, torch.from_numpy(q)), _row_weights(tokens, rows, weights, q))


def _neighbour_pairs(query: np.ndarray, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (in ``query``) of horizontally and vertically adjacent token pairs that are both queried."""
    where = {int(t): k for k, t in enumerate(query)}
    pairs = [(k, where[t + d]) for t, k in where.items() for d in (1, cols)
             if t + d in where and (d == cols or (t + 1) % cols)]
    a, b = (zip(*pairs) if pairs else ((), ()))
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


def _loss_pass(model: SubspotHead, tokens: TokenRows, targets: np.ndarray, rows: np.ndarray, weights: np.ndarray,
               *, batch: int, device: str, opt: Any = None, sched: Any = None, smoothness: float = 0.0) -> float:
    """One pass over ``rows``: the mean standardised squared error of the spot aggregates (and optimiser steps
    when ``opt``, on that error plus ``smoothness`` × the mean absolute difference of adjacent tokens'
    standardised predictions — a total-variation prior: tissue regions are larger than a token)."""
    qnp = _query(weights)
    query = torch.from_numpy(qnp).to(device)
    pa, pb = (t.to(device) for t in _neighbour_pairs(qnp, model.grid[1]))
    scale = model.output_affine[0] if model.output_affine is not None else torch.ones(1, device=device)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        r = rows[i:i + batch]
        y = torch.from_numpy(np.asarray(targets[r], np.float32)).to(device)
        with torch.set_grad_enabled(opt is not None):
            x = torch.from_numpy(tokens.take(r)).to(device)
            tok = model.forward_selected(x.reshape(len(r), -1, x.shape[-1]), query)
            w = _row_weights(tokens, r, weights, qnp).to(device)
            loss = (((aggregate_tokens(tok, w) - y) / scale) ** 2).mean()
            if opt is not None and smoothness > 0 and len(pa):
                loss = loss + smoothness * ((tok[:, pa] - tok[:, pb]).abs() / scale).mean()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        total += float(loss.detach()) * len(r)
        count += len(r)
    return total / max(count, 1)


def train_subspot(tokens: TokenRows, targets: np.ndarray, *, config: SubspotConfig, train_rows: np.ndarray,
                  val_rows: np.ndarray | None = None, train_config: TrainConfig | None = None, batch_tiles: int = 32,
                  smoothness: float | None = None, weights: np.ndarray | None = None,
                  history_out: dict[str, list[float]] | None = None, progress: bool = True,
                  device: str = "cpu") -> tuple[SubspotHead, list[float]]:
    """Fit a :class:`SubspotHead` on the measurements ``train_rows`` of ``tokens`` (tiles centred on them) and
    ``targets [N, genes]``; with ``val_rows`` stop after ``patience`` epochs without a better validation loss
    and keep the best epoch. ``smoothness``: the total-variation weight (default ``config.smoothness``);
    ``weights``: each measurement's token weights, ``[T]`` or one row per part of ``tokens`` (default: a
    Visium spot's disk, :func:`spot_weights`). Returns the head (eval mode, CPU, output scaling folded) and
    the training loss per epoch (standardised units)."""
    tc = train_config or TrainConfig()
    smoothness = config.smoothness if smoothness is None else float(smoothness)
    seed_everything(tc.seed)
    rng = np.random.default_rng(tc.seed)
    weights = spot_weights(config) if weights is None else np.asarray(weights, np.float64)
    model = _new_head(config, tokens, targets, np.asarray(train_rows), tc, device)
    opt, sched = _optimiser(model, tc, math.ceil(len(train_rows) / batch_tiles))  # type: ignore[arg-type]
    history: list[float] = []
    val_hist: list[float] = []
    best = BestEpoch(tc.patience)
    bar = tqdm(range(tc.epochs), desc="training (sub-spot)", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        history.append(_loss_pass(model, tokens, targets, rng.permutation(train_rows), weights, batch=batch_tiles,
                                  device=device, opt=opt, sched=sched, smoothness=smoothness))
        if val_rows is None or len(val_rows) == 0:
            continue
        model.eval()
        val_hist.append(_loss_pass(model, tokens, targets, np.asarray(val_rows), weights, batch=64, device=device))
        bar.set_postfix(loss=f"{history[-1]:.4f}", val=f"{val_hist[-1]:.4f}")
        if best.update(model, val_hist[-1], epoch):
            break
    best.finish(model, history, val_hist, history_out)
    return model.eval().cpu(), history


@torch.inference_mode()
def predict_spots(model: SubspotHead, tokens: TokenRows, rows: np.ndarray | None = None, *, batch: int = 64,
                  weights: np.ndarray | None = None) -> np.ndarray:
    """Measurement-level predictions ``[len(rows), genes]``: each tile's tokens aggregated with ``weights``
    (as in :func:`train_subspot`; default a Visium spot's disk)."""
    model.eval()
    weights = spot_weights(model.config) if weights is None else np.asarray(weights, np.float64)
    rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
    out = [_spot_batch(model, tokens, rows[i:i + batch], weights).numpy() for i in range(0, len(rows), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.config.n_genes), np.float32)


@torch.inference_mode()
def predict_tokens(model: SubspotHead, tiles_tokens: np.ndarray) -> np.ndarray:
    """Per-token predictions ``[B, rows, cols, genes]`` of token tiles ``[B, rows, cols, width]``."""
    model.eval()
    return model(torch.from_numpy(np.asarray(tiles_tokens, np.float32))).numpy()
