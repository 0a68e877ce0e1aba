"""Robust global pooling: forward optimality against independent solvers, gradients against the
generic engine and finite differences, equivariance properties, parameters and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from ddnlib import DeclarativeNode, Options
from ddnlib.nodes import (PENALTIES, RobustGlobalPool1d, RobustGlobalPool2d, RobustPooling,
                          robust_global_pool)

ALPHA = {"general": 0.5}  # Barron's α for the tests that fix one (non-convex: the hard case)


# -- an independent reference: the formulas in numpy, a grid and Brent's method --------
def phi(name: str, z: np.ndarray, c: float, alpha: float = 1.0) -> np.ndarray:
    if name == "quadratic":
        return 0.5 * z**2
    if name == "pseudo_huber":
        return c**2 * (np.sqrt(1 + (z / c) ** 2) - 1)
    if name == "huber":
        return np.where(np.abs(z) <= c, 0.5 * z**2, c * (np.abs(z) - 0.5 * c))
    if name == "welsch":
        return 1 - np.exp(-(z**2) / (2 * c**2))
    if name == "truncated_quadratic":
        return np.where(np.abs(z) <= c, 0.5 * z**2, 0.5 * c**2)
    a = abs(alpha - 2)
    return a / alpha * (((z / c) ** 2 / a + 1) ** (alpha / 2) - 1)


def phi2(name: str, z: np.ndarray, c: float, alpha: float = 1.0) -> np.ndarray:
    """``φ″`` differentiated by hand from the table (Huber / truncated: the inlier side at ``c``)."""
    s = (z / c) ** 2
    if name == "quadratic":
        return np.ones_like(z)
    if name == "pseudo_huber":
        return (1 + s) ** -1.5
    if name in ("huber", "truncated_quadratic"):
        return (np.abs(z) <= c).astype(float)
    if name == "welsch":
        return np.exp(-s / 2) * (1 - s) / c**2
    q = s / abs(alpha - 2)
    return (1 + q) ** (alpha / 2 - 2) * (1 + (alpha - 1) * q) / c**2


def reference_argmin(name: str, x: np.ndarray, c: float, alpha: float) -> float:
    """Global minimiser: 40 points in each gap of the sorted data, then Brent on the best cell."""
    f = lambda u: phi(name, u - x, c, alpha).sum()  # noqa: E731
    s = np.unique(x)
    grid = np.unique(np.concatenate([np.linspace(lo, hi, 40) for lo, hi in zip(s[:-1], s[1:])]
                                    + [s]))
    values = np.array([f(u) for u in grid])
    k = int(values.argmin())
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    if hi <= lo:
        return float(grid[k])
    res = minimize_scalar(f, bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-13 * (1 + abs(grid[k]))})
    return float(res.x) if res.fun <= values[k] else float(grid[k])


def outlier_input(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(x.shape, generator=g) < 0.15
    x = torch.where(mask, x + 20 * torch.randn(x.shape, generator=g, dtype=torch.float64), x)
    x[0, 0, 0, 0], x[1, 2, 3, 3], x[2, 3, 5, 0] = 1e6, -1e6, 1e6
    return x


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", list(PENALTIES))
def test_matches_independent_reference(name, c):
    alpha = ALPHA.get(name, 1.0)
    x = outlier_input(int(10 * c)).requires_grad_()
    pool = RobustGlobalPool2d(name, c=c, alpha=alpha).double()
    y = pool(x)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, x, v)
    rows = x.detach().reshape(12, 36).numpy()
    for r, (row, y_r) in enumerate(zip(rows, y.detach().flatten().tolist())):
        y_ref = reference_argmin(name, row, c, alpha)
        f_ours = phi(name, y_r - row, c, alpha).sum()
        f_ref = phi(name, y_ref - row, c, alpha).sum()
        assert f_ours <= f_ref + 1e-10 * (1 + abs(f_ref)), (r, y_r, y_ref)
        w = phi2(name, y_ref - row, c, alpha)  # ∂y/∂x_i = φ″_i / Σ φ″ at the reference
        expected = v.flatten()[r].item() * w / w.sum()
        np.testing.assert_allclose(gx.reshape(12, 36)[r].numpy(), expected, atol=1e-5)


def _module(name, channels=3, learn=True):
    return RobustGlobalPool1d(name, c=torch.tensor([0.7, 1.0, 1.6]), learn_c=learn,
                              alpha=torch.tensor([0.6, 1.4, 2.5]), channels=channels,
                              learn_alpha=learn and name == "general").double()


def _gradcheck_input(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 7, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("name", list(PENALTIES))
def test_gradcheck_inputs_and_parameters(name):
    """Finite differences for ``x`` and every learnable parameter (per-channel ``c`` and ``α``).

    The random data keep every ``|y − x_i|`` away from ``c``, where Huber and the truncated
    quadratic are not differentiable.
    """
    pool = _module(name)
    params = [p for p in pool.parameters() if p.requires_grad]
    assert params
    names = [k for k, p in pool.named_parameters()]

    def f(x, *theta):
        swapped = dict(zip(names, theta))
        return torch.func.functional_call(pool, swapped, (x,))

    assert torch.autograd.gradcheck(f, (_gradcheck_input(), *params), atol=1e-6)


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 1.0, 1.9, 2.0, 2.1, 2.9])
def test_gradcheck_general_shape(alpha):
    """Barron's loss with scalar ``c`` and ``α`` as differentiable inputs, including ``α → 0`` and
    the limit ``α = 2`` (where ``∂y/∂α`` stays finite though ``∂φ/∂α`` diverges)."""
    x = _gradcheck_input(1)
    c = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    fn = lambda x, c, a: robust_global_pool(x, "general", c, a)  # noqa: E731
    if alpha == 2.0:  # finite differences straddle the limit: compare α-gradient both sides
        (g,) = torch.autograd.grad(fn(x, c, a).sum(), a)
        (lo,) = torch.autograd.grad(fn(x, c, a - 1e-7).sum(), a)
        assert torch.isfinite(g) and abs(g - lo) < 1e-4
        a = a.detach()
    assert torch.autograd.gradcheck(fn, (x, c, a), atol=1e-6)


@pytest.mark.parametrize("name", list(PENALTIES))
def test_closed_form_vjp_matches_generic_engine(name):
    node = RobustPooling(name)
    x = outlier_input(3).reshape(12, 36).requires_grad_()
    c = torch.full((12,), 1.3, dtype=torch.float64, requires_grad=True)
    a = torch.full((12,), ALPHA.get(name, 1.0), dtype=torch.float64, requires_grad=True)
    y = node(x, c, a).detach()
    v = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours, _ = node.vjp(x, c, a, y=y, v=v)
    generic, _ = DeclarativeNode.vjp(node, x, c, a, y=y, v=v)
    for got, want in zip(ours, generic):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name,alpha", [("welsch", 1.0), ("truncated_quadratic", 1.0),
                                        ("general", 0.3), ("general", 0.8)])
@pytest.mark.parametrize("seed", range(4))
def test_non_convex_global_minimum_against_grid(name, alpha, seed):
    """Two or three clusters of different sizes: a local method would often stop in the wrong one."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64)[torch.randperm(3, generator=g)]
    sizes = (9, 8, 4)
    x = torch.cat([m + 0.6 * torch.randn(k, generator=g, dtype=torch.float64)
                   for m, k in zip(centres, sizes)])
    x = x[torch.randperm(len(x), generator=g)].reshape(1, 1, -1)
    y = robust_global_pool(x, name, 0.8, alpha).item()
    row = x.flatten().numpy()
    grid = np.linspace(row.min(), row.max(), 40001)
    brute = phi(name, grid[:, None] - row, 0.8, alpha).sum(1).min()
    assert phi(name, y - row, 0.8, alpha).sum() <= brute + 1e-9


