"""The engine's constrained backward against closed forms and finite differences (float64).

Nodes written with ``objective`` + constraints only (default solvers), except where a test needs a
planted defect in ``solve``. References are computed independently of ddnlib.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from ddnlib import (
    DDNWarning,
    DeclarativeNode,
    OptimalityError,
    OptimalityWarning,
    Options,
    SingularSystemError,
    SingularSystemWarning,
)

from helpers import DENSE, LINEAR_SOLVERS, MATRIX_FREE, gradcheck_node, vjp

SOLVERS = LINEAR_SOLVERS
F64 = torch.float64


# -- nodes ------------------------------------------------------------------------------------


class Sphere(DeclarativeNode):
    """y = argmin ½‖y − x‖² s.t. ‖y‖² = r² (``squared``) or ‖y‖ = r; learnable r. y = r x/‖x‖."""

    def __init__(self, r: float = 1.5, squared: bool = True, options: Options | None = None):
        super().__init__(options)
        self.r = torch.nn.Parameter(torch.tensor(r, dtype=F64))
        self.squared = squared

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        if self.squared:
            return (y * y).sum(-1, keepdim=True) - self.r**2
        return y.norm(dim=-1, keepdim=True) - self.r


class SphereOfInputRadius(DeclarativeNode):
    """y = argmin ½‖y − x‖² s.t. ‖y‖² = s² with the radius a second input s (b, 1). y = s x/‖x‖."""

    def objective(self, x, s, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, s, y):
        return (y * y).sum(-1, keepdim=True) - s**2


class DoubledSphere(Sphere):
    """The sphere constraint written twice: a rank-deficient constraint Jacobian."""

    def equality_constraints(self, x, y):
        h = super().equality_constraints(x, y)
        return torch.cat([h, 2 * h], dim=-1)


class Simplex(DeclarativeNode):
    """Sparsemax: y = argmin ½‖y − x‖² s.t. Σ y = 1, y ≥ 0."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def inequality_constraints(self, x, y):
        return -y


class ConstrainedLeastSquares(DeclarativeNode):
    """y = argmin ½‖M y − x‖² s.t. C y = d; learnable M (n, m) and C (p, m), second input d (b, p).

    Closed form from the KKT matrix: [[MᵀM, Cᵀ], [C, 0]] [y; λ] = [Mᵀx; d].
    """

    def __init__(self, n: int = 4, m: int = 3, p: int = 1, options: Options | None = None):
        super().__init__(options)
        self.M = torch.nn.Parameter(torch.randn(n, m, dtype=F64))
        self.C = torch.nn.Parameter(torch.randn(p, m, dtype=F64))

    def objective(self, x, d, y):
        return 0.5 * ((y @ self.M.T - x) ** 2).sum(-1)

    def equality_constraints(self, x, d, y):
        return y @ self.C.T - d

    def initial_guess(self, x, d):
        return x.new_zeros(x.shape[0], self.M.shape[1])


class BoxedLeastSquares(ConstrainedLeastSquares):
    """The same with an inequality ``y_0 ≤ bound``: inactive when ``bound`` is large."""

    bound = 1e3

    def inequality_constraints(self, x, d, y):
        return y[:, :1] - self.bound


# -- references (independent of ddnlib) --------------------------------------------------------


def sparsemax(x):
    """Sort-based sparsemax (Martins & Astudillo 2016), differentiable by autograd."""
    z, _ = x.sort(-1, descending=True)
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    cumsum = z.cumsum(-1)
    support = (1 + k * z > cumsum).sum(-1, keepdim=True)
    tau = (cumsum.gather(-1, support - 1) - 1) / support
    return (x - tau).clamp_min(0)


def sparsemax_jacobian(x):
    """diag(s) − s sᵀ / |S| with s the support indicator (Martins & Astudillo 2016, eq. 12)."""
    s = (sparsemax(x) > 0).to(x.dtype)
    return torch.diag_embed(s) - s.unsqueeze(-1) * s.unsqueeze(-2) / s.sum(-1)[:, None, None]


