"""Fuzzing the public API with hypothesis: shapes, dtypes, scales ``1e-6 … 1e6``, duplicates,
constant rows and up to 90% gross outliers.

On finite input the only permitted outcomes are a finite result with finite gradients, possibly
with a documented :class:`~ddnlib.DDNWarning`; on malformed input, ``TypeError``/``ValueError``.
Each test checks an invariant that a wrong answer would break (range of the pooled value,
``Σ_i ∂y/∂x_i = 1``, feasibility and idempotence of a projection), not just "no exception".
"""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import assume, given, settings, strategies as st

from ddnlib import DDNWarning, Options
from ddnlib.errors import SingularSystemWarning
from ddnlib.nodes import (PENALTIES, L1Ball, L2Sphere, RobustGlobalPool1d, RobustGlobalPool2d,
                          project, robust_global_pool)
from toy_nodes import Quartic

DTYPES = st.sampled_from([torch.float32, torch.float64])
LOG_SCALE = st.integers(-6, 6)


@st.composite
def clouds(draw, shape):
    """``(x, scale)``: values ``scale · N(0, 1)`` with duplicates, constant rows and outliers
    (a fraction up to 0.9 of each row moved ``10³ · scale`` away)."""
    dtype = draw(DTYPES)
    scale = 10.0 ** draw(LOG_SCALE)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["plain", "duplicates", "constant rows", "zeros"]))
    if kind == "duplicates":
        x = torch.round(2 * x) / 2
    elif kind == "constant rows":
        x[..., :] = x[..., :1]
    elif kind == "zeros":
        x[: max(1, shape[0] // 2)] = 0
    outliers = draw(st.floats(0.0, 0.9))
    if outliers:
        mask = torch.rand(shape, generator=g) < outliers
        x = torch.where(mask, 1e3 * torch.randn(shape, generator=g, dtype=torch.float64), x)
    return (scale * x).to(dtype), scale


# -- robust pooling ----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.data(), penalty=st.sampled_from(list(PENALTIES)), b=st.integers(1, 3),
       ch=st.integers(1, 3), n=st.integers(1, 150), two_d=st.booleans(),
       log_c=st.floats(-2, 2), alpha=st.floats(0.05, 2.95))
def test_fuzz_robust_pooling(data, penalty, b, ch, n, two_d, log_c, alpha):
    shape = (b, ch, n, 2) if two_d else (b, ch, n)
    x, scale = data.draw(clouds(shape))
    x.requires_grad_()
    module = RobustGlobalPool2d if two_d else RobustGlobalPool1d
    extra = dict(alpha=alpha, learn_alpha=True) if penalty == "general" else {}
    pool = module(penalty, c=scale * 10.0 ** log_c, learn_c=True, **extra).to(x.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DDNWarning)
        y = pool(x)
        v = torch.randn(y.shape, dtype=y.dtype)
        gx, *gp = torch.autograd.grad((y * v).sum(), [x, *pool.parameters()])
    assert all(issubclass(w.category, DDNWarning) for w in caught), [str(w) for w in caught]
    assert y.shape == (b, ch) and torch.isfinite(y).all()
    rows = x.detach().flatten(2)
    slack = 1e-4 * scale * (1 + rows.abs().amax(-1) / scale)
    assert (y >= rows.amin(-1) - slack).all() and (y <= rows.amax(-1) + slack).all()
    assert torch.isfinite(gx).all() and all(torch.isfinite(g).all() for g in gp)
    # Σ_i ∂y/∂x_i = 1 (shift equivariance), or 0 on a row reported as singular
    total = (gx / v[..., None, None] if two_d else gx / v[..., None]).flatten(2).sum(-1)
    one = (total - 1).abs() <= 1e-3
    zero = total.abs() <= 1e-3
    assert (one | zero).all(), total
    if zero.any():
        assert any(issubclass(w.category, SingularSystemWarning) for w in caught)


@settings(max_examples=50, deadline=None)
@given(data=st.data(), penalty=st.sampled_from(list(PENALTIES)), n=st.integers(1, 30),
       dim=st.sampled_from([-1, (1, 2), 0]))
def test_fuzz_functional_pooling_dims(data, penalty, n, dim):
    x, scale = data.draw(clouds((3, 2, n)))
    y = robust_global_pool(x, penalty, c=scale, alpha=1.5, dim=dim)
    pooled = {d % 3 for d in ((dim,) if isinstance(dim, int) else dim)}
    kept = [s for d, s in enumerate(x.shape) if d not in pooled]
    assert y.shape == tuple(kept) and torch.isfinite(y).all()


# -- projections -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.data(), p=st.sampled_from([1, 2, math.inf]),
       kind=st.sampled_from(["ball", "sphere"]), b=st.integers(1, 4), n=st.integers(1, 40),
       log_r=st.floats(-2, 2), learn=st.booleans())