def test_multistart_subsamples_long_rows():
    """Rows longer than ``starts`` use evenly spaced candidates and still find the dense cluster."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, generator=g) * 0.2 + 5, torch.rand(200, generator=g) * 40 - 20])
    x = x[torch.randperm(500, generator=g)].double().reshape(1, 1, -1)
    y = robust_global_pool(x, "welsch", 0.5, starts=16).item()
    assert abs(y - 5) < 0.1


# -- properties --------------------------------------------------------------------------------
rows = st.lists(st.floats(-50, 50, allow_nan=False, width=64), min_size=1, max_size=12)
names = st.sampled_from(list(PENALTIES))


def _pool(values, name, c=1.0, alpha=1.5):
    x = torch.tensor(values, dtype=torch.float64).reshape(1, 1, -1)
    return robust_global_pool(x, name, c, alpha)


def _objective(values, name, y, c=1.0, alpha=1.5):
    return phi(name, y - np.asarray(values), c, alpha).sum()


def _same_optimum(values, name, y1, y2, c=1.0):
    """Equal, or (for a non-unique global minimum) equally good."""
    f1, f2 = _objective(values, name, y1, c), _objective(values, name, y2, c)
    return abs(y1 - y2) <= 1e-7 * (1 + abs(y1)) or abs(f1 - f2) <= 1e-9 * (1 + abs(f1))


@settings(max_examples=20, deadline=None)
@given(rows, names, st.floats(-1e3, 1e3))
def test_shift_equivariance(values, name, t):
    y = _pool(values, name).item()
    shifted = _pool([v + t for v in values], name).item() - t
    assert _same_optimum(values, name, y, shifted)


@settings(max_examples=20, deadline=None)
@given(rows, names, st.floats(0.01, 100))
def test_scale_equivariance_with_c(values, name, s):
    y = _pool(values, name, c=1.0).item()
    scaled = _pool([v * s for v in values], name, c=s).item() / s
    assert _same_optimum(values, name, y, scaled)


@settings(max_examples=20, deadline=None)
@given(rows, names, st.randoms(use_true_random=False))
def test_permutation_invariance_and_range(values, name, rnd):
    y = _pool(values, name).item()
    perm = list(values)
    rnd.shuffle(perm)
    assert _same_optimum(values, name, y, _pool(perm, name).item())
    assert min(values) <= y <= max(values)


@settings(max_examples=20, deadline=None)
@given(rows)
def test_quadratic_is_the_mean(values):
    assert _pool(values, "quadratic").item() == pytest.approx(np.mean(values), abs=1e-12)


# -- awkward inputs ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_extreme_c_ties_and_constant_rows(name, c):
    x = torch.tensor([[[2.0] * 6, [1.0, 1.0, 1.0, 3.0, 3.0, 1e6], [-1e6, 0.0, 0.0, 0.1, 0.2, 1e6]]],
                     dtype=torch.float64, requires_grad=True)
    y = robust_global_pool(x, name, c, ALPHA.get(name, 1.0))
    assert torch.isfinite(y).all()
    assert y[0, 0].item() == 2.0
    for r in range(3):
        row = x[0, r].detach().numpy()
        f = _objective(row, name, y[0, r].item(), c, ALPHA.get(name, 1.0))
        for u in np.unique(row):  # no worse than any data point (each is a candidate)
            assert f <= _objective(row, name, u, c, ALPHA.get(name, 1.0)) + 1e-9 * (1 + abs(f))
    (g,) = torch.autograd.grad(y[0, 0], x)
    torch.testing.assert_close(g[0, 0], torch.full((6,), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(PENALTIES))
def test_dtypes_shapes_and_empty_batch(name, dtype):
    pool = RobustGlobalPool2d(name, learn_c=True, channels=4).to(dtype)
    x = torch.randn(2, 4, 5, 3, dtype=dtype, requires_grad=True)
    y = pool(x)
    assert y.shape == (2, 4) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    assert pool.parametrizations.c.original.grad.shape == (4,)
    empty = pool(torch.randn(0, 4, 5, 3, dtype=dtype, requires_grad=True))
    assert empty.shape == (0, 4)
    mean = robust_global_pool(x.detach().to(torch.float64), name, 1.0, dim=(2, 3))
    torch.testing.assert_close(y.detach().double(), mean, rtol=1e-4, atol=1e-4)


def test_parameters_are_parametrised_and_learn():
    pool = RobustGlobalPool1d("general", c=2.0, learn_c=True, alpha=0.5, learn_alpha=True,
                              alpha_range=(0.2, 2.5))
    names = dict(pool.named_parameters())
    assert set(names) == {"parametrizations.c.original", "parametrizations.alpha.original"}
    assert pool.c.item() == pytest.approx(2.0) and pool.alpha.item() == pytest.approx(0.5)
    x = torch.randn(4, 3, 20)
    x[:, :, 0] = 30.0
    opt = torch.optim.SGD(pool.parameters(), lr=5.0)
    for _ in range(5):  # pull every pooled value towards zero: shrink the outlier's influence
        opt.zero_grad()
        (pool(x) ** 2).mean().backward()
        opt.step()
    assert 0.2 < pool.alpha.item() < 2.5 and pool.c.item() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pool.parameters())


def test_fixed_parameters_follow_double_and_are_buffers():
    pool = RobustGlobalPool1d("huber", c=0.3).double()
    assert not list(pool.parameters())
    assert pool.c.dtype == torch.float64
    assert pool(torch.randn(2, 3, 4, dtype=torch.float64)).dtype == torch.float64


def test_singular_curvature_warns_and_zeroes():
    """Huber at a point of its flat minimum set (no entry within ``c``): ``Σ φ″ = 0``."""
    from ddnlib.errors import SingularSystemWarning
    node = RobustPooling("huber")
    x = torch.tensor([[0.0, 10.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1e-3], dtype=torch.float64)
    y = torch.tensor([5.0], dtype=torch.float64)
    with pytest.warns(SingularSystemWarning, match="flat or degenerate"):
        (g, _, _), _ = node.vjp(x, c, torch.ones(1, dtype=torch.float64), y=y,
                                v=torch.ones(1, dtype=torch.float64))
    assert (g == 0).all()
    damped = RobustPooling("huber", options=Options(damping=1.0))
    (g, _, _), _ = damped.vjp(x, c, torch.ones(1, dtype=torch.float64), y=y,
                              v=torch.ones(1, dtype=torch.float64))
    assert (g == 0).all()  # φ″ = 0 everywhere: damping makes H > 0 but the weights are zero


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(penalty="cauchy"), "penalty='cauchy'"),
    (dict(c=0.0), "c=0.0"),
    (dict(c=-1.0), "c=-1.0"),
    (dict(penalty="general", alpha=3.0), "alpha=3.0"),
    (dict(penalty="general", alpha=0.0), "alpha=0.0"),
    (dict(penalty="general", alpha=1.0, alpha_range=(2.0, 1.0)), "alpha_range"),
    (dict(penalty="huber", learn_alpha=True), "learn_alpha"),
    (dict(channels=0), "channels=0"),
    (dict(c=torch.ones(2), channels=3), "shape"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustGlobalPool1d(**kwargs)


def test_bad_call():
    pool = RobustGlobalPool1d(channels=3)
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(B, C, N\)"):
        pool(torch.randn(2, 3))
    with pytest.raises(ValueError, match="4 channels"):
        pool(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="torch.int64"):
        pool(torch.ones(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="pooled dimensions"):
        pool(torch.randn(2, 3, 0))
    with pytest.raises(ValueError, match="expected finite c > 0"):
        robust_global_pool(torch.randn(2, 3), c=torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="finite"):
        robust_global_pool(torch.tensor([[1.0, float("nan")]]), "pseudo_huber")
    with pytest.raises(TypeError, match="dtype torch.float64 but x has torch.float32"):
        robust_global_pool(torch.randn(2, 3), c=torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim"):
        robust_global_pool(torch.randn(2, 3), dim=2)


def test_options_reach_the_solver():
    x = torch.randn(4, 3, 50, dtype=torch.float64) * 100
    from ddnlib.errors import NonConvergenceError
    with pytest.raises(NonConvergenceError):
        robust_global_pool(x, "pseudo_huber", 1e-3, options=Options(max_iter=1, strict=True))
    assert math.isfinite(robust_global_pool(x, "pseudo_huber", 1e-3).sum().item())


# -- the whole float range and the rest of PyTorch (issues 17, 18) --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [1e-20, 1e20])
@pytest.mark.parametrize("name", list(PENALTIES))
def test_scale_equivariance_over_the_float_range(name, s, dtype):
    """``y(s x; s c) = s y(x; c)`` at ``s = 1e±20``, where ``c·c`` and ``(x/c)²`` would
    overflow / underflow float32; gradients for ``x``, ``c`` and ``α`` by finite differences."""
    x = _gradcheck_input(5).detach()
    alpha = ALPHA.get(name, 1.0) if name != "general" else 1.5  # convex here: the Newton path
    y = robust_global_pool(x.to(dtype), name, 0.9, alpha)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-convergence, no singular system
        ys = robust_global_pool(x.to(dtype) * s, name, 0.9 * s, alpha)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(ys / s, y, rtol=tol, atol=tol)
    c = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    fn = lambda x, c, a: robust_global_pool(x * s, name, c * s, a) / s  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x[:, :1].clone().requires_grad_(), c, a), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["welsch", "general", "pseudo_huber"])
def test_tiny_c_gives_finite_gradients(name, dtype):
    """``c = 1e-20`` against unit-scale data: every ``(x/c)²`` overflows; ``y`` is a data point
    (the Welsch and Barron objectives count the points at ``y``) and the gradients are finite."""
    x = torch.tensor([[0.3, 0.3, 1.0, 2.0, 0.3, -1.0]], dtype=dtype, requires_grad=True)
    c = torch.tensor([1e-20], dtype=dtype, requires_grad=True)
    a = torch.tensor([0.5], dtype=dtype, requires_grad=True)
    y = RobustPooling(name)(x, c, a)
    if name != "pseudo_huber":
        assert y.item() == pytest.approx(0.3)
    grads = torch.autograd.grad(y.sum(), [x, c, a], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cls,shape", [(RobustGlobalPool1d, (2, 8, 9000)),
                                       (RobustGlobalPool2d, (2, 8, 90, 100))])
def test_inference_mode_with_threads_over_several_blocks(cls, shape):
    """Worker threads do not inherit inference mode; the solver carries it in."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        pool = cls("pseudo_huber")
        with torch.inference_mode():
            y = pool(x)
        assert y.is_inference()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(y.clone(), pool(x))


