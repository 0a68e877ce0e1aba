"""Shared pytest configuration: a deterministic hypothesis profile and float64 helpers."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ddnlib",
    deadline=None,
    max_examples=25,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ddnlib")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
