"""Public pathology foundation models, each as an :class:`~hishrst_train.encoders.spec.EncoderSpec`.

Every value states its source. "TRIDENT" is the Mahmood Lab's feature-extraction toolkit
(github.com/mahmoodlab/TRIDENT, ``trident/patch_encoder_models/load.py`` and ``utils/constants.py``), which
loads each of these models with explicit timm arguments and transforms that mirror the model cards; "card"
is the model's Hugging Face model card. Values listed in a spec's ``unverified`` could not be checked
against a public source here and come from the model's reference code as remembered: check them before
relying on them (a wrong key layout fails loudly at load time — never silently). Weights are never
shipped: they resolve as UNI's do (``--weights`` → ``$HISHRST_WEIGHTS_DIR/<name>/`` / Hugging Face cache →
hub with the user's token), after accepting each model's terms on its hub page where it is gated.
"""

from __future__ import annotations

from typing import Any

from hishrst_train.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, EncoderSpec

__all__ = ["ZOO"]

#: H-optimus-0/1 normalisation (TRIDENT, as the H-optimus model cards).
_HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
#: Hibou normalisation (TRIDENT ``HIBOU_MEAN`` / ``HIBOU_STD``, as the Hibou preprocessor config).
_HIBOU_MEAN = (0.7068, 0.5755, 0.722)
_HIBOU_STD = (0.195, 0.2316, 0.1816)
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


def _spec(name: str, *, arch: str, kw: dict[str, Any], size: int = 224, mean: Any = IMAGENET_MEAN,
          std: Any = IMAGENET_STD, dim: int, repo: str, file: str = "pytorch_model.bin", gated: bool = True,
          license: str, about: str, source: str, **more: Any) -> EncoderSpec:
    return EncoderSpec(name=name, arch=arch, timm_kwargs={"img_size": size, "num_classes": 0, **kw}, input_size=size,
                       mean=mean, std=std, feature_dim=dim, hf_repo=repo, weights_filename=file, gated=gated,
                       license=license, description=about, source=source, **more)


