"""Frozen pathology foundation-model encoders: registry, weight resolution and the uint8 → feature module.

Registry
    :data:`ENCODERS` maps a name to an :class:`EncoderSpec` — the timm architecture and its kwargs, the
    input size in pixels, the RGB mean/std (0–1 scale), the feature dimension and where the weights live:

    * ``uni``     — UNI (ViT-L/16, 1024-d), ``MahmoodLab/UNI``, gated, CC-BY-NC-ND-4.0;
    * ``uni2-h``  — UNI2-h (ViT-H/14 with SwiGLU and 8 register tokens, 1536-d), ``MahmoodLab/UNI2-h``, gated;
    * ``test-vit`` — a tiny randomly initialised ViT of the same family (64 px, 64-d) for tests: no download.

Weight resolution (:func:`resolve_weights`, used by :func:`load_encoder`), in this fixed order:

    1. an explicit ``weights`` file (``.safetensors`` preferred; ``.bin``/``.pth`` are read with
       ``torch.load(weights_only=True)`` — plain state dicts only, never whole-module pickles) or a folder
       holding ``model.safetensors`` / ``pytorch_model.bin``;
    2. a local weights folder — ``cache_dir`` or ``$HISHRST_WEIGHTS_DIR`` — holding
       ``<dir>/<name>/model.safetensors`` or ``<dir>/<name>/pytorch_model.bin``; then the Hugging Face
       hub cache (``huggingface_hub.try_to_load_from_cache``);
    3. a download with ``huggingface_hub.hf_hub_download``, authenticated by whatever huggingface_hub finds
       (``HF_TOKEN`` or ``huggingface-cli login``); this module never takes or logs a token.

    Offline (``HF_HUB_OFFLINE=1``), with the hub unreachable (a 3 s TCP probe is made first, because
    huggingface_hub otherwise retries for ~25 s) or without access to the gated repository, a
    :class:`WeightsError` explains how to request access, log in, or pass a local file. Nothing touches the
    network at import time.

:class:`EncoderModule` takes uint8 NHWC RGB tiles ``[B, S, S, 3]`` and returns float32 features ``[B, D]``;
scaling by 1/255 and mean/std normalisation are plain tensor ops inside ``forward`` so the same module
exports to ONNX with a uint8 input. Before an ONNX export call :func:`set_fused_attn` ``(encoder, False)``
so timm's attention runs as explicit matmul/softmax instead of ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import socket
import threading
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn
from hishrst_runtime.core.errors import EnvironmentProblem

__all__ = [
    "EncoderSpec",
    "ENCODERS",
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

#: Environment variable naming a local weights folder (``<dir>/<encoder name>/model.safetensors``).
WEIGHTS_DIR_ENV = "HISHRST_WEIGHTS_DIR"
#: Seconds allowed for the TCP probe of the hub (or proxy) before a download is attempted.
HUB_PROBE_TIMEOUT_S = 3.0
#: Seconds huggingface_hub may wait for the metadata (HEAD) request of a download.
HUB_ETAG_TIMEOUT_S = 10.0
_LOCAL_FILENAMES = ("model.safetensors", "pytorch_model.bin")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(EnvironmentProblem):
    """Encoder weights could not be found, downloaded or loaded; the message says what to do."""


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


ENCODERS: dict[str, EncoderSpec] = {
    "uni": EncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1024,
        hf_repo="MahmoodLab/UNI",
        weights_filename="pytorch_model.bin",
        gated=True,
        license="CC-BY-NC-ND-4.0",
        description="UNI (Chen et al., Nat. Med. 2024): ViT-L/16 DINOv2-pretrained on 100k H&E slides; 1024-d CLS token.",
    ),
    "uni2-h": EncoderSpec(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        timm_kwargs={  # as in the UNI2-h model card
            "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
            "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
            "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True,
        },
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        feature_dim=1536,
        hf_repo="MahmoodLab/UNI2-h",
        weights_filename="pytorch_model.bin",
        gated=True,
        license="CC-BY-NC-ND-4.0",
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


def get_encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` registered under ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return ENCODERS[name]
    except KeyError as e:
        raise KeyError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}") from e


# --------------------------------------------------------------------------------------------- building


def _timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    import timm.layers

    kwargs = dict(spec.timm_kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if isinstance(kwargs.get("act_layer"), str):
        kwargs["act_layer"] = getattr(nn, kwargs["act_layer"])
    return kwargs


def build_backbone(spec: EncoderSpec, *, device: str | torch.device | None = None) -> nn.Module:
    """Create the timm model of ``spec`` with timm's random initialisation (no weights are loaded).

    ``device="meta"`` builds it without allocating memory (to check shapes or ``load_state_dict(assign=True)``).
    """
    import timm

    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec))
    if getattr(model, "num_features", spec.feature_dim) != spec.feature_dim:
        raise RuntimeError(f"encoder {spec.name!r}: timm built {model.num_features}-d features, spec says {spec.feature_dim}")
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


# ------------------------------------------------------------------------------------ weights resolution


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Offline mode, read at call time (huggingface_hub itself reads HF_HUB_OFFLINE only at its import)."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    import huggingface_hub.constants as hf_constants

    return bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))


def _hub_endpoint() -> str:
    import huggingface_hub.constants as hf_constants

    return os.environ.get("HF_ENDPOINT") or getattr(hf_constants, "ENDPOINT", "https://huggingface.co")


def _can_connect(host: str, port: int, timeout: float) -> bool:
    """TCP connect to ``host:port`` within ``timeout`` s (name resolution included, via a daemon thread)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="hishrst-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether the hub (or the HTTPS proxy in front of it) accepts a TCP connection; returns (ok, target)."""
    url = urllib.parse.urlsplit(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or host, p.port or (443 if p.scheme == "https" else 80)
    return _can_connect(host, port, timeout), f"{host}:{port}"


def _access_help(spec: EncoderSpec, reason: str) -> str:
    repo = spec.hf_repo
    lines = [
        f"Cannot get the weights of encoder {spec.name!r} from the Hugging Face repository {repo!r} "
        f"(file {spec.weights_filename!r}): {reason}.",
    ]
    if spec.gated:
        lines.append(
            f"  - The repository is gated: request access on https://huggingface.co/{repo} and accept its "
            f"licence ({spec.license}) with your Hugging Face account."
        )
    lines += [
        "  - Then log in on this machine with `huggingface-cli login` (or `hf auth login`), or set the HF_TOKEN "
        "environment variable, and make sure huggingface.co is reachable (HF_HUB_OFFLINE unset).",
        f"  - Or use a local copy of the weights: pass `--weights PATH` (load_encoder(weights=PATH)) to a "
        f".safetensors/.bin state dict, or place it at ${WEIGHTS_DIR_ENV}/{spec.name}/model.safetensors "
        f"(or pytorch_model.bin).",
    ]
    return "\n".join(lines)


def _find_local(folder: Path, spec: EncoderSpec, *, flat: bool) -> Path | None:
    subdirs = [folder / spec.name] + ([folder] if flat else [])
    names = list(dict.fromkeys((*_LOCAL_FILENAMES, spec.weights_filename)))
    for d in subdirs:
        for n in names:
            if (d / n).is_file():
                return d / n
    return None


def _hf_cached(spec: EncoderSpec) -> Path | None:
    if spec.hf_repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in dict.fromkeys((spec.weights_filename, "model.safetensors")):
        hit = try_to_load_from_cache(spec.hf_repo, filename)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _download(spec: EncoderSpec, looked: str) -> Path:
    if spec.hf_repo is None:
        raise WeightsError(f"encoder {spec.name!r} has no Hugging Face repository to download from")
    if _hub_offline():
        raise WeightsError(_access_help(spec, f"offline mode is on (HF_HUB_OFFLINE) and no local copy "
                                              f"was found ({looked})"))
    ok, target = _hub_reachable()
    if not ok:
        raise WeightsError(_access_help(spec, f"the hub is unreachable (could not connect to {target} within "
                                              f"{HUB_PROBE_TIMEOUT_S:g} s) and no local copy was found ({looked})"))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(spec.hf_repo, spec.weights_filename, etag_timeout=HUB_ETAG_TIMEOUT_S))
    except GatedRepoError as e:
        raise WeightsError(_access_help(spec, "access denied — your account has no access to this gated "
                                              "repository yet, or you are not logged in")) from e
    except RepositoryNotFoundError as e:
        raise WeightsError(_access_help(spec, "repository not found or not authorised (not logged in?)")) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(_access_help(spec, f"download failed ({type(e).__name__}: {e})")) from e


