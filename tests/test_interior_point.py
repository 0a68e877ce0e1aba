"""The batched interior-point solver (ddnlib.interior_point): QPs against closed forms and scipy,
infeasible starts, equality + inequality constraints, both float dtypes, redundant constraints,
multipliers (KKT residuals), non-convergence and non-finite starts reported, gradients through a
node that uses it, and agreement with qpth / cvxpylayers where those are installed."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from ddnlib import DeclarativeNode, NonConvergenceError, NonConvergenceWarning, Options
from ddnlib import interior_point
from ddnlib.problem import Problem, batched_jacobian, grad

F64 = torch.float64


def sort_simplex(x: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex by sorting (Held, Wolfe & Crowder 1974)."""
    u = torch.sort(x, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True)
    return (x - css.gather(-1, rho - 1) / rho).clamp_min(0)


class Simplex(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. 1ᵀy = 1 (``copies`` times, scaled: redundant), y ≥ 0."""

    def __init__(self, copies: int = 1, options: Options | None = None):
        super().__init__(options)
        self.copies = copies

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        row = y.sum(-1, keepdim=True) - 1
        return torch.cat([(k + 1) * row for k in range(self.copies)], -1)

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        return interior_point.solve(self, x)


class Box(DeclarativeNode):
    """argmin ½ Σ d_i (y_i − x_i)² s.t. lo ≤ y ≤ hi: ``clamp(x, lo, hi)``."""

    def __init__(self, m: int, lo: float = -0.5, hi: float = 0.5):
        super().__init__()
        self.d = torch.linspace(0.5, 3.0, m, dtype=F64)
        self.lo, self.hi = lo, hi

    def objective(self, x, y):
        return 0.5 * (self.d.to(y.dtype) * (y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([self.lo - y, y - self.hi], -1)


class QP(DeclarativeNode):
    """OptNet-style argmin ½ yᵀQy + xᵀy s.t. G y ≤ h, A y = 0 (y = 0 is feasible), learnable Q."""

    def __init__(self, n: int = 6, q: int = 4, p: int = 2, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.L = torch.nn.Parameter(torch.randn(n, n, generator=gen, dtype=F64) / n**0.5)
        self.G = torch.randn(q, n, generator=gen, dtype=F64)
        self.h = torch.rand(q, generator=gen, dtype=F64) + 0.1
        self.A = torch.randn(p, n, generator=gen, dtype=F64)

    def Q(self):
        return self.L @ self.L.T + torch.eye(self.L.shape[0], dtype=F64)

    def objective(self, x, y):
        return 0.5 * ((y @ self.Q()) * y).sum(-1) + (x * y).sum(-1)

    def inequality_constraints(self, x, y):
        return y @ self.G.T - self.h

    def equality_constraints(self, x, y):
        return y @ self.A.T

    def initial_guess(self, x):
        return torch.zeros_like(x)

    def solve(self, x):
        return interior_point.solve(self, x)


def _run(node, x, y0=None, options=None):
    y0 = node.initial_guess(x) if y0 is None else y0
    return interior_point.interior_point(Problem(node, (x,), y0.shape), y0,
                                         options or node.options)


def _scipy_qp(node: QP, x: torch.Tensor) -> torch.Tensor:
    Q, G, h, A = (t.detach().numpy() for t in (node.Q(), node.G, node.h, node.A))
    out = []
    for xi in x.numpy():
        res = scipy.optimize.minimize(
            lambda y: (0.5 * y @ Q @ y + xi @ y, Q @ y + xi), np.zeros(len(xi)), jac=True,
            method="SLSQP", options={"ftol": 1e-13, "maxiter": 500},
            constraints=[{"type": "ineq", "fun": lambda y: h - G @ y, "jac": lambda y: -G},
                         {"type": "eq", "fun": lambda y: A @ y, "jac": lambda y: A}])
        assert res.status in (0, 8), res.message  # 8: SLSQP's line search at its precision
        out.append(res.x)
    return torch.tensor(np.array(out))


def _kkt(node, x, result):
    """Largest stationarity, feasibility, sign and complementarity residual of a result."""
    b = x.shape[0]
    problem = Problem(node, (x,), result.y.shape)
    with torch.enable_grad():
        yv = result.y.reshape(b, -1).clone().requires_grad_()
        h, g = problem.eq(yv), problem.ineq(yv)
        gf = grad(problem.objective(yv).sum(), [yv], retain_graph=True)[0]
        A = batched_jacobian(torch.cat([h, g], 1), yv)
    nu = torch.cat([result.eq_multipliers, result.ineq_multipliers], 1)
    stat = (gf + (A.transpose(-1, -2) @ nu.unsqueeze(-1))[..., 0]).abs().max()
    mu = result.ineq_multipliers
    return max(stat.item(), h.abs().max().item() if h.numel() else 0.0,
               g.clamp_min(0).max().item(), (-mu).clamp_min(0).max().item(),
               (mu * g).abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_box_qp_is_the_clamp_in_both_dtypes(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 7, generator=gen, dtype=F64).to(dtype)
    node = Box(7)
    result = _run(node, x)
    assert result.y.dtype == dtype and result.y.device == x.device
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y, x.clamp(-0.5, 0.5), atol=tol, rtol=0)


@pytest.mark.parametrize("start", ["default", "infeasible", "far"])
def test_simplex_projection_matches_sorting_from_any_start(start):
    gen = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(32, 9, generator=gen, dtype=F64)
    y0 = {"default": x, "infeasible": torch.full_like(x, -3.0), "far": 100 * x}[start]
    result = _run(Simplex(), x, y0)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y, sort_simplex(x), atol=1e-9, rtol=0)
    assert _kkt(Simplex(), x, result) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("copies", [2, 3])
def test_redundant_but_consistent_equalities(copies, dtype):
    """Redundant rows make the Schur complement singular: the steps of λ have no component along
    its null space (least squares), so λ stays the size of the data; in float32 a factor of the
    shifted matrix let λ drift to ~1e7, ∇L lost every digit to rounding and the slacks
    underflowed to NaN (entropic and quadratic transport, finding F5)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 6, generator=gen, dtype=F64).to(dtype)
    node = Simplex(copies)
    result = _run(node, x)
    assert bool(result.converged.all())
    f32 = dtype == torch.float32
    torch.testing.assert_close(result.y, sort_simplex(x), atol=1e-5 if f32 else 1e-9, rtol=0)
    assert result.eq_multipliers.abs().max() <= 10 * (1 + x.abs().max())
    if not f32:
        assert _kkt(node, x, result) < 1e-8


