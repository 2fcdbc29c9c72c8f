"""The frozen encoder module (uint8 NHWC tiles → features), its construction and its fingerprint.

:class:`EncoderModule` takes uint8 NHWC RGB tiles ``[B, S, S, 3]`` and returns float32 features ``[B, D]``;
scaling by 1/255 and mean/std normalisation are plain tensor ops inside ``forward`` so the same module
exports to ONNX with a uint8 input. :meth:`EncoderModule.forward_tokens` also returns the last-layer patch
tokens ``[B, rows, cols, width]`` (sub-spot models; :class:`EncoderTokens` wraps it for export). For an ONNX
export, timm's attention runs as explicit matmul/softmax instead of ``scaled_dot_product_attention``
(:func:`plain_attention`, or :func:`set_fused_attn` ``(encoder, False)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hishrst_train.encoders.convert import adapt_state_dict
from hishrst_runtime.core.errors import InputError
from hishrst_train.encoders.registry import EncoderSpec, get_encoder_spec
from hishrst_train.encoders.state_dict import check_state_dict, load_state_dict_file
from hishrst_train.encoders.weights import WeightsError, resolve_weights

__all__ = ["ChannelsFirst", "EncoderModule", "EncoderTokens", "EncoderBuildError", "build_backbone", "load_encoder",
           "encoder_fingerprint", "set_fused_attn", "plain_attention", "pool_tokens"]


class EncoderBuildError(InputError, ValueError):
    """timm cannot build the encoder's architecture with its arguments, or it does not match the spec."""


def pool_tokens(tokens: torch.Tensor, *, prefix_tokens: int) -> torch.Tensor:
    """``cls+mean`` pooling: the CLS token ⊕ the mean of the patch tokens (after ``prefix_tokens`` — the CLS
    token and the registers), ``[B, T, D]`` → ``[B, 2·D]`` (Virchow / Virchow2)."""
    return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(dim=1)], dim=-1)


def _timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    """``spec.timm_kwargs`` with ``mlp_layer`` / ``act_layer`` class names (``SwiGLUPacked``, or dotted as
    in hub configs: ``timm.layers.SwiGLUPacked``, ``torch.nn.SiLU``) resolved to the classes."""
    import timm.layers

    kwargs = dict(spec.timm_kwargs)
    for key, home in (("mlp_layer", timm.layers), ("act_layer", nn)):
        if isinstance(kwargs.get(key), str):
            short = kwargs[key].rsplit(".", 1)[-1]
            found = getattr(home, short, None) or getattr(timm.layers, short, None)
            if found is None:
                raise EncoderBuildError(f"encoder {spec.name!r}: {key} {kwargs[key]!r} is neither in timm.layers "
                                          "nor torch.nn; fix the encoder's config")
            kwargs[key] = found
    return kwargs