@pytest.mark.parametrize("cls", [RobustGlobalPool1d, RobustGlobalPool2d])
def test_construction_on_the_meta_device(cls):
    with torch.device("meta"):
        pool = cls("general", c=2.0, learn_c=True, alpha=0.5, learn_alpha=True, channels=3)
        fixed = cls("welsch", c=0.5)
    assert pool.parametrizations.c.original.device.type == "meta"
    assert fixed.c.device.type == "meta"
    assert "RobustPooling" in repr(pool)
    with pytest.raises(ValueError, match="c="):
        with torch.device("meta"):
            cls("welsch", c=-1.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_is_refused_clearly():
    with pytest.raises(TypeError, match="torch.jit.trace"):
        torch.jit.trace(RobustGlobalPool1d("welsch"), torch.randn(2, 3, 5))


# -- global minimum of the non-convex penalties against brute force (issue 18) ---------------------
def _hard_row(case: str, g: torch.Generator) -> tuple[np.ndarray, float]:
    """``(row, c)`` for one awkward data set."""
    randn = lambda k, s=1.0: s * torch.randn(k, generator=g, dtype=torch.float64)  # noqa: E731
    if case == "two equal clusters":  # equal mass: the global one is decided by the spread
        return torch.cat([randn(40, 0.5) - 3, randn(40, 0.55) + 3]).numpy(), 0.7
    if case == "90% outliers":  # 10 % inliers, 90 % spread 30x wider
        return torch.cat([randn(20, 0.3) + 2, randn(180, 30.0)]).numpy(), 1.0
    if case == "far clusters":  # separation 1e4 c: the bound cannot narrow one range (fallback)
        return torch.cat([randn(30) - 5e3, randn(31) + 5e3, randn(5, 1e3)]).numpy(), 1.0
    if case == "c near 0":  # c far below the spacing: the answer is the densest tie
        row = torch.cat([randn(60), torch.full((3,), 0.25, dtype=torch.float64)])
        return row.numpy(), 1e-9
    if case == "c huge":
        return torch.cat([randn(50), randn(10, 100.0)]).numpy(), 1e5
    if case == "spread":  # many small clusters: runs whose ends rise into the run
        return randn(70, 10.0).numpy(), 0.8
    raise AssertionError(case)


def _brute_minimum(name: str, row: np.ndarray, c: float, alpha: float) -> float:
    """min F over the data points and a grid of spacing c/50 around each of them."""
    offsets = np.linspace(-3 * c, 3 * c, 301)
    grid = np.unique(np.concatenate([row, (row[:, None] + offsets).ravel()]))
    values = np.concatenate([phi(name, grid[i:i + 2000, None] - row, c, alpha).sum(1)
                             for i in range(0, grid.size, 2000)])
    return float(values.min())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["two equal clusters", "90% outliers", "far clusters",
                                  "c near 0", "c huge", "spread"])
