"""Shared session-scoped fixtures: a synthetic section, a small fitted run and its exported bundle.

All three are built once per test session under ``tmp_path_factory`` and must be treated as
read-only by tests (copy them — e.g. ``shutil.copytree`` — before modifying anything). torch, timm and
the training stack are imported lazily inside the fixtures, so collecting torch-free tests does not
import them.

* ``small_section``: ``outs`` directory of ``make_synthetic_visium(preset="small", seed=0)``
  (≈ 230 spots in tissue, 300 genes, 0.6 µm/px; ~3 s).
* ``small_run``: a recovery ``fit_run`` on it with the ``test-vit`` encoder, :data:`SMALL_RUN_EPOCHS`
  epochs (~10 s on 2 cores; torch is limited to one thread while it trains, which is much faster on
  a shared machine).
* ``small_bundle``: ``export_bundle(small_run)`` in fp32 (~5 s), parity-checked.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["SMALL_RUN_EPOCHS", "torch_threads"]

#: Training epochs of the ``small_run`` fixture.
SMALL_RUN_EPOCHS = 40


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Limit torch's intra-op threads to ``n`` inside the block (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_section(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Space Ranger ``outs`` directory of the synthetic ``small`` preset (seed 0)."""
    pytest.importorskip("torch")
    from hishrst_train.synth import make_synthetic_visium

    return make_synthetic_visium(tmp_path_factory.mktemp("small_section"), preset="small", seed=0)


@pytest.fixture(scope="session")
def small_run(small_section: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run directory of a recovery fit (``test-vit`` encoder, :data:`SMALL_RUN_EPOCHS` epochs) on ``small_section``."""
    pytest.importorskip("timm")
    from hishrst_train.tasks import fit_run

    root = tmp_path_factory.mktemp("small_run")
    with torch_threads(1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="only .* genes available")  # the preset has 300 genes
        fit_run(small_section, out=root / "run", encoder="test-vit", allow_test_encoder=True, epochs=SMALL_RUN_EPOCHS,
                seed=0, progress=False, cache_dir=root / "cache")
    return root / "run"


@pytest.fixture(scope="session")
def small_bundle(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 model bundle exported from ``small_run`` (``encoder.onnx``, ``head.onnx``, ``manifest.json``)."""
    pytest.importorskip("onnx")
    from hishrst_export.bundle import export_bundle

    out = tmp_path_factory.mktemp("small_bundle") / "bundle"
    export_bundle(small_run, out=out, echo=lambda s: None)
    return out


@pytest.fixture(autouse=True)
def _restore_hishrst_loggers() -> Iterator[None]:
    """A CLI test configures the hishrst loggers (own handler, no propagation): put them back afterwards so a
    later test's ``caplog`` still sees their records, whatever the test order."""
    import logging

    from hishrst_runtime.cli.logs import LOGGERS

    saved = {n: (lg.handlers[:], lg.level, lg.propagate) for n in LOGGERS for lg in [logging.getLogger(n)]}
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