def constrained_lstsq(M, C, x, d):
    """Per-sample KKT solve, unbatched (no batched LU)."""
    m, p = M.shape[1], C.shape[0]
    K = torch.cat([torch.cat([M.T @ M, C.T], 1), torch.cat([C, C.new_zeros(p, p)], 1)], 0)
    rhs = torch.cat([x @ M, d], 1)
    return torch.stack([torch.linalg.solve(K, r) for r in rhs])[:, :m]


# -- helpers ----------------------------------------------------------------------------------


def _sparse_inputs(b=4, n=8, zeros=2, gap=1e-3, generator=None):
    """Random inputs whose sparsemax has at least ``zeros`` zero and two non-zero coordinates,
    every coordinate at least ``gap`` away from the threshold (so finite differences are valid)."""
    rows = []
    while len(rows) < b:
        x = 1.5 * torch.randn(64, n, dtype=F64, generator=generator)
        y = sparsemax(x)
        tau = (x - y)[torch.arange(64), y.argmax(-1)]
        ok = ((y == 0).sum(-1) >= zeros) & ((y > 0).sum(-1) >= 2)
        ok &= ((x - tau.unsqueeze(-1)).abs() > gap).all(-1)
        rows.extend(x[ok][: b - len(rows)])
    return torch.stack(rows)


# -- closed forms -----------------------------------------------------------------------------


@SOLVERS
@pytest.mark.parametrize("squared", [True, False], ids=["norm2", "norm"])
def test_sphere_reproduces_closed_form_and_gradients(squared, options):
    node = Sphere(r=1.3, squared=squared, options=options)
    x = torch.randn(4, 3, dtype=F64)
    x[0] *= 0.1  # inside the sphere: a negative multiplier for ‖y‖ = r
    xs = x.clone().requires_grad_()
    y = node(xs)
    r = node.r.detach()
    norm = x.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, r * x / norm, atol=1e-6, rtol=0)

    v = torch.randn_like(x)
    gx, gr = torch.autograd.grad((y * v).sum(), [xs, node.r])
    xhat = x / norm
    # d(r x̂)/dx = r/‖x‖ (I − x̂x̂ᵀ), d(r x̂)/dr = x̂
    expected_x = r / norm * (v - (v * xhat).sum(-1, keepdim=True) * xhat)
    torch.testing.assert_close(gx, expected_x, atol=1e-6, rtol=0)
    torch.testing.assert_close(gr, (v * xhat).sum(), atol=1e-6, rtol=0)
    assert gradcheck_node(node, x[:2])


@SOLVERS
def test_radius_as_second_input(options):
    node = SphereOfInputRadius(options=options)
    x = torch.randn(3, 3, dtype=F64)
    s = 0.5 + torch.rand(3, 1, dtype=F64)
    torch.testing.assert_close(node(x, s), s * x / x.norm(dim=-1, keepdim=True),
                               atol=1e-6, rtol=0)
    assert gradcheck_node(node, x, s)


@SOLVERS
def test_constrained_least_squares_matches_kkt_closed_form(options):
    node = ConstrainedLeastSquares(n=5, m=4, p=2, options=options)
    x = torch.randn(5, 5, dtype=F64)
    d = torch.randn(5, 2, dtype=F64)
    v = torch.randn(5, 4, dtype=F64)
    y = node(x, d)
    M, C = node.M.detach().requires_grad_(), node.C.detach().requires_grad_()
    xs, ds = x.clone().requires_grad_(), d.clone().requires_grad_()
    reference = constrained_lstsq(M, C, xs, ds)
    torch.testing.assert_close(y, reference.detach(), atol=1e-8, rtol=0)
    expected = torch.autograd.grad((reference * v).sum(), [xs, ds, M, C])
    for got, want in zip(vjp(node, (x, d), v), expected):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)
    small = ConstrainedLeastSquares(options=options)
    assert gradcheck_node(small, x[:2, :4], d[:2, :1])