@pytest.mark.parametrize("name,alpha", [("welsch", 1.0), ("general", 0.5), ("general", 0.2)])
def test_non_convex_global_minimum_on_hard_rows(name, alpha, case, dtype):
    """Never worse than a brute-force search (data points plus a c/50 grid around each)."""
    g = torch.Generator().manual_seed(7)
    rows = [_hard_row(case, g) for _ in range(3)]
    c = rows[0][1]
    x = torch.tensor(np.stack([r for r, _ in rows]), dtype=dtype)
    y = robust_global_pool(x, name, c, alpha).double().numpy()
    for row, yr in zip(x.double().numpy(), y):
        brute = _brute_minimum(name, row, c, alpha)
        got = float(phi(name, yr - row, c, alpha).sum())
        rounding = 1e-9 if dtype == torch.float64 else 1e-4
        assert got <= brute + rounding * (1 + abs(brute)), (got, brute)


_FEW_ENTRY_ROWS = [  # (c, row): rows of a few entries where an earlier search missed by 0.1-0.7
    (3.0, [6.602, 7.229, -3.4, 0.195]),
    (3.0, [-0.217, 6.689, 6.935, -3.39]),
    (1.0, [3.221, 2.346, 7.099, 0.034, 7.068, 0.41, 0.294, 0.047, 3.058, 6.941, 2.927]),
    (3.0, [7.988, 12.656, -40.192, -41.683, 29.133, -49.149, -3.308, -31.283, -34.3, -8.015]),
    (3.0, [-2.406, -2.833, -3.13, 7.339, 6.986, 7.24, -2.75, 2.75, 7.079, -2.805, -0.28, -3.549,
           6.794, 0.131, 3.198, 6.998, 7.18, 0.212, 6.797]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c,row", _FEW_ENTRY_ROWS)
def test_welsch_global_minimum_on_rows_of_few_entries(c, row, dtype):
    """Clusters of a few entries each, ``c`` comparable to their spacing (found by a random
    search against brute force): never worse than the brute-force minimum."""
    x = torch.tensor([row], dtype=dtype)
    y = robust_global_pool(x, "welsch", c).double().item()
    values = np.asarray(x.double().numpy()[0])
    brute = _brute_minimum("welsch", values, c, 1.0)
    rounding = 1e-9 if dtype == torch.float64 else 1e-5
    assert float(phi("welsch", y - values, c, 1.0).sum()) <= brute + rounding * (1 + brute)


def test_run_whose_end_rises_into_it_is_not_settled_by_moving_out():
    """A row where the run holding the global minimum has ``F′ > 0`` at its left end: the
    refinement moved that end out to a worse minimum and the search used to call the row settled
    (F = 62.76 at a point of negative curvature instead of 59.10)."""
    g = torch.Generator().manual_seed(6)
    torch.randn(3, 5, 70, generator=g, dtype=torch.float64)
    row = (10 * torch.randn(3, 5, 70, generator=g, dtype=torch.float64)).reshape(-1, 70)[11]
    y = robust_global_pool(row[None], "welsch", 0.8).item()
    got = float(phi("welsch", y - row.numpy(), 0.8).sum())
    assert got <= _brute_minimum("welsch", row.numpy(), 0.8, 1.0) + 1e-9


def test_solver_dispatch_reads_the_penalty_not_its_name():
    """A user penalty that happens to be called "quadratic" is solved by Newton on its own φ (here
    pseudo-Huber's), not by the mean that the bundled quadratic's ``closed_form`` selects."""
    import dataclasses

    from ddnlib.nodes import PENALTIES, robust_global_pool

    mine = dataclasses.replace(PENALTIES["pseudo_huber"], name="quadratic")
    x = torch.tensor([[0.0, 0.1, 0.2, 10.0]], dtype=torch.float64)
    y = robust_global_pool(x, mine, c=0.5)
    torch.testing.assert_close(y, robust_global_pool(x, "pseudo_huber", c=0.5))
    assert (y - x.mean(-1)).abs().item() > 1.0


# -- in-place kernels and the early stop (issue 18) ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
def test_general_in_place_newton_sums_match_the_derivatives(alpha, dtype):
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(5, 40, generator=g, dtype=dtype)
    c = torch.tensor([[0.3], [1.0], [2.0], [1e-3], [1e3]], dtype=dtype)
    a = torch.full((5, 1), alpha, dtype=dtype)
    penalty = PENALTIES["general"]
    d1, d2 = penalty.scaled_derivatives(z, c, a)
    g_sum, h_sum = penalty.newton_sums(z.clone(), c, a, torch.empty_like(z))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_sum, d1.sum(1), **tol)
    torch.testing.assert_close(h_sum, d2.sum(1), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huber_curvature_is_the_inlier_indicator_also_at_the_threshold(dtype):
    """Huber's stored weights and Newton sums: ``φ″ = 1`` where ``|z| ≤ c`` (also at ``|z| = c``
    exactly, the inlier side), 0 beyond, ``±inf`` included; ``Σφ′`` the clamped sum."""
    penalty = PENALTIES["huber"]
    c = torch.tensor([[0.5], [3.0]], dtype=dtype)
    z = torch.tensor([[-1.0, -0.5, -0.25, 0.0, 0.5, 0.75, float("inf"), -float("inf")],
                      [-3.0, 3.0, 2.999, -3.001, 1e30, 0.0, 6.0, -6.0]], dtype=dtype)
    expected = (z.abs() <= c).to(dtype)
    assert torch.equal(penalty.scaled_curvature(z, c, c), expected)
    finite = z[:, :6]
    g, h = penalty.newton_sums(finite.clone(), c, c, torch.empty_like(finite))
    torch.testing.assert_close(h, (finite.abs() <= c).to(dtype).sum(1))
    torch.testing.assert_close(g, torch.maximum(torch.minimum(finite, c), -c).sum(1))


def _range_bound(dtype):
    return torch.finfo(dtype).max ** (1 / 3) / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_in_range_bounds_c_and_the_spread(dtype):
    from ddnlib.nodes.penalties import sums_in_range

    B = _range_bound(dtype)
    t = lambda *v: torch.tensor(v, dtype=dtype)  # noqa: E731
    assert sums_in_range(t(0.0, 1.0, 1e3), t(1.0, 1.0, 1e-3))
    assert sums_in_range(t(B / 2), t(B / 2)) and sums_in_range(t(0.0), t(1.01 / B))
    for spread, c in [(2 * B, 1.0), (0.0, 2 * B), (0.0, 0.5 / B), (1e19, 1.0),
                      (float("nan"), 1.0), (1.0, float("nan")), (float("inf"), 1.0)]:
        assert not sums_in_range(t(0.0, spread), t(1.0, c)), (spread, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,alpha", [(name, 1.0) for name in PENALTIES] + [("general", 0.5)])
def test_newton_sums_match_the_derivatives_at_the_edges_of_their_range(name, alpha, dtype):
    """The in-place sums (pseudo-Huber's from ``c² + z²`` and ``c³``) against the exact
    derivatives in float64, for ``c`` and spreads at both ends of ``sums_in_range``."""
    from ddnlib.nodes.penalties import sums_in_range

    B = _range_bound(dtype)
    g = torch.Generator().manual_seed(7)
    rows = []
    for c in (1.01 / B, 1e-3, 1.0, 1e3, B / 1.01):
        spread = min(B, 1e17 * c) / 8  # entries within ± spread / 2 of u
        z = torch.randn(2, 32, generator=g, dtype=torch.float64)
        z = torch.cat([c / 8 * z[:1].clamp(-3, 3), spread * z[1:].clamp(-0.5, 0.5)])
        rows.append((z.to(dtype), torch.full((2, 1), c, dtype=dtype)))
    z, c = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    assert sums_in_range(z.amax(1) - z.amin(1), c.squeeze(1))
    a = torch.full_like(c, alpha)
    penalty = PENALTIES[name]
    g_sum, h_sum = penalty.newton_sums(z.clone(), c, a, torch.empty_like(z))
    d1, d2 = penalty.scaled_derivatives(z.double(), c.double(), a.double())
    # to rounding relative to the terms and to the natural scales |κφ′| ≲ c, κφ″ ≤ 1 (the float64
    # reference itself loses κφ″ ≈ 1e-45 far out to cancellation)
    eps, n = torch.finfo(dtype).eps, z.shape[1]
    for got, terms, scale in ((g_sum, d1, c.squeeze(1).double()), (h_sum, d2, 1.0)):
        assert torch.isfinite(got).all()
        err = (got.double() - terms.sum(1)).abs()
        assert (err <= 256 * eps * (terms.abs().sum(1) + n * scale)).all(), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,alpha", [("welsch", 1.0), ("general", 0.0), ("general", 0.1),
                                        ("general", 0.25), ("general", 0.5), ("general", 1.5)])
def test_newton_value_sums_match_within_their_declared_rounding(name, alpha, dtype):
    """The one-pass (Σ κφ′, Σ κφ″, Σ ranked) against the derivatives and ``ranked_sum``: the
    value to its relative rounding plus ``value_rounding`` eps per entry (Welsch and Barron's
    loss with α ≥ 0.25 compute it as ``Σ e − n``), on rows near and far from ``u``."""
    g = torch.Generator().manual_seed(6)
    z = torch.cat([1e-3 * torch.randn(3, 40, generator=g, dtype=dtype),
                   4 * torch.randn(3, 40, generator=g, dtype=dtype)])
    c = torch.tensor([[0.3], [1.0], [7.0]] * 2, dtype=dtype)
    a = torch.full((6, 1), alpha, dtype=dtype)
    penalty = PENALTIES[name]
    d1, d2 = penalty.scaled_derivatives(z, c, a)
    gs, hs, value = penalty.newton_value_sums(z.clone(), c, a, torch.empty_like(z))
    eps = torch.finfo(dtype).eps
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gs, d1.sum(1), **tol)
    torch.testing.assert_close(hs, d2.sum(1), **tol)
    exact = penalty.ranked(z.double(), c.double(), a.double()).sum(1)
    allowed = 64 * eps * exact.abs() + 4 * 40 * eps * max(1.0, penalty.value_rounding(a))
    assert ((value.double() - exact).abs() <= allowed).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(PENALTIES))