def test_equality_and_inequality_qp_matches_scipy():
    gen = torch.Generator().manual_seed(4)
    node = QP()
    x = 2 * torch.randn(8, 6, generator=gen, dtype=F64)
    result = _run(node, x)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y, _scipy_qp(node, x), atol=1e-6, rtol=0)
    assert _kkt(node, x, result) < 1e-8
    active = result.ineq_multipliers > 0
    assert bool(active.any()) and not bool(active.all())  # the test exercises both kinds of row


def test_non_convergence_is_reported_with_samples_and_residual():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10), dtype=F64)
    y0 = 100 * x  # far and infeasible, and a quartic: no sample can end within one iteration
    with pytest.warns(NonConvergenceWarning, match=r"samples \[0, 1, 2, 3\].*residual"):
        result = _run(Cubic(4), x, y0, options=Options(max_iter=1))
    assert not bool(result.converged.any())
    with pytest.raises(NonConvergenceError, match="interior point did not converge"):
        _run(Cubic(4), x, y0, options=Options(max_iter=1, strict=True))


class LogBarrier(DeclarativeNode):
    """argmin −Σ log y + ½‖y − x‖² s.t. Σ y ≤ 1: undefined where some y ≤ 0."""

    def objective(self, x, y):
        return -(y.log()).sum(-1) + 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1


def test_non_finite_objective_at_the_start_is_a_clear_error():
    x = torch.tensor([[0.2, 0.3], [-0.1, 0.2], [0.1, 0.1]], dtype=F64)
    with pytest.raises(ValueError, match=r"objective is not finite at the initial guess at "
                                         r"samples \[1\]"):
        _run(LogBarrier(), x)
    result = _run(LogBarrier(), x, y0=torch.full_like(x, 0.25))  # a sensible start works
    assert bool(result.converged.all())
    assert _kkt(LogBarrier(), x, result) < 1e-8


def test_gradients_through_the_node_pass_gradcheck():
    node = QP(n=4, q=3, p=1, seed=5)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    L = node.L.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, L: torch.func.functional_call(node, {"L": L}, (x,)), (x, L),
        atol=1e-6, rtol=1e-5)


