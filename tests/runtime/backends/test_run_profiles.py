"""TensorRT profiles follow the run's batch size (hishrst_runtime.inference.engines._profile)."""

from __future__ import annotations

from types import SimpleNamespace

from hishrst_runtime.inference.engines import _profile


def _spec(subspot: bool, max_batch: int = 64) -> SimpleNamespace:
    return SimpleNamespace(subspot=subspot, max_batch=max_batch)


def test_encoder_profile_is_the_runs_batch_capped_by_the_bundle() -> None:
    assert _profile(_spec(False), "encoder", 32) == (32, 32)
    assert _profile(_spec(False), "encoder", 256) == (64, 64)  # the bundle's engines take at most 64
    assert _profile(_spec(False), "encoder", None) == (64, 64)


def test_subspot_head_takes_the_encoders_batches_and_spot_head_its_groups() -> None:
    assert _profile(_spec(True), "head", 16) == (16, 16)
    assert _profile(_spec(False), "head", 16) == (64, 8)
