"""The HisHRST network: frozen-encoder features + position information → attention block → gene head.

``forward(features [B, N, D], positions [B, N, 2], mask [B, N] | None) -> expression [B, N, G]``

* the features are standardised per dimension with training-set statistics (buffers ``feat_mean`` /
  ``feat_std``; identity for imported reference weights), then position information is added according
  to ``position_mode`` (:data:`POSITION_MODES`, chosen per run and recorded in the run's config and the
  bundle manifest):
  - ``grid``: the reference implementation's learned x/y embeddings (512 each) of integer array
    coordinates — positions are truncated with ``.long()`` exactly as the reference does;
  - ``continuous``: multi-scale sinusoidal features of absolute physical coordinates in µm
    (wavelengths log-spaced between ``min_wavelength_um`` and ``max_wavelength_um``) followed by a
    learned linear map. It is defined at any density: fractional positions never collapse. Being
    absolute, it ties a model to the training section's placement on its slide;
  - ``relative`` (default, :data:`~hishrst_runtime.core.vocab.DEFAULT_POSITION_MODE`): positions are still fed as absolute µm, but the model only computes quantities that
    are invariant to translation, rotation and reflection of the neighbour group (see
    :class:`RelativePosition`): each spot's distance to the group's (masked) centroid, encoded with
    sinusoids (wavelengths ``rel_min_wavelength_um`` … ``rel_max_wavelength_um``) and added to the
    features, and a learned additive attention bias per head from the pairwise distances between the
    group's spots. A model trained this way predicts the same for a section moved, rotated or flipped on
    another slide, exactly (up to float rounding); rotation/flip augmentation is therefore unnecessary;
  - ``none``: no position information (image features only); ``positions`` is accepted and ignored so
    that every mode has the same inputs (and the same exported ONNX head signature).
* ``depth`` pre-norm transformer blocks (multi-head attention, 4 heads × 64 by default, then a GELU
  MLP of width ``mlp_dim`` = D by default), each with residual connections, mixing the spots of a
  neighbour group. ``mask`` (1 = real spot, 0 = padding) keeps padded spots out of the attention.
* gene head: Linear(D → ``head_hidden``), ReLU, LayerNorm, Linear(→ G), and a final ReLU. ``head_hidden``
  is 2048 in the reference (and for imported reference weights); the default here is smaller (see
  :class:`HisHRSTConfig`), because a frozen encoder's features of a few thousand spots cannot support a
  2048-wide head without overfitting the training sections (``benchmarks/BASELINES.md``).
* while training only, :attr:`HisHRST.output_affine` ``(scale, shift)`` maps the last linear layer's output
  to ``out * scale + shift`` before the ReLU (targets standardised per gene, :mod:`hishrst_train.train`);
  :meth:`HisHRST.fold_output_affine` folds it into that layer when training ends, so a saved model has
  exactly the reference architecture and state-dict layout.

Parameter names mirror the reference (``trans.layers.{i}.{0|1}...``, ``gene_head.*``) so that
:func:`import_reference_state_dict` is a direct mapping. All position computation lives in the ``pos``
submodule (ONNX node names ``/pos/...``, kept in fp32 by the fp16 export).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hishrst_runtime.core.vocab import DEFAULT_POSITION_MODE, POSITION_MODES, PositionMode  # the modes :class:`HisHRST` accepts

__all__ = ["HisHRSTConfig", "HisHRST", "import_reference_state_dict", "MASK_NEG", "POSITION_MODES", "PositionMode",
           "RelativePosition"]

#: Additive attention bias for padded keys. Finite and fp16-safe; exp(-1e4) underflows to 0.
MASK_NEG = 1.0e4



@dataclass
class HisHRSTConfig:
    """Hyper-parameters of :class:`HisHRST` (saved in every checkpoint's ``config.json``)."""

    feature_dim: int = 1024
    n_genes: int = 1000
    depth: int = 1
    heads: int = 4
    dim_head: int = 64
    mlp_dim: int | None = None  # defaults to feature_dim, as in the reference
    #: Width of the gene head's hidden layer: 2048 in the reference (kept by
    #: :func:`import_reference_state_dict`); 256 here — on unseen sections a 2048-wide head over a few
    #: thousand training spots overfits (benchmarks/BASELINES.md: MSE 1.02 → 0.97, PCC 0.30 → 0.33).
    head_hidden: int = 256
    dropout: float = 0.1
    position_mode: PositionMode = DEFAULT_POSITION_MODE
    grid_size: int = 512
    # continuous mode: wavelengths (µm) of the absolute-position sinusoids
    pos_n_freqs: int = 16
    min_wavelength_um: float = 50.0
    max_wavelength_um: float = 20000.0
    # relative mode: wavelengths (µm) of the distance sinusoids (a group spans a few hundred µm), and the
    # ε (µm²) in sqrt(d² + ε) that keeps distances differentiable at 0
    rel_n_freqs: int = 16
    rel_min_wavelength_um: float = 25.0
    rel_max_wavelength_um: float = 2000.0
    rel_eps_um2: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HisHRSTConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ContinuousPosition(nn.Module):
    """Sinusoidal features of (x, y) in µm at log-spaced wavelengths, then a learned linear map."""

    def __init__(self, dim: int, *, n_freqs: int, min_wavelength_um: float, max_wavelength_um: float) -> None:
        super().__init__()
        wl = torch.logspace(math.log10(min_wavelength_um), math.log10(max_wavelength_um), n_freqs, dtype=torch.float64)
        self.register_buffer("angular", (2 * math.pi / wl).to(torch.float32), persistent=True)
        self.proj = nn.Linear(4 * n_freqs, dim)

    def forward(self, pos_um: torch.Tensor) -> torch.Tensor:
        ang = pos_um.float().unsqueeze(-1) * self.angular  # [B, N, 2, F]
        feats = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).flatten(-2)  # [B, N, 4F]
        return self.proj(feats)