def build_backbone(spec: EncoderSpec, *, device: str | torch.device | None = None) -> nn.Module:
    """Create the timm model of ``spec`` with timm's random initialisation (no weights are loaded).

    ``device="meta"`` builds it without allocating memory (to check shapes or ``load_state_dict(assign=True)``).
    """
    import timm

    kwargs = _timm_kwargs(spec)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = timm.create_model(spec.arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise EncoderBuildError(f"encoder {spec.name!r}: timm cannot build {spec.arch!r} with {dict(spec.timm_kwargs)} "
                                f"({type(e).__name__}: {e}); check the architecture name and its arguments") from e
    if getattr(model, "num_features", spec.width) != spec.width:
        raise EncoderBuildError(f"encoder {spec.name!r}: timm built {model.num_features}-d tokens, the spec says "
                                f"{spec.width} ({spec.pooling} → {spec.feature_dim}-d); fix the encoder's spec")
    return model


def _random_backbone(spec: EncoderSpec) -> nn.Module:
    """Seeded random weights; LayerScale gammas set to 1 so the output depends on the input.

    With timm's ``init_values=1e-5`` every residual branch is scaled by 1e-5 and a random ViT returns nearly
    the same vector for any image; real checkpoints have learned gammas, so this only affects random init.
    """
    from timm.layers import LayerScale

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_backbone(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(1.0)
    return model


def _load_into_meta(spec: EncoderSpec, path: Path) -> nn.Module:
    model = build_backbone(spec, device="meta")
    sd = adapt_state_dict(load_state_dict_file(path), spec, model, path)
    check_state_dict(model, sd, spec, path)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: loading into encoder {spec.name!r} failed: {e}") from e
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"encoder {spec.name!r}: tensors not set by the state dict: {leftovers[:5]}")
    return model.float()


def set_fused_attn(module: nn.Module, enabled: bool) -> int:
    """Switch timm attention in ``module`` between fused SDPA (``True``) and explicit matmul/softmax.

    Call ``set_fused_attn(encoder, False)`` before ``torch.onnx.export`` for a portable attention graph.
    Returns the number of attention modules changed. (``timm.layers.set_fused_attn`` only affects models
    created afterwards; this flips the ``fused_attn`` attribute of existing modules.)
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)
            n += 1
    return n


@contextlib.contextmanager
def plain_attention(module: nn.Module) -> Iterator[None]:
    """Inside the block, timm attention in ``module`` runs as plain MatMul/Softmax (what ONNX export traces);
    each attention module's own ``fused_attn`` setting is restored afterwards."""
    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    for m, _ in saved:
        setattr(m, "fused_attn", False)  # noqa: B010 - attribute of timm's Attention, unknown to nn.Module
    try:
        yield
    finally:
        for m, v in saved:
            setattr(m, "fused_attn", v)  # noqa: B010


class EncoderModule(nn.Module):
    """Frozen encoder: uint8 NHWC RGB tiles ``[B, S, S, 3]`` → float32 features ``[B, feature_dim]``.

    ``forward`` scales to 0–1, subtracts ``spec.mean`` and divides by ``spec.std`` (channels last, RGB),
    permutes to NCHW and runs the timm backbone. Parameters have ``requires_grad=False`` and the module stays
    in eval mode (``train()`` is a no-op), so it can sit inside a trainable model without being updated.
    """

    def __init__(self, backbone: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.input_size = int(spec.input_size)
        self.feature_dim = int(spec.feature_dim)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 1, 1, 3), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 1, 1, 3), persistent=False)
        self.requires_grad_(False)
        super().train(False)
        self._fingerprint: tuple[tuple[Any, ...], str] | None = None

    def train(self, mode: bool = True) -> EncoderModule:  # noqa: ARG002 - frozen: always eval
        """No-op: the encoder is frozen and always in eval mode."""
        return super().train(False)

    def set_fused_attn(self, enabled: bool) -> int:
        """See :func:`set_fused_attn`; ``False`` before ONNX export."""
        return set_fused_attn(self.backbone, enabled)

    def _normalised(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC tiles → the backbone's float32 NCHW input (scaled to 0–1, mean/std normalised)."""
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
            raise TypeError(f"expected uint8 tiles [B, S, S, 3] (NHWC, RGB), got {tiles.dtype} {list(tiles.shape)}")
        x = tiles.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return x.permute(0, 3, 1, 2)

    def _pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output feature from the last-layer tokens ``[B, T, width]`` (``forward_features``)."""
        if self.spec.pooling == "cls+mean":
            return pool_tokens(tokens, prefix_tokens=int(self.backbone.num_prefix_tokens)).to(torch.float32)
        return self.backbone.forward_head(tokens).to(torch.float32)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: uint8 ``[B, S, S, 3]`` RGB (S = ``input_size``) → float32 ``[B, feature_dim]``."""
        x = self._normalised(tiles)
        if self.spec.pooling == "cls+mean":
            return self._pooled(self.backbone.forward_features(x))
        return self.backbone(x).to(torch.float32)

    @property
    def token_grid(self) -> tuple[int, int]:
        """Patch tokens per side (rows, cols) of an ``input_size`` tile (:attr:`EncoderSpec.token_grid`)."""
        return self.spec.token_grid

    def forward_tokens(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tiles`` uint8 ``[B, S, S, 3]`` → (features float32 ``[B, feature_dim]``, equal to :meth:`forward`;
        tokens float32 ``[B, rows, cols, width]``): the last-layer patch tokens after the final norm, class
        token and registers removed, in row-major grid order — both from one ``forward_features`` pass."""
        x = self._normalised(tiles)
        if not hasattr(self.backbone, "forward_features") or not hasattr(self.backbone, "forward_head"):
            raise EncoderBuildError(f"encoder {self.spec.name!r}: {type(self.backbone).__name__} has no "
                                    "forward_features/forward_head, so its patch tokens cannot be read; use a timm ViT")
        tokens = self.backbone.forward_features(x)
        rows, cols = self.token_grid
        prefix = int(getattr(self.backbone, "num_prefix_tokens", self.spec.prefix_tokens))
        if tokens.dim() != 3 or tokens.shape[1] != prefix + rows * cols:
            raise EncoderBuildError(f"encoder {self.spec.name!r}: {list(tokens.shape)} tokens from forward_features, "
                                    f"expected [B, {prefix} + {rows}×{cols}, width]; fix the encoder's spec")
        grid = tokens[:, prefix:].reshape(-1, rows, cols, int(self.spec.width))  # constants: a static ONNX shape
        return self._pooled(tokens), grid if grid.dtype == torch.float32 else grid.to(torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, input_size={self.input_size}, feature_dim={self.feature_dim}"


class ChannelsFirst(nn.Module):
    """An encoder (or :class:`EncoderTokens`) taking ``[B, 3, S, S]`` uint8 planes: reorders them to the NHWC tiles
    it takes (``hishrst export --tile-layout NCHW``). In the exported graph this reorder meets the encoder's own NHWC
    → NCHW one and ONNX Runtime's transpose optimiser cancels the pair."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tiles: torch.Tensor) -> Any:
        return self.inner(tiles.permute(0, 2, 3, 1))


class EncoderTokens(nn.Module):
    """``encoder.forward_tokens`` as a module's ``forward`` (tiles → (features, tokens)): what the token
    encoder's ONNX export traces. Shares the encoder's parameters; frozen and in eval mode like it."""

    def __init__(self, encoder: EncoderModule) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_size = encoder.input_size
        self.feature_dim = encoder.feature_dim
        super().train(False)

    def train(self, mode: bool = True) -> EncoderTokens:  # noqa: ARG002 - frozen: always eval
        """No-op: the encoder is frozen and always in eval mode."""
        return super().train(False)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`EncoderModule.forward_tokens`."""
        return self.encoder.forward_tokens(tiles)


def load_encoder(
    name: str | EncoderSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
) -> EncoderModule:
    """Build encoder ``name`` (a registered or generic name, or an :class:`EncoderSpec`) with its weights (resolved as in :func:`resolve_weights`) on ``device``.

    ``random_init=True`` skips weight resolution and uses seeded random weights (architecture tests, e.g.
    ONNX export of the full UNI graph without access to its weights). Raises :class:`WeightsError` with
    instructions when the weights are unavailable or do not fit the architecture.
    """
    spec = name if isinstance(name, EncoderSpec) else get_encoder_spec(name)
    path = None if random_init else resolve_weights(spec, weights=weights, cache_dir=cache_dir)
    backbone = _random_backbone(spec) if path is None else _load_into_meta(spec, path)
    return EncoderModule(backbone, spec).to(device)


def encoder_fingerprint(encoder: nn.Module) -> str:
    """16-hex-digit hash of the encoder's name, architecture and weights (all state-dict tensor bytes).

    Used in feature cache keys. The value is cached on the module and recomputed when any tensor changes
    (tracked through the tensors' storage pointers and in-place version counters).
    """
    spec = getattr(encoder, "spec", None)
    sd = encoder.state_dict()
    try:
        state: tuple[Any, ...] | None = tuple((k, v.data_ptr(), v._version, v.device.type) for k, v in sd.items())
    except RuntimeError:  # inference tensors have no version counter: hash every time
        state = None
    cached = getattr(encoder, "_fingerprint", None)
    if state is not None and cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.blake2b(digest_size=8)
    if spec is not None:
        h.update(repr((spec.name, spec.arch, sorted(spec.timm_kwargs.items()), spec.input_size, spec.mean,
                       spec.std)).encode())
        if spec.pooling != "cls":  # only non-default pooling enters, so earlier fingerprints stay valid
            h.update(f"pooling={spec.pooling}".encode())
    else:
        h.update(type(encoder).__qualname__.encode())
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()
    if isinstance(encoder, EncoderModule) and state is not None:
        encoder._fingerprint = (state, digest)
    return digest