@SOLVERS
def test_sparsemax_matches_sort_based_forward_and_jvp(options):
    node = Simplex(options=options)
    x = _sparse_inputs(b=4, n=8, zeros=3)
    y = node(x)
    torch.testing.assert_close(y, sparsemax(x), atol=1e-5, rtol=0)
    assert ((y == 0) | (y.abs() < 1e-9)).sum(-1).min() >= 3

    # JVPs J v through the backward pass (rows of J from VJPs), against the known Jacobian.
    J = torch.autograd.functional.jacobian(node, x)  # (b, n, b, n)
    J = torch.stack([J[i, :, i] for i in range(x.shape[0])])
    v = torch.randn_like(x)
    expected = (sparsemax_jacobian(x) @ v.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close((J @ v.unsqueeze(-1)).squeeze(-1), expected, atol=1e-4, rtol=0)
    assert gradcheck_node(node, x[:1])


def test_dense_and_matrix_free_agree():
    x, d = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    v = torch.randn(4, 4, dtype=F64)
    results = []
    for options in (DENSE, MATRIX_FREE):
        torch.manual_seed(1)
        node = ConstrainedLeastSquares(n=5, m=4, p=2, options=options)
        results.append(vjp(node, (x, d), v))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)

    x = _sparse_inputs(b=3, n=6, zeros=2)
    v = torch.randn_like(x)
    dense, cg = (vjp(Simplex(options=o), (x,), v)[0] for o in (DENSE, MATRIX_FREE))
    torch.testing.assert_close(dense, cg, atol=1e-7, rtol=1e-7)


def test_multipliers_from_ctx_and_recovered_agree():
    """The backward is the same whether the solver returns λ or the engine recovers it."""

    class SphereSolveOnlyY(Sphere):
        def solve(self, x):
            return self.r * x / x.norm(dim=-1, keepdim=True)

    x, v = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    given = vjp(Sphere(), (x,), v)
    recovered = vjp(SphereSolveOnlyY(), (x,), v)
    for a, b in zip(given, recovered):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


# -- degenerate cases -------------------------------------------------------------------------


class _FixedSolve:
    """Mixin: ``solve`` returns ``self.answer(x)`` (a planted forward solution)."""

    def solve(self, x):
        return self.answer(x)