_ENTRIES = [
    # CONCH v1: the vision tower's timm trunk (ViT-B/16 at 448 px, keys `visual.trunk.*` of MahmoodLab/CONCH's
    # pytorch_model.bin), OpenAI-CLIP normalisation (TRIDENT loads it through the CONCH package, whose
    # transform uses OPENAI_DATASET_MEAN/STD). Output: the trunk's CLS token (768-d) — not CONCH's 512-d
    # attentional-pool embedding (`encode_image`), which needs the CoCa pooler.
    _spec("conch-v1", arch="vit_base_patch16_224", kw={"patch_size": 16}, size=448, mean=OPENAI_CLIP_MEAN,
          std=OPENAI_CLIP_STD, dim=768, repo="MahmoodLab/CONCH", license="CC-BY-NC-ND-4.0",
          about="CONCH v1 vision trunk (ViT-B/16, 448 px, CoCa on 1.17M image-caption pairs); 768-d trunk CLS.",
          source="CONCH model card + TRIDENT (Conchv1InferenceEncoder); trunk config from the CONCH repo",
          state_dict_prefix="visual.trunk.",
          unverified=("arch/img_size of the trunk (CONCH conch_ViT-B-16.json)", "state_dict_prefix", "pooling")),
    # CONCH v1.5: ViT-L/16 trunk with LayerScale (init_values=1.0), 448 px, ImageNet normalisation
    # (TRIDENT model_zoo/conchv1_5: vit_large(init_values=1.0), T.Normalize(IMAGENET_MEAN, IMAGENET_STD));
    # weights MahmoodLab/conchv1_5 pytorch_model_vision.bin, keys `trunk.*`; the stored position embedding is
    # resampled to the 448 px grid as TRIDENT does. Output: the trunk's CLS token (1024-d) — not TRIDENT's
    # 768-d attentional-pool + LayerNorm embedding.
    _spec("conch-v1.5", arch="vit_large_patch16_224", kw={"patch_size": 16, "init_values": 1.0}, size=448,
          dim=1024, repo="MahmoodLab/conchv1_5", file="pytorch_model_vision.bin", license="CC-BY-NC-ND-4.0",
          about="CONCH v1.5 vision trunk (ViT-L/16, 448 px, TITAN's patch encoder); 1024-d trunk CLS.",
          source="TRIDENT (model_zoo/conchv1_5/conchv1_5.py, Conchv15InferenceEncoder)",
          state_dict_prefix="trunk.", resample_pos_embed=True,
          unverified=("trunk keys match timm's ViT names", "pooling")),
    # Virchow2: ViT-H/14, 4 registers, SwiGLU (mlp_ratio 5.3375), LayerScale; embedding = CLS ⊕ mean of the
    # patch tokens (registers skipped: output[:, 5:]) = 2560-d (card; TRIDENT Virchow2InferenceEncoder).
    _spec("virchow2", arch="vit_huge_patch14_224",
          kw={"init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375, "dynamic_img_size": True, **_SWIGLU},
          dim=2560, repo="paige-ai/Virchow2", license="CC-BY-NC-ND-4.0", pooling="cls+mean",
          about="Virchow2 (Paige): ViT-H/14, 4 registers, SwiGLU; CLS ⊕ mean patch token, 2560-d.",
          source="Virchow2 model card + TRIDENT (Virchow2InferenceEncoder)", unverified=("license",)),
    # H-optimus-0 / -1: timm vit_giant_patch14_reg4_dinov2 (ViT-g/14, 4 registers, SwiGLU), 224 px, their own
    # normalisation, CLS (global_pool='token'), 1536-d (cards; TRIDENT HOptimus0/1InferenceEncoder).
    _spec("h-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
          kw={"init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"}, mean=_HOPTIMUS_MEAN,
          std=_HOPTIMUS_STD, dim=1536, repo="bioptimus/H-optimus-0", gated=False, license="Apache-2.0",
          about="H-optimus-0 (Bioptimus): ViT-g/14, 4 registers, 1.1B parameters; 1536-d CLS.",
          source="H-optimus-0 model card + TRIDENT (HOptimus0InferenceEncoder)", unverified=("gated",)),
    _spec("h-optimus-1", arch="vit_giant_patch14_reg4_dinov2",
          kw={"init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"}, mean=_HOPTIMUS_MEAN,
          std=_HOPTIMUS_STD, dim=1536, repo="bioptimus/H-optimus-1", license="CC-BY-NC-ND-4.0",
          about="H-optimus-1 (Bioptimus): ViT-g/14, 4 registers; 1536-d CLS.",
          source="H-optimus-1 model card + TRIDENT (HOptimus1InferenceEncoder)", unverified=("license",)),
    # Phikon-v2 (Owkin): DINOv2 ViT-L/16 in transformers' Dinov2Model layout (converted on load), ImageNet
    # normalisation, CLS of last_hidden_state (TRIDENT Phikonv2InferenceEncoder), 1024-d.
    _spec("phikon-v2", arch="vit_large_patch16_224", kw={"patch_size": 16, "init_values": 1e-5}, dim=1024,
          repo="owkin/phikon-v2", file="model.safetensors", gated=False, license="Owkin-non-commercial",
          about="Phikon-v2 (Owkin): DINOv2 ViT-L/16 on 460M tiles; 1024-d CLS.",
          source="Phikon-v2 model card + TRIDENT (Phikonv2InferenceEncoder)", state_dict_format="hf-dinov2",
          unverified=("config image_size 224 (position-embedding grid)", "license name")),
    # Prov-GigaPath tile encoder: timm vit_giant_patch14_dinov2 with patch_size=16, embed 1536, depth 40,
    # 24 heads, mlp_ratio 5.33334 (SwiGLU, LayerScale), 224 px, ImageNet normalisation, CLS, 1536-d (TRIDENT
    # GigaPathInferenceEncoder; hub config of prov-gigapath/prov-gigapath).
    _spec("gigapath", arch="vit_giant_patch14_dinov2",
          kw={"patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp_ratio": 5.33334,
              "in_chans": 3}, dim=1536, repo="prov-gigapath/prov-gigapath", license="prov-gigapath-license",
          about="Prov-GigaPath tile encoder: ViT-g/16 (DINOv2), 1.1B parameters; 1536-d CLS.",
          source="Prov-GigaPath model card + TRIDENT (GigaPathInferenceEncoder)"),
    # Hibou-B / Hibou-L (HistAI): DINOv2 with 4 registers and SwiGLU FFN in transformers' custom
    # Dinov2WithRegisters layout (converted on load); transformers' SwiGLU hidden size
    # (int(int(d·4)·2/3)+7)//8·8 packed ×2 gives mlp_ratio 4096/768 and 5472/1024; Hibou normalisation;
    # pooler_output = CLS after the final LayerNorm (TRIDENT HibouLInferenceEncoder; hibou-b config.json).
    _spec("hibou-b", arch="vit_base_patch14_reg4_dinov2",
          kw={"patch_size": 14, "init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True,
              "mlp_ratio": 4096 / 768, **_SWIGLU}, mean=_HIBOU_MEAN, std=_HIBOU_STD, dim=768,
          repo="histai/hibou-b", file="model.safetensors", gated=False, license="Apache-2.0",
          about="Hibou-B (HistAI): ViT-B/14, 4 registers, SwiGLU; 768-d CLS.",
          source="hibou-b config.json (hub) + TRIDENT constants (HIBOU_MEAN/STD)", state_dict_format="hf-dinov2"),
    _spec("hibou-l", arch="vit_large_patch14_reg4_dinov2",
          kw={"patch_size": 14, "init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True,
              "mlp_ratio": 5472 / 1024, **_SWIGLU}, mean=_HIBOU_MEAN, std=_HIBOU_STD, dim=1024,
          repo="histai/hibou-L", file="model.safetensors", license="Apache-2.0",
          about="Hibou-L (HistAI): ViT-L/14, 4 registers, SwiGLU; 1024-d CLS.",
          source="Hibou-L model card + TRIDENT (HibouLInferenceEncoder)", state_dict_format="hf-dinov2",
          unverified=("use_swiglu_ffn and image_size as in hibou-b's config.json",)),
]

#: name → spec of the public models above (UNI and UNI2-h live in :mod:`.registry`).
ZOO: dict[str, EncoderSpec] = {s.name: s for s in _ENTRIES}
