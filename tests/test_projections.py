"""Tests of the projection nodes (``ddnlib.nodes.projections``).

References are independent of the nodes: L1 by root finding on the threshold (``scipy.optimize``)
and by Duchi et al.'s sort, the L∞ sphere by enumerating its 2n faces, input Jacobians by central
differences of those references.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq
from torch.nn.utils import parametrize

from ddnlib import DDNWarning, DeclarativeNode
from ddnlib.nodes import L1Ball, L1Sphere, L2Ball, L2Sphere, LInfBall, LInfSphere, project

NODES = [L1Sphere, L1Ball, L2Sphere, L2Ball, LInfSphere, LInfBall]
LOG_RADIUS = "parametrizations.radius.original"
D = torch.float64


def ids(cls):
    return cls.__name__


def kind(cls):
    return "sphere" if cls.sphere else "ball"


def pnorm(x, p):
    return torch.linalg.vector_norm(x, ord=p, dim=-1)


# -- independent references (numpy, one vector at a time) -----------------------------------------

def ref_l1(x: np.ndarray, r: float, sphere: bool) -> np.ndarray:
    a = np.abs(x)
    if not sphere and a.sum() <= r:
        return x.copy()
    phi = lambda t: np.maximum(a - t, 0).sum() - r  # noqa: E731
    tau = brentq(phi, -r, a.max(), xtol=1e-15, rtol=1e-15, maxiter=500)
    sign = np.where(x < 0, -1.0, 1.0)
    return sign * np.maximum(a - tau, 0)


def ref_l2(x: np.ndarray, r: float, sphere: bool) -> np.ndarray:
    norm = np.sqrt((x * x).sum())
    if not sphere and norm <= r:
        return x.copy()
    return x * (r / norm)


def ref_linf(x: np.ndarray, r: float, sphere: bool) -> np.ndarray:
    clipped = np.clip(x, -r, r)
    if not sphere or np.abs(x).max() >= r:
        return clipped
    best, dist = None, math.inf
    for i in range(x.size):  # the nearest point of each face {u_i = ±r, |u_j| ≤ r}
        for s in (1.0, -1.0):
            u = clipped.copy()
            u[i] = s * r
            d = ((u - x) ** 2).sum()
            if d < dist:
                best, dist = u, d
    return best


REFERENCE = {1: ref_l1, 2: ref_l2, math.inf: ref_linf}


def reference(cls, x: torch.Tensor, r: float) -> torch.Tensor:
    f = REFERENCE[cls.p]
    rows = [f(row, r, cls.sphere) for row in x.detach().numpy().astype(np.float64)]
    return torch.tensor(np.stack(rows), dtype=D)


def reference_jacobian(cls, x: np.ndarray, r: float, h: float = 1e-6) -> np.ndarray:
    f = REFERENCE[cls.p]
    n = x.size
    J = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h
        J[:, j] = (f(x + e, r, cls.sphere) - f(x - e, r, cls.sphere)) / (2 * h)
    return J


def duchi_sort(x: np.ndarray, r: float) -> np.ndarray:
    """Duchi et al. 2008, Fig. 1, on |x| with signs restored (L1 sphere, any x)."""
    a = np.abs(x)
    mu = np.sort(a)[::-1]
    cs = np.cumsum(mu)
    j = np.arange(1, a.size + 1)
    rho = j[mu - (cs - r) / j > 0].max()
    tau = (cs[rho - 1] - r) / rho
    return np.where(x < 0, -1.0, 1.0) * np.maximum(a - tau, 0)


def mixed_points(cls, r: float, b: int = 16, n: int = 10, seed: int = 0) -> torch.Tensor:
    """Random ``(b, n)`` rows with ‖x‖_p / r spread over [0.3, 2]: half inside, half outside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, generator=g, dtype=D)
    factor = torch.cat([torch.linspace(0.3, 0.8, b // 2, dtype=D),
                        torch.linspace(1.25, 2.0, b - b // 2, dtype=D)])
    return x * (r * factor / pnorm(x, cls.p)).unsqueeze(-1)


def with_log_radius(node):
    """``(x, ρ) -> node(x)`` with ``ρ = log r`` substituted, for gradcheck."""
    return lambda x, rho: torch.func.functional_call(node, {LOG_RADIUS: rho}, (x,))


def log_radius(node) -> torch.Tensor:
    return node.parametrizations.radius.original.detach().clone().requires_grad_()


# -- what it must show: forward and input gradients against the references ------------------------

@pytest.mark.parametrize("r", [1.0, 2.5])
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_forward_and_input_gradients_match_reference(cls, r):
    x = mixed_points(cls, r).requires_grad_()
    node = cls(r)
    y = node(x)
    torch.testing.assert_close(y.detach(), reference(cls, x, r), atol=1e-6, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda z: node(z).sum(0), x)  # (n, b, n)
    for i in range(x.shape[0]):
        expected = reference_jacobian(cls, x[i].detach().numpy(), r)
        np.testing.assert_allclose(jac[:, i].numpy(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [0.5, 3.0, 40.0])
def test_l1_threshold_matches_duchi_sort(r, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 300, generator=g, dtype=D)
    x[:4] = x[:4].round()  # many tied magnitudes and zeros
    x[4:8] *= 1e-3  # inside the sphere
    y = L1Sphere(r)(x.to(dtype))
    expected = np.stack([duchi_sort(row, r) for row in x.numpy()])
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(y.double().numpy(), expected, atol=tol * r, rtol=0)


# -- gradients: gradcheck for x and r, closed form vs the generic engine ---------------------------

@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_gradcheck_input_and_radius(cls, scale):
    node = cls(1.5 * scale, learn_radius=True).double()
    x = (mixed_points(cls, 1.5 * scale, b=4, n=5, seed=2)).requires_grad_()
    assert torch.autograd.gradcheck(with_log_radius(node), (x, log_radius(node)))


@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_gradcheck_fixed_radius_and_functional(cls):
    x = mixed_points(cls, 0.7, b=4, n=6, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(cls(0.7), (x,))
    radius = torch.tensor(0.7, dtype=D, requires_grad=True)
    order = "inf" if cls.p == math.inf else cls.p
    assert torch.autograd.gradcheck(lambda z, s: project(z, s, order, kind(cls)), (x, radius))


@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_gradcheck_awkward_points(cls):
    """Near the boundary, tiny and huge coordinates, most L1 coordinates off the support."""
    r = 1.0
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 6, generator=g, dtype=D)
    x[0] *= r * (1 + 1e-4) / pnorm(x[0], cls.p)  # just outside
    x[1] *= r * (1 - 1e-4) / pnorm(x[1], cls.p)  # just inside
    x[2] = torch.tensor([1e-4, -2e-4, 3e-4, 1e-5, -5e-5, 7e-5], dtype=D)
    x[3] = torch.tensor([40.0, -1.25, 0.5, 2.0, -3.0, 0.1], dtype=D)
    x[4] = torch.tensor([5.0, 4.9, -4.8, 0.01, 0.02, -0.03], dtype=D)
    node = cls(r, learn_radius=True).double()
    assert torch.autograd.gradcheck(with_log_radius(node), (x.requires_grad_(), log_radius(node)))


def generic_cases(cls, r: float = 1.3) -> list[tuple[torch.Tensor, float]]:
    """Rows ``(1, n)`` and radii where the generic engine applies: no zero / tied coordinates."""
    g = torch.Generator().manual_seed(5)
    n = 7
    if cls.p == 2 or cls is LInfBall:
        x = mixed_points(cls, r, b=8, n=n, seed=5)
        return [(x[i:i + 1], r) for i in range(x.shape[0])]
    sign = torch.where(torch.rand(6, n, generator=g) < 0.5, -1.0, 1.0).to(D)
    if cls.p == 1:  # |x_i| ∈ [1, 1.5]; inside: r = 1.2 ‖x‖₁; outside: τ = 0.5 < min |x_i|
        x = sign * (1 + 0.5 * torch.rand(6, n, generator=g, dtype=D))
        l1 = pnorm(x, 1)
        radii = torch.cat([1.2 * l1[:3], l1[3:] - 0.5 * n])
        return [(x[i:i + 1], radii[i].item()) for i in range(6)]
    # L∞ sphere: distinct magnitudes below 0.9 r inside; outside with one |x_i| > r
    a = 0.1 + 0.8 * torch.rand(6, n, generator=g, dtype=D)
    a[3:, 0] = 1.7
    x = sign * a * r
    return [(x[i:i + 1], r) for i in range(6)]


@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_closed_form_vjp_matches_generic_engine(cls):
    g = torch.Generator().manual_seed(6)
    for xi, ri in generic_cases(cls):
        node = cls(ri, learn_radius=True).double()
        xi = xi.clone().requires_grad_()
        y, ctx = node.solve(xi.detach())
        v = torch.randn(y.shape, generator=g, dtype=D)
        (gx, ), gp = node.vjp(xi, y=y, v=v, ctx=ctx)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DDNWarning)
            (gx_ref, ), gp_ref = DeclarativeNode.vjp(node, xi, y=y, v=v, ctx=ctx)
        torch.testing.assert_close(gx, gx_ref, atol=1e-9, rtol=1e-7)
        assert gp.keys() == gp_ref.keys() == {LOG_RADIUS}
        torch.testing.assert_close(gp[LOG_RADIUS], gp_ref[LOG_RADIUS], atol=1e-9, rtol=1e-7)


def test_stacked_parametrisation_uses_autograd_chain():
    class Double(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    node = L1Ball(1.0, learn_radius=True).double()
    parametrize.register_parametrization(node, "radius", Double())
    assert node.radius.item() == pytest.approx(2.0)
    x = mixed_points(L1Ball, 2.0, b=4, n=5, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(with_log_radius(node), (x, log_radius(node)))


# -- hypothesis properties -------------------------------------------------------------------------

SCALES = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])


@st.composite
def problems(draw, min_n=1, max_n=8):
    """``(x (b, n) float64, r)`` at a common scale, with ‖x‖ on either side of r."""
    n = draw(st.integers(min_n, max_n))
    b = draw(st.integers(1, 3))
    scale = draw(SCALES)
    unit = st.floats(-1, 1, allow_nan=False, allow_subnormal=False)
    x = torch.tensor(draw(st.lists(st.lists(unit, min_size=n, max_size=n), min_size=b,
                                   max_size=b)), dtype=D) * scale
    r = draw(st.floats(0.05, 3.0)) * scale * (1 if draw(st.booleans()) else n ** 0.5)
    return x, r


def tolerance(x, r, p):
    n = x.shape[-1]
    return 64 * n * torch.finfo(D).eps * (r + pnorm(x, p).amax().item())


@pytest.mark.parametrize("cls", NODES, ids=ids)
@settings(max_examples=30, deadline=None)
@given(problem=problems())
def test_feasible_and_idempotent(cls, problem):
    x, r = problem
    node = cls(r)
    y = node(x)
    tol = tolerance(x, r, cls.p)
    norm = pnorm(y, cls.p)
    if cls.sphere:
        assert (norm - r).abs().max() <= tol
    else:
        assert norm.max() <= r + tol
        inside = pnorm(x, cls.p) <= r
        assert torch.equal(y[inside], x[inside])
    torch.testing.assert_close(node(y), y, atol=tol, rtol=0)


def random_feasible(cls, x, y, r, g):
    """Feasible points: random directions, and perturbations of ``y`` put back on the set."""
    w = torch.randn(16, *x.shape, generator=g, dtype=D)
    near = y + 0.1 * (pnorm(y, cls.p).unsqueeze(-1) + 1e-300) * w[:8]
    cand = torch.cat([w[8:], near])
    norm = pnorm(cand, cls.p).unsqueeze(-1)
    if cls.sphere:
        return cand * (r / norm)
    shrink = torch.rand(cand.shape[:-1] + (1,), generator=g, dtype=D)
    return cand * torch.minimum(r * shrink / norm, torch.ones_like(norm))


@pytest.mark.parametrize("cls", NODES, ids=ids)
@settings(max_examples=30, deadline=None)
@given(problem=problems(), seed=st.integers(0, 2**16))
def test_no_feasible_point_is_closer(cls, problem, seed):
    x, r = problem
    y = cls(r)(x)
    z = random_feasible(cls, x, y, r, torch.Generator().manual_seed(seed))
    best = (y - x).norm(dim=-1)
    others = (z - x).norm(dim=-1)
    assert (best <= others + tolerance(x, r, cls.p)).all()


@pytest.mark.parametrize("cls", NODES, ids=ids)
@settings(max_examples=30, deadline=None)
@given(problem=problems(min_n=2), seed=st.integers(0, 2**16))
def test_sign_and_permutation_equivariance(cls, problem, seed):
    x, r = problem
    a = x.abs()
    assume((a > 0).all())  # sign(0) := +1 is a choice, not an equivariance
    assume((a.sort(-1).values.diff(dim=-1) > 0).all())  # at ties in |x| the first index moves
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(x.shape[-1], generator=g) < 0.5, -1.0, 1.0).to(D)
    perm = torch.randperm(x.shape[-1], generator=g)
    node = cls(r)
    y = node(x)
    tol = tolerance(x, r, cls.p)
    torch.testing.assert_close(node(x * sign), y * sign, atol=tol, rtol=0)
    torch.testing.assert_close(node(x[:, perm]), y[:, perm], atol=tol, rtol=0)


# -- documented choices ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_inside_ball_is_identity_with_zero_radius_gradient(cls):
    node = cls(2.0, learn_radius=True).double()
    x = mixed_points(cls, 2.0, b=8, n=5)[:4].requires_grad_()  # all inside
    v = torch.randn(x.shape, dtype=D)
    y = node(x)
    if cls.sphere:
        assert not torch.equal(y, x)
        return
    assert torch.equal(y, x)
    gx, gr = torch.autograd.grad(y, (x, node.parametrizations.radius.original), v)
    assert torch.equal(gx, v)
    assert gr.item() == 0.0


@pytest.mark.parametrize("cls", [L1Ball, L2Ball, LInfBall], ids=ids)
def test_boundary_point_of_ball_is_inside(cls):
    x = torch.tensor([[0.5, -0.25, 0.25]], dtype=D)
    r = pnorm(x, cls.p).item()
    x.requires_grad_()
    y = cls(r)(x)
    assert torch.equal(y, x)
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    assert torch.equal(torch.autograd.grad(y, x, v)[0], v)


def test_sphere_choices_at_zero():
    r, n = 2.0, 4
    zero = torch.zeros(1, n, dtype=D, requires_grad=True)
    torch.testing.assert_close(L1Sphere(r)(zero), torch.full((1, n), r / n, dtype=D))
    torch.testing.assert_close(LInfSphere(r)(zero), torch.tensor([[r, 0, 0, 0]], dtype=D))
    node = L2Sphere(r, learn_radius=True).double()
    y = node(zero)
    torch.testing.assert_close(y, torch.full((1, n), r / n ** 0.5, dtype=D))
    v = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=D)
    gx, grho = torch.autograd.grad(y, (zero, node.parametrizations.radius.original), v)
    assert torch.equal(gx, torch.zeros_like(gx))
    torch.testing.assert_close(grho, v.sum() / n ** 0.5 * r)  # ∂y/∂r = 1/√n, ∂r/∂ρ = r


def test_l1_sphere_zero_coordinates_grow_positive_and_ties_leave_support():
    y = L1Sphere(3.0)(torch.tensor([[0.0, -1.0, 0.0]], dtype=D))
    torch.testing.assert_close(y, torch.tensor([[2 / 3, -5 / 3, 2 / 3]], dtype=D))
    x = torch.tensor([[3.0, 1.0, -1.0]], dtype=D, requires_grad=True)  # τ = 1 = |x_2| = |x_3|
    y = L1Ball(2.0)(x)
    torch.testing.assert_close(y, torch.tensor([[2.0, 0.0, 0.0]], dtype=D))
    gx = torch.autograd.grad(y, x, torch.tensor([[1.0, 5.0, 7.0]], dtype=D))[0]
    torch.testing.assert_close(gx, torch.zeros_like(gx))  # support {0}: k = 1, 1 − 1 = 0


def test_linf_choices_at_ties():
    x = torch.tensor([[1.0, -2.0, 0.5]], dtype=D, requires_grad=True)  # |x_0| = r: not clamped
    node = LInfBall(1.0, learn_radius=True).double()
    y = node(x)
    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    gx, grho = torch.autograd.grad(y, (x, node.parametrizations.radius.original), v)
    torch.testing.assert_close(gx, torch.tensor([[1.0, 0.0, 3.0]], dtype=D))
    torch.testing.assert_close(grho, torch.tensor(-2.0, dtype=D))  # σ_1 v_1 · r
    inside = torch.tensor([[0.3, -0.5, 0.5, 0.1]], dtype=D)  # first of the tied maxima moves
    torch.testing.assert_close(LInfSphere(1.0)(inside),
                               torch.tensor([[0.3, -1.0, 0.5, 0.1]], dtype=D))


# -- shapes, dtypes, devices, transforms -----------------------------------------------------------

@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_leading_dims_empty_and_vectors(cls):
    node = cls(1.0, learn_radius=True).double()
    x = torch.randn(2, 3, 5, dtype=D)
    y = node(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, node(x.reshape(6, 5)).reshape(2, 3, 5))
    torch.testing.assert_close(node(x[0, 0]), y[0, 0])
    torch.testing.assert_close(torch.func.vmap(node)(x), y)
    empty = torch.zeros(0, 5, dtype=D, requires_grad=True)
    out = node(empty)
    assert out.shape == (0, 5)
    gx, grho = torch.autograd.grad(out.sum(), (empty, node.parametrizations.radius.original))
    assert gx.shape == (0, 5) and grho.item() == 0.0


@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_float32_matches_float64_and_leaves_input_alone(cls):
    x = mixed_points(cls, 1.0, b=8, n=12, seed=9)
    node = cls(1.0, learn_radius=True)
    x32 = x.float().requires_grad_()
    before = x32.detach().clone()
    y32 = node(x32)
    assert y32.dtype == torch.float32
    y32.square().sum().backward()
    assert torch.equal(x32.detach(), before)
    x64 = x.clone().requires_grad_()
    y64 = node(x64)  # float32 parameter, float64 input: computed in float64
    assert y64.dtype == D
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)
    grad64 = torch.autograd.grad(y64.square().sum(), x64)[0]
    torch.testing.assert_close(x32.grad.double(), grad64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_functional_form_matches_module(cls):
    x = mixed_points(cls, 1.7, b=6, n=5, seed=10).requires_grad_()
    order = math.inf if cls.p == math.inf else cls.p
    node = cls(1.7, learn_radius=True).double()
    radius = torch.tensor(1.7, dtype=D, requires_grad=True)
    y, y_fn = node(x), project(x, radius, order, kind(cls))
    torch.testing.assert_close(y_fn, y)
    torch.testing.assert_close(project(x, 1.7, order, kind(cls)), y)
    torch.testing.assert_close(project(x, torch.tensor(1.7, dtype=D), order, kind(cls)), y)
    v = torch.randn(x.shape, dtype=D)
    gr = torch.autograd.grad(y_fn, radius, v)[0]
    grho = torch.autograd.grad(y, node.parametrizations.radius.original, v)[0]
    torch.testing.assert_close(gr * 1.7, grho)  # ∂ℓ/∂ρ = r ∂ℓ/∂r


def test_learnable_radius_is_a_positive_parameter():
    node = L2Ball(0.5, learn_radius=True)
    names = [k for k, _ in node.named_parameters()]
    assert names == [LOG_RADIUS]
    assert node.radius.item() == pytest.approx(0.5)
    assert list(L2Ball(0.5).named_parameters()) == []
    assert "radius" in dict(L2Ball(0.5).named_buffers())
    x = torch.randn(3, 4) * 3
    node(x).sum().backward()
    assert node.parametrizations.radius.original.grad is not None
    with torch.no_grad():
        node.parametrizations.radius.original.fill_(-50.0)
    assert node.radius.item() > 0


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("radius, error", [(0.0, ValueError), (-1.0, ValueError),
                                           (math.inf, ValueError), (math.nan, ValueError),
                                           ("1", TypeError), (True, TypeError),
                                           (None, TypeError)])
def test_bad_radius(radius, error):
    with pytest.raises(error, match="radius"):
        L1Ball(radius)


def test_bad_learn_radius_and_inputs():
    with pytest.raises(TypeError, match="learn_radius"):
        L2Sphere(1.0, learn_radius="yes")
    node = L2Sphere()
    with pytest.raises(TypeError, match="list"):
        node([1.0, 2.0])
    with pytest.raises(TypeError, match="int64"):
        node(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        node(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"shape \(3, 0\)"):
        node(torch.ones(3, 0))


def test_bad_functional_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="p=3"):
        project(x, 1.0, 3)
    with pytest.raises(ValueError, match="p=True"):
        project(x, 1.0, True)
    with pytest.raises(ValueError, match="kind='cube'"):
        project(x, 1.0, 2, "cube")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        project(x, torch.ones(2), 2)
    with pytest.raises(ValueError, match="radius"):
        project(x, torch.tensor(-1.0, requires_grad=True), 2)
    with pytest.raises(ValueError, match="radius"):
        project(x, torch.tensor(0.0), 1, "sphere")


# -- the whole float range (issue 18) --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("s", [1e-20, 1e20])
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_homogeneous_over_the_float_range(cls, s, dtype):
    """``P_{s r}(s x) = s P_r(x)`` for every projection: at ``s = 1e±20`` the float32 squares of
    an unscaled L2 norm overflow / underflow."""
    x = mixed_points(cls, 1.5, b=8, n=7).to(dtype)
    y = cls(1.5)(x)
    ys = cls(1.5 * s)(x * s)
    assert torch.isfinite(ys).all()
    torch.testing.assert_close(ys / s, y, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=0.0)
    x64 = x.double()[:3].requires_grad_()
    node = cls(1.5 * s, learn_radius=True).double()
    rho = log_radius(node)
    scaled = lambda x, rho: with_log_radius(node)(x * s, rho) / s  # noqa: E731
    assert torch.autograd.gradcheck(scaled, (x64, rho))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [L1Sphere, L1Ball], ids=ids)
def test_l1_tied_row_with_tiny_radius(cls, dtype):
    """A tied row ``|x_i| = 1`` (n = 1000) and ``r = 1e-5``: every coordinate is in the support,
    ``y = sign(x) r / n``, finite gradients (``τ = 1 − r/n`` rounds to 1 in float32)."""
    g = torch.Generator().manual_seed(3)
    x = torch.where(torch.rand(2, 1000, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    node = cls(1e-5, learn_radius=True).to(dtype)
    xg = x.clone().requires_grad_()
    y = node(xg)
    torch.testing.assert_close(y, x * 1e-8, rtol=1e-4, atol=0.0)
    v = torch.randn(x.shape, generator=g, dtype=dtype)
    gx, grho = torch.autograd.grad(y, [xg, node.parametrizations.radius.original], v)
    sigma = x.sign()
    torch.testing.assert_close(gx, v - sigma * (sigma * v).mean(-1, keepdim=True),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grho, ((sigma * v).mean(-1) * 1e-5).sum().to(grho.dtype),
                               rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("cls", [L1Sphere, L1Ball], ids=ids)
def test_gradcheck_l1_nearly_tied_row_with_small_radius(cls):
    g = torch.Generator().manual_seed(4)
    sign = torch.where(torch.rand(3, 6, generator=g) < 0.5, -1.0, 1.0).double()
    x = (sign * (1 + 1e-5 * torch.rand(3, 6, generator=g, dtype=D))).requires_grad_()
    node = cls(1e-3, learn_radius=True).double()
    assert (node(x) != 0).all()
    assert torch.autograd.gradcheck(with_log_radius(node), (x, log_radius(node)), eps=1e-8)


@pytest.mark.parametrize("learn, value", [(False, -1.0), (False, 0.0), (False, math.nan),
                                          (False, math.inf), (True, math.nan),
                                          (True, -math.inf), (True, 100.0)])
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_radius_is_checked_on_every_call(cls, learn, value):
    """A radius set after construction (``load_state_dict``, an optimiser) is rejected when the
    node runs, not silently used: r = −1, 0, NaN, inf, and ``ρ = log r`` NaN, −inf (r = 0) or
    100 (r = e¹⁰⁰ = inf in float32)."""
    node = cls(1.0, learn_radius=learn)
    node.load_state_dict({LOG_RADIUS if learn else "radius": torch.tensor(value)})
    with pytest.raises(ValueError, match="radius="):
        node(torch.randn(2, 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_jit_trace_is_refused_clearly(cls):
    with pytest.raises(TypeError, match="torch.jit.trace"):
        torch.jit.trace(cls(1.0), torch.randn(2, 3))


@pytest.mark.parametrize("learn", [False, True])
@pytest.mark.parametrize("cls", NODES, ids=ids)
def test_repr_on_the_meta_device(cls, learn):
    with torch.device("meta"):
        node = cls(2.0, learn_radius=learn)
    assert "radius=<meta>" in repr(node)
    assert "radius=2" in repr(cls(2.0, learn_radius=learn))
