"""Shared pytest configuration: a deterministic hypothesis profile and float64 helpers."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Derandomized: the same examples on every run, so that a run's verdict is the code's (CI runs on a
# clean clone and need not set CI=1). DDNLIB_EXPLORE=1 draws fresh examples, for hunting bugs.
settings.register_profile(
    "ddnlib",
    deadline=None,
    max_examples=25,
    derandomize=not os.environ.get("DDNLIB_EXPLORE"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ddnlib")

# `pytest -n 2` runs two workers on two cores: one intra-op thread each. Oversubscribed MKL/OpenMP
# threads make small LAPACK calls ~1000x slower (16 ms for a 3x3 Cholesky under load).
# Tests that need several threads (the batched-LU regression) use `threads(2)`.
torch.set_num_threads(1)


@pytest.fixture
def threads():
    """Run a block with ``n`` intra-op threads: ``with threads(2): ...``."""
    import contextlib

    @contextlib.contextmanager
    def use(n):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return use


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
