"""The fused (torch.compile) Newton path of convex robust pooling: equal to eager, the automatic
choice never compiles for ordinary inputs, a failing compile falls back to eager with a warning."""

from __future__ import annotations

import shutil

import pytest
import torch

from ddnlib.nodes import PENALTIES, RobustGlobalPool1d, robust_global_pool
from ddnlib.nodes import pooling_fused


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_fused_equals_eager_values_and_gradients():
    """One dtype only: compiling takes seconds (float32 is compared in the benchmark run)."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g, dtype=dtype)
    x[0, 0, :4] = 30.0  # outliers
    results = []
    for fused in (True, False):
        pool = RobustGlobalPool1d("pseudo_huber", c=0.7, learn_c=True, fused=fused).to(dtype)
        xg = x.clone().requires_grad_()
        y = pool(xg)
        grads = torch.autograd.grad(y.square().sum(), [xg, *pool.parameters()])
        results.append((y.detach(), *grads))
    for fused, eager in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-12, atol=1e-12)


def test_automatic_choice_never_compiles_small_inputs(monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", no_compile)
    pooling_fused._compiled.clear()
    x = torch.randn(2, 3, 50)
    for _ in range(6):
        robust_global_pool(x, "pseudo_huber")
    assert not pooling_fused.want_fused(None, PENALTIES["pseudo_huber"], True, 1 << 20)
    assert not pooling_fused.want_fused(None, PENALTIES["welsch"], False, 1 << 30)
    assert pooling_fused.want_fused(True, PENALTIES["huber"], True, 10)
    with pytest.raises(TypeError, match="fused="):
        RobustGlobalPool1d(fused="yes")


def test_failing_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(pooling_fused, "_compiled",
                        {f"huber:{kind}": broken for kind in pooling_fused._KINDS})
    monkeypatch.setattr(pooling_fused, "_failed", set())
    x = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        y = robust_global_pool(x, "huber", fused=True)
    torch.testing.assert_close(y, robust_global_pool(x, "huber", fused=False))
    assert "huber" in pooling_fused._failed
