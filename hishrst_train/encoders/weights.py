"""Where an encoder's weights come from, in this fixed order (:func:`resolve_weights`):

1. an explicit ``weights`` file (``.safetensors`` preferred; ``.bin``/``.pth`` state dicts) or a folder
   holding ``model.safetensors`` / ``pytorch_model.bin``;
2. a local weights folder — ``cache_dir`` or ``$HISHRST_WEIGHTS_DIR`` — holding
   ``<dir>/<name>/model.safetensors`` or ``<dir>/<name>/pytorch_model.bin``; then the Hugging Face
   hub cache (``huggingface_hub.try_to_load_from_cache``);
3. a download with ``huggingface_hub.hf_hub_download``, authenticated by whatever huggingface_hub finds
   (``HF_TOKEN`` or ``huggingface-cli login``); this module never takes or logs a token.

Offline (``HF_HUB_OFFLINE=1``), with the hub unreachable (a TCP probe of :data:`HUB_PROBE_TIMEOUT_S`
seconds is made first, because huggingface_hub otherwise retries for a long time) or without access to
the gated repository, a :class:`WeightsError` explains how to request access, log in, or pass a local
file. Nothing touches the network at import time, and this module needs no torch.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from hishrst_runtime.core.errors import EnvironmentProblem
from hishrst_train.encoders.registry import EncoderSpec

__all__ = ["WEIGHTS_DIR_ENV", "HUB_PROBE_TIMEOUT_S", "HUB_ETAG_TIMEOUT_S", "WeightsError", "resolve_weights"]

#: Environment variable naming a local weights folder (``<dir>/<encoder name>/model.safetensors``).
WEIGHTS_DIR_ENV = "HISHRST_WEIGHTS_DIR"
#: Seconds allowed for the TCP probe of the hub (or proxy) before a download is attempted.
HUB_PROBE_TIMEOUT_S = 3.0
#: Seconds huggingface_hub may wait for the metadata (HEAD) request of a download.
HUB_ETAG_TIMEOUT_S = 10.0
_LOCAL_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class WeightsError(EnvironmentProblem):
    """Encoder weights could not be found, downloaded or loaded; the message says what to do."""


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

    for filename in dict.fromkeys((spec.weights_filename, *_LOCAL_FILENAMES)):
        hit = try_to_load_from_cache(spec.hf_repo, filename)
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    return None


def _download_first(spec: EncoderSpec, hf_hub_download: Any) -> Path:
    """Download the first of the spec's file, ``model.safetensors`` and ``pytorch_model.bin`` the repository has."""
    from huggingface_hub.errors import EntryNotFoundError

    names = list(dict.fromkeys((spec.weights_filename, *_LOCAL_FILENAMES)))
    for i, name in enumerate(names):
        try:
            return Path(hf_hub_download(spec.hf_repo, name, etag_timeout=HUB_ETAG_TIMEOUT_S))
        except EntryNotFoundError:
            if i == len(names) - 1:
                raise
    raise AssertionError("unreachable")


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
        return _download_first(spec, hf_hub_download)
    except GatedRepoError as e:
        raise WeightsError(_access_help(spec, "access denied — your account has no access to this gated "
                                              "repository yet, or you are not logged in")) from e
    except RepositoryNotFoundError as e:
        raise WeightsError(_access_help(spec, "repository not found or not authorised (not logged in?)")) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise WeightsError(_access_help(spec, f"download failed ({type(e).__name__}: {e})")) from e


def _local_dir_weights(spec: EncoderSpec) -> Path:
    """The weights file of a local timm folder (``timm:FOLDER``)."""
    folder = Path(str(spec.local_dir))
    hit = _find_local(folder, spec, flat=True)
    if hit is None:
        raise WeightsError(f"{folder}: holds none of {', '.join(_LOCAL_FILENAMES)} for encoder {spec.name!r}; put the "
                           "weights beside config.json or pass --weights FILE")
    return hit


def resolve_weights(
    spec: EncoderSpec,
    *,
    weights: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> Path | None:
    """Path of the weights file for ``spec`` (see the module docstring for the order), or ``None``.

    ``None`` means "use the built-in seeded random weights" and is only returned for test encoders
    (``spec.test_only``); any other encoder without weights is a :class:`WeightsError`. Raises :class:`WeightsError` when an explicit ``weights`` path does not exist, or when a
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
    if spec.local_dir is not None:
        return _local_dir_weights(spec)
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
        if spec.test_only:
            return None  # the built-in seeded random weights of a test encoder
        where = "" if ":" in spec.name else f" (or place it at ${WEIGHTS_DIR_ENV}/{spec.name}/model.safetensors)"
        raise WeightsError(f"encoder {spec.name!r} has no weights to download; pass the weights file with "
                           f"--weights FILE{where}")
    if not download:
        raise WeightsError(_access_help(spec, f"no local copy was found ({'; '.join(looked)}) and downloading "
                                              "is disabled"))
    return _download(spec, "; ".join(looked))