def _peer_data(b=5, n=6, q=4, p=2, seed=6):
    node = QP(n, q, p, seed)
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(b, n, generator=gen, dtype=F64)
    v = torch.randn(b, n, generator=gen, dtype=F64)
    return node, x, v


def _ddn_grads(node, x, v):
    x = x.clone().requires_grad_()
    y = node(x)
    gx, gL = torch.autograd.grad(y, (x, node.L), v)
    return y.detach(), gx, gL


def test_gradients_agree_with_qpth():
    qp = pytest.importorskip("qpth.qp")
    node, x, v = _peer_data()
    y, gx, gL = _ddn_grads(node, x, v)
    L = node.L.detach().clone().requires_grad_()
    xq = x.clone().requires_grad_()
    Q = (L @ L.T + torch.eye(L.shape[0], dtype=F64)).expand(x.shape[0], -1, -1)
    # a batched Q: with a shared (2-d) Q qpth returns the batch mean of its gradient
    yq = qp.QPFunction(verbose=-1, eps=1e-14, maxIter=100)(
        Q, xq, node.G, node.h, node.A, torch.zeros(node.A.shape[0], dtype=F64))
    gxq, gLq = torch.autograd.grad(yq, (xq, L), v)
    torch.testing.assert_close(y, yq.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gxq, atol=1e-6, rtol=0)
    torch.testing.assert_close(gL, gLq, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffcp under numpy 2
def test_gradients_agree_with_cvxpylayers():
    cp = pytest.importorskip("cvxpy")
    layers = pytest.importorskip("cvxpylayers.torch")
    node, x, v = _peer_data()
    y, gx, _ = _ddn_grads(node, x, v)
    n = x.shape[1]
    Q = node.Q().detach().numpy()
    c = cp.Parameter(n)
    yv = cp.Variable(n)
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(yv, Q) + c @ yv),
                         [node.G.numpy() @ yv <= node.h.numpy(), node.A.numpy() @ yv == 0])
    layer = layers.CvxpyLayer(problem, parameters=[c], variables=[yv])
    xc = x.clone().requires_grad_()
    (yc,) = layer(xc, solver_args={"eps": 1e-12, "max_iters": 100000})
    (gxc,) = torch.autograd.grad(yc, xc, v)
    torch.testing.assert_close(y, yc.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gxc, atol=1e-6, rtol=0)


# -- robustness cases of issue 16: poor starts, maxima, eigenvectors, peaked transport plans ----


class Sphere(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖² = 1: ``x/‖x‖`` (the antipode ``−x/‖x‖`` is a maximum)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("start", ["near origin", "antipode (a maximum)", "default"])
def test_sphere_from_poor_starts(start, dtype, tol):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 16, generator=gen, dtype=F64)
    y0 = {"near origin": 1e-3 * torch.randn(64, 16, generator=gen, dtype=F64),
          "antipode (a maximum)": -x / x.norm(dim=-1, keepdim=True), "default": x}[start]
    result = _run(Sphere(), x.to(dtype), y0.to(dtype))
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y, (x / x.norm(dim=-1, keepdim=True)).to(dtype),
                               atol=tol, rtol=0)


class TopEigenvector(DeclarativeNode):
    """argmin −yᵀAy s.t. ‖y‖² = 1: every eigenvector is a KKT point, only the top one a minimum."""

    def objective(self, A, y):
        return -(y * (A @ y.unsqueeze(-1))[..., 0]).sum(-1)

    def equality_constraints(self, A, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def initial_guess(self, A):
        return A[:, :, 0].clone()


@pytest.mark.parametrize("start", ["default", "bottom eigenvector (a maximum)"])
def test_top_eigenvector(start):
    gen = torch.Generator().manual_seed(8)
    B = torch.randn(32, 8, 8, generator=gen, dtype=F64)
    A = B @ B.transpose(-1, -2) / 8
    V = torch.linalg.eigh(A).eigenvectors
    node = TopEigenvector()
    y0 = node.initial_guess(A) if start == "default" else V[..., 0]
    result = interior_point.interior_point(Problem(node, (A,), y0.shape), y0, node.options)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y.abs(), V[..., -1].abs(), atol=1e-9, rtol=0)


