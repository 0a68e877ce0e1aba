"""The default unconstrained solver's dense path (``ddnlib.solvers._dense_newton``): the same
minimiser as the generic Newton step through the linear-solver objects, Levenberg shifts on
indefinite Hessians, least squares on singular ones, steepest descent where the Hessian is not
finite, per-sample decisions (a sample's bits do not depend on the batch), the Hessian factor
handed to the backward only for a backward and only when every final factor is trusted, and
non-convergence reports."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_nodes import PseudoHuberRegression

from ddnlib import DeclarativeNode, NonConvergenceError, NonConvergenceWarning, Options
from ddnlib.linear_solvers import Dense, LinearSolver
from ddnlib.problem import Problem
from ddnlib.solvers import default_solution

F64 = torch.float64


class ThroughOperator(LinearSolver):
    """:class:`Dense` behind another class: the generic Newton step (KKT point, operator,
    ``Dense.solve`` with its convexification) instead of the dense path."""

    def solve(self, op, By, Bc, rtol=None):
        return Dense().solve(op, By, Bc, rtol)


class Rosenbrock(DeclarativeNode):
    """``argmin (a − y₀)² + 100 (y₁ − y₀²)²`` = ``(a, a²)``, started at ``x``: the Hessian is
    indefinite where ``y₁ > y₀² + 1/200``."""

    def objective(self, x, a, y):
        return (a[:, 0] - y[:, 0]) ** 2 + 100 * (y[:, 1] - y[:, 0] ** 2) ** 2


class DoubleWell(DeclarativeNode):
    """``argmin Σ_i (y_i² − 1)² − x_i y_i / 10`` from ``x / 100``, next to the maximum at 0:
    each coordinate goes to the well on the side of ``x_i``."""

    def objective(self, x, y):
        return ((y * y - 1) ** 2 - 0.1 * x * y).sum(-1)

    def initial_guess(self, x):
        return x / 100


class Flat(DeclarativeNode):
    """``argmin ½ (aᵀy − x)²`` over ``y ∈ R³``: a rank-one Hessian, minimisers ``aᵀy = x``; from
    0 the minimum-norm one, ``a x / ‖a‖²``."""

    a = (1.0, -2.0, 0.5)

    def objective(self, x, y):
        return 0.5 * ((y * y.new_tensor(self.a)).sum(-1) - x[:, 0]) ** 2

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], 3)


class Cusp(DeclarativeNode):
    """``argmin Σ_i |y_i|^1.5 + (y_i − x_i)²`` from 0, where the Hessian is infinite."""

    def objective(self, x, y):
        return (y.abs() ** 1.5 + (y - x) ** 2).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


def _hessian(node, xs, y):
    with torch.enable_grad():
        return Problem(node, xs, y.shape).kkt(y, None, node.options).hessian()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_dense_path_finds_the_generic_steps_minimiser(seed, scale):
    torch.manual_seed(seed)
    node = PseudoHuberRegression(n=7, m=4, c=0.3)
    generic = PseudoHuberRegression(n=7, m=4, c=0.3, options=Options(
        linear_solver=ThroughOperator()))
    generic.load_state_dict(node.state_dict())
    x = scale * torch.randn(6, 7, dtype=F64)
    y, y_generic = default_solution(node, (x,)).y, default_solution(generic, (x,)).y
    torch.testing.assert_close(y, y_generic, atol=1e-9 * (1 + scale), rtol=1e-9)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-8), (torch.float32, 1e-3)])
def test_rosenbrock_from_indefinite_starts(dtype, tol):
    starts = torch.tensor([[-1.2, 1.0], [0.0, 1.0], [-1.0, 2.0], [2.0, -1.0], [0.5, 3.0]],
                          dtype=dtype)
    a = torch.tensor([[1.0], [1.0], [-0.5], [2.0], [0.3]], dtype=dtype, requires_grad=True)
    node = Rosenbrock()
    assert (torch.linalg.eigvalsh(_hessian(node, (starts, a), starts)).amin(-1) < 0).sum() >= 3
    solution = default_solution(node, (starts, a))
    assert solution.y.dtype == dtype
    torch.testing.assert_close(solution.y, torch.cat([a, a * a], 1), atol=tol, rtol=tol)
    if dtype == F64:  # positive definite at every minimiser (in float32 too ill-conditioned)
        L = solution.hessian_cholesky
        assert L is not None and L.dtype == dtype
        H = _hessian(node, (starts, a), solution.y)
        torch.testing.assert_close(L @ L.mT, H, atol=1e-10, rtol=1e-10)


class _ScaledRosenbrock(Rosenbrock):
    def __init__(self, s: float, options: Options):
        super().__init__(options)
        self.s = s

    def objective(self, x, a, y):
        return self.s * super().objective(x, a, y)

    def initial_guess(self, x, a):
        return x


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-8), (torch.float32, 1e-3)])
@pytest.mark.parametrize("s", [1e-8, 1.0, 1e4])
def test_newton_cg_stops_on_a_tight_solve(s, dtype, tol):
    """Newton-CG on Rosenbrock scaled by ``s`` from 16 random starts: its CG forcing term
    ``min(½, √‖∇f‖)`` was absolute, so at ``s = 1e4`` every step was solved to a residual of ½,
    and a step below tol along the valley (where CG resolves least) stopped a sample 3 % off,
    silently (float32). Now the forcing is relative to the start's gradient and a step only
    stops the iteration when it comes from a solve to ``cg_tol``."""
    g = torch.Generator().manual_seed(0)
    starts = (torch.rand(16, 2, generator=g, dtype=F64) * 4 - 2).to(dtype)
    a = (torch.rand(16, 1, generator=g, dtype=F64) + 0.5).to(dtype)
    y = _ScaledRosenbrock(s, Options(linear_solver="cg", max_iter=200, strict=True))(starts, a)
    torch.testing.assert_close(y, torch.cat([a, a * a], 1), atol=tol, rtol=tol)


def test_double_well_from_next_to_its_maximum():
    x = torch.randn(4, 5, dtype=F64)
    y = DoubleWell()(x)
    assert torch.equal(y.sign(), x.sign())
    # stationary: 4 y (y² − 1) = x / 10, in the well (y² > 1/3)
    torch.testing.assert_close(4 * y * (y * y - 1), 0.1 * x, atol=1e-12, rtol=0)
    assert (3 * y * y > 1).all()


class _ScaledDoubleWell(DoubleWell):
    def __init__(self, s: float, options: Options):
        super().__init__(options)
        self.s = s

    def objective(self, x, y):
        return self.s * super().objective(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
@pytest.mark.parametrize("s", [1e-12, 1e-4, 1.0, 1e3])
def test_indefinite_steps_scale_with_the_problem(s, linear_solver, dtype):
    """The double well scaled by ``s`` from next to its maximum, 64 samples: the matrix-free step
    where the Hessian is indefinite was steepest descent of the gradient's length (at ``s =
    1e-4`` 100 iterations did not reach the wells); it is now Levenberg-shifted as the dense
    one. Some samples' curvatures span many orders (an entry next to the inflection point), so
    the dense step is Jacobi-scaled: with the negative entries left unscaled, their shift was on
    the scale of the scaled ones (one), and at ``s = 1e-12`` they never moved."""
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    y = _ScaledDoubleWell(s, Options(linear_solver=linear_solver, strict=True))(x)
    assert torch.equal(y.sign(), x.sign())
    atol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(4 * y * (y * y - 1), 0.1 * x, atol=atol, rtol=0)


class Sigmoid(DeclarativeNode):
    """``argmin Σ −x y + y log y + (1 − y) log(1 − y)`` from ``½``: ``σ(x)``, with curvature
    ``1/(y(1 − y))`` from 4 to ``1/eps`` where ``x`` saturates."""

    def objective(self, x, y):
        return (-x * y + y * y.log() + (1 - y) * torch.log1p(-y)).sum(-1)

    def initial_guess(self, x):
        return torch.full_like(x, 0.5)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (torch.float32, 1e-6)])
def test_curvatures_over_many_orders_do_not_stall_the_step(dtype, tol):
    """One saturated entry (``1 − y ≈ 4e-8``) made the Hessian look singular to the pivot test
    (``√eps · max |H|``): the least-squares step cut the other coordinates and Newton stopped,
    "converged", with ``y = 0.34`` for ``σ(−1.47) = 0.19`` (float32). The step is now formed
    from the Jacobi-scaled Hessian."""
    x = 10 * torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    x[:, 0] = torch.tensor([16.9, -17.0, 20.0], dtype=F64)  # saturated in float32
    x = x.to(dtype)
    y = Sigmoid(Options(strict=True))(x)
    torch.testing.assert_close(y, torch.sigmoid(x), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-9), (torch.float32, 1e-4)])
def test_singular_hessian_is_shifted_and_not_handed_on(dtype, tol):
    x = torch.randn(5, 1, dtype=dtype)
    solution = default_solution(Flat(), (x,))
    a = torch.tensor(Flat.a, dtype=dtype)
    torch.testing.assert_close(solution.y, x * a / (a @ a), atol=tol, rtol=tol)
    assert solution.hessian_cholesky is None  # no trusted factor of a singular Hessian


def test_non_finite_hessian_takes_a_steepest_descent_step():
    x = torch.tensor([[2.0, -0.5, 0.1, 3.0]], dtype=F64)
    start = torch.zeros_like(x).requires_grad_()
    with torch.enable_grad():
        f = Cusp().objective(x, start)
        g, = torch.autograd.grad(f.sum(), start, create_graph=True)
        assert not torch.isfinite(torch.autograd.grad(g[0, 0], start)[0]).all()
    y = Cusp()(x)
    # stationary: 1.5 sign(y) √|y| + 2 (y − x) = 0
    torch.testing.assert_close(1.5 * y.sign() * y.abs().sqrt() + 2 * (y - x),
                               torch.zeros_like(x), atol=1e-10, rtol=0)


def test_non_convergence_is_reported_with_the_numbers():
    starts = torch.tensor([[-1.2, 1.0], [0.0, 1.0]], dtype=F64)
    a = torch.ones(2, 1, dtype=F64)
    with pytest.warns(NonConvergenceWarning,
                      match=r"Newton did not converge in 2 iterations at samples .*worst "
                            r"relative step [0-9.e+-]+ > tol 1e-10"):
        solution = default_solution(Rosenbrock(Options(max_iter=2)), (starts, a))
    assert solution.hessian_cholesky is None and torch.isfinite(solution.y).all()
    with pytest.raises(NonConvergenceError, match="Newton did not converge"):
        default_solution(Rosenbrock(Options(max_iter=2, strict=True)), (starts, a))


def test_a_sample_does_not_depend_on_the_rest_of_the_batch():
    """Steps, chord steps and line searches are decided per sample: a sub-batch gives the same
    bits (the samples converge after different numbers of iterations)."""
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=F64) * torch.tensor([[0.01], [0.3], [1.0], [3.0], [10.0], [30.0]],
                                                    dtype=F64)
    node = PseudoHuberRegression(n=5, m=4, c=0.3)
    y = default_solution(node, (x,)).y
    for rows in ([0, 3], [1, 2, 4, 5], [5]):
        assert torch.equal(default_solution(node, (x[rows],)).y, y[rows])


def test_the_factor_is_formed_only_for_a_backward():
    x = torch.randn(4, 5, dtype=F64)
    node = PseudoHuberRegression(n=5, m=3).requires_grad_(False)
    assert default_solution(node, (x,)).hessian_cholesky is None  # no backward can follow
    solution = default_solution(node, (x.clone().requires_grad_(),))
    torch.testing.assert_close(solution.y, default_solution(node, (x,)).y, atol=0, rtol=0)
    L = solution.hessian_cholesky
    torch.testing.assert_close(L @ L.mT, _hessian(node, (x,), solution.y), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
def test_a_converged_solve_certifies_itself_and_the_backward_check_is_skipped(linear_solver,
                                                                               monkeypatch):
    """Every sample stopped on a Newton step below solver_tol: Solution.certified, and the
    backward does not repeat the test; a solve cut short certifies nothing and is checked."""
    from ddnlib.kkt import KKTPoint

    calls = []
    original = KKTPoint.optimality
    monkeypatch.setattr(KKTPoint, "optimality",
                        lambda self, *a: calls.append(1) or original(self, *a))
    node = PseudoHuberRegression(options=Options(linear_solver=linear_solver))
    x = torch.randn(5, 6, dtype=F64, requires_grad=True)
    solution = default_solution(node, (x,))
    assert solution.certified == node.options.tol("solver_tol", F64)
    node(x).sum().backward()
    assert not calls
    short = PseudoHuberRegression(options=Options(linear_solver=linear_solver, max_iter=1))
    with pytest.warns(NonConvergenceWarning):
        assert default_solution(short, (x,)).certified is None
    with pytest.warns(Warning):
        short(x).sum().backward()
    assert calls


class _TinyLogCosh(DeclarativeNode):
    """argmin Σ s² log cosh((y − x)/s) + ½ y²: non-quadratic at the scale ``s``, ``y = O(s)``."""

    def __init__(self, s: float, options: Options):
        super().__init__(options)
        self.s = s

    def objective(self, x, y):
        s = self.s
        return (s * s * torch.log(torch.cosh((y - x) / s)) + 0.5 * y * y).sum(-1)


def _tiny_log_cosh_root(x: torch.Tensor, s: float) -> torch.Tensor:
    """The root of ``s tanh((y − x)/s) + y`` per entry, by bisection in float64."""
    x = x.double()
    lo = torch.minimum(x, torch.zeros_like(x)) - 2 * s
    hi = torch.maximum(x, torch.zeros_like(x)) + 2 * s
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        left = s * torch.tanh((mid - x) / s) + mid < 0
        lo, hi = torch.where(left, mid, lo), torch.where(left, hi, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("s", [1e-6, 1e-3, 1e3])
def test_the_step_test_scales_with_the_problem(s, dtype, linear_solver):
    """A solution of size ``s`` is as accurate relative to ``s`` as one of size 1: the step test's
    floor is the size of the start and of the first step (with ``1 + ‖y‖∞``, ``s = 1e-6`` in
    float32 stopped after one step with an error of 250 %, certified, so that the backward's check
    was skipped too)."""
    g = torch.Generator().manual_seed(5)
    x = (3 * s * torch.randn(4, 5, generator=g, dtype=F64)).to(dtype)
    node = _TinyLogCosh(s, Options(linear_solver=linear_solver))
    y = default_solution(node, (x,)).y
    exact = _tiny_log_cosh_root(x, s)
    err = ((y.double() - exact).abs().amax(-1) / exact.abs().amax(-1)).max()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-9), err


class _ScaledLogCosh(DeclarativeNode):
    """``argmin s Σ log cosh((y − x)/t) + 0.1 ‖y/t‖²``: ``t`` times the answer at ``s = t = 1``."""

    def __init__(self, s: float, t: float, options: Options):
        super().__init__(options)
        self.s, self.t = s, t

    def objective(self, x, y):
        u, v = y / self.t, x / self.t
        return self.s * (torch.log(torch.cosh(u - v)).sum(-1) + 0.1 * (u * u).sum(-1))


@pytest.mark.parametrize("s, t", [(1e-12, 1e6), (1e-6, 1e6), (1e12, 1e-6)])
def test_matrix_free_newton_at_extreme_scales(s, t):
    """Curvatures ``s/t²`` of 1e-24 or 1e24 in float32: CG's ``pᵀHp`` for a right-hand side of
    the gradient's size under- or overflowed (at ``(1e-12, 1e6)`` Newton stopped 20 % off,
    silently); each system is now solved for a right-hand side of norm one."""
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = _ScaledLogCosh(1.0, 1.0, Options(linear_solver="dense"))(x)
    node = _ScaledLogCosh(s, t, Options(linear_solver="cg", max_iter=300, strict=True))
    y = node((t * x).float()).double() / t
    torch.testing.assert_close(y, exact, atol=1e-4, rtol=0)