class GridPosition(nn.Module):
    """The reference's learned embeddings of integer array coordinates (x → x_embed, y → y_embed)."""

    def __init__(self, dim: int, *, grid_size: int) -> None:
        super().__init__()
        self.x_embed = nn.Embedding(grid_size, dim)
        self.y_embed = nn.Embedding(grid_size, dim)

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.x_embed(pos[..., 0].long()) + self.y_embed(pos[..., 1].long())


class RelativePosition(nn.Module):
    """Position information of a neighbour group that is invariant to translation, rotation and reflection.

    Input: absolute positions ``pos_um [B, N, 2]`` (µm) and ``mask [B, N]`` (1 = spot, 0 = padding) or
    ``None``. Positions are centred on the group's masked centroid (two passes, so that the centred
    offsets keep full fp32 precision however far the group lies from the slide origin); padded spots
    are moved onto the centroid and never enter it. From the offsets only Euclidean distances are used:

    * ``term [B, N, D]``: sinusoids of each spot's distance to the centroid → ``Linear(2F → D)``;
    * ``bias [B, H, N, N]``: sinusoids of the pairwise distances → ``Linear(2F → H)`` (initialised to 0,
      so training starts from plain attention), an additive attention bias per head.

    Distances are ``sqrt(d² + eps_um2)``: finite gradients at 0. Wavelengths are log-spaced between
    ``min_wavelength_um`` and ``max_wavelength_um`` (``n_freqs`` of them, F).
    """

    def __init__(self, dim: int, *, heads: int, n_freqs: int, min_wavelength_um: float, max_wavelength_um: float,
                 eps_um2: float) -> None:
        super().__init__()
        wl = torch.logspace(math.log10(min_wavelength_um), math.log10(max_wavelength_um), n_freqs, dtype=torch.float64)
        self.register_buffer("angular", (2 * math.pi / wl).to(torch.float32), persistent=True)
        self.eps = float(eps_um2)
        self.radial = nn.Linear(2 * n_freqs, dim)
        self.pair = nn.Linear(2 * n_freqs, heads)
        nn.init.zeros_(self.pair.weight)
        nn.init.zeros_(self.pair.bias)

    def _sinusoids(self, dist_um: torch.Tensor) -> torch.Tensor:
        ang = dist_um.unsqueeze(-1) * self.angular
        return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)

    def offsets(self, pos_um: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Offsets ``[B, N, 2]`` (µm) from the masked centroid; 0 for padded spots."""
        p = pos_um.float()
        keep = torch.ones_like(p[..., :1], dtype=torch.bool) if mask is None else (mask > 0).unsqueeze(-1)
        zero = torch.zeros_like(p)
        p = torch.where(keep, p, zero)
        n = keep.float().sum(1, keepdim=True).clamp_min(1.0)  # [B, 1, 1]
        rel = torch.where(keep, p - p.sum(1, keepdim=True) / n, zero)  # rough centroid: large sums round
        return torch.where(keep, rel - rel.sum(1, keepdim=True) / n, zero)  # exact centring of small offsets

    def forward(self, pos_um: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rel = self.offsets(pos_um, mask)
        radial = torch.sqrt((rel * rel).sum(-1) + self.eps)  # [B, N]
        diff = rel.unsqueeze(2) - rel.unsqueeze(1)  # [B, N, N, 2]
        pair = torch.sqrt((diff * diff).sum(-1) + self.eps)  # [B, N, N]
        term = self.radial(self._sinusoids(radial))
        bias = self.pair(self._sinusoids(pair)).permute(0, 3, 1, 2)  # [B, H, N, N]
        return term, bias


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.fn(self.norm(x), **kwargs)


class Attention(nn.Module):
    """Multi-head self-attention written with plain matmul/softmax (exports cleanly to ONNX/TensorRT)."""

    def __init__(self, dim: int, *, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, d]
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if bias is not None:
            dots = dots + bias
        attn = torch.softmax(dots.float(), dim=-1).to(v.dtype)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, *, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, *, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PreNorm(dim, Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)),
                    PreNorm(dim, FeedForward(dim, mlp_dim, dropout=dropout)),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x, bias=bias) + x
            x = ff(x) + x
        return x


class HisHRST(nn.Module):
    """HisHRST head over frozen-encoder features. See the module docstring for the architecture."""

    def __init__(self, config: HisHRSTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = config or HisHRSTConfig(**kwargs)
        if config is not None and kwargs:
            raise TypeError("pass either a HisHRSTConfig or keyword arguments, not both")
        if cfg.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {', '.join(map(repr, POSITION_MODES))}, "
                             f"got {cfg.position_mode!r}")
        self.config = cfg
        d = cfg.feature_dim
        self.pos = _position_module(cfg)
        self.trans = Transformer(
            d, depth=cfg.depth, heads=cfg.heads, dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim or d, dropout=cfg.dropout
        )
        self.gene_head = nn.Sequential(
            nn.Linear(d, cfg.head_hidden), nn.ReLU(), nn.LayerNorm(cfg.head_hidden), nn.Linear(cfg.head_hidden, cfg.n_genes)
        )
        # Per-dimension standardisation of the frozen features with training-set statistics
        # (identity until set_feature_stats; identity for imported reference weights).
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("feat_std", torch.ones(d))
        #: ``(scale [G], shift [G])`` applied to the head's last linear output while training (None otherwise).
        self.output_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor, *, per_dimension: bool = True) -> None:
        """Centre inputs on the mean of ``features [N, D]`` (the training spots' features) and divide by their
        std: per dimension, or (``per_dimension=False``) by one scale for all dimensions, the root mean
        variance, which keeps the dimensions' relative scales (low-variance dimensions stay small)."""
        std = features.std(0)
        if not per_dimension:
            std = torch.full_like(std, float(std.pow(2).mean().sqrt()))
        self.feat_mean.copy_(features.mean(0))
        self.feat_std.copy_(std.clamp_min(1e-6))

    @torch.no_grad()
    def fold_output_affine(self) -> None:
        """Fold :attr:`output_affine` into the head's last linear layer (exactly the same predictions) and clear it."""
        if self.output_affine is None:
            return
        scale, shift = self.output_affine
        last = self.gene_head[-1]
        last.weight.mul_(scale.to(last.weight)[:, None])
        last.bias.mul_(scale.to(last.bias)).add_(shift.to(last.bias))
        self.output_affine = None

    def forward(
        self, features: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``features [B, N, D]``, ``positions [B, N, 2]`` (µm, or array coords in grid mode; ignored in
        ``none`` mode), ``mask [B, N]`` (1 = spot, 0 = padding)."""
        mode = self.config.position_mode
        x = (features - self.feat_mean) / self.feat_std
        pair_bias = None
        if mode == "relative":
            term, pair_bias = self.pos(positions, mask)
            x = x + term.to(features.dtype)
        elif mode != "none":
            x = x + self.pos(positions).to(features.dtype)
        elif torch.onnx.is_in_onnx_export():
            # keep ``positions`` an input of the exported graph (same signature in every mode): a
            # shape-only use (ConstantOfShape), exactly zero whatever the values, even inf/NaN or fp16
            x = x + torch.zeros_like(positions[..., :1], dtype=x.dtype)
        bias = None
        if mask is not None:
            bias = ((mask.to(x.dtype) - 1.0) * MASK_NEG)[:, None, None, :]  # [B, 1, 1, N]
        if pair_bias is not None:
            pair_bias = pair_bias.to(x.dtype)
            bias = pair_bias if bias is None else bias + pair_bias
        out = self.gene_head(self.trans(x, bias=bias))
        if self.output_affine is not None:
            scale, shift = self.output_affine
            out = out * scale + shift
        return F.relu(out)


def _position_module(cfg: HisHRSTConfig) -> nn.Module | None:
    """The ``pos`` submodule of ``cfg.position_mode`` (``None`` for ``none``)."""
    d = cfg.feature_dim
    if cfg.position_mode == "grid":
        return GridPosition(d, grid_size=cfg.grid_size)
    if cfg.position_mode == "continuous":
        return ContinuousPosition(
            d, n_freqs=cfg.pos_n_freqs, min_wavelength_um=cfg.min_wavelength_um, max_wavelength_um=cfg.max_wavelength_um
        )
    if cfg.position_mode == "relative":
        return RelativePosition(d, heads=cfg.heads, n_freqs=cfg.rel_n_freqs, min_wavelength_um=cfg.rel_min_wavelength_um,
                                max_wavelength_um=cfg.rel_max_wavelength_um, eps_um2=cfg.rel_eps_um2)
    return None


def import_reference_state_dict(state_dict: Mapping[str, torch.Tensor], **config: Any) -> HisHRST:
    """Build a :class:`HisHRST` (grid position mode) from a state dict saved by the reference code.

    The reference's ``HistoSGE`` module names its parameters ``x_embed.*``, ``y_embed.*``,
    ``trans.layers.*`` and ``gene_head.*`` (plus an unused ``layer_norm.*``, ignored here). Feature
    dimension, depth, gene count and grid size are read from the tensors; ``config`` may set the rest
    (e.g. ``heads``, ``dim_head``). The returned model's output equals the reference's second output
    (``F.relu(gene_head(h))``) for the same inputs.
    """
    sd = dict(state_dict)
    required = ["x_embed.weight", "y_embed.weight", "gene_head.0.weight", "gene_head.3.weight"]
    missing = [k for k in required if k not in sd]
    if missing:
        raise KeyError(f"not a HisHRST reference state dict: missing {', '.join(missing)}")
    grid_size, dim = sd["x_embed.weight"].shape
    depth = len({k.split(".")[2] for k in sd if k.startswith("trans.layers.")})
    heads = config.pop("heads", 4)
    dim_head = config.pop("dim_head", sd["trans.layers.0.0.fn.to_qkv.weight"].shape[0] // 3 // heads)
    cfg = HisHRSTConfig(
        feature_dim=dim,
        n_genes=sd["gene_head.3.weight"].shape[0],
        depth=depth,
        heads=heads,
        dim_head=dim_head,
        mlp_dim=sd["trans.layers.0.1.fn.net.0.weight"].shape[0],
        head_hidden=sd["gene_head.0.weight"].shape[0],
        position_mode="grid",
        grid_size=grid_size,
        **config,
    )
    model = HisHRST(cfg)
    mapped = {}
    for k, v in sd.items():
        if k.startswith(("x_embed.", "y_embed.")):
            mapped["pos." + k] = v
        elif k.startswith(("trans.", "gene_head.")):
            mapped[k] = v
        elif k.startswith("layer_norm."):
            continue  # defined but unused by the reference forward
        else:
            raise KeyError(f"unexpected parameter {k!r} in reference state dict")
    mapped["feat_mean"] = model.feat_mean.clone()
    mapped["feat_std"] = model.feat_std.clone()
    model.load_state_dict(mapped, strict=True)
    return model
