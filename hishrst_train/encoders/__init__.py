"""Frozen pathology foundation-model encoders, by concern:

* :mod:`.registry` — name → :class:`EncoderSpec` (timm architecture, input size in px, RGB mean/std,
  feature dimension, where the weights live); torch-free;
* :mod:`.weights` — where the weights come from (explicit file → local folder / Hugging Face cache →
  hub download) and the offline / gated-access errors; torch-free;
* :mod:`.state_dict` — reading safetensors / torch state-dict files and checking they fit;
* :mod:`.module` — :class:`EncoderModule` (uint8 NHWC tiles → float32 features), :func:`load_encoder`
  and :func:`encoder_fingerprint`.

Names are imported on first use, so ``import hishrst_train.encoders`` (and the registry) needs no torch.
"""

from __future__ import annotations

from hishrst_runtime.core.lazy import lazy_attributes

__all__ = [
    "EncoderSpec",
    "ENCODERS",
    "ENCODER_NAMES",
    "UnknownEncoderError",
    "WEIGHTS_DIR_ENV",
    "WeightsError",
    "EncoderModule",
    "get_encoder_spec",
    "build_backbone",
    "resolve_weights",
    "load_state_dict_file",
    "load_encoder",
    "encoder_fingerprint",
    "set_fused_attn",
]

_WHERE = {
    "EncoderSpec": "registry",
    "ENCODERS": "registry",
    "ENCODER_NAMES": "registry",
    "UnknownEncoderError": "registry",
    "IMAGENET_MEAN": "registry",
    "IMAGENET_STD": "registry",
    "get_encoder_spec": "registry",
    "WEIGHTS_DIR_ENV": "weights",
    "HUB_PROBE_TIMEOUT_S": "weights",
    "HUB_ETAG_TIMEOUT_S": "weights",
    "WeightsError": "weights",
    "resolve_weights": "weights",
    "load_state_dict_file": "state_dict",
    "EncoderModule": "module",
    "build_backbone": "module",
    "load_encoder": "module",
    "encoder_fingerprint": "module",
    "set_fused_attn": "module",
}

__getattr__, __dir__ = lazy_attributes("hishrst_train.encoders", _WHERE, extra="train")
