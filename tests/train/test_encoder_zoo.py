"""The public encoders of the registry and the generic forms, without downloading anything.

Each registered entry is checked against a randomly initialised timm model of the same architecture: a
depth-reduced copy (same width, patch size, registers, pooling, norm and MLP kinds; one block) for the
token geometry, the output feature, the weight-file adapters, ONNX export and parity in the default suite
(entries 1536 wide and the full-size builds are ``slow``). The generic forms are tested with a small timm
ViT and local weights. ``HF_HUB_OFFLINE=1`` throughout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from safetensors.torch import save_file  # noqa: E402

from hishrst_runtime.core.errors import InputError  # noqa: E402
from hishrst_train.encoders.module import EncoderModule, build_backbone, load_encoder  # noqa: E402
from hishrst_train.encoders.registry import ENCODERS, UnknownEncoderError, get_encoder_spec  # noqa: E402
from hishrst_train.encoders.spec import EncoderSpec  # noqa: E402
from hishrst_train.encoders.weights import WeightsError  # noqa: E402

REAL = [n for n, s in ENCODERS.items() if not s.test_only]
#: (patch px, token grid, prefix tokens, pooling, feature dim) from each model card / TRIDENT (see zoo.py).
GEOMETRY = {
    "uni": (16, 14, 1, "cls", 1024), "uni2-h": (14, 16, 9, "cls", 1536), "conch-v1": (16, 28, 1, "cls", 768),
    "conch-v1.5": (16, 28, 1, "cls", 1024), "virchow2": (14, 16, 5, "cls+mean", 2560),
    "h-optimus-0": (14, 16, 5, "cls", 1536), "h-optimus-1": (14, 16, 5, "cls", 1536),
    "phikon-v2": (16, 14, 1, "cls", 1024), "gigapath": (16, 14, 1, "cls", 1536), "hibou-b": (14, 16, 5, "cls", 768),
    "hibou-l": (14, 16, 5, "cls", 1024),
}
#: Entries whose depth-1 ONNX export runs in the default suite, one per kind of graph: CLS ⊕ mean with
#: registers and SwiGLU (virchow2), registers without class position (hibou-b), plain ViT-L (phikon-v2 = uni);
#: every other entry's export is ``slow`` (the default suite stays fast on a shared 2-core machine).
FAST_EXPORT = ["virchow2", "hibou-b", "phikon-v2"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


_SMALL: dict[str, EncoderModule] = {}


def small(name: str) -> EncoderModule:
    """Depth-1 random copy of a registered encoder (cached for the module)."""
    if name not in _SMALL:
        _SMALL[name] = load_encoder(ENCODERS[name].with_depth(1), random_init=True)
    return _SMALL[name]


def tiles(spec: EncoderSpec, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, spec.input_size, spec.input_size, 3), dtype=np.uint8)


def test_every_real_entry_is_documented_and_needs_weights():
    assert set(REAL) == set(GEOMETRY)
    for name in REAL:
        s = ENCODERS[name]
        assert s.source and s.hf_repo and not s.test_only and s.license, name
        assert all(0 < m < 1 for m in s.mean) and all(0 < v < 1 for v in s.std), name
        assert json.loads(json.dumps(s.to_dict()))["name"] == name


@pytest.mark.parametrize("name", REAL)
def test_token_geometry_and_output(name):
    patch, grid, prefix, pooling, dim = GEOMETRY[name]
    s = ENCODERS[name]
    assert (s.patch_size, s.token_grid, s.prefix_tokens, s.pooling, s.feature_dim) == (patch, (grid, grid), prefix,
                                                                                       pooling, dim)
    enc = small(name)
    bb = enc.backbone
    assert tuple(bb.patch_embed.grid_size) == (grid, grid) and bb.num_prefix_tokens == prefix
    assert bb.num_features == s.width and len(bb.blocks) == 1
    with torch.no_grad():
        out = enc(torch.from_numpy(tiles(s)))
        tokens = bb.forward_features(enc_input(enc, tiles(s)))
    assert out.shape == (2, dim) and tokens.shape == (2, prefix + grid * grid, s.width)
    assert torch.allclose(out[:, : s.width], tokens[:, 0], atol=1e-5)
    if pooling == "cls+mean":  # registers excluded from the mean (Virchow2: output[:, 5:])
        assert torch.allclose(out[:, s.width:], tokens[:, prefix:].mean(1), atol=1e-5)


@pytest.mark.parametrize("name", REAL)
def test_forward_tokens_grid(name):
    """Patch tokens of every entry: [B, grid, grid, width], class token and registers removed, row-major;
    the features are bit-identical to ``forward``."""
    patch, grid, prefix, _, dim = GEOMETRY[name]
    s, enc = ENCODERS[name], small(name)
    t = tiles(s)
    with torch.no_grad():
        feats, tok = enc.forward_tokens(torch.from_numpy(t))
        want = enc.backbone.forward_features(enc_input(enc, t))
        out = enc(torch.from_numpy(t))
    assert feats.shape == (2, dim) and tok.shape == (2, grid, grid, s.width) and tok.dtype == torch.float32
    assert torch.equal(feats, out)
    assert torch.equal(tok[:, 1, 2], want[:, prefix + grid + 2]) and torch.equal(tok.reshape(2, -1, s.width),
                                                                                   want[:, prefix:])
    geom = s.token_geometry()
    assert geom.grid == (grid, grid) and geom.input_size == s.input_size and geom.patch_px == patch
    assert geom.tile_um == grid * 8.0


def enc_input(enc: EncoderModule, t: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(t).float() / 255.0
    return ((x - enc.mean) / enc.std).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", FAST_EXPORT)
def test_depth_reduced_onnx_export_and_parity(name, tmp_path):
    pytest.importorskip("onnxruntime")
    _export_and_check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in REAL if n not in FAST_EXPORT])
def test_depth_reduced_onnx_export_and_parity_others(name, tmp_path):
    pytest.importorskip("onnxruntime")
    _export_and_check(name, tmp_path)


def _export_and_check(name: str, tmp_path: Path) -> None:
    from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx

    enc = small(name)
    path = export_encoder_onnx(enc, tmp_path / "encoder.onnx")
    report = encoder_parity(enc, path, tiles={"random": tiles(enc.spec, 2, seed=1)}, batch_sizes=(1, 2))
    assert report["random"]["passed"] and report["random"]["n_tiles"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_full_size_random_build(name):
    s = ENCODERS[name]
    enc = EncoderModule(build_backbone(s), s)
    with torch.no_grad():
        out = enc(torch.from_numpy(tiles(s, 1)))
    assert out.shape == (1, s.feature_dim) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------- weight-file adapters


def _roundtrip(spec: EncoderSpec, sd: dict[str, torch.Tensor], tmp_path: Path, ref: EncoderModule) -> None:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_encoder(spec, weights=path)
    t = torch.from_numpy(tiles(spec, 2, seed=3))
    with torch.no_grad():
        assert torch.allclose(loaded(t), ref(t), atol=1e-5)


def test_trunk_prefix_is_selected(tmp_path):
    """CONCH v1: the vision trunk is ``visual.trunk.*`` of a larger checkpoint; the rest is ignored."""
    spec = ENCODERS["conch-v1"].with_depth(1)
    ref = small("conch-v1")
    sd = {f"visual.trunk.{k}": v for k, v in ref.backbone.state_dict().items()}
    sd["text.token_embedding.weight"] = torch.zeros(3, 4)
    _roundtrip(spec, sd, tmp_path, ref)
    with pytest.raises(WeightsError, match="visual.trunk"):
        _roundtrip(spec, {"x": torch.zeros(1)}, tmp_path, ref)


def test_position_embedding_of_another_grid_is_resampled(tmp_path):
    """CONCH v1.5 stores a 224 px (14×14) position embedding; the 448 px model has 28×28 patches."""
    from timm.layers import resample_abs_pos_embed

    spec = ENCODERS["conch-v1.5"].with_depth(1)
    ref = small("conch-v1.5")
    sd = {f"trunk.{k}": v for k, v in ref.backbone.state_dict().items()}
    sd["trunk.pos_embed"] = resample_abs_pos_embed(ref.backbone.pos_embed.detach(), new_size=[14, 14],
                                                   num_prefix_tokens=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_encoder(spec, weights=path)
    assert loaded.backbone.pos_embed.shape == ref.backbone.pos_embed.shape == (1, 1 + 28 * 28, 1024)


def _to_hf_dinov2(sd: dict[str, torch.Tensor], *, no_embed_class: bool) -> dict[str, torch.Tensor]:
    """timm → transformers Dinov2 names, written from transformers' modeling_dinov2 (the inverse mapping)."""
    out: dict[str, torch.Tensor] = {"embeddings.mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    pos = sd["pos_embed"]
    cls = sd["cls_token"]
    if no_embed_class:  # transformers keeps a class-token position; timm folds it into the class token
        cls_pos = torch.randn(1, 1, pos.shape[-1])
        pos, cls = torch.cat([cls_pos, pos], dim=1), cls - cls_pos
    out.update({"embeddings.cls_token": cls, "embeddings.position_embeddings": pos,
                "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
                "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
                "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    if "reg_token" in sd:
        out["embeddings.register_tokens"] = sd["reg_token"]
    swiglu = "blocks.0.mlp.norm.weight" in sd or sd["blocks.0.mlp.fc1.weight"].shape[0] != 4 * pos.shape[-1]
    names = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense",
             "mlp.fc1": "mlp.weights_in" if swiglu else "mlp.fc1", "mlp.fc2": "mlp.weights_out" if swiglu else "mlp.fc2"}
    for key, v in sd.items():
        if not key.startswith("blocks.0."):
            continue
        rest = key[len("blocks.0."):]
        if rest.startswith("attn.qkv."):
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"encoder.layer.0.attention.attention.{part}.{rest.split('.')[-1]}"] = t
        elif rest in ("ls1.gamma", "ls2.gamma"):
            out[f"encoder.layer.0.layer_scale{rest[2]}.lambda1"] = v
        else:
            mod, _, leaf = rest.rpartition(".")
            out[f"encoder.layer.0.{names[mod]}.{leaf}"] = v
    return out


@pytest.mark.parametrize("name", ["hibou-b", "phikon-v2"])
def test_transformers_dinov2_weights_are_converted(name, tmp_path):
    spec = ENCODERS[name].with_depth(1)
    ref = small(name)
    sd = _to_hf_dinov2(ref.backbone.state_dict(), no_embed_class=bool(ref.backbone.no_embed_class))
    _roundtrip(spec, sd, tmp_path, ref)


# --------------------------------------------------------------------------------- generic forms


def _timm_folder(tmp_path: Path, *, global_pool: str = "token") -> tuple[Path, EncoderModule]:
    args = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "global_pool": global_pool}
    cfg = {"architecture": "vit_tiny_patch16_224", "num_features": 32, "model_args": args,
           "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    folder = tmp_path / "my-vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    spec = get_encoder_spec(f"timm:{folder}")
    return folder, EncoderModule(model.eval(), spec)


def test_local_timm_folder_round_trip_and_onnx(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from hishrst_export.onnx_export import encoder_parity, export_encoder_onnx

    folder, ref = _timm_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    enc = load_encoder("timm:my-vit")
    assert enc.spec.name == f"timm:{folder.resolve()}" and enc.spec.local_dir == str(folder.resolve())
    assert (enc.input_size, enc.feature_dim, enc.spec.mean) == (32, 32, (0.5, 0.4, 0.3))
    t = tiles(enc.spec, 3)
    with torch.no_grad():
        assert torch.allclose(enc(torch.from_numpy(t)), ref(torch.from_numpy(t)), atol=1e-6)
    path = export_encoder_onnx(enc, tmp_path / "e.onnx")
    assert encoder_parity(enc, path, tiles={"random": t})["random"]["passed"]


def test_timm_arch_needs_weights_and_uses_them(tmp_path):
    folder, ref = _timm_folder(tmp_path)
    with pytest.raises(WeightsError, match="--weights"):
        load_encoder("timm:vit_tiny_patch16_224")
    spec = get_encoder_spec("timm:vit_tiny_patch16_224")
    assert spec.input_size == 224 and spec.feature_dim == 192 and spec.hf_repo is None and not spec.test_only


def test_hf_hub_form_reads_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    folder, ref = _timm_folder(tmp_path)
    cache = tmp_path / "hub"
    snap = cache / "models--lab--tiny-vit" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--lab--tiny-vit" / "refs").mkdir()
    (cache / "models--lab--tiny-vit" / "refs" / "main").write_text("abc123")
    for f in ("config.json", "model.safetensors"):
        (snap / f).write_bytes((folder / f).read_bytes())
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    enc = load_encoder("hf-hub:lab/tiny-vit")
    assert enc.spec.hf_repo == "lab/tiny-vit" and enc.input_size == 32
    t = torch.from_numpy(tiles(enc.spec, 2))
    with torch.no_grad():
        assert torch.allclose(enc(t), ref(t), atol=1e-6)
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        get_encoder_spec("hf-hub:lab/not-cached")


def test_generic_errors_are_one_line(tmp_path):
    cases = ["hf-hub:no-slash", f"timm:{tmp_path}", "timm:not_a_timm_model_xyz"]
    for name in cases:
        with pytest.raises(UnknownEncoderError) as info:
            get_encoder_spec(name)
        assert "\n" not in str(info.value) and name.split(":")[0] in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224",
                                                      "model_args": {"global_pool": ""}}))
    with pytest.raises(UnknownEncoderError, match="global_pool"):
        get_encoder_spec(f"timm:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_features": 192,
                                                      "model_args": {"depth": "many"}}))
    with pytest.raises(InputError, match="timm cannot build"):
        load_encoder(f"timm:{tmp_path}", random_init=True)