def resolve_weights(
    spec: EncoderSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Path | None:
    """Path of the weights file for ``spec`` (see the module docstring for the order), or ``None``.

    ``None`` means "use the built-in seeded random weights" and is only returned for specs without
    ``hf_repo``. Raises :class:`WeightsError` when an explicit ``weights`` path does not exist, or when a
    hub encoder's weights are not local and cannot be downloaded (or ``download=False``).
    """
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            hit = _find_local(p, spec, flat=True)
            if hit is not None:
                return hit
            raise WeightsError(f"{p}: folder holds none of {', '.join(_LOCAL_FILENAMES)} for encoder {spec.name!r} "
                               f"(also looked in {p / spec.name}); pass the weights file itself.")
        raise WeightsError(f"{p}: weights file not found (encoder {spec.name!r}); check the --weights path.")
    folder = cache_dir if cache_dir is not None else os.environ.get(WEIGHTS_DIR_ENV) or None
    looked = ["searched the Hugging Face cache"]
    if folder is None:
        looked.append(f"${WEIGHTS_DIR_ENV} is not set")
    else:
        looked.append(f"searched {Path(folder).expanduser() / spec.name}/{{{','.join(_LOCAL_FILENAMES)}}}")
    if folder is not None:
        hit = _find_local(Path(folder).expanduser(), spec, flat=False)
        if hit is not None:
            return hit
    hit = _hf_cached(spec)
    if hit is not None:
        return hit
    if spec.hf_repo is None:
        return None
    if not download:
        raise WeightsError(_access_help(spec, f"no local copy was found ({'; '.join(looked)}) and downloading "
                                              "is disabled"))
    return _download(spec, "; ".join(looked))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict (tensor name → tensor, on CPU) from a safetensors or torch file.

    The format is detected from the content, not the suffix. Torch files are read with
    ``torch.load(weights_only=True)``: a pickled whole module (or anything else but tensors and plain
    containers) is refused with :class:`WeightsError`. A single wrapping ``{"state_dict": ...}`` or
    ``{"model": ...}`` level and a ``module.`` prefix on every key are removed.
    """
    p = Path(path)
    try:
        safetensors_format = _is_safetensors(p)
    except OSError as e:
        raise WeightsError(f"{p}: cannot open weights file ({e})") from e
    if safetensors_format:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{p}: not a readable safetensors file ({e}); re-download or re-save it.") from e
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else type(e).__name__)
            raise WeightsError(
                f"{p}: not a plain state dict — torch.load(weights_only=True) refused it ({why}). Whole-module "
                "pickles are never loaded; save `model.state_dict()` with safetensors.torch.save_file (preferred) "
                "or torch.save."
            ) from e
        except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise WeightsError(f"{p}: cannot read weights ({type(e).__name__}: {e}); is it a complete "
                               ".safetensors/.bin state dict?") from e
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{p}: expected a state dict (name → tensor), found {type(obj).__name__}; "
                           "save `model.state_dict()`, not the model or a training checkpoint.")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _check_keys(model: nn.Module, sd: Mapping[str, torch.Tensor], spec: EncoderSpec, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = [f"{k}: file {list(sd[k].shape)} vs model {list(s)}" for k, s in expected.items()
                  if k in sd and tuple(sd[k].shape) != s]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    source = f" — expected the weights from {spec.hf_repo}" if spec.hf_repo else ""
    raise WeightsError(
        f"{path}: these weights do not fit encoder {spec.name!r} (timm {spec.arch}, {spec.feature_dim}-d): "
        f"{'; '.join(parts)}. Did you pass another model's weights{source}?"
    )


def _load_into_meta(spec: EncoderSpec, path: Path) -> nn.Module:
    sd = load_state_dict_file(path)
    model = build_backbone(spec, device="meta")
    _check_keys(model, sd, spec, path)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise WeightsError(f"{path}: loading into encoder {spec.name!r} failed: {e}") from e
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"encoder {spec.name!r}: tensors not set by the state dict: {leftovers[:5]}")
    return model.float()


# ------------------------------------------------------------------------------------------- the module


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

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """``tiles``: uint8 ``[B, S, S, 3]`` RGB (S = ``input_size``) → float32 ``[B, feature_dim]``."""
        if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
            raise TypeError(f"expected uint8 tiles [B, S, S, 3] (NHWC, RGB), got {tiles.dtype} {list(tiles.shape)}")
        x = tiles.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        x = x.permute(0, 3, 1, 2)
        return self.backbone(x).to(torch.float32)

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, input_size={self.input_size}, feature_dim={self.feature_dim}"


def load_encoder(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    random_init: bool = False,
) -> EncoderModule:
    """Build encoder ``name`` with its weights (resolved as in :func:`resolve_weights`) on ``device``.

    ``random_init=True`` skips weight resolution and uses seeded random weights (architecture tests, e.g.
    ONNX export of the full UNI graph without access to its weights). Raises :class:`WeightsError` with
    instructions when the weights are unavailable or do not fit the architecture.
    """
    spec = get_encoder_spec(name)
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