def test_fuzz_projections(data, p, kind, b, n, log_r, learn):
    x, scale = data.draw(clouds((b, n)))
    x.requires_grad_()
    r = torch.tensor(scale * 10.0 ** log_r, dtype=x.dtype, requires_grad=learn)
    y = project(x, radius=r, p=p, kind=kind)
    assert y.shape == x.shape and torch.isfinite(y).all()
    eps = torch.finfo(x.dtype).eps
    size = torch.maximum(torch.linalg.vector_norm(x.detach(), ord=p, dim=-1), r.detach())
    tol = 8 * n * eps * size
    norm = torch.linalg.vector_norm(y.detach(), ord=p, dim=-1)
    if kind == "ball":
        assert (norm <= r.detach() + tol).all()
        inside = torch.linalg.vector_norm(x.detach(), ord=p, dim=-1) <= r.detach()
        if learn:  # a radius that requires grad goes through r = exp(log r): 1 ulp on the boundary
            moved = (y.detach() - x.detach()).abs().amax(-1)
            assert (moved[inside] <= tol[inside]).all()
        else:
            assert torch.equal(y.detach()[inside], x.detach()[inside])
    else:
        assert ((norm - r.detach()).abs() <= tol).all()
    again = project(y.detach(), radius=r.detach(), p=p, kind=kind)
    assert ((again - y.detach()).abs().amax(-1) <= tol).all()
    wrt = [x, r] if learn else [x]
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum(), wrt)
    assert all(torch.isfinite(g).all() for g in grads)


# -- a generic node on the default Newton solver ----------------------------------------------

@settings(max_examples=50, deadline=None)
@given(data=st.data(), b=st.integers(1, 4), n=st.integers(1, 6),
       linear_solver=st.sampled_from(["dense", "cg"]))
def test_fuzz_generic_node(data, b, n, linear_solver):
    x, scale = data.draw(clouds((b, n)))
    x = x.double().requires_grad_()
    node = Quartic(options=Options(linear_solver=linear_solver))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DDNWarning)
        y = node(x)
        gx, gs = torch.autograd.grad(y.sum(), [x, node.s])
    assert all(issubclass(w.category, DDNWarning) for w in caught), [str(w) for w in caught]
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gs)
    # stationarity y − x + s y³ = 0, relative to the size of the terms
    residual = (y - x + y ** 3).abs() / (1 + x.abs())
    assert (residual <= 1e-6).all() or caught


# -- malformed input: only TypeError / ValueError ----------------------------------------------

_BAD_DTYPES = [torch.int8, torch.int64, torch.bool, torch.complex64, torch.float16,
               torch.bfloat16, torch.uint8]
_CALLS = {
    "pool1d": lambda x, c: RobustGlobalPool1d(c=c)(x),
    "pool2d": lambda x, c: RobustGlobalPool2d("general", c=c, alpha=c)(x),
    "robust_global_pool": lambda x, c: robust_global_pool(x, "welsch", c=c),
    "project": lambda x, c: project(x, radius=c, p=1),
    "L1Ball": lambda x, c: L1Ball(c)(x),
    "L2Sphere": lambda x, c: L2Sphere(c, learn_radius=True)(x),
    "generic": lambda x, c: Quartic(s=c)(x),
}


@settings(max_examples=300, deadline=None)
@given(call=st.sampled_from(list(_CALLS)), dtype=st.sampled_from(_BAD_DTYPES + [torch.float64]),
       shape=st.lists(st.integers(0, 3), min_size=0, max_size=5).map(tuple),
       c=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                   st.just("1"), st.none()))
def test_fuzz_malformed_input_raises_only_documented_errors(call, dtype, shape, c):
    assume(call != "generic" or len(shape) != 1)  # Quartic's objective needs (b, ...) with a tail
    x = torch.zeros(shape, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DDNWarning)
            out = _CALLS[call](x, c)
    except (TypeError, ValueError) as e:
        assert str(e), "an error without a message"
        return
    # accepted: a valid float input and parameter, so the result must be finite
    halves = (torch.float16, torch.bfloat16) if call == "generic" else ()  # solved in float32
    assert x.dtype in (torch.float64, *halves) and isinstance(out, torch.Tensor)
    assert torch.isfinite(out).all()
