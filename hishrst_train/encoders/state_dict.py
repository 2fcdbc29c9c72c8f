"""Reading encoder weights files into state dicts, and checking that they fit an architecture.

The format is detected from the content, not the suffix: safetensors, or a torch file read with
``torch.load(weights_only=True)`` (never a whole-module pickle). Every problem is a :class:`WeightsError`
naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from hishrst_train.encoders.registry import EncoderSpec
from hishrst_train.encoders.weights import WeightsError

__all__ = ["load_state_dict_file", "check_state_dict"]


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
        from safetensors import SafetensorError  # torch.load may hand a file to the safetensors reader

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
        except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError) as e:
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


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], spec: EncoderSpec, path: Path) -> None:
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
