"""The encoder registry: name → :class:`EncoderSpec` (plain data; importing this module needs no torch).

* ``uni``     — UNI (ViT-L/16, 1024-d), ``MahmoodLab/UNI``, gated, CC-BY-NC-ND-4.0; 14 × 14 tokens of 16 px
  (8 µm at 0.5 µm/px);
* ``uni2-h``  — UNI2-h (ViT-H/14 with SwiGLU and 8 register tokens, 1536-d), ``MahmoodLab/UNI2-h``, gated;
  16 × 16 tokens of 14 px (7 µm at 0.5 µm/px), registers removed from the token grid;
* ``test-vit`` — a tiny randomly initialised ViT of the same family (64 px, 64-d) for tests: no download;
* ``test-vit-uni`` — the same tiny random ViT with UNI's token geometry (224 px, 14 × 14 tokens of 16 px) and
  normalisation, for sub-spot tests;
  both ``test_only`` — fit / cv / evaluate refuse them without ``--allow-test-encoder``
  (:func:`check_encoder_allowed`, on ``spec.test_only``, never on a name);
* the public models of :mod:`.zoo` (CONCH v1 / v1.5, Virchow2, H-optimus-0/1, Phikon-v2, Prov-GigaPath,
  Hibou-B/L), each with its preprocessing, token geometry, pooling and licence;
* generic forms (:mod:`.generic`): ``hf-hub:ORG/NAME`` (a timm model on the hub) and ``timm:FOLDER`` (a
  local timm ``config.json`` + weights) or ``timm:ARCH`` with ``--weights FILE``.
"""

from __future__ import annotations

from typing import Any, Mapping

from hishrst_runtime.core.errors import InputError
from hishrst_train.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from hishrst_train.encoders.zoo import ZOO

__all__ = ["EncoderSpec", "ENCODERS", "ENCODER_NAMES", "DEFAULT_ENCODER", "GENERIC_PREFIXES", "TEST_ENCODER_NAMES",
           "UnknownEncoderError", "TestEncoderError", "get_encoder_spec", "check_encoder_allowed",
           "is_encoder_name", "IMAGENET_MEAN", "IMAGENET_STD"]

#: The encoder of ``hishrst fit`` / ``cv`` when ``--encoder`` is not given: real weights, never random.
DEFAULT_ENCODER = "uni"
#: Prefixes of the generic forms (:mod:`.generic`): ``hf-hub:ORG/NAME`` and ``timm:FOLDER`` / ``timm:ARCH``.
GENERIC_PREFIXES = ("hf-hub:", "timm:")


class UnknownEncoderError(InputError, KeyError):
    """An encoder name that is not in :data:`ENCODERS` (a ``KeyError`` for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TestEncoderError(InputError):
    """A random test encoder was asked for without ``--allow-test-encoder``."""


def _gated_hub_vit(name: str, *, arch: str, timm_kwargs: Mapping[str, Any], feature_dim: int, hf_repo: str,
                   description: str, source: str) -> EncoderSpec:
    """A gated Mahmood-lab ViT on the hub: 224 px ImageNet-normalised tiles, ``pytorch_model.bin``, CC-BY-NC-ND-4.0."""
    return EncoderSpec(name=name, arch=arch, timm_kwargs=timm_kwargs, input_size=224, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, feature_dim=feature_dim, hf_repo=hf_repo, weights_filename="pytorch_model.bin",
                       gated=True, license="CC-BY-NC-ND-4.0", description=description,
                       source=source)


def _test_vit(name: str, *, input_size: int, description: str) -> EncoderSpec:
    """A tiny seeded random ViT (16-px patches, 64-d, 2 blocks, 2 heads, CLS; UNI's ImageNet mean/std) of
    ``input_size`` px: ``test_only``, MIT, nothing to download."""
    return EncoderSpec(name=name, arch="vit_tiny_patch16_224",
                       timm_kwargs={"img_size": input_size, "patch_size": 16, "embed_dim": 64, "depth": 2,
                                    "num_heads": 2, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
                       input_size=input_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, feature_dim=64, hf_repo=None,
                       weights_filename="model.safetensors", gated=False, license="MIT", description=description,
                       seed=0, test_only=True, source="hishrst (random, seeded)")


ENCODERS: dict[str, EncoderSpec] = {
    "uni": _gated_hub_vit(
        "uni",
        arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        feature_dim=1024,
        hf_repo="MahmoodLab/UNI",
        source="UNI model card + TRIDENT (UNIInferenceEncoder)",
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
        source="UNI2-h model card + TRIDENT (UNIv2InferenceEncoder)",
        description="UNI2-h: ViT-H/14 (SwiGLU, 8 register tokens), 681M parameters, pretrained on 200M+ tiles; 1536-d.",
    ),
    "test-vit": _test_vit(
        "test-vit", input_size=64,
        description="Tiny random ViT (UNI family, 64 px, 64-d), seeded, for tests and smoke runs; no download.",
    ),
    "test-vit-uni": _test_vit(
        "test-vit-uni", input_size=224,
        description="Tiny random ViT with UNI's token geometry (224 px, 14 × 14 tokens of 16 px, UNI's mean/std; "
                    "64-d, 2 blocks), seeded, for sub-spot tests and smoke runs; no download.",
    ),
    **ZOO,
}
#: Registered encoder names (``hishrst fit --encoder`` also takes the generic forms of :data:`GENERIC_PREFIXES`).
ENCODER_NAMES: tuple[str, ...] = tuple(ENCODERS)
#: Encoders with built-in random weights: refused by fit / cv / evaluate without ``--allow-test-encoder``.
TEST_ENCODER_NAMES: tuple[str, ...] = tuple(n for n, s in ENCODERS.items() if s.test_only)


def is_encoder_name(name: str) -> bool:
    """Whether ``name`` is a registered encoder or one of the generic forms (syntax only; nothing is read)."""
    return name in ENCODERS or any(name.startswith(p) and len(name) > len(p) for p in GENERIC_PREFIXES)


def get_encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered under ``name``, or built for a generic ``hf-hub:ORG/NAME`` /
    ``timm:FOLDER`` / ``timm:ARCH`` (:mod:`.generic`); :class:`UnknownEncoderError` (a ``KeyError``)
    listing the known names otherwise."""
    if name in ENCODERS:
        return ENCODERS[name]
    if is_encoder_name(name):
        from hishrst_train.encoders.generic import generic_spec

        return generic_spec(name)
    raise UnknownEncoderError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}, or "
                              "hf-hub:ORG/NAME, timm:FOLDER, timm:ARCH (choose one with --encoder)")


def check_encoder_allowed(name: str, *, allow_test_encoder: bool, where: str = "--encoder") -> None:
    """Refuse a random test encoder (:data:`TEST_ENCODER_NAMES`) unless ``allow_test_encoder``: a model on
    random features predicts nothing real, so it is only ever built on purpose."""
    if name in TEST_ENCODER_NAMES and not allow_test_encoder:
        raise TestEncoderError(f"{where} {name}: a randomly initialised test encoder — its features carry no "
                               "information about the tissue, so the model would not be trustworthy; choose a "
                               "real encoder (default uni, see `hishrst fit --help`), or pass --allow-test-encoder "
                               "for tests and smoke runs")