def test_ranked_sum_equals_the_sum_of_ranked(name, dtype):
    g = torch.Generator().manual_seed(4)
    z = 5 * torch.randn(4, 30, generator=g, dtype=dtype)
    c = torch.tensor([[0.5], [1.0], [3.0], [1e-20]], dtype=dtype)
    a = torch.full((4, 1), ALPHA.get(name, 1.0), dtype=dtype)
    penalty = PENALTIES[name]
    expected = penalty.ranked(z, c, a).sum(1)
    torch.testing.assert_close(penalty.ranked_sum(z.clone(), c, a), expected,
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("name", ["pseudo_huber", "welsch", "general"])
def test_curvature_lipschitz_constant_bounds_the_derivative_of_the_curvature(name):
    """``|∂(κφ″)/∂z| ≤ λ / c`` (by autograd of the solver's own ``κφ″``), with ``λ`` barely above
    the maximum (Barron's loss: ``curvature_lipschitz_for(α)``, for every ``α ≤ 2``, the maximum
    reached as ``α → −∞``; none for ``α > 2``, where the slope reaches 2 / c at ``α = 3``); the
    other penalties declare none."""
    penalty = PENALTIES[name]
    alphas = (-1e6, -100.0, -10.0, -2.0, 0.0, 0.3, 0.5, 0.9, 1.0, 1.5, 2.0)
    lam = penalty.curvature_lipschitz_for(torch.tensor(alphas, dtype=torch.float64))
    assert lam < float("inf")
    for c in (0.1, 1.0, 7.0):
        z = torch.linspace(-20 * c, 20 * c, 400001, dtype=torch.float64, requires_grad=True)
        ct = torch.tensor(c, dtype=torch.float64)
        slopes = []
        for alpha in alphas if name == "general" else (c,):
            a = torch.tensor(alpha, dtype=torch.float64)
            (slope,) = torch.autograd.grad(penalty.scaled_derivatives(z, ct, a)[1].sum(), z)
            slopes.append(slope.abs().max())
            assert slopes[-1] <= lam / c, alpha
        assert max(slopes) >= 0.9999 * lam / c
    assert penalty.curvature_lipschitz_for(torch.tensor([0.5, 3.0])) == (
        float("inf") if name == "general" else lam)
    assert all(p.curvature_lipschitz == float("inf") for p in PENALTIES.values()
               if p.name not in ("pseudo_huber", "welsch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["pseudo_huber", "welsch"])
def test_lipschitz_early_stop_is_as_accurate_as_the_step_rule(name, dtype):
    """The early stop (a provable error bound) against the plain step-size rule, on rows with
    outliers, spread-out data and tiny and large ``c``."""
    import dataclasses

    penalty = PENALTIES[name]
    plain = dataclasses.replace(penalty, curvature_lipschitz=float("inf"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 6, 300, generator=g, dtype=dtype)
    x[0] += 30 * (torch.rand(x[0].shape, generator=g) < 0.2)
    x[1] *= 100
    for c in (1e-3, 0.5, 1.0, 50.0):
        fast = robust_global_pool(x, penalty, c)
        slow = robust_global_pool(x, plain, c)
        scale = dtype is torch.float32 and 1e-5 or 1e-10
        bound = 2 * scale * (fast.abs() + min(c, float(x.max() - x.min())))
        assert ((fast - slow).abs() <= bound).all()


def test_scratch_buffers_are_distinct_and_reused(monkeypatch):
    from ddnlib.nodes import pooling_scratch
    from ddnlib.nodes.pooling_scratch import scratch

    monkeypatch.setattr(pooling_scratch, "_free", {})
    with scratch(1000, torch.float32, torch.device("cpu"), 3) as bufs:
        assert len({b.data_ptr() for b in bufs}) == 3 and all(b.numel() == 1000 for b in bufs)
        first = {b.data_ptr() for b in bufs}
        with scratch(1000, torch.float32, torch.device("cpu"), 2) as inner:  # nested: fresh
            assert not first & {b.data_ptr() for b in inner}
    with scratch(500, torch.float32, torch.device("cpu"), 3) as again:
        assert {b.data_ptr() for b in again} <= first | {b.data_ptr() for b in inner}
    with torch.inference_mode(), scratch(10, torch.float64, torch.device("cpu"), 1) as (b,):
        pass
    assert not b.is_inference()  # reusable outside inference mode


@pytest.mark.parametrize("name", ["pseudo_huber", "welsch", "general"])
def test_repeated_calls_do_not_share_results(name):
    """Pooled scratch buffers never leak into results or saved backward quantities."""
    g = torch.Generator().manual_seed(6)
    x1 = torch.randn(3, 5, 70, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = (10 * torch.randn(3, 5, 70, generator=g, dtype=torch.float64)).requires_grad_()
    pool = RobustGlobalPool1d(name, c=0.8, learn_c=True, alpha=ALPHA.get(name, 1.0)).double()
    y1 = pool(x1)
    y1_copy = y1.detach().clone()
    (g1,) = torch.autograd.grad(y1.sum(), x1, retain_graph=True)
    pool(x2).sum().backward()  # another call in between
    torch.testing.assert_close(y1.detach(), y1_copy, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y1.sum(), x1)[0], g1, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(PENALTIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equal_entries_pool_to_that_value(name, dtype):
    """All-equal rows: every penalty's minimiser is the common value itself, not an ulp beside it
    (Σx / n rounds; hypothesis found 3 × 42.99331842651513 pooled to 42.993318426515124)."""
    values = torch.tensor([42.99331842651513, -7.1, 1e-3, 3.3e4], dtype=dtype)
    x = values.reshape(-1, 1, 1).expand(-1, 2, 3).contiguous()  # (4 rows, 2 channels, 3 equal)
    y = robust_global_pool(x, name, 1.0, 1.5)
    torch.testing.assert_close(y, x[..., 0], rtol=0, atol=0)


def test_an_overflowing_mean_is_rejected_not_clamped():
    """float32 entries whose sum overflows: the mean is not representable by the sum, so the row
    is an error, not the row's maximum (which clamping an infinite mean would return)."""
    x = torch.tensor([3e38, 1e38, 2e38], dtype=torch.float32).reshape(1, 1, -1)
    with pytest.raises(ValueError, match="no finite result"):
        robust_global_pool(x, "quadratic", 1.0, 1.5)


# -- global minimum on short rows against brute force (every cell searched) ---------------------
def _short_rows(seed: int, n: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x (rows, n), c (rows,))`` in float32 values: near-mirrored clusters (two minima of
    almost equal depth) and a few random clusters, ``c`` log-uniform in ``[0.05, 3]``."""
    g = np.random.default_rng(seed)
    out = []
    for k in range(rows):
        if k % 2:  # mirrored: a cluster and its reflection, perturbed by 1e-3
            half = g.normal(g.uniform(0.1, 3), g.uniform(0.01, 1), (n + 1) // 2)
            out.append(np.concatenate([half, -half])[:n] + g.normal(0, 1e-3, n))
        else:
            centres = g.normal(0, g.uniform(1, 20), 3)
            out.append(centres[g.integers(3, size=n)] + g.normal(0, g.uniform(0.01, 1.5), n))
    c = np.exp(g.uniform(np.log(0.05), np.log(3), rows))
    return np.float32(out).astype(np.float64), np.float32(c).astype(np.float64)


def _phi_any(name: str, z: np.ndarray, c, alpha: float) -> np.ndarray:
    if name == "general" and alpha == 0:
        return np.log1p(0.5 * (z / c) ** 2)
    return phi(name, z, c, alpha)


def _brute_row(name: str, row: np.ndarray, c: float, alpha: float) -> float:
    """min F over a 4001-point grid of [min x, max x] and the entries, then Brent in the grid
    cells around the 5 best points (float64)."""
    f = lambda u: float(_phi_any(name, u - row, c, alpha).sum())  # noqa: E731
    grid = np.unique(np.concatenate([np.linspace(row.min(), row.max(), 4001), row]))
    values = _phi_any(name, grid[:, None] - row, c, alpha).sum(1)
    best = float(values.min())
    for k in np.argsort(values)[:5]:
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
        if hi > lo:
            res = minimize_scalar(f, bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-13 * (1 + abs(grid[k]))})
            best = min(best, float(res.fun))
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,alpha", [("welsch", 1.0), ("general", 0.5), ("general", 0.0),
                                        ("general", -2.0)])
def test_non_convex_global_minimum_on_short_rows(name, alpha, dtype):
    """Rows of 3-37 entries (per-row ``c``) never worse than brute force. Before the short rows
    were searched cell by cell, the histogram search missed on 1-4 of these 96 rows in every
    case, by 1e-4 to 0.03 (two minima of nearly equal depth)."""
    eps = torch.finfo(dtype).eps
    for seed, n in [(s + k, n) for s in (0, 30) for k, n in enumerate((3, 8, 21, 37))]:
        x, c = _short_rows(seed, n, 12)
        y = robust_global_pool(torch.tensor(x, dtype=dtype), name,
                               torch.tensor(c, dtype=dtype), alpha).double().numpy()
        for row, cr, yr in zip(x, c, y):
            brute = _brute_row(name, row, cr, alpha)
            got = float(_phi_any(name, yr - row, cr, alpha).sum())
            assert got <= brute + 16 * eps * (n + brute), (seed, n, row.tolist(), cr, got, brute)


@pytest.mark.parametrize("name,alpha", [("welsch", 1.0), ("general", 0.5), ("general", 0.0)])
def test_multistart_finds_the_deeper_of_two_mirrored_minima(name, alpha):
    """The multi-start solver (the fallback of long rows the histogram search does not settle)
    on two entries ``±d``, a little asymmetric, with ``c`` such that the midpoint is a maximum:
    the deeper minimum, by brute force. It used to refine only its 3 best candidates (the
    midpoint and the two ends, whose brackets have zero width) and miss the far side."""
    from ddnlib.nodes.penalties import PENALTIES as table
    from ddnlib.nodes.pooling_solvers import SolverSettings, _multistart
    d = np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
    rows = np.concatenate([np.stack([d, -d + 2e-3 * d], 1), np.stack([-d, d - 2e-3 * d], 1)])
    settings = SolverSettings(tol=1e-10, max_iter=100, strict=False, starts=64)
    x = torch.tensor(rows)
    c = torch.full((x.shape[0], 1), 1.0, dtype=torch.float64)
    y, failed = _multistart(table[name], x, c, torch.full_like(c, alpha), settings, None, None)
    assert not failed.any()
    for row, yr in zip(rows, y.numpy()):
        brute = _brute_row(name, row, 1.0, alpha)
        assert float(_phi_any(name, yr - row, 1.0, alpha).sum()) <= brute + 1e-9 * (1 + brute)
