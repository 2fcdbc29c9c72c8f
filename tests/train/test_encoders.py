"""Tests of hishrst_train.encoders: registry, test encoder, weight files, offline errors, fingerprints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from safetensors.torch import save_file  # noqa: E402

import hishrst_train.encoders.weights  # noqa: E402
from hishrst_train import encoders as enc  # noqa: E402
from hishrst_train.encoders import (  # noqa: E402
    ENCODERS,
    EncoderModule,
    WeightsError,
    build_backbone,
    encoder_fingerprint,
    get_encoder_spec,
    load_encoder,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def isolated_hub(tmp_path, monkeypatch):
    """No local weights anywhere: empty HF cache, no $HISHRST_WEIGHTS_DIR, hub offline flags cleared."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for var in ("HISHRST_WEIGHTS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _textures() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    noise = (rng.random((1, 64, 64, 3)) * 255).astype(np.uint8)
    xx = np.mgrid[:64, :64][1]
    stripes = np.where(np.sin(xx / 2.0) > 0, 230, 30).astype(np.uint8)
    stripes = np.repeat(stripes[None, :, :, None], 3, axis=3)
    return torch.from_numpy(noise), torch.from_numpy(stripes)


def _perturbed_state_dict(encoder: EncoderModule, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in encoder.backbone.state_dict().items()}


# ----------------------------------------------------------------------------------------------- registry


def test_registry_lookup_and_unknown_name():
    uni = get_encoder_spec("uni")
    assert (uni.arch, uni.hf_repo, uni.weights_filename, uni.feature_dim) == (
        "vit_large_patch16_224", "MahmoodLab/UNI", "pytorch_model.bin", 1024)
    assert uni.gated and uni.license == "CC-BY-NC-ND-4.0" and uni.input_size == 224
    assert uni.timm_kwargs["init_values"] == 1e-5 and uni.timm_kwargs["dynamic_img_size"] is True
    uni2 = get_encoder_spec("uni2-h")
    assert (uni2.hf_repo, uni2.feature_dim, uni2.timm_kwargs["reg_tokens"]) == ("MahmoodLab/UNI2-h", 1536, 8)
    assert get_encoder_spec("test-vit").hf_repo is None
    assert json.loads(json.dumps(uni2.to_dict()))["timm_kwargs"]["mlp_layer"] == "SwiGLUPacked"
    with pytest.raises(KeyError) as info:
        get_encoder_spec("unii")
    for name in ENCODERS:
        assert name in str(info.value)


@pytest.mark.parametrize("name, n_params_m", [("uni", 303.35), ("uni2-h", 681.39)])
def test_real_architectures_build_on_meta(name, n_params_m):
    """The registered kwargs build the published architectures (parameter counts of the model cards)."""
    spec = get_encoder_spec(name)
    model = build_backbone(spec, device="meta")
    assert model.num_features == spec.feature_dim
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(n_params_m, abs=0.01)
    assert "blocks.0.ls1.gamma" in model.state_dict()  # LayerScale present (init_values), as in the checkpoints


# ------------------------------------------------------------------------------------------- test encoder


def test_test_encoder_contract_deterministic_and_input_dependent():
    e1, e2 = load_encoder("test-vit"), load_encoder("test-vit")
    assert isinstance(e1, EncoderModule) and (e1.input_size, e1.feature_dim) == (64, 64)
    assert not any(p.requires_grad for p in e1.parameters())
    e1.train()
    assert not e1.training and not e1.backbone.training
    noise, stripes = _textures()
    f_noise, f_stripes = e1(noise), e1(stripes)
    assert f_noise.dtype == torch.float32 and f_noise.shape == (1, 64)
    assert torch.equal(f_noise, e2(noise))  # same seed → same weights → identical features
    assert encoder_fingerprint(e1) == encoder_fingerprint(e2)
    rel = (f_noise - f_stripes).norm() / f_noise.norm()
    assert rel > 0.1, f"features barely depend on the image (relative difference {rel:.3g})"
    with pytest.raises(TypeError, match="uint8"):
        e1(noise.float())


