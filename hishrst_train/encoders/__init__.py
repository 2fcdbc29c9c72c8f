"""Frozen pathology foundation-model encoders, by concern:

* :mod:`.spec` — :class:`EncoderSpec` (timm architecture, input size in px, RGB mean/std, token geometry,
  pooling, feature dimension, where the weights live, licence); torch-free;
* :mod:`.registry` — name → spec (UNI, UNI2-h, the random ``test-vit`` / ``test-vit-uni``, the public models
  of :mod:`.zoo`), the default encoder and the test-encoder check; torch-free;
* :mod:`.generic` — ``hf-hub:ORG/NAME``, ``timm:FOLDER`` and ``timm:ARCH`` (bring your own timm model);
* :mod:`.convert` — fitting a weights file onto the timm model (trunk prefix, transformers DINOv2 names,
  position-embedding resampling);
* :mod:`.weights` — where the weights come from (explicit file → local folder / Hugging Face cache →
  hub download) and the offline / gated-access errors; torch-free;
* :mod:`.state_dict` — reading safetensors / torch state-dict files and checking they fit;
* :mod:`.module` — :class:`EncoderModule` (uint8 NHWC tiles → float32 features, and with
  ``forward_tokens`` the patch tokens), :func:`load_encoder`
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
    "DEFAULT_ENCODER",
    "TestEncoderError",
    "check_encoder_allowed",
    "generic_spec",
    "EncoderBuildError",
    "WEIGHTS_DIR_ENV",
    "WeightsError",
    "EncoderModule",
    "EncoderTokens",
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
    "DEFAULT_ENCODER": "registry",
    "TestEncoderError": "registry",
    "check_encoder_allowed": "registry",
    "generic_spec": "generic",
    "EncoderBuildError": "module",
    "WEIGHTS_DIR_ENV": "weights",
    "HUB_PROBE_TIMEOUT_S": "weights",
    "HUB_ETAG_TIMEOUT_S": "weights",
    "WeightsError": "weights",
    "resolve_weights": "weights",
    "load_state_dict_file": "state_dict",
    "EncoderModule": "module",
    "EncoderTokens": "module",
    "build_backbone": "module",
    "load_encoder": "module",
    "encoder_fingerprint": "module",
    "set_fused_attn": "module",
}

__getattr__, __dir__ = lazy_attributes("hishrst_train.encoders", _WHERE, extra="train")
