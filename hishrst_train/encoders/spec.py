"""What an encoder *is*, as plain data: :class:`EncoderSpec` (importing this module needs no torch).

A spec fixes everything the features depend on: the timm architecture and its keyword arguments, the
preprocessing (tile side in px, RGB mean/std on the 0–1 scale), the token geometry (patch size, register
tokens, hence the token grid and the number of prefix tokens), the output feature (``pooling``) and its
dimension, where the weights live and under which licence, and how a weights file maps onto the timm
model (``state_dict_prefix``, ``state_dict_format``, ``resample_pos_embed``).

Tokens: an ``input_size``-px tile gives ``token_grid`` = ``input_size // patch_size`` tokens per side, after
``prefix_tokens`` (class token + registers). Cut at an encoder's native 0.5 µm/px (20×) a token spans
``patch_size × 0.5`` µm: 8 µm for 16-px tokens (UNI, CONCH, Phikon-v2, Prov-GigaPath, 14 × 14 at 224 px,
28 × 28 for CONCH's 448 px), 7 µm for 14-px tokens (UNI2-h, Virchow2, H-optimus, Hibou; 16 × 16 at 224 px).
Sub-spot models instead fix the token pitch (8 µm by default) and cut tiles to match:
:meth:`EncoderSpec.token_geometry`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal, Mapping

from hishrst_runtime.core.tokens import DEFAULT_MARGIN_TOKENS, DEFAULT_TOKEN_PITCH_UM, TokenGeometry

__all__ = ["EncoderSpec", "Pooling", "StateDictFormat", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: OpenAI CLIP normalisation (timm ``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``; CONCH v1).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The output feature: ``cls`` — timm's pooled output with ``num_classes=0`` (the normalised CLS token for
#: ``global_pool='token'``, timm's default for ViTs); ``cls+mean`` — the CLS token concatenated with the mean
#: of the patch tokens (register tokens excluded), as Virchow / Virchow2 recommend (2 × width).
Pooling = Literal["cls", "cls+mean"]
#: Key layout of the weights file: ``timm`` (timm's own names) or ``hf-dinov2`` (Hugging Face transformers'
#: ``Dinov2Model`` / ``Dinov2WithRegisters`` names, converted on load: Phikon-v2, Hibou).
StateDictFormat = Literal["timm", "hf-dinov2"]


@dataclass(frozen=True)
class EncoderSpec:
    """Static description of a frozen encoder.

    ``timm_kwargs`` are passed to ``timm.create_model(arch, pretrained=False, **timm_kwargs)``; the values
    ``mlp_layer`` / ``act_layer`` are class *names* resolved in ``timm.layers`` / ``torch.nn`` at build time,
    so a spec is plain data (JSON-able). ``input_size`` is the tile side in pixels; ``mean`` / ``std`` are
    RGB on the 0–1 scale. ``feature_dim`` is the output of ``pooling`` (2 × width for ``cls+mean``).
    ``test_only`` marks encoders with built-in seeded random weights (``hf_repo`` None, ``seed``): tests and
    smoke runs only — fit/cv/evaluate refuse them without ``--allow-test-encoder``. ``local_dir``: a local
    timm folder (``config.json`` + weights) the weights come from. ``source`` says where the values come
    from; ``unverified`` names those that could not be checked against a public source.
    """

    name: str
    arch: str
    timm_kwargs: Mapping[str, Any] = field(hash=False)
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    hf_repo: str | None
    weights_filename: str
    gated: bool
    license: str
    description: str
    seed: int = 0
    test_only: bool = False
    pooling: Pooling = "cls"
    state_dict_prefix: str | None = None
    state_dict_format: StateDictFormat = "timm"
    resample_pos_embed: bool = False
    local_dir: str | None = None
    source: str = ""
    unverified: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    # ------------------------------------------------------------------------------------ token geometry

    @property
    def patch_size(self) -> int:
        """Side of one patch token in px (``timm_kwargs['patch_size']``, else from the architecture name)."""
        if "patch_size" in self.timm_kwargs:
            return int(self.timm_kwargs["patch_size"])
        m = re.search(r"patch(\d+)", self.arch)
        if m is None:
            raise ValueError(f"encoder {self.name!r}: no patch_size in its timm arguments or architecture name")
        return int(m.group(1))

    @property
    def reg_tokens(self) -> int:
        """Register tokens (``timm_kwargs['reg_tokens']``, or the ``_regN`` of the architecture name)."""
        if "reg_tokens" in self.timm_kwargs:
            return int(self.timm_kwargs["reg_tokens"])
        m = re.search(r"_reg(\d+)", self.arch)
        return int(m.group(1)) if m else 0

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token and the registers."""
        return 1 + self.reg_tokens

    @property
    def token_grid(self) -> tuple[int, int]:
        """Patch tokens per side, (rows, columns), for an ``input_size`` tile."""
        n = self.input_size // self.patch_size
        return n, n

    def token_geometry(self, *, pitch_um: float = DEFAULT_TOKEN_PITCH_UM,
                       margin: int = DEFAULT_MARGIN_TOKENS) -> TokenGeometry:
        """The :class:`~hishrst_runtime.core.tokens.TokenGeometry` of this encoder's patch tokens when one token
        spans ``pitch_um`` µm (tile side ``token_grid × pitch_um`` µm, cut at ``pitch_um / patch_size`` µm per
        encoder pixel: 0.5 µm/px for UNI's 16-px tokens at 8 µm) with ``margin`` tokens dropped at each side
        at run time. An :class:`~hishrst_runtime.core.errors.InputError` if the grid leaves no token."""
        return TokenGeometry(grid=self.token_grid, input_size=int(self.input_size), pitch_um=float(pitch_um),
                             margin=int(margin))

    @property
    def width(self) -> int:
        """Token width of the transformer (``feature_dim``, halved for ``cls+mean``)."""
        return self.feature_dim // 2 if self.pooling == "cls+mean" else self.feature_dim

    # ------------------------------------------------------------------------------------ variants

    def with_depth(self, depth: int) -> EncoderSpec:
        """The same encoder with ``depth`` blocks (same width, patch size, registers, pooling, norm and MLP
        kinds): the depth-reduced copy the default test suite builds instead of a full-size model."""
        return replace(self, name=f"{self.name}@depth{depth}", timm_kwargs={**self.timm_kwargs, "depth": int(depth)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the spec (for manifests and run configs)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(timm_kwargs=dict(self.timm_kwargs), mean=list(self.mean), std=list(self.std),
                 unverified=list(self.unverified))
        return d