class EntropicTransport(DeclarativeNode):
    """argmin ⟨C, P⟩ + ε Σ P log P s.t. P 1 = a, Pᵀ 1 = b (one redundant row: Σa = Σb), P ≥ 0."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.n, self.eps = n, eps

    def objective(self, C, a, b, y):
        return (C.flatten(1) * y).sum(-1) + self.eps * (y * y.log()).sum(-1)

    def equality_constraints(self, C, a, b, y):
        P = y.reshape(-1, self.n, self.n)
        return torch.cat([P.sum(-1) - a, P.sum(-2) - b], -1)

    def inequality_constraints(self, C, a, b, y):
        return -y

    def initial_guess(self, C, a, b):
        return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(1)


def test_peaked_optimal_transport_with_redundant_marginals():
    n, eps = 6, 0.02
    gen = torch.Generator().manual_seed(9)
    C = torch.rand(16, n, n, generator=gen, dtype=F64)
    a = torch.softmax(torch.randn(16, n, generator=gen, dtype=F64), -1)
    b = torch.softmax(torch.randn(16, n, generator=gen, dtype=F64), -1)
    f, g = torch.zeros_like(a), torch.zeros_like(b)
    for _ in range(3000):  # log-domain Sinkhorn (the reference)
        f = a.log() - torch.logsumexp(-C / eps + g.unsqueeze(-2), -1)
        g = b.log() - torch.logsumexp(-C / eps + f.unsqueeze(-1), -2)
    P = torch.exp(-C / eps + f.unsqueeze(-1) + g.unsqueeze(-2))
    assert (P.sum(-1) - a).abs().max() < 1e-13 and P.max() > 0.3  # converged and peaked
    node = EntropicTransport(n, eps)
    y0 = node.initial_guess(C, a, b)
    result = interior_point.interior_point(Problem(node, (C, a, b), y0.shape), y0, node.options)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.y, P.flatten(1), atol=1e-10, rtol=0)


# -- structure: quadratic / affine parts detected by autograd, expanded once, result certified --


class Cubic(DeclarativeNode):
    """argmin Σ (y − x)⁴/4 + ½‖y‖² s.t. Σ y ≤ 1 (``power``: the objective's exponent)."""

    def __init__(self, power: int = 4):
        super().__init__()
        self.power = power

    def objective(self, x, y):
        return ((y - x) ** self.power).sum(-1) / self.power + 0.5 * (y * y).sum(-1)

    def inequality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1


class ExpBudget(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. Σ exp(y) ≤ 2, y₀ ≥ −1 (a quadratic objective, a nonlinear row)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.stack([y.exp().sum(-1) - 2, -1 - y[:, 0]], -1)


class NormBall(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖ ≤ 1 (the norm: not quadratic)."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y.norm(dim=-1, keepdim=True) - 1


class AbsBox(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. |y₀| ≤ 1: ``abs`` has a zero second derivative and no graph to
    ``y``, so autograd shows the row as affine with the slope of the start's sign."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y[:, :1].abs() - 1


def _model(node, x, y0=None):
    y0 = (node.initial_guess(x) if y0 is None else y0).reshape(x.shape[0], -1)
    return interior_point._Model(Problem(node, (x,), y0.shape), y0)


_STRUCTURE = {  # node, quadratic objective, kind of constraints
    "qp": (QP(), True, "affine"),  # learnable L (requires grad): Q depends on it, not on y
    "simplex": (Simplex(), True, "affine"),  # (y − x) ** 2: its Hessian holds (y − x) ** 0
    "box": (Box(6), True, "affine"),
    "sphere": (Sphere(), True, "quadratic"),
    "eigenvector": (TopEigenvector(), True, "quadratic"),
    "quartic": (Cubic(4), False, "affine"),
    "cubic": (Cubic(3), False, "affine"),
    "log": (LogBarrier(), False, "affine"),
    "exp": (ExpBudget(), True, "nonlinear"),
    "norm": (NormBall(), True, "nonlinear"),
}


@pytest.mark.parametrize("name,dtype", [(name, dtype) for name in _STRUCTURE
                                        for dtype in (torch.float64, torch.float32)
                                        if name != "qp" or dtype == torch.float64])  # f64 QP
def test_structure_is_detected_only_where_it_is_there(name, dtype):
    node, quadratic, constraints = _STRUCTURE[name]
    gen = torch.Generator().manual_seed(11)
    if isinstance(node, TopEigenvector):
        B = torch.randn(4, 5, 5, generator=gen, dtype=F64)
        x = (B @ B.transpose(-1, -2)).to(dtype)
    else:
        x = (0.3 * torch.rand(4, 6, generator=gen, dtype=F64) + 0.1).to(dtype)
    model = _model(node, x)
    assert (model.quad is not None) == quadratic
    assert (model.lin is not None) == (constraints != "nonlinear")
    assert (model.lin is not None and model.lin[2] is not None) == (constraints == "quadratic")
    for part in (model.quad or ()) + tuple(t for t in (model.lin or ()) if t is not None):
        assert part.dtype == dtype and not part.requires_grad
    # convex: a quadratic objective with a positive semi-definite Hessian, affine constraints
    convex = isinstance(node, (QP, Simplex, Box))
    assert bool(model.convex.all()) == convex and model.all_convex == convex


@pytest.mark.parametrize("case,dtype,tol", [
    (case, dtype, tol) for case in ("qp", "simplex", "sphere", "eigenvector", "exp", "box")
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 2e-3))
    if case != "qp" or dtype == torch.float64])  # the QP node holds float64 parameters
def test_expanded_and_autodiff_paths_agree(case, dtype, tol):
    gen = torch.Generator().manual_seed(12)
    if case == "eigenvector":
        node = TopEigenvector()
        B = torch.randn(16, 6, 6, generator=gen, dtype=F64)
        x = B @ B.transpose(-1, -2) / 6
    else:
        node = {"qp": QP(), "simplex": Simplex(), "sphere": Sphere(), "exp": ExpBudget(),
                "box": Box(6)}[case]
        x = 2 * torch.randn(16, 6, generator=gen, dtype=F64)
    x = x.to(dtype)
    y0 = node.initial_guess(x)
    problem = Problem(node, (x,), y0.shape)
    fast = interior_point.interior_point(problem, y0, node.options)
    plain = interior_point.interior_point(problem, y0, node.options, exploit_structure=False)
    assert bool(fast.converged.all()) and bool(plain.converged.all())
    assert fast.y.dtype == dtype
    if case == "eigenvector":  # the sign of an eigenvector is the start's
        torch.testing.assert_close(fast.y.abs(), plain.y.abs(), atol=tol, rtol=0)
    else:
        torch.testing.assert_close(fast.y, plain.y, atol=tol, rtol=0)
    for a, b in ((fast.eq_multipliers, plain.eq_multipliers),
                 (fast.ineq_multipliers, plain.ineq_multipliers)):
        torch.testing.assert_close(a, b, atol=tol * (1 + b.abs().amax().item() if b.numel() else 1), rtol=0)
    assert bool((fast.residual <= node.options.tol("solver_tol", dtype)).all())


def test_a_branch_that_looks_affine_is_caught_by_the_certification():
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(8, 4, generator=gen, dtype=F64)
    x[:, 0] = -3.0  # the answer has y₀ = −1: the row's slope there is −1, not the start's +1
    y0 = torch.zeros_like(x)
    y0[:, 0] = 0.5
    node = AbsBox()
    model = _model(node, x, y0)
    assert model.lin is not None  # autograd is fooled ...
    result = _run(node, x, y0)    # ... the answer is not
    assert bool(result.converged.all())
    expected = x.clone()
    expected[:, 0] = -1.0
    torch.testing.assert_close(result.y, expected, atol=1e-9, rtol=0)
    assert _kkt(node, x, result) < 1e-8


def test_unconverged_samples_are_solved_again_only_where_the_expansion_was_wrong():
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(6, 4, generator=gen, dtype=F64)
    x[:, 0] = -3.0
    y0 = torch.zeros_like(x)
    y0[:, 0] = 0.5
    for node, wrong in ((AbsBox(), True), (Sphere(), False)):
        model = _model(node, x, y0)
        out = interior_point._solve(model, y0, Options(max_iter=1), 1e-10)
        out.converged[:] = False  # as if the iteration had stopped at its last point
        trusted = interior_point._certified(model, out, 1e-10)
        assert bool((trusted != wrong).all())


class Ellipsoid(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. Σ d_i y_i² ≤ 1 with ``d`` per sample: a quadratic row whose Hessian
    differs between samples."""

    def objective(self, x, d, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, d, y):
        return (d * y * y).sum(-1, keepdim=True) - 1

    def initial_guess(self, x, d):
        return torch.zeros_like(x)


def test_per_sample_quadratic_constraints_agree_with_autodiff():
    gen = torch.Generator().manual_seed(15)
    x = 2 * torch.randn(12, 5, generator=gen, dtype=F64)
    d = torch.rand(12, 5, generator=gen, dtype=F64) + 0.5
    node = Ellipsoid()
    y0 = node.initial_guess(x, d)
    problem = Problem(node, (x, d), y0.shape)
    model = interior_point._Model(problem, y0)
    assert model.lin is not None and model.lin[2] is not None and model.lin[2].stride(0) != 0
    fast = interior_point.interior_point(problem, y0, node.options)
    plain = interior_point.interior_point(problem, y0, node.options, exploit_structure=False)
    assert bool(fast.converged.all()) and bool(plain.converged.all())
    torch.testing.assert_close(fast.y, plain.y, atol=1e-8, rtol=0)
    torch.testing.assert_close(fast.ineq_multipliers, plain.ineq_multipliers, atol=1e-8, rtol=0)
    assert bool(((d * fast.y**2).sum(-1) <= 1 + 1e-9).all())


@pytest.mark.parametrize("node", [QP(n=5, q=3, p=1, seed=3), Simplex(), Box(4)],
                         ids=["qp", "simplex", "box"])
def test_a_qp_hands_its_constant_derivatives_to_the_backward(node):
    """Quadratic objective, affine constraints: the solution carries ∇²L and the constraint
    Jacobian (exactly autodiff's), and the backward with them equals the backward without."""
    import dataclasses

    from ddnlib.engine import implicit_vjp

    x = 2 * torch.randn(6, node.A.shape[1] if isinstance(node, QP) else 4, dtype=F64)
    solution = node.solve(x)
    y = solution.y
    with torch.enable_grad():
        yv = y.detach().clone().requires_grad_()
        problem = Problem(node, (x,), y.shape)
        c = problem.constraints(yv)
        g = grad(problem.objective(yv).sum(), [yv], create_graph=True)[0]
        H, J = batched_jacobian(g, yv), batched_jacobian(c, yv)
    torch.testing.assert_close(solution.hessian, H, atol=1e-12, rtol=0)
    torch.testing.assert_close(solution.constraint_jacobian, J, atol=1e-12, rtol=0)
    xr, v = x.clone().requires_grad_(), torch.randn_like(x)
    plain = dataclasses.replace(solution, hessian=None, constraint_jacobian=None)
    handed, _ = implicit_vjp(node, (xr,), y, v, solution)
    recomputed, _ = implicit_vjp(node, (xr,), y, v, plain)
    torch.testing.assert_close(handed[0], recomputed[0], atol=1e-10, rtol=0)


def test_no_derivatives_are_handed_over_where_the_problem_is_not_a_qp():
    x = 3 * torch.randn(4, 5, dtype=F64)
    for solution in (interior_point.solve(Sphere(), x),
                     interior_point.solve(QP(n=5, q=3, p=1), x, exploit_structure=False)):
        assert solution.hessian is None and solution.constraint_jacobian is None


def test_a_certified_solution_skips_the_backward_optimality_check(monkeypatch):
    """Converged in every sample: the interior point certifies its stopping test (by autodiff
    at y) and the backward does not repeat it; not converged: no certificate, the check runs."""
    from ddnlib.kkt import KKTPoint

    calls = []
    original = KKTPoint.optimality
    monkeypatch.setattr(KKTPoint, "optimality",
                        lambda self, *a: calls.append(1) or original(self, *a))
    node = QP(n=5, q=3, p=1, seed=2)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    assert node.solve(x.detach()).certified == node.options.tol("solver_tol", F64)
    node(x).sum().backward()
    assert not calls
    sphere = Sphere(Options(max_iter=2))  # a nonlinear constraint: two iterations do not do
    x = 3 * torch.randn(4, 5, dtype=F64, requires_grad=True)
    with pytest.warns(NonConvergenceWarning):
        solution = interior_point.solve(sphere, x.detach())
    assert solution.certified is None
    with pytest.warns(NonConvergenceWarning):
        y = sphere(x)
    with pytest.warns(Warning):  # the unconverged point fails the check
        y.sum().backward()
    assert calls


class _Ball(DeclarativeNode):
    """argmin ½‖y − x‖² s.t. ‖y‖² ≤ r²: y = x min(1, r/‖x‖)."""

    def __init__(self, r: float):
        super().__init__()
        self.r = r

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r**2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1e-5, 1e-3, 1e3, 1e5])
@pytest.mark.parametrize("start", ["x", "zeros"])
def test_the_stopping_test_scales_with_the_problem(r, dtype, start):
    """A ball of radius ``r`` (points inside and outside) is solved as accurately relative to
    ``r`` as the unit ball: the floors of the stopping test follow the problem's size (with floors
    of 1, radius 1e-3 in float32 "converged" in two iterations to answers 20–66 % of ``r`` off)."""
    g = torch.Generator().manual_seed(21)
    d = torch.randn(6, 3, generator=g, dtype=torch.float64)
    dist = torch.tensor([0.1, 0.3, 0.6, 1.5, 2.0, 5.0], dtype=torch.float64)[:, None]
    x = (r * dist * d / d.norm(dim=-1, keepdim=True)).to(dtype)
    exact = x.double() * (r / x.double().norm(dim=-1, keepdim=True)).clamp_max(1)
    result = _run(_Ball(r), x, y0=x.clone() if start == "x" else torch.zeros_like(x))
    assert result.converged.all()
    err = (result.y.double() - exact).norm(dim=-1) / r
    assert (err <= (1e-4 if dtype == torch.float32 else 1e-8)).all(), err


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("k", [1e-6, 1e-3, 1e3, 1e6])
def test_a_scaled_qp_has_the_scaled_solution(k, dtype):
    """``x → k x``, ``h → k h`` scales the QP's solution by ``k``: the interior point finds it as
    accurately relative to ``k`` (with floors of 1, ``k = 1e-6`` in float32 was 110 % off,
    silently, and 2e-8 in float64)."""
    gen = torch.Generator().manual_seed(4)
    x = 2 * torch.randn(16, 6, generator=gen, dtype=F64)
    node = QP().requires_grad_(False)
    reference = _run(node, x).y
    node.h = k * node.h
    node.L.data, node.G, node.A = (t.to(dtype) for t in (node.L.data, node.G, node.A))
    node.h = node.h.to(dtype)
    Q = node.Q
    node.Q = lambda: Q().to(dtype)
    result = _run(node, (k * x).to(dtype))
    assert result.converged.all()
    err = (result.y.double() / k - reference).abs().amax(-1) / reference.abs().amax(-1)
    assert (err <= (1e-5 if dtype == torch.float32 else 1e-9)).all(), err


def _far_from_the_answer(kind: str, size: float):
    """``(node, x, exact, unit)``: problems whose answer is far smaller than the data or the
    start (a box of width ``size`` and a ball of radius ``size`` with ``|x| ~ 1``, from ``y₀ =
    x``) or far smaller than the objective (the simplex at ``x`` of size ``size``, where ``f ≈
    ½‖x‖²``); ``unit``: the answer's size."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=F64)
    if kind == "box":
        return Box(4, 0.0, size), x, x.clamp(0.0, size), size
    if kind == "ball":
        return _Ball(size), x, size * x / x.norm(dim=-1, keepdim=True), size
    return Simplex(), size * x, sort_simplex(size * x), 1.0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("kind, size", [("box", 1e-4), ("box", 1e-6), ("ball", 1e-6),
                                        ("ball", 1e-8), ("simplex", 1e5), ("simplex", 1e6)])
def test_the_answer_is_accurate_on_its_own_scale(kind, size, dtype):
    """The stopping test judged these by the data's size: float32 boxes of width 1e-4 were 45 %
    off, balls of radius 1e-8 3500 %, the simplex at scale 1e6 30 % (complementarity relative to
    ``|f| ≈ ½‖x‖²``), all converged and certified (silent). The feasibility floor follows the
    constraints' size at the point reached, and complementarity is a slack times a multiplier."""
    node, x, exact, unit = _far_from_the_answer(kind, size)
    result = _run(node, x.to(dtype), y0=x.to(dtype))
    assert result.converged.all()
    err = (result.y.double() - exact).abs().amax() / unit
    assert err <= (1e-4 if dtype == torch.float32 else 1e-8), err


class _ScaledBall(_Ball):
    """``argmin s · ½‖y − x‖²`` s.t. ``‖y‖² ≤ r²``: the same answer for every ``s > 0``."""

    def __init__(self, r: float, s: float):
        super().__init__(r)
        self.s = s

    def objective(self, x, y):
        return self.s * super().objective(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("s", [1e-12, 1e-6, 1e6])
def test_the_objective_scale_does_not_move_the_answer(s, dtype):
    """Scaling the objective by ``s`` leaves the argmin: with the stopping test's gradient floor
    taken from ∇²L at ``z₀ = 1`` (the constraint's curvature, of size one) and ``z₀ = 1``, an
    objective of size 1e-12 stopped 3 % off, silently, in float64 too."""
    x = 2 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = x / x.norm(dim=-1, keepdim=True).clamp_min(1)
    result = _run(_ScaledBall(1.0, s), x.to(dtype), y0=x.to(dtype))
    assert result.converged.all()
    err = (result.y.double() - exact).abs().amax()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-9), err


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_weakly_active_constraint_is_met_exactly(dtype):
    """``x`` on the sphere: the answer ``y = x`` has the constraint active with multiplier 0. The
    interior point converges there at the rate of √tol only; the active-set step, whose
    multiplier comes out ± rounding, was rejected for a multiplier of −1e-17, and ``y`` was left
    4e-6 off in float64. Now a multiplier negative within tol of the multipliers' size is 0."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(42), dtype=F64)
    x = x / x.norm(dim=-1, keepdim=True)
    result = _run(_Ball(1.0), x.to(dtype), y0=torch.zeros_like(x, dtype=dtype))
    assert result.converged.all()
    err = (result.y.double() - x).abs().amax()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-10), err
    assert (result.ineq_multipliers.abs() <= (1e-4 if dtype == torch.float32 else 1e-8)).all()


class _TinyCurvature(DeclarativeNode):
    """``argmin s · ½‖(y − x)/t‖²`` s.t. ``‖y/t‖² ≤ 1``: ``x`` projected on the ball of radius
    ``t``, with curvatures ``s/t²``."""

    def __init__(self, s: float, t: float):
        super().__init__(Options(strict=True))
        self.s, self.t = s, t

    def objective(self, x, y):
        return self.s * 0.5 * (((y - x) / self.t) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return ((y / self.t) ** 2).sum(-1, keepdim=True) - 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("s, t", [(1e-12, 1e6), (1e-6, 1e6), (1e6, 1e-6)])
def test_curvatures_far_below_one_do_not_stall_the_steps(s, t, dtype):
    """Curvatures of 1e-24 (an objective of 1e-12 in variables of size 1e6): the condensed
    system was scaled by ``max(|M_ii|, 1)``, so its ``10 eps`` safeguard swamped it, the steps
    vanished and 100 iterations stalled (flagged). Now scaled relative to its own diagonal."""
    x = 2 * torch.randn(8, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    exact = x / x.norm(dim=-1, keepdim=True).clamp_min(1)
    y = _TinyCurvature(s, t)((t * x).to(dtype)).double() / t
    torch.testing.assert_close(y, exact, atol=1e-4 if dtype == torch.float32 else 1e-9, rtol=0)


class _WellsInABox(DeclarativeNode):
    """``argmin s Σ (y_i² − 1)² − 0.3 x_i y_i`` s.t. ``|y_i| ≤ 0.8``, from ``x/100``: next to
    the maximum of every coordinate, a non-convex problem whose local minimum depends on the
    path."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def objective(self, x, y):
        return self.s * ((y * y - 1) ** 2 - 0.3 * x * y).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.cat([y - 0.8, -0.8 - y], -1)

    def initial_guess(self, x):
        return x / 100


@pytest.mark.parametrize("s", [1e-12, 1e-6])
def test_the_path_does_not_depend_on_the_objective_s_scale(s):
    """Scaling the objective leaves the interior point's iterates (so the local minimum it ends
    in): its merit line search accepted any change of the merit within ``64 eps (1 + |φ|)``, so
    at ``s = 1e-12`` steps that raised ``f`` by up to 1 % passed, and 3 of 24 coordinates ended
    in other wells than at ``s = 1``."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    reference = _run(_WellsInABox(1.0), x).y
    torch.testing.assert_close(_run(_WellsInABox(s), x).y, reference, atol=1e-8, rtol=0)
