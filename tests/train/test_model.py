"""HisHRST module: shapes, masking, continuous positions, reference-import parity, defaults, output folding."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from hishrst_train.model import HisHRST, HisHRSTConfig, import_reference_state_dict  # noqa: E402


class _RefHistoSGE(nn.Module):
    """Independent re-implementation of the reference forward (lucidrains-style transformer, einsum).

    Parameter names follow the reference checkpoint layout; the code is written from the published
    architecture, not shared with hishrst_train.model.
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, n_genes: int) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.x_embed = nn.Embedding(512, dim)
        self.y_embed = nn.Embedding(512, dim)
        layers = []
        for _ in range(depth):
            attn = nn.Module()
            attn.norm = nn.LayerNorm(dim)
            attn.fn = nn.Module()
            attn.fn.to_qkv = nn.Linear(dim, inner * 3, bias=False)
            attn.fn.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))
            ff = nn.Module()
            ff.norm = nn.LayerNorm(dim)
            ff.fn = nn.Module()
            ff.fn.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0))
            layers.append(nn.ModuleList([attn, ff]))
        self.trans = nn.Module()
        self.trans.layers = nn.ModuleList(layers)
        self.gene_head = nn.Sequential(nn.Linear(dim, 2048), nn.ReLU(), nn.LayerNorm(2048), nn.Linear(2048, n_genes))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, image, centers):
        x = image + self.x_embed(centers[:, :, 0].long()) + self.y_embed(centers[:, :, 1].long())
        b, n, _ = x.shape
        for attn, ff in self.trans.layers:
            y = attn.norm(x)
            q, k, v = attn.fn.to_qkv(y).chunk(3, dim=-1)
            q, k, v = (t.reshape(b, n, self.heads, self.dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
            dots = torch.einsum("bhid,bhjd->bhij", q, k) * self.dim_head**-0.5
            out = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v)
            x = attn.fn.to_out(out.permute(0, 2, 1, 3).reshape(b, n, -1)) + x
            x = ff.fn.net(ff.norm(x)) + x
        h = x
        return h, torch.relu(self.gene_head(h))


def test_reference_import_parity():
    torch.manual_seed(0)
    ref = _RefHistoSGE(dim=96, depth=2, heads=4, dim_head=64, n_genes=37).eval()
    # Non-trivial LayerNorm parameters so that a mis-mapped norm cannot pass.
    for m in ref.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, 1.0, 0.2)
            nn.init.normal_(m.bias, 0.0, 0.2)
    model = import_reference_state_dict(ref.state_dict()).eval()
    feats = torch.randn(3, 50, 96)
    centers = torch.randint(0, 120, (3, 50, 2)).float() + 0.4  # fractional: both truncate with .long()
    with torch.no_grad():
        _, want = ref(feats, centers)
        got = model(feats, centers)
    assert model.config.depth == 2 and model.config.n_genes == 37
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_import_rejects_foreign_state_dict():
    with pytest.raises(KeyError, match="not a HisHRST reference"):
        import_reference_state_dict({"fc.weight": torch.zeros(2, 2)})


def test_forward_shapes_and_relu():
    model = HisHRST(feature_dim=32, n_genes=11).eval()
    out = model(torch.randn(2, 7, 32), torch.rand(2, 7, 2) * 5000)
    assert out.shape == (2, 7, 11)
    assert (out >= 0).all()


def test_mask_isolates_padding():
    torch.manual_seed(1)
    model = HisHRST(feature_dim=32, n_genes=5).eval()
    feats, pos = torch.randn(1, 6, 32), torch.rand(1, 6, 2) * 1000
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    padded_garbage = feats.clone()
    padded_garbage[:, 4:] = 1e3
    with torch.no_grad():
        a = model(feats, pos, mask)[:, :4]
        b = model(padded_garbage, pos, mask)[:, :4]
        c = model(feats[:, :4], pos[:, :4])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_continuous_positions_do_not_collapse_fractions():
    torch.manual_seed(2)
    cont = HisHRST(feature_dim=16, n_genes=3, position_mode="continuous").eval()
    grid = HisHRST(feature_dim=16, n_genes=3, position_mode="grid").eval()
    p = torch.tensor([[[10.0, 20.0]]])
    q = torch.tensor([[[10.5, 20.5]]])  # a denser grid's half-step
    with torch.no_grad():
        assert not torch.allclose(cont.pos(p), cont.pos(q))
        assert torch.equal(grid.pos(p), grid.pos(q))  # the reference's .long() collapses them


def test_config_round_trip():
    cfg = HisHRSTConfig(feature_dim=8, n_genes=3, position_mode="grid")
    assert HisHRSTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="position_mode"):
        HisHRST(feature_dim=8, n_genes=3, position_mode="polar")


def test_default_position_mode_is_the_shared_default():
    from hishrst_runtime.core.vocab import DEFAULT_POSITION_MODE

    assert HisHRSTConfig().position_mode == DEFAULT_POSITION_MODE == "relative"
    assert HisHRST(feature_dim=8, n_genes=3).pos.__class__.__name__ == "RelativePosition"


def test_reference_import_keeps_the_reference_head_width():
    torch.manual_seed(3)
    ref = _RefHistoSGE(dim=32, depth=1, heads=4, dim_head=8, n_genes=5)
    model = import_reference_state_dict(ref.state_dict())
    assert model.config.head_hidden == 2048 and model.output_affine is None
    assert set(model.state_dict()) == {"pos." + k if k.startswith(("x_", "y_")) else k
                                       for k in ref.state_dict() if not k.startswith("layer_norm.")} | {"feat_mean", "feat_std"}


def test_fold_output_affine_keeps_predictions_and_state_dict_layout():
    torch.manual_seed(4)
    model = HisHRST(feature_dim=16, n_genes=6, head_hidden=32).eval()
    keys = set(model.state_dict())
    feats, pos = torch.randn(2, 9, 16), torch.rand(2, 9, 2) * 500
    model.output_affine = (torch.rand(6) + 0.5, torch.randn(6) + 2.0)
    with torch.no_grad():
        want = model(feats, pos)
        model.fold_output_affine()
        got = model(feats, pos)
    assert model.output_affine is None and set(model.state_dict()) == keys
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want > 0).any() and not torch.equal(want, torch.relu(want - 1))  # the affine was not a no-op


def test_global_feature_norm_keeps_relative_scales():
    model = HisHRST(feature_dim=3, n_genes=2)
    f = torch.randn(500, 3) * torch.tensor([1.0, 10.0, 0.01])
    model.set_feature_stats(f, per_dimension=False)
    assert torch.allclose(model.feat_std, model.feat_std[0].expand(3))
    model.set_feature_stats(f)
    torch.testing.assert_close(model.feat_std, f.std(0))
