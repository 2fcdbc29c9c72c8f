"""Fitting a weights file's tensors onto the timm model of a spec, before the strict shape check.

Three steps, each named by a spec field: keep only the keys under ``state_dict_prefix`` (a vision trunk
inside a larger checkpoint: CONCH's ``visual.trunk.``), convert Hugging Face transformers' DINOv2 names to
timm's (``state_dict_format="hf-dinov2"``: Phikon-v2, Hibou; the mapping mirrors timm's own DINOv2
checkpoint filter: query/key/value fused into ``qkv``, the class token's position embedding folded into the
class token when the model keeps no position for prefix tokens), and resample a position embedding stored
for another grid (``resample_pos_embed``: CONCH v1.5, trained at 224 px, used at 448 px).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from hishrst_train.encoders.spec import EncoderSpec
from hishrst_train.encoders.weights import WeightsError

__all__ = ["adapt_state_dict", "hf_dinov2_to_timm"]

#: transformers Dinov2 layer names → timm ViT block names (after ``encoder.layer.N.`` → ``blocks.N.``).
_HF_BLOCK = {
    "norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "mlp.weights_in.": "mlp.fc1.", "mlp.weights_out.": "mlp.fc2.",
}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def _hf_block_key(rest: str, block: str) -> str | None:
    for old, new in _HF_BLOCK.items():
        if rest.startswith(old):
            return f"{block}{new}{rest[len(old):]}"
    return None


def hf_dinov2_to_timm(sd: dict[str, torch.Tensor], *, no_embed_class: bool) -> dict[str, torch.Tensor]:
    """transformers ``Dinov2Model`` (or ``Dinov2WithRegisters``) state dict → timm ``VisionTransformer`` names.

    ``no_embed_class``: the timm model adds no position embedding to prefix tokens (DINOv2 with registers);
    then the class token's stored position is added to the class token itself, as timm does."""
    if all(k.startswith("dinov2.") for k in sd):
        sd = {k[len("dinov2."):]: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
        if m:
            block, rest = f"blocks.{m.group(1)}.", m.group(2)
            qm = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
            if qm:
                qkv.setdefault(f"{block}attn.qkv.{qm.group(2)}", {})[qm.group(1)] = value
                continue
            new = _hf_block_key(rest, block)
            out[new if new is not None else key] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key != "embeddings.mask_token":
            out[_HF_TOP.get(key, key)] = value
    for name, parts in qkv.items():
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if no_embed_class and "pos_embed" in out and "cls_token" in out:
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    from timm.layers import resample_abs_pos_embed

    want = getattr(model, "pos_embed", None)
    have = sd.get("pos_embed")
    if want is None or have is None or tuple(have.shape) == tuple(want.shape):
        return
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    sd["pos_embed"] = resample_abs_pos_embed(have, new_size=list(model.patch_embed.grid_size),
                                             num_prefix_tokens=prefix, verbose=False)


def adapt_state_dict(sd: dict[str, torch.Tensor], spec: EncoderSpec, model: nn.Module, path: Path
                     ) -> dict[str, torch.Tensor]:
    """``sd`` as ``model`` (the timm model of ``spec``) names and shapes it: see the module docstring."""
    if spec.state_dict_prefix:
        p = spec.state_dict_prefix
        sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if not sd:
            raise WeightsError(f"{path}: no tensors under {p!r}, where encoder {spec.name!r} expects its vision "
                               f"trunk; pass the weights of {spec.hf_repo or spec.name} (file {spec.weights_filename})")
    if spec.state_dict_format == "hf-dinov2":
        sd = hf_dinov2_to_timm(sd, no_embed_class=bool(getattr(model, "no_embed_class", False)))
    if spec.resample_pos_embed:
        sd = dict(sd)
        _resample_pos_embed(sd, model)
    return sd
