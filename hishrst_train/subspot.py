"""The sub-spot head: one prediction per encoder patch token (8 µm at UNI's geometry).

``forward(tokens [B, rows, cols, width]) -> expression [B, rows, cols, genes]`` (log-normalised, ≥ 0).

The HisHRST recipe at token scale: tokens are standardised per dimension with training statistics
(``feat_mean`` / ``feat_std``), one pre-norm block mixes the tokens of a tile — multi-head attention
(``heads`` × ``dim_head``) with a learned additive bias per head from the tokens' pairwise distances in µm
(sinusoids of the distance → ``Linear``, zero at initialisation; translation-, rotation- and
reflection-invariant like the spot model's ``relative`` mode; no absolute position, so a token is
predicted the same wherever it sits in its tile), then a GELU MLP — and the gene head
``Linear(width → head_hidden)``, ReLU, LayerNorm, ``Linear(→ genes)``, then ``softplus_β`` so that every
token's log-expression is positive and smooth (a plain ReLU would stop the gradient of a token that a
spot's aggregate needs). Training is from spot-level measurements (:mod:`hishrst_train.subspot_train`):
a spot's prediction is the count-space aggregate of the tokens inside its disk
(:func:`hishrst_runtime.core.tokens.aggregate_log1p`; :func:`aggregate_tokens` is the same in torch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hishrst_runtime.core.tokens import TokenGeometry, token_offsets_um

__all__ = ["SubspotConfig", "SubspotHead", "aggregate_tokens", "SOFTPLUS_BETA"]

#: Default weight of the sub-spot head's total-variation prior (:attr:`SubspotConfig.smoothness`).
SMOOTHNESS_DEFAULT = 0.3
#: Sharpness of the output softplus: softplus_β(x) = log(1 + e^(βx)) / β (≈ ReLU away from 0).
SOFTPLUS_BETA = 5.0


@dataclass
class SubspotConfig:
    """Hyper-parameters of :class:`SubspotHead` (saved in the run's ``config.json`` under ``model``)."""

    width: int
    n_genes: int
    geometry: dict[str, Any] = field(default_factory=dict)  # TokenGeometry.to_dict()
    heads: int = 4
    dim_head: int = 32
    mlp_dim: int | None = None  # defaults to width
    head_hidden: int = 256
    dropout: float = 0.1
    rel_n_freqs: int = 16
    rel_min_wavelength_um: float = 8.0
    rel_max_wavelength_um: float = 400.0
    #: Training only (no effect on a trained head): weight of the total-variation prior on adjacent tokens'
    #: standardised predictions (:func:`hishrst_train.subspot_train.train_subspot`). Spot measurements constrain
    #: only a disk's mean, so without it each token is free to follow its nucleus or its neuropil;
    #: ``benchmarks/RESULTS.md`` (sub-spot) has the evidence for the default.
    smoothness: float = SMOOTHNESS_DEFAULT
    kind: str = "subspot"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SubspotConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @property
    def token_geometry(self) -> TokenGeometry:
        return TokenGeometry.from_dict(self.geometry)


def _distance_sinusoids(geom: TokenGeometry, n_freqs: int, lo_um: float, hi_um: float) -> torch.Tensor:
    """``[T, T, 2F]`` sinusoids of the pairwise token distances (µm) of one tile."""
    off = torch.from_numpy(token_offsets_um(geom).reshape(-1, 2))
    dist = torch.cdist(off, off)  # float64 [T, T]
    wl = torch.logspace(math.log10(lo_um), math.log10(hi_um), n_freqs, dtype=torch.float64)
    ang = dist.unsqueeze(-1) * (2 * math.pi / wl)
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).to(torch.float32)


