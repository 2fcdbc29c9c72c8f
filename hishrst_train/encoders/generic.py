"""Bring your own encoder: specs for timm models that are not in the registry.

Three forms of ``--encoder`` (:func:`generic_spec`):

* ``hf-hub:ORG/NAME`` — a timm model on the Hugging Face hub (a repository with timm's ``config.json``:
  ``architecture``, ``model_args``, ``pretrained_cfg`` with ``input_size`` / ``mean`` / ``std``). The config
  and the weights (``model.safetensors`` or ``pytorch_model.bin``) resolve like UNI's: Hugging Face cache,
  then the hub with the user's token; ``--weights FILE`` overrides the weights.
* ``timm:FOLDER`` — a local folder in the same layout (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), e.g. a downloaded copy of such a repository or what ``timm.models.save_for_hf``
  writes. Recorded in the run by its absolute path.
* ``timm:ARCH`` — a timm architecture name with ``--weights FILE`` (required); mean/std/size come from
  timm's built-in pretrained config of ``ARCH`` (no download).

The output feature is timm's pooled output with ``num_classes=0`` (``pooling="cls"``); a config whose
``global_pool`` is ``''`` (token outputs) is refused, since its pooling is not known. Every problem is one
line naming the encoder, what is wrong and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hishrst_train.encoders.registry import UnknownEncoderError
from hishrst_train.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from hishrst_train.encoders.weights import WeightsError

__all__ = ["generic_spec", "canonical_encoder_name", "spec_from_timm_config"]

CONFIG_FILE = "config.json"


def canonical_encoder_name(name: str) -> str:
    """``timm:FOLDER`` with the folder made absolute (so a run records where it is); other names unchanged."""
    if name.startswith("timm:"):
        p = Path(name[len("timm:"):]).expanduser()
        if p.is_dir():
            return f"timm:{p.resolve()}"
    return name


def _fail(name: str, problem: str) -> UnknownEncoderError:
    return UnknownEncoderError(f"--encoder {name}: {problem}")


def _read_config(path: Path, name: str) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _fail(name, f"cannot read {path} ({e}); it must be timm's config.json (architecture, model_args, "
                          "pretrained_cfg)") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise _fail(name, f"{path} has no 'architecture'; it is not a timm model config (transformers models "
                          "need a registered entry)")
    return cfg


def _hub_config(repo: str, name: str) -> Path:
    """``config.json`` of hub repository ``repo``: from the Hugging Face cache, else downloaded."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, CONFIG_FILE)
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit)
    from hishrst_train.encoders import weights as w

    if w._hub_offline():
        raise WeightsError(f"--encoder {name}: {repo}/{CONFIG_FILE} is not in the Hugging Face cache and offline mode "
                           "is on (HF_HUB_OFFLINE); download the repository first or use --encoder timm:FOLDER")
    ok, target = w._hub_reachable()
    if not ok:
        raise WeightsError(f"--encoder {name}: the hub is unreachable ({target}) and {repo}/{CONFIG_FILE} is not "
                           "cached; connect, or use a local copy with --encoder timm:FOLDER")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(hf_hub_download(repo, CONFIG_FILE, etag_timeout=w.HUB_ETAG_TIMEOUT_S))
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(f"--encoder {name}: cannot get {repo}/{CONFIG_FILE} ({type(e).__name__}: {e}); check the "
                           "repository name, your access to it (huggingface-cli login) and the network") from e


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default


def spec_from_timm_config(cfg: dict[str, Any], *, name: str, hf_repo: str | None = None,
                          local_dir: str | None = None) -> EncoderSpec:
    """An :class:`EncoderSpec` from timm's ``config.json`` contents (see the module docstring)."""
    args = dict(cfg.get("model_args") or {})
    if args.get("global_pool") == "":
        raise _fail(name, "its config sets global_pool='' (token outputs without pooling); hishrst needs one "
                          "feature vector per tile — use a registered encoder or set global_pool in config.json")
    pcfg = cfg.get("pretrained_cfg") or {}
    size = pcfg.get("input_size") or [3, args.get("img_size", 224), args.get("img_size", 224)]
    size = int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    args = {**args, "num_classes": 0}
    args.setdefault("img_size", size)
    spec = EncoderSpec(name=name, arch=str(cfg["architecture"]), timm_kwargs=args, input_size=size,
                       mean=_triple(pcfg.get("mean"), IMAGENET_MEAN), std=_triple(pcfg.get("std"), IMAGENET_STD),
                       feature_dim=int(cfg.get("num_features") or 0) or 1, hf_repo=hf_repo,
                       weights_filename="model.safetensors", gated=False, license=str(pcfg.get("license") or "unknown"),
                       description=f"timm {cfg['architecture']} from {hf_repo or local_dir}", local_dir=local_dir,
                       source=f"timm config.json of {hf_repo or local_dir}",
                       unverified=() if pcfg.get("mean") else ("mean/std (ImageNet assumed: none in the config)",))
    return _with_built_dim(spec) if not cfg.get("num_features") else spec


def _with_built_dim(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with ``feature_dim`` read from the model built on the meta device (no memory, no weights)."""
    from dataclasses import replace

    import torch

    from hishrst_train.encoders.module import _timm_kwargs

    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec))
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        raise _fail(spec.name, f"timm cannot build {spec.arch!r} ({type(e).__name__}: {e}); check the architecture "
                               "and its model_args") from e
    return replace(spec, feature_dim=int(model.num_features))


def _timm_arch_spec(name: str, arch: str) -> EncoderSpec:
    import timm

    if not timm.is_model(arch):
        raise _fail(name, f"{arch!r} is neither a folder nor a timm architecture; pass timm:FOLDER (config.json + "
                          "weights) or a name from timm.list_models()")
    pcfg = timm.models.get_pretrained_cfg(arch)
    pdict = pcfg.to_dict() if pcfg is not None else {}
    return spec_from_timm_config({"architecture": arch, "pretrained_cfg": pdict}, name=name)


def generic_spec(name: str) -> EncoderSpec:
    """The spec of ``hf-hub:ORG/NAME``, ``timm:FOLDER`` or ``timm:ARCH`` (see the module docstring)."""
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise _fail(name, "expected hf-hub:ORG/NAME (a timm model repository on the Hugging Face hub)")
        return spec_from_timm_config(_read_config(_hub_config(repo, name), name), name=name, hf_repo=repo)
    rest = name[len("timm:"):]
    folder = Path(rest).expanduser()
    if folder.is_dir():
        config = folder / CONFIG_FILE
        if not config.is_file():
            raise _fail(name, f"{folder} has no {CONFIG_FILE}; a local timm model needs timm's config.json beside "
                              "its weights (or pass timm:ARCH --weights FILE)")
        return spec_from_timm_config(_read_config(config, name), name=canonical_encoder_name(name),
                                     local_dir=str(folder.resolve()))
    return _timm_arch_spec(name, rest)