class BoundaryOfBall(_FixedSolve, DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖² ≤ 1, but ``solve`` always returns x/‖x‖ (wrong inside)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def answer(self, x):
        return x / x.norm(dim=-1, keepdim=True)


class InfeasibleSphere(_FixedSolve, Sphere):
    """``solve`` returns x itself, off the sphere."""

    def answer(self, x):
        return x.clone()


class NearestOnSphereForMax(_FixedSolve, Sphere):
    """min −½‖y − x‖² on the sphere (a maximiser of the distance), but ``solve`` returns the
    nearest point r x/‖x‖: a KKT point whose reduced Hessian is negative definite."""

    def objective(self, x, y):
        return -0.5 * ((y - x) ** 2).sum(-1)

    def answer(self, x):
        return self.r * x / x.norm(dim=-1, keepdim=True)


DEGENERATE = [
    (BoundaryOfBall, OptimalityWarning, OptimalityError, "wrong sign", 0.3),
    (InfeasibleSphere, OptimalityWarning, OptimalityError, "violates the constraints", 1.0),
    (NearestOnSphereForMax, SingularSystemWarning, SingularSystemError, "not positive definite",
     1.0),
]


@SOLVERS
@pytest.mark.parametrize("node_cls, warning, error, words, scale", DEGENERATE,
                         ids=[c[0].__name__ for c in DEGENERATE])
def test_degenerate_cases_warn_with_numbers_and_raise_in_strict_mode(
        node_cls, warning, error, words, scale, options):
    x = scale * torch.nn.functional.normalize(torch.randn(3, 4, dtype=F64), dim=-1)
    x = x.requires_grad_()
    with pytest.warns(warning, match=words) as record:
        node_cls(options=options)(x).sum().backward()
    assert any(ch.isdigit() for w in record for ch in str(w.message))
    with pytest.raises(error):
        node_cls(options=options.replace(strict=True))(x).sum().backward()


@SOLVERS
def test_redundant_constraints_are_silent_and_gradients_stay_right(options):
    """Consistent redundant constraints (rank 1 < 2 rows): minimum-norm multipliers, the right
    gradient, no warning (issue 15: redundancy is normal, not an error)."""
    x = torch.randn(3, 4, dtype=F64)
    v = torch.randn_like(x)
    node = Sphere(options=options)
    expected = vjp(node, (x,), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DDNWarning)
        got = vjp(DoubledSphere(options=options.replace(strict=True)), (x,), v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_batched_kkt_solve_at_size_160_is_right():
    """Regression: batched LU is wrong on CPU with threads at this size; the engine must not use it.

    y = argmin ½ yᵀQy − xᵀy s.t. Σ y = 0 with Q SPD (m = 160), batch of 2, against unbatched solves.
    """
    m = 160

    class Quadratic(DeclarativeNode):
        def __init__(self, Q):
            super().__init__(Options(linear_solver="dense"))
            self.Q = torch.nn.Parameter(Q)

        def objective(self, x, y):
            return 0.5 * ((y @ self.Q) * y).sum(-1) - (x * y).sum(-1)

        def equality_constraints(self, x, y):
            return y.sum(-1, keepdim=True)

        def solve(self, x):
            return torch.stack([_kkt_reference(self.Q, xi) for xi in x])

    B = torch.randn(m, m, dtype=F64)
    Q = B @ B.T / m + torch.eye(m, dtype=F64)
    node = Quadratic(Q)
    x = torch.randn(2, m, dtype=F64, requires_grad=True)
    v = torch.randn(2, m, dtype=F64)
    gx, gQ = torch.autograd.grad((node(x) * v).sum(), [x, node.Q])
    Qr = Q.clone().requires_grad_()
    xr = x.detach().requires_grad_()
    Qsym = 0.5 * (Qr + Qr.T)  # the objective only sees the symmetric part of Q
    ref = torch.stack([_kkt_reference(Qsym, xi) for xi in xr])
    ex, eQ = torch.autograd.grad((ref * v).sum(), [xr, Qr])
    torch.testing.assert_close(gx, ex, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(gQ, eQ, atol=1e-9, rtol=1e-7)


def _kkt_reference(Q, x):
    """Unbatched solve of [[Q, 1], [1ᵀ, 0]] [y; λ] = [x; 0]."""
    m = Q.shape[0]
    one = torch.ones(m, 1, dtype=Q.dtype)
    K = torch.cat([torch.cat([Q, one], 1), torch.cat([one.T, Q.new_zeros(1, 1)], 1)], 0)
    return torch.linalg.solve(K, torch.cat([x, x.new_zeros(1)]))[:m]


# -- properties -------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bound=st.floats(10.0, 1e3))
def test_inactive_inequality_leaves_gradients_unchanged(seed, bound):
    g = torch.Generator().manual_seed(seed)
    x, d = torch.randn(3, 4, dtype=F64, generator=g), torch.randn(3, 1, dtype=F64, generator=g)
    v = torch.randn(3, 3, dtype=F64, generator=g)
    torch.manual_seed(seed)
    plain = ConstrainedLeastSquares()
    boxed = BoxedLeastSquares()
    boxed.load_state_dict(plain.state_dict())
    boxed.bound = bound
    # The bound is inactive only if the unconstrained-in-y_0 solution stays below it.
    assume(plain(x, d)[:, 0].max() < bound - 1)
    for a, b in zip(vjp(plain, (x, d), v), vjp(boxed, (x, d), v)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