def test_test_vit_uni_has_unis_token_geometry_and_is_a_test_encoder():
    from hishrst_runtime.core.errors import InputError
    from hishrst_train.encoders.registry import TEST_ENCODER_NAMES, TestEncoderError, check_encoder_allowed

    s, uni = get_encoder_spec("test-vit-uni"), get_encoder_spec("uni")
    assert s.test_only and s.hf_repo is None and "test-vit-uni" in TEST_ENCODER_NAMES
    assert (s.input_size, s.patch_size, s.token_grid, s.prefix_tokens, s.mean, s.std, s.pooling) == (
        uni.input_size, uni.patch_size, uni.token_grid, uni.prefix_tokens, uni.mean, uni.std, uni.pooling)
    assert s.token_geometry() == uni.token_geometry() and s.token_geometry().encoder_mpp == 0.5
    assert s.token_geometry(pitch_um=16.0, margin=1).tile_um == 224.0
    with pytest.raises(TestEncoderError, match="--allow-test-encoder"):
        check_encoder_allowed("test-vit-uni", allow_test_encoder=False)
    check_encoder_allowed("test-vit-uni", allow_test_encoder=True)
    with pytest.raises(InputError, match="margin"):  # test-vit's 4 × 4 tokens leave none inside a 2-token margin
        get_encoder_spec("test-vit").token_geometry()
    e1, e2 = load_encoder("test-vit-uni"), load_encoder("test-vit-uni")
    assert encoder_fingerprint(e1) == encoder_fingerprint(e2) != encoder_fingerprint(load_encoder("test-vit"))


@pytest.mark.parametrize("name", ["test-vit", "test-vit-uni"])
def test_forward_tokens_matches_forward_bit_for_bit(name):
    """One forward_features pass gives both outputs: the features are exactly ``forward``'s (cls pooling goes
    through forward_head, as ``backbone(x)`` does), the tokens are the normed patch tokens in grid order."""
    e = load_encoder(name)
    rows, cols = e.spec.token_grid
    t = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, e.input_size, e.input_size, 3), dtype=np.uint8))
    with torch.no_grad():
        feats, tokens = e.forward_tokens(t)
        x = ((t.float() / 255 - e.mean) / e.std).permute(0, 3, 1, 2)
        normed = e.backbone.forward_features(x)
        assert torch.equal(feats, e(t)) and torch.equal(feats, e.backbone(x))
    assert tokens.shape == (3, rows, cols, 64) and tokens.dtype == torch.float32
    assert torch.equal(tokens.reshape(3, rows * cols, 64), normed[:, 1:])
    assert torch.equal(tokens[:, rows - 1, 0], normed[:, 1 + (rows - 1) * cols])
    with pytest.raises(TypeError, match="uint8"):
        e.forward_tokens(t.float())


