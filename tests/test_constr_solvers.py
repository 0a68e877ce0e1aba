"""The default forward solvers for constrained problems: the interior point (inequalities, dense
equalities), SQP (matrix-free equalities) and the opt-in SLSQP fallback — KKT conditions at the
solution, closed forms, non-convergence reports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ddnlib.solvers
from ddnlib import (
    DeclarativeNode,
    NonConvergenceError,
    NonConvergenceWarning,
    Options,
)
from ddnlib.problem import Problem, batched_jacobian, grad
from test_constraints import (
    F64,
    BoundaryOfBall,
    BoxedLeastSquares,
    ConstrainedLeastSquares,
    NearestOnSphereForMax,
    Simplex,
    Sphere,
    sparsemax,
)


class FarthestOnSphere(Sphere):
    """y = argmin −½‖y − x‖² s.t. ‖y‖² = r²: the farthest point, −r x/‖x‖. The Hessian of the
    Lagrangian is indefinite on the way (SQP needs its Levenberg damping)."""

    objective = NearestOnSphereForMax.objective

    def initial_guess(self, x):
        return x + x.roll(1, dims=-1)  # off the line through x, where the nearest point lies


def _kkt_residuals(node, xs):
    """Solve with ``node.solve`` and measure stationarity, feasibility, sign and complementarity."""
    solution = node.solve(*xs)
    y, ctx = solution.y, solution
    problem = Problem(node, xs, y.shape)
    b = y.shape[0]
    with torch.enable_grad():
        yv = y.reshape(b, -1).clone().requires_grad_()
        c = problem.constraints(yv)
        gf = grad(problem.objective(yv).sum(), [yv], retain_graph=True)[0]
        A = batched_jacobian(c, yv)
    p = problem.eq(yv).shape[1]
    parts = [ctx["lambda"]] if p else []
    if problem.has_ineq:
        parts.append(ctx["mu"])
    nu = torch.cat(parts, 1)
    g, mu = c[:, p:].detach(), nu[:, p:]
    return {
        "stationarity": (gf + (A.transpose(-1, -2) @ nu.unsqueeze(-1)).squeeze(-1)).abs().max(),
        "equality": c[:, :p].abs().max() if p else torch.tensor(0.0),
        "inequality": g.clamp_min(0).max() if g.numel() else torch.tensor(0.0),
        "sign": (-mu).clamp_min(0).max() if mu.numel() else torch.tensor(0.0),
        "complementarity": (mu * g).abs().max() if mu.numel() else torch.tensor(0.0),
    }


CASES = {
    "sphere": lambda g: (Sphere(r=0.5 + torch.rand((), generator=g).item()),
                         (torch.randn(3, 4, dtype=F64, generator=g),)),
    "least-squares": lambda g: (ConstrainedLeastSquares(),
                                (torch.randn(3, 4, dtype=F64, generator=g),
                                 torch.randn(3, 1, dtype=F64, generator=g))),
    "simplex": lambda g: (Simplex(), (1.5 * torch.randn(3, 6, dtype=F64, generator=g),)),
    "boxed-least-squares": lambda g: (_boxed(0.1), (torch.randn(3, 4, dtype=F64, generator=g),
                                                    torch.randn(3, 1, dtype=F64, generator=g))),
}


def _boxed(bound):
    node = BoxedLeastSquares()
    node.bound = bound  # often active
    return node


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_solution_satisfies_kkt_conditions(case, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    node, xs = CASES[case](g)
    residuals = _kkt_residuals(node, xs)
    for name, value in residuals.items():
        assert value <= 1e-7, (name, value.item())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_sqp_follows_the_input_dtype(dtype, tol):
    node = Sphere(r=2.0).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    y = node(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, 2.0 * x / x.norm(dim=-1, keepdim=True), atol=tol, rtol=0)


@pytest.mark.parametrize("options", [Options(linear_solver="dense"), Options(linear_solver="cg")],
                         ids=["dense", "cg"])
def test_sqp_escapes_indefinite_hessians(options):
    node = FarthestOnSphere(r=1.5, options=options)
    x = torch.randn(4, 3, dtype=F64)
    y = node(x)
    torch.testing.assert_close(y, -1.5 * x / x.norm(dim=-1, keepdim=True), atol=1e-7, rtol=0)


class TopEigenvector(DeclarativeNode):
    """``argmin −yᵀSy`` s.t. ``‖y‖² = 1`` from ``1/√n``: the top eigenvector of ``S (b, n, n)``.
    At the answer ``H = 2(λ_max I − S)`` is singular along ``y``, and far from it indefinite."""

    def objective(self, S, y):
        return -torch.einsum("bi,bij,bj->b", y, S, y)

    def equality_constraints(self, S, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def initial_guess(self, S):
        return S.new_ones(S.shape[:2]) / S.shape[-1] ** 0.5


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
@pytest.mark.parametrize("n", [3, 8])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e2])
def test_top_eigenvector_at_every_scale(scale, n, linear_solver):
    """Random symmetric ``S``, 8 samples. Matrix-free SQP used to crawl (19 of 384 samples over
    100 iterations): its truncated-CG / steepest-descent step at indefinite points had the
    length of the gradient (``scale`` times too short), and one wild first step raised the ℓ1
    penalty for good; now the step is Levenberg-shifted and the penalty follows Powell's rule."""
    g = torch.Generator().manual_seed(n)
    A = torch.randn(8, n, n, generator=g, dtype=F64)
    S = scale * (A + A.mT) / 2
    y = TopEigenvector(Options(linear_solver=linear_solver, strict=True))(S)
    top = torch.linalg.eigh(S).eigenvectors[..., -1]
    top = top * torch.sign((top * y).sum(-1, keepdim=True))
    torch.testing.assert_close(y, top, atol=1e-7, rtol=0)


