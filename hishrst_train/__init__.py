"""hishrst_train — data, preprocessing, encoders, features, the HisHRST model, training and evaluation.

Needs the ``[train]`` extra (torch, timm, scanpy, …). Heavy modules are imported on first use, so
``import hishrst_train`` is cheap and never touches the network.
"""

from __future__ import annotations

from hishrst_runtime.core.lazy import lazy_attributes


__all__ = [
    "HisHRST",
    "HisHRSTConfig",
    "import_reference_state_dict",
    "make_synthetic_visium",
    "read_visium",
    "read_h5ad_with_image",
    "select_hvgs",
    "normalize_log1p",
    "load_encoder",
    "extract_features",
    "train_model",
    "predict",
    "fit_run",
    "evaluate_run",
]

_WHERE = {
    "HisHRST": "model",
    "HisHRSTConfig": "model",
    "import_reference_state_dict": "model",
    "make_synthetic_visium": "synth",
    "read_visium": "data",
    "read_h5ad_with_image": "data",
    "select_hvgs": "preprocess",
    "normalize_log1p": "preprocess",
    "load_encoder": "encoders",
    "extract_features": "features",
    "train_model": "train",
    "predict": "train",
    "fit_run": "tasks",
    "evaluate_run": "evaluate",
}


__getattr__, __dir__ = lazy_attributes("hishrst_train", _WHERE, extra='train')
