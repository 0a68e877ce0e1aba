"""The generic engine and the default unconstrained solver against closed forms and finite differences."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, strategies as st

import ddnlib
from ddnlib import DeclarativeNode, Options
from toy_nodes import PseudoHuberRegression, Quadratic, Quartic, Ridge, WeightedMean

from helpers import DENSE, LINEAR_SOLVERS, MATRIX_FREE, gradcheck_node, learnable

SOLVERS = LINEAR_SOLVERS


@SOLVERS
@pytest.mark.parametrize("node_cls", [Ridge, Quadratic])
def test_matches_closed_form_and_its_gradients(node_cls, options):
    node = node_cls(options=options)
    x = torch.randn(7, 5 if node_cls is Ridge else 4, dtype=torch.float64, requires_grad=True)
    y = node(x)
    y_ref = node.closed_form(x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    v = torch.randn_like(y)
    wrt = [x, *learnable(node).values()]
    got = torch.autograd.grad((y * v).sum(), wrt)
    want = torch.autograd.grad((y_ref * v).sum(), wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("node_cls", [Ridge, Quadratic, PseudoHuberRegression, Quartic])
@SOLVERS
def test_gradcheck_inputs_and_parameters(node_cls, options):
    node = node_cls(options=options)
    n = {Ridge: 5, Quadratic: 4, PseudoHuberRegression: 6, Quartic: 3}[node_cls]
    assert gradcheck_node(node, torch.randn(3, n, dtype=torch.float64))


def test_two_inputs_match_closed_form_and_gradcheck():
    node = WeightedMean()
    x, w = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(node(x, w), WeightedMean.closed_form(x, w), atol=1e-8, rtol=0)
    assert torch.autograd.gradcheck(node, (x.requires_grad_(), w.requires_grad_()))


def test_multidimensional_output_keeps_its_shape():
    node = Quartic()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = node(x)
    assert y.shape == x.shape
    assert gradcheck_node(node, x)


def test_dense_and_matrix_free_agree():
    x = torch.randn(6, 6, dtype=torch.float64)
    grads = []
    for options in (DENSE, MATRIX_FREE):
        torch.manual_seed(1)
        node = PseudoHuberRegression(options=options)
        xr = x.clone().requires_grad_()
        y = node(xr)
        grads.append(torch.autograd.grad(y.square().sum(), [xr, node.A, node.c]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-7)


def test_gradients_only_for_what_requires_grad():
    node = Ridge()
    node.A.requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64)
    node(x).sum().backward()
    assert node.A.grad is None
    assert node.parametrizations.lam.original.grad is not None
    assert x.grad is None


def test_buffers_get_no_gradient_and_are_used():
    class Shifted(DeclarativeNode):
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.tensor(2.0, dtype=torch.float64))

        def objective(self, x, y):
            return 0.5 * ((y - x - self.shift) ** 2).sum(-1)

    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = Shifted()(x)
    torch.testing.assert_close(y, x + 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_float32_follows_input_and_matches_float64():
    node = Quartic()
    x = torch.randn(5, 4, dtype=torch.float64)
    y64 = node(x)
    y32 = node.float()(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-5, rtol=1e-5)


def test_empty_batch_gives_empty_output_and_zero_gradients():
    node = Ridge()
    x = torch.zeros(0, 5, dtype=torch.float64, requires_grad=True)
    y = node(x)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(node.A.grad) == 0


def test_input_is_not_modified():
    node = PseudoHuberRegression()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    node(x).sum().backward()
    torch.testing.assert_close(x.detach(), before, atol=0, rtol=0)


def test_vmap_folds_into_the_batch():
    node = PseudoHuberRegression()
    xs = torch.randn(3, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(node)(xs), torch.stack([node(x) for x in xs]))


def test_concurrent_calls_match_sequential():
    node = PseudoHuberRegression()
    xs = [torch.randn(4, 6, dtype=torch.float64, requires_grad=True) for _ in range(4)]

    def run(x):
        y = node(x)
        return y.detach(), torch.autograd.grad(y.square().sum(), [x, node.A])

    sequential = [run(x) for x in xs]
    results = [None] * len(xs)

    def worker(i):
        results[i] = run(xs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (y0, g0), (y1, g1) in zip(sequential, results):
        torch.testing.assert_close(y0, y1, atol=0, rtol=0)
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_batched_dense_solve_is_right_at_size_160(threads):
    """Regression: batched LU on CPU with 2 threads is wrong at this size; the engine avoids it."""
    torch.manual_seed(3)
    node = Quadratic(n=160, m=160, options=DENSE)
    x = torch.randn(2, 160, dtype=torch.float64, requires_grad=True)
    with threads(2):
        y = node(x)
    Q = node.Q().detach()
    ref = torch.stack([torch.linalg.solve(Q, node.B.detach() @ xi) for xi in x.detach()])
    torch.testing.assert_close(y, ref, atol=1e-8, rtol=1e-8)
    v = torch.randn_like(y)
    with threads(2):
        (gx,) = torch.autograd.grad((y * v).sum(), x)
    ref_gx = torch.stack([node.B.detach().T @ torch.linalg.solve(Q, vi) for vi in v])
    torch.testing.assert_close(gx, ref_gx, atol=1e-8, rtol=1e-8)


def test_non_convergence_is_reported_and_strict_raises():
    x = torch.randn(3, 6, dtype=torch.float64) * 10
    with pytest.warns(ddnlib.NonConvergenceWarning, match="did not converge"):
        PseudoHuberRegression(options=Options(max_iter=1))(x)
    with pytest.raises(ddnlib.NonConvergenceError):
        PseudoHuberRegression(options=Options(max_iter=1, strict=True))(x)


class _WrongSolve(Quartic):
    def solve(self, x):
        return 0.9 * x


def test_wrong_forward_solution_fails_the_optimality_check():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(ddnlib.OptimalityWarning, match="optimality check"):
        _WrongSolve()(x).sum().backward()
    with pytest.raises(ddnlib.OptimalityError):
        _WrongSolve(options=Options(strict=True))(x).sum().backward()


class _Degenerate(DeclarativeNode):
    """f = ½(y₀ − x₀)²: y₁ is free, so the Hessian is singular."""

    def objective(self, x, y):
        return 0.5 * (y[:, 0] - x[:, 0]) ** 2

    def solve(self, x):
        return x.clone()


@LINEAR_SOLVERS
def test_singular_hessian_is_reported(options):
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.warns(ddnlib.DDNWarning):
        _Degenerate(options=options)(x).sum().backward()


def test_damping_regularises_a_singular_hessian_without_warning(recwarn):
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    _Degenerate(options=Options(damping=1e-3, check_optimality=False))(x).sum().backward()
    assert not [w for w in recwarn if issubclass(w.category, ddnlib.DDNWarning)]
    assert torch.isfinite(x.grad).all()


@given(
    b=st.integers(1, 5),
    m=st.integers(1, 12),
    log_scale=st.floats(-4, 4),
    seed=st.integers(0, 2**16),
)
def test_property_quadratic_matches_closed_form_at_any_size_and_scale(b, m, log_scale, seed):
    torch.manual_seed(seed)
    node = Quadratic(n=m, m=m)
    x = (torch.randn(b, m, dtype=torch.float64) * 10**log_scale).requires_grad_()
    y = node(x)
    y_ref = node.closed_form(x)
    torch.testing.assert_close(y, y_ref, atol=1e-8 * 10**log_scale, rtol=1e-7)
    v = torch.randn_like(y)
    (g,) = torch.autograd.grad((y * v).sum(), x)
    (g_ref,) = torch.autograd.grad((y_ref * v).sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [dict(linear_solver="lu"), dict(damping=-1.0), dict(max_iter=0), dict(optimality_tol=0.0),
     dict(dense_max=1.5), dict(cg_max_iter=0)],
)
def test_options_reject_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Options(**kwargs)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((), TypeError, "at least one input"),
        (([1.0, 2.0],), TypeError, "expected a torch.Tensor"),
        ((torch.ones(2, 5, dtype=torch.int64),), TypeError, "dtype torch.int64"),
        ((torch.tensor(1.0),), ValueError, "0-d"),
        ((torch.ones(2, 5), torch.ones(3, 5)), ValueError, "batch sizes input 0: 2, input 1: 3"),
        ((torch.ones(2, 5), torch.ones(2, 5, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_clear_errors(args, error, match):
    with pytest.raises(error, match=match):
        Quartic()(*args)


def test_objective_with_wrong_shape_is_reported():
    class Bad(DeclarativeNode):
        def objective(self, x, y):
            return ((y - x) ** 2)

    with pytest.raises(ValueError, match=r"objective returned shape \(3, 2\)"):
        Bad()(torch.randn(3, 2))


def test_options_type_is_checked():
    with pytest.raises(TypeError, match="options"):
        Quartic(options={"strict": True})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@SOLVERS
def test_a_non_finite_sample_does_not_poison_the_others(bad, options):
    node = PseudoHuberRegression(options=options)
    x = torch.randn(4, 6, dtype=torch.float64)
    clean = x[[0, 2, 3]].clone().requires_grad_()
    y_clean = node(clean)
    ref = torch.autograd.grad(y_clean.square().sum(), [clean, node.A, node.c])
    x[1, 2] = bad
    x.requires_grad_()
    y = node(x)
    got = torch.autograd.grad(y.square().sum(), [x, node.A, node.c])
    assert torch.isnan(y[1]).all() and torch.isnan(got[0][1]).all()
    torch.testing.assert_close(y[[0, 2, 3]], y_clean, atol=0, rtol=0)
    torch.testing.assert_close(got[0][[0, 2, 3]], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("rejects", [False, True])
def test_inputs_are_tested_for_finiteness_unless_the_node_rejects_them(rejects):
    """An entry the objective never reads is infinite, so y is finite: the backward's own test of
    the inputs leaves that sample out (NaN gradient); a node that declares
    ``rejects_non_finite_inputs`` (its solve raises on such inputs, as pooling's does) is not
    tested again, which this node, whose solve does not, shows."""

    class FirstColumns(DeclarativeNode):
        rejects_non_finite_inputs = rejects

        def objective(self, x, y):
            return 0.5 * ((y - x[:, :3]) ** 2).sum(-1)

        def initial_guess(self, x):
            return torch.zeros_like(x[:, :3])

    x = torch.randn(2, 4, dtype=torch.float64)
    x[0, 3] = float("inf")
    x.requires_grad_()
    (g,) = torch.autograd.grad(FirstColumns()(x).sum(), x)
    assert bool(torch.isfinite(g[1]).all())
    assert bool(torch.isfinite(g[0]).all()) == rejects


# -- the forward Newton's Hessian factor, reused by the backward -------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_hands_its_hessian_factor_to_the_backward(dtype):
    from ddnlib.problem import Problem
    from ddnlib.solvers import default_solution

    node = PseudoHuberRegression(options=Options(linear_solver="dense")).to(dtype)
    x = torch.randn(5, 6, dtype=dtype)
    solution = default_solution(node, (x,))
    assert isinstance(node.solve(x), torch.Tensor)  # the public solve still returns y
    L = solution.hessian_cholesky
    assert L is not None and L.dtype == dtype and L.shape == (5, 3, 3)
    with torch.enable_grad():
        H = Problem(node, (x,), solution.y.shape).kkt(solution.y, None, node.options).hessian()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(L @ L.transpose(-1, -2), H, atol=tol, rtol=tol)


@pytest.mark.parametrize("options", [Options(), Options(damping=1e-3), Options(linear_solver="cg")],
                         ids=["dense", "damped", "cg"])
def test_reused_factor_gives_the_gradient_of_the_hessian_at_y(options):
    torch.manual_seed(0)
    node = PseudoHuberRegression(options=options)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 3, dtype=torch.float64)
    y = node(x)
    got = torch.autograd.grad(y, [x, *node.parameters()], v)
    # the engine without the solver's factor: H formed and factorised at y
    (gx,), gp = ddnlib.implicit_vjp(node, [x], y.detach(), v, None)
    torch.testing.assert_close(got[0], gx, atol=1e-9, rtol=1e-9)
    for g, (name, _) in zip(got[1:], node.named_parameters()):
        torch.testing.assert_close(g, gp[name], atol=1e-9, rtol=1e-9)
    if not options.damping:  # damping changes the gradient on purpose
        assert gradcheck_node(PseudoHuberRegression(options=options), x)


def test_no_factor_from_an_unconverged_or_non_finite_newton():
    from ddnlib.solvers import default_solution

    node = PseudoHuberRegression(options=Options(max_iter=1))
    x = 10 * torch.randn(3, 6, dtype=torch.float64)
    with pytest.warns(ddnlib.NonConvergenceWarning):
        assert default_solution(node, (x,)).hessian_cholesky is None
    x[1, 0] = float("nan")
    assert default_solution(PseudoHuberRegression(), (x,)).hessian_cholesky is None


def test_a_solve_set_on_the_instance_is_used():
    node = Quartic()
    x = torch.randn(3, 4, dtype=torch.float64)
    node.solve = lambda x: 0.5 * x
    torch.testing.assert_close(node(x), 0.5 * x)
