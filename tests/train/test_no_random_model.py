"""No silent random model: fit defaults to a real encoder, test encoders need --allow-test-encoder, and any
bundle made from one says so (manifest ``encoder.test_encoder``, ``BundleSpec.test_encoder``, a warning).
Also ``--threads``. No network: ``HF_HUB_OFFLINE=1`` and an empty Hugging Face cache."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from hishrst_train import cli  # noqa: E402
from tests.train.cli_helpers import invoke, one_line_error  # noqa: E402
from hishrst_train.encoders.registry import (  # noqa: E402
    DEFAULT_ENCODER,
    ENCODERS,
    TEST_ENCODER_NAMES,
    TestEncoderError as RefusedEncoderError,
)

FAST = ["--epochs", "1", "--no-progress", "--device", "cpu", "--task", "full", "--val-frac", "0"]


@pytest.fixture(autouse=True)
def no_weights(tmp_path_factory, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HISHRST_WEIGHTS_DIR", raising=False)






def test_registry_marks_test_encoders_and_defaults_to_uni():
    assert DEFAULT_ENCODER == "uni" and not ENCODERS["uni"].test_only
    assert set(TEST_ENCODER_NAMES) == {"test-vit", "test-vit-uni"}
    assert all(ENCODERS[n].test_only for n in TEST_ENCODER_NAMES)


def test_fit_without_encoder_uses_uni_and_fails_in_one_line_without_weights(small_section, tmp_path):
    r = invoke(cli.fit, [small_section, "--out", tmp_path / "r", "--threads", "1", *FAST])
    line = one_line_error(r, "'uni'", "MahmoodLab/UNI", "--weights")
    assert "offline" in line and not (tmp_path / "r").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("command", ["fit", "cv"])
def test_test_encoder_refused_without_flag(command, small_section, tmp_path):
    data = [small_section] * (2 if command == "cv" else 1)
    r = invoke(getattr(cli, command), [*data, "--out", tmp_path / "r", "--encoder", "test-vit", *FAST[:5]])
    one_line_error(r, "--encoder test-vit", "randomly initialised", "--allow-test-encoder")
    assert not (tmp_path / "r").exists()


def test_fit_run_api_refuses_test_encoder(small_section, tmp_path):
    from hishrst_train.tasks import fit_run

    with pytest.raises(RefusedEncoderError, match="--allow-test-encoder"):
        fit_run(small_section, out=tmp_path / "r", encoder="test-vit", epochs=1)
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_a_test_encoder_run_without_flag(small_run):
    r = invoke(cli.evaluate, [small_run, "--no-ssim", "--no-ari"])
    one_line_error(r, str(small_run), "test-vit", "--allow-test-encoder")
    r = invoke(cli.evaluate, [small_run, "--no-ssim", "--no-ari", "--allow-test-encoder", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "threads: 1" in r.output
    for row in ("model", "training mean", "ridge (embeddings)", "kNN (positions)"):  # baselines on the console
        assert f"\n{row} " in r.output, r.output


def test_bundle_of_a_test_encoder_says_so(small_run, small_bundle, tmp_path):
    from hishrst_export.bundle import export_bundle
    from hishrst_export.cli import format_summary
    from hishrst_runtime.bundle.manifest import load_bundle
    from hishrst_runtime.bundle.spec import build_spec

    m = json.loads((small_bundle / "manifest.json").read_text())
    assert m["encoder"]["test_encoder"] is True and m["encoder"]["pooling"] == "cls"
    spec = load_bundle(small_bundle).spec
    assert spec.test_encoder is True and spec.encoder.test_encoder is True
    assert any("TEST ENCODER" in line for line in format_summary(m, small_bundle))
    older = {k: v for k, v in m.items()}
    older["encoder"] = {k: v for k, v in m["encoder"].items() if k not in ("test_encoder", "pooling")}
    assert build_spec(older).test_encoder is False
    said: list[str] = []
    export_bundle(small_run, out=tmp_path / "b", echo=said.append)
    assert any("test encoder" in s and "test_encoder" in s for s in said)


def test_threads_option_and_environment(monkeypatch):
    n = cli.use_threads(2)
    assert n == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("HISHRST_THREADS", "1")
    assert cli.use_threads(None) == 1 and torch.get_num_threads() == 1
    r = invoke(cli.fit, ["x", "--out", "y", "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output