class _ScaledFarthest(FarthestOnSphere):
    def __init__(self, s: float, options: Options):
        super().__init__(options=options)
        self.s = s

    def objective(self, x, y):
        return self.s * super().objective(x, y)


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
@pytest.mark.parametrize("s", [1e-14, 1.0, 1e8])
def test_sqp_shifts_on_the_problem_s_scale(s, linear_solver):
    """SQP's Levenberg shifts at indefinite points are relative to ``max |H_ii|``: from ``1 +
    max |H_ii|`` the smallest shift tried, 1e-8, was a million times the Hessian of an objective
    of size 1e-14, and 100 iterations did not reach the farthest point (dense)."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    node = _ScaledFarthest(s, Options(linear_solver=linear_solver))
    y, _, converged, _, _ = ddnlib.solvers.sqp(Problem(node, (x,), x.shape),
                                               node.initial_guess(x), node.options)
    assert bool(converged.all())
    torch.testing.assert_close(y, -node.r.detach() * x / x.norm(dim=-1, keepdim=True),
                               atol=1e-7, rtol=0)


class _FromInput(FarthestOnSphere):
    initial_guess = Sphere.initial_guess


def test_sqp_flags_a_saddle_point():
    """From y₀ = x the first step is radial and lands on the nearest point, a KKT point that
    maximises the objective on the sphere: SQP (dense) marks it as not a strict local minimum."""
    x = torch.randn(3, 3, dtype=F64)
    node = _FromInput(options=Options(linear_solver="dense"))
    problem = Problem(node, (x,), x.shape)
    y, _, converged, _, saddle = ddnlib.solvers.sqp(problem, x, node.options)
    assert bool(converged.all()) and bool(saddle.all())
    torch.testing.assert_close(y, node.r.detach() * x / x.norm(dim=-1, keepdim=True), atol=1e-9,
                               rtol=0)


class _ScaledFromInput(_FromInput):
    def __init__(self, s: float, **kwargs):
        super().__init__(**kwargs)
        self.s = s

    def objective(self, x, y):
        return self.s * super().objective(x, y)


@pytest.mark.parametrize("s", [1e-12, 1.0, 1e8])
def test_dense_default_leaves_the_maximum(s):
    """The dense default (the interior point) leaves that maximum along negative curvature and
    returns the minimiser, the farthest point, at every scale of the objective (the test for
    negative curvature was ``ω < −√eps (1 + max |W_ii|)``: at ``s = 1e-12`` no curvature was
    negative enough, and the maximum was returned)."""
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = _ScaledFromInput(s, r=1.5, options=Options(strict=True)).solve(x).y
    torch.testing.assert_close(y, -1.5 * x / x.norm(dim=-1, keepdim=True), atol=1e-9, rtol=0)


class SlsqpSimplex(Simplex):
    def solve(self, x):
        return ddnlib.solvers.slsqp_solve(self, x)


def test_opt_in_slsqp_matches_the_default_interior_point():
    x = 1.5 * torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(0))
    default, slsqp = Simplex().solve(x), SlsqpSimplex().solve(x)
    torch.testing.assert_close(slsqp.y, default.y, atol=1e-9, rtol=0)
    for key in ("lambda", "mu"):
        torch.testing.assert_close(slsqp[key], default[key], atol=1e-7, rtol=0)


def test_slsqp_matches_sparsemax_without_scipy_multipliers(monkeypatch):
    """Older scipy returns no multipliers: the active set then comes from g(y) and the result
    (y and the multipliers handed to the engine) is the same."""
    x = 1.5 * torch.randn(4, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
    with_multipliers = SlsqpSimplex().solve(x)
    original = ddnlib.solvers._slsqp_one

    def without(*args, **kwargs):
        res = original(*args, **kwargs)
        res.pop("multipliers", None)
        return res

    monkeypatch.setattr(ddnlib.solvers, "_slsqp_one", without)
    ctx = SlsqpSimplex().solve(x)
    torch.testing.assert_close(ctx.y, sparsemax(x), atol=1e-9, rtol=0)
    torch.testing.assert_close(ctx.y, with_multipliers.y, atol=1e-9, rtol=0)
    for key in ("lambda", "mu"):
        torch.testing.assert_close(ctx[key], with_multipliers[key], atol=1e-8, rtol=0)


class Ball(BoundaryOfBall):
    """argmin ½‖y − x‖² s.t. ‖y‖² ≤ 1, with the default (interior point) solver."""

    solve = DeclarativeNode.solve


class SlsqpBall(Ball):
    def solve(self, x):
        return ddnlib.solvers.slsqp_solve(self, x)


@pytest.mark.parametrize("node_cls, words, solver", [
    (Sphere, "SQP did not converge within 1 iter", "cg"),
    (Sphere, "interior point did not converge", "auto"),
    (Ball, "interior point did not converge", "auto"),
    (SlsqpBall, "SLSQP did not converge", "auto")])
def test_non_convergence_is_reported(node_cls, words, solver):
    x = 3 * torch.randn(3, 5, dtype=F64)
    with pytest.warns(NonConvergenceWarning, match=words):
        node_cls(options=Options(max_iter=1, check_optimality=False,
                                 linear_solver=solver))(x)
    with pytest.raises(NonConvergenceError, match="samples"):
        node_cls(options=Options(max_iter=1, strict=True, linear_solver=solver))(x)


@pytest.mark.parametrize("node_cls", [Sphere, Simplex])
def test_empty_batch(node_cls):
    x = torch.randn(0, 4, dtype=F64, requires_grad=True)
    y = node_cls()(x)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_ball_projection_with_active_and_inactive_samples():
    """Inequality fallback end to end: y = x / max(1, ‖x‖), gradients against autograd of it."""
    x = torch.randn(4, 3, dtype=F64)
    x[:2] *= 0.2 / x[:2].norm(dim=-1, keepdim=True)  # inside: constraint inactive
    x[2:] *= 2.0 / x[2:].norm(dim=-1, keepdim=True)  # outside: active
    xs = x.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y = Ball()(xs)
    ref = xr / xr.norm(dim=-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(y, ref.detach(), atol=1e-8, rtol=0)
    v = torch.randn_like(x)
    got = torch.autograd.grad((y * v).sum(), xs)[0]
    torch.testing.assert_close(got, torch.autograd.grad((ref * v).sum(), xr)[0], atol=1e-7, rtol=0)
