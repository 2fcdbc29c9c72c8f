"""The encoder registry: name → :class:`EncoderSpec` (plain data; importing this module needs no torch).

* ``uni``     — UNI (ViT-L/16, 1024-d), ``MahmoodLab/UNI``, gated, CC-BY-NC-ND-4.0;
* ``uni2-h``  — UNI2-h (ViT-H/14 with SwiGLU and 8 register tokens, 1536-d), ``MahmoodLab/UNI2-h``, gated;
* ``test-vit`` — a tiny randomly initialised ViT of the same family (64 px, 64-d) for tests: no download.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from hishrst_runtime.core.errors import InputError

__all__ = ["EncoderSpec", "ENCODERS", "ENCODER_NAMES", "UnknownEncoderError", "get_encoder_spec",
           "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownEncoderError(InputError, KeyError):
    """An encoder name that is not in :data:`ENCODERS` (a ``KeyError`` for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class EncoderSpec:
    """Static description of a frozen encoder.

    ``timm_kwargs`` are passed to ``timm.create_model(arch, pretrained=False, **timm_kwargs)``; the values
    ``mlp_layer`` / ``act_layer`` are class *names* resolved in ``timm.layers`` / ``torch.nn`` at build time,
    so a spec is plain data (JSON-able). ``input_size`` is the tile side in pixels; ``mean`` / ``std`` are
    RGB on the 0–1 scale. ``hf_repo`` is ``None`` for encoders with built-in seeded random weights
    (``seed``), which are meant for tests only.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the spec (for manifests and run configs)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(timm_kwargs=dict(self.timm_kwargs), mean=list(self.mean), std=list(self.std))
        return d


def _gated_hub_vit(name: str, *, arch: str, timm_kwargs: Mapping[str, Any], feature_dim: int, hf_repo: str,
                   description: str) -> EncoderSpec:
    """A gated Mahmood-lab ViT on the hub: 224 px ImageNet-normalised tiles, ``pytorch_model.bin``, CC-BY-NC-ND-4.0."""
    return EncoderSpec(name=name, arch=arch, timm_kwargs=timm_kwargs, input_size=224, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, feature_dim=feature_dim, hf_repo=hf_repo, weights_filename="pytorch_model.bin",
                       gated=True, license="CC-BY-NC-ND-4.0", description=description)


ENCODERS: dict[str, EncoderSpec] = {
    "uni": _gated_hub_vit(
        "uni",
        arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        feature_dim=1024,
        hf_repo="MahmoodLab/UNI",
        description="UNI (Chen et al., Nat. Med. 2024): ViT-L/16 DINOv2-pretrained on 100k H&E slides; 1024-d CLS token.",
    ),
    "uni2-h": _gated_hub_vit(
        "uni2-h",
        arch="vit_giant_patch14_224",
        timm_kwargs={  # as in the UNI2-h model card
            "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True,
        },
        feature_dim=1536,
        hf_repo="MahmoodLab/UNI2-h",
        description="UNI2-h: ViT-H/14 (SwiGLU, 8 register tokens), 681M parameters, pretrained on 200M+ tiles; 1536-d.",
    ),
    "test-vit": EncoderSpec(
        name="test-vit",
        arch="vit_tiny_patch16_224",
        timm_kwargs={
            "img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "init_values": 1e-5,
            "num_classes": 0, "dynamic_img_size": True,
        },
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=64,
        hf_repo=None,
        weights_filename="model.safetensors",
        gated=False,
        license="MIT",
        description="Tiny random ViT (UNI family, 64 px, 64-d), seeded, for tests and smoke runs; no download.",
        seed=0,
    ),
}
#: Registered encoder names (the choices of ``hishrst fit --encoder``).
ENCODER_NAMES: tuple[str, ...] = tuple(ENCODERS)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered under ``name``; :class:`UnknownEncoderError` (a ``KeyError``)
    listing the known names otherwise."""
    try:
        return ENCODERS[name]
    except KeyError as e:
        raise UnknownEncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))} "
                                  "(choose one with --encoder)") from e