class _TokenAttention(nn.Module):
    """Pre-norm multi-head attention over a tile's tokens with a learned per-head distance bias."""

    def __init__(self, c: SubspotConfig, geom: TokenGeometry) -> None:
        super().__init__()
        inner = c.heads * c.dim_head
        self.heads, self.dim_head = c.heads, c.dim_head
        self.norm = nn.LayerNorm(c.width)
        self.to_qkv = nn.Linear(c.width, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, c.width), nn.Dropout(c.dropout))
        self.register_buffer("pair_sin", _distance_sinusoids(geom, c.rel_n_freqs, c.rel_min_wavelength_um,
                                                             c.rel_max_wavelength_um), persistent=False)
        self.pair = nn.Linear(2 * c.rel_n_freqs, c.heads)
        nn.init.zeros_(self.pair.weight)
        nn.init.zeros_(self.pair.bias)

    def forward(self, x: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
        """``x [B, T, D]``; ``query``: token indices whose outputs are needed (None: all) → ``[B, Q, D]``."""
        b, t, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        bias = self.pair(self.pair_sin).permute(2, 0, 1)  # [H, T, T]
        if query is not None:
            q, bias = q[:, query], bias[:, query]
        split = lambda z: z.reshape(b, z.shape[1], self.heads, self.dim_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = (q @ k.transpose(-1, -2)) * (self.dim_head ** -0.5) + bias.unsqueeze(0)
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, q.shape[2], self.heads * self.dim_head)
        return self.to_out(out)


class SubspotHead(nn.Module):
    """Tokens ``[B, rows, cols, width]`` → log-normalised expression ``[B, rows, cols, genes]`` (≥ 0)."""

    def __init__(self, config: SubspotConfig) -> None:
        super().__init__()
        c = self.config = config
        geom = c.token_geometry
        self.grid = geom.grid
        self.register_buffer("feat_mean", torch.zeros(c.width))
        self.register_buffer("feat_std", torch.ones(c.width))
        self.attn = _TokenAttention(c, geom)
        mlp = c.mlp_dim or c.width
        self.mlp = nn.Sequential(nn.LayerNorm(c.width), nn.Linear(c.width, mlp), nn.GELU(), nn.Dropout(c.dropout),
                                 nn.Linear(mlp, c.width), nn.Dropout(c.dropout))
        self.gene_head = nn.Sequential(nn.Linear(c.width, c.head_hidden), nn.ReLU(), nn.LayerNorm(c.head_hidden),
                                       nn.Linear(c.head_hidden, c.n_genes))
        #: Training only: ``(scale, shift)`` applied to the last layer's output before the softplus (folded
        #: into that layer by :meth:`fold_output_affine`).
        self.output_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_feature_stats(self, tokens: torch.Tensor) -> None:
        """Per-dimension mean/std of training tokens ``[..., width]``."""
        flat = tokens.reshape(-1, tokens.shape[-1]).float()
        self.feat_mean.copy_(flat.mean(0))
        self.feat_std.copy_(flat.std(0).clamp_min(1e-6))

    def fold_output_affine(self) -> None:
        """Fold the training-time output scaling into the last linear layer (exact)."""
        if self.output_affine is None:
            return
        scale, shift = self.output_affine
        last = self.gene_head[-1]
        with torch.no_grad():
            last.weight.mul_(scale.unsqueeze(1))
            last.bias.mul_(scale).add_(shift)
        self.output_affine = None

    def forward_selected(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens [B, T, width]`` (flattened grid) → ``[B, Q, genes]`` for the token indices ``query``."""
        x = (tokens.float() - self.feat_mean) / self.feat_std
        xq = x if query is None else x[:, query]
        h = xq + self.attn(x, query)
        h = h + self.mlp(h)
        z = self.gene_head(h)
        if self.output_affine is not None:
            z = z * self.output_affine[0] + self.output_affine[1]
        return F.softplus(z, beta=SOFTPLUS_BETA)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, rows, cols, width = tokens.shape
        out = self.forward_selected(tokens.reshape(b, rows * cols, width))
        return out.reshape(b, rows, cols, -1)


def aggregate_tokens(pred_log: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Count-space aggregate ``log1p(Σ_t w_t · expm1(pred_log[:, t]))``: ``[B, T, G]``, ``weights [T]`` (or
    ``[B, T]``) → ``[B, G]`` (as :func:`hishrst_runtime.core.tokens.aggregate_log1p`)."""
    w = weights if weights.dim() == 2 else weights.unsqueeze(0)
    return torch.log1p((torch.expm1(pred_log) * w.unsqueeze(-1)).sum(dim=1))