def test_forward_normalises_inside_module():
    """forward == backbone((x/255 - mean)/std in NCHW): the preprocessing lives in the module (ONNX-able)."""
    e = load_encoder("test-vit")
    noise, _ = _textures()
    mean = torch.tensor(e.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(e.spec.std).view(1, 3, 1, 1)
    ref = e.backbone((noise.permute(0, 3, 1, 2).float() / 255 - mean) / std)
    torch.testing.assert_close(e(noise), ref)


def test_set_fused_attn_keeps_outputs():
    e = load_encoder("test-vit")
    noise, _ = _textures()
    fused = e(noise)
    assert e.set_fused_attn(False) == 2
    assert all(not m.fused_attn for m in e.modules() if hasattr(m, "fused_attn"))
    torch.testing.assert_close(e(noise), fused, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_explicit_weights_round_trip(tmp_path, fmt):
    base = load_encoder("test-vit")
    sd = _perturbed_state_dict(base)
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    loaded = load_encoder("test-vit", weights=path)
    got = loaded.backbone.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert not any(p.requires_grad for p in loaded.parameters())
    noise, _ = _textures()
    assert not torch.allclose(loaded(noise), base(noise))
    assert encoder_fingerprint(loaded) != encoder_fingerprint(base)


def test_weights_dir_lookup(tmp_path, monkeypatch):
    sd = _perturbed_state_dict(load_encoder("test-vit"), seed=3)
    (tmp_path / "test-vit").mkdir()
    save_file(sd, str(tmp_path / "test-vit" / "model.safetensors"))
    via_arg = load_encoder("test-vit", cache_dir=tmp_path)
    monkeypatch.setenv("HISHRST_WEIGHTS_DIR", str(tmp_path))
    via_env = load_encoder("test-vit")
    for e in (via_arg, via_env):
        assert torch.equal(e.backbone.state_dict()["cls_token"], sd["cls_token"])


def test_wrong_architecture_weights_name_the_file(tmp_path):
    other = build_backbone(get_encoder_spec("test-vit"))
    sd = {k: v for k, v in other.state_dict().items() if not k.startswith("blocks.1.")}  # a 1-block model
    sd["pos_embed"] = torch.zeros(1, 5, 64)
    path = tmp_path / "someone_elses_model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError) as info:
        load_encoder("test-vit", weights=path)
    msg = str(info.value)
    assert str(path) in msg and "missing keys" in msg and "pos_embed" in msg and "test-vit" in msg


def test_whole_module_pickle_and_missing_file_are_refused(tmp_path):
    path = tmp_path / "whole_module.pth"
    torch.save(build_backbone(get_encoder_spec("test-vit")), path)
    with pytest.raises(WeightsError, match="not a plain state dict") as info:
        load_encoder("test-vit", weights=path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError, match="not found"):
        load_encoder("test-vit", weights=tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------ hub / offline errors


def _assert_access_help(msg: str, repo: str) -> None:
    for needle in (repo, f"https://huggingface.co/{repo}", "CC-BY-NC-ND-4.0", "huggingface-cli login",
                   "HF_TOKEN", "--weights", "HISHRST_WEIGHTS_DIR"):
        assert needle in msg, f"{needle!r} missing from: {msg}"


def test_offline_env_gives_weights_error_fast(isolated_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*a, **k):
        raise AssertionError("hf_hub_download must not be called offline")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_download)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        load_encoder("uni")
    assert time.perf_counter() - t0 < 5.0
    _assert_access_help(str(info.value), "MahmoodLab/UNI")
    assert "offline" in str(info.value)


def test_unreachable_hub_gives_weights_error_fast(isolated_hub, monkeypatch):
    """No env var: the network is down (every connect fails) → error in < 5 s, no 25 s of hub retries."""

    def refuse(*a, **k):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        load_encoder("uni2-h")
    assert time.perf_counter() - t0 < 5.0
    _assert_access_help(str(info.value), "MahmoodLab/UNI2-h")
    assert "unreachable" in str(info.value)


def test_gated_access_denied_message(isolated_hub, monkeypatch):
    from huggingface_hub.errors import GatedRepoError

    def gated(*a, **k):
        err = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(err, "401 Client Error: access to model MahmoodLab/UNI is restricted")
        raise err

    monkeypatch.setattr(enc.weights, "_hub_reachable", lambda timeout=3.0: (True, "huggingface.co:443"))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", gated)
    with pytest.raises(WeightsError, match="access denied") as info:
        load_encoder("uni")
    assert isinstance(info.value.__cause__, GatedRepoError)
    _assert_access_help(str(info.value), "MahmoodLab/UNI")


def test_no_network_access_at_import():
    code = textwrap.dedent(
        """
        import socket
        def boom(*a, **k):
            raise RuntimeError("network used at import time")
        socket.socket.connect = boom
        socket.create_connection = boom
        socket.getaddrinfo = boom
        import hishrst_train.encoders, hishrst_train.features
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


# --------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_tracks_in_place_weight_changes():
    e = load_encoder("test-vit")
    fp = encoder_fingerprint(e)
    assert len(fp) == 16 and encoder_fingerprint(e) == fp
    with torch.no_grad():
        e.backbone.blocks[0].attn.qkv.weight[0, 0] += 1.0
    assert encoder_fingerprint(e) != fp
