"""Slow: ONNX export of the full UNI architecture (ViT-L/16, 224 px, ≈ 303M parameters, ≈ 1.2 GB fp32).

Random weights (``load_encoder("uni", random_init=True)``): the gated checkpoint is not needed to
check that the real architecture exports and matches PyTorch. Several minutes on a 2-core CPU and
≈ 6 GB of RAM; deselected by the default ``pytest -m "not slow and not gpu"``. Run with
``pytest -m slow tests/test_export_uni.py -s`` to see the measured figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("timm")

from hishrst_export.onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    PARITY_TOLERANCE,
    encoder_parity,
    export_encoder_onnx,
    external_data_files,
)

from hishrst_train.encoders import load_encoder

pytestmark = pytest.mark.slow


def _real_tiles(outs: Path, n: int, size: int) -> np.ndarray:
    """``n`` tiles of 64 µm around in-tissue spots of the synthetic section, resized to ``size`` px."""
    from hishrst_runtime.core.patches import cut_patches, patch_side_px
    from hishrst_train.data import open_fullres_image
    from hishrst_train.tasks import load_section

    adata = load_section(outs)
    img = open_fullres_image(adata.uns["hishrst"]["fullres_image"])
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:: max(1, adata.n_obs // n)][:n]
    side = patch_side_px(64.0, float(adata.uns["hishrst"]["mpp"]))
    return cut_patches(img, xy, side=side, out_size=size)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_uni_export_parity(small_section: Path, tmp_path: Path, precision: str) -> None:
    encoder = load_encoder("uni", random_init=True)
    n_params = sum(p.numel() for p in encoder.parameters())
    assert encoder.input_size == 224 and encoder.feature_dim == 1024 and 3.0e8 < n_params < 3.1e8
    t0 = time.perf_counter()
    path = export_encoder_onnx(encoder, tmp_path / "encoder.onnx", precision=precision)  # type: ignore[arg-type]
    t_export = time.perf_counter() - t0
    size = path.stat().st_size
    # ≈ 1.2 GB fp32 stays below the external-data threshold (UNI2-h, ≈ 2.7 GB, would not)
    assert external_data_files(path) == [] and size < EXTERNAL_DATA_THRESHOLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx"]
    onnx.checker.check_model(str(path))
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [224, 224, 3]

    rng = np.random.default_rng(0)
    tiles = {"random": rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8),
             "real": _real_tiles(small_section, 4, 224)}
    t0 = time.perf_counter()
    report = encoder_parity(encoder, path, tiles=tiles, precision=precision, batch_sizes=(1, 4))  # type: ignore[arg-type]
    t_parity = time.perf_counter() - t0
    tol = PARITY_TOLERANCE[precision]
    for r in report.values():
        assert r["passed"] and r["scaled_max_abs"] <= tol["scaled_max_abs"] and r["min_gene_pcc"] >= tol["min_gene_pcc"]
    print("\nUNI", precision, json.dumps({"params": n_params, "onnx_bytes": size, "export_s": round(t_export, 1),
                                          "parity_s": round(t_parity, 1), "parity": report}, indent=1))
