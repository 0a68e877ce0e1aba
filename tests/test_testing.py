"""Tests of the user testing toolkit ``ddnlib.testing``: it passes correct nodes and fails on each
planted defect (wrong vjp, wrong solve, non-smooth objective where a warning is due)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import user_nodes as U
from ddnlib import DeclarativeNode, Options
from ddnlib.testing import (CheckResult, CheckRow, assert_gradients, assert_node, assert_optimal,
                            assert_vjp, check_gradients, check_node, check_optimality,
                            check_separability, check_vjp)
from ddnlib.testing.strategies import PATTERNS, node_inputs


def _inputs(node_cls, b=3, n=5, seed=0):
    x = torch.randn(b, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if node_cls is U.Pair:
        return (x, x.flip(-1))
    if issubclass(node_cls, U.Ball):
        x[0] *= 0.1  # one point inside the ball, where the constraint is inactive
    if issubclass(node_cls, U.SoftThreshold):
        x = x + 0.2 * x.sign()  # keep |x_i| away from the kink at λ = 1 (finite differences)
        x[x.abs().sub(1).abs() < 0.05] *= 1.2
    return (x,)


def _row(result: CheckResult, check: str, argument: str) -> CheckRow:
    matches = [r for r in result.rows if r.check == check and r.argument == argument]
    assert len(matches) == 1, f"no single row ({check}, {argument}) in\n{result}"
    return matches[0]


@pytest.mark.parametrize("node_cls", [U.Smoother, U.RightVjp, U.Pair, U.Sphere, U.Ball,
                                      U.SoftThresholdExact])
def test_correct_nodes_pass(node_cls):
    result = check_node(node_cls(), *_inputs(node_cls))
    assert result.passed, str(result)
    checked = {(r.check, r.argument) for r in result.rows if r.status == "pass"}
    n_inputs = len(_inputs(node_cls))
    for i in range(n_inputs):  # every input and every parameter has a passing gradient row
        assert ("gradient", f"input {i}") in checked
    for name, _ in node_cls().named_parameters():
        assert ("gradient", f"param {name}") in checked


def test_float32_node_is_checked_in_float64_on_a_copy():
    node = U.Smoother(theta=0.3).float()
    x = torch.randn(3, 5)
    before, x_before = node.theta.detach().clone(), x.clone()
    result = assert_gradients(node, x)
    assert result.passed
    assert node.theta.dtype == torch.float32 and torch.equal(node.theta.detach(), before)
    assert node.theta.grad is None and torch.equal(x, x_before)
    # float64 finite differences: far below what float32 could resolve
    assert _row(result, "gradient", "input 0").error < 1e-7


def test_wrong_vjp_fails_vjp_and_gradient_checks():
    node, xs = U.WrongVjp(), _inputs(U.WrongVjp)
    vjp = check_vjp(node, *xs)
    assert not vjp.passed
    for argument in ("input 0", "param theta"):
        row = _row(vjp, "vjp", argument)
        assert row.failed and "rel 0.5," in row.detail  # 1.5x the generic answer
    grads = check_gradients(node, *xs)
    assert _row(grads, "gradient", "input 0").failed
    assert _row(grads, "gradient", "param theta").failed


def test_vjp_check_skips_nodes_without_override():
    result = check_vjp(U.Smoother(), *_inputs(U.Smoother))
    assert result.passed and [r.status for r in result.rows] == ["skip"]


@pytest.mark.parametrize("node_cls, failing", [
    (U.WrongSolve, ["stationarity", "perturbation", "vs default solver"]),
    (U.SphereOffset, ["stationarity", "perturbation", "vs default solver"]),
    (U.SphereInside, ["feasibility"]),
    (U.BallWrongSign, ["multiplier sign", "perturbation"]),
])
def test_solve_that_is_not_the_minimiser_fails_optimality(node_cls, failing):
    result = check_optimality(node_cls(), *_inputs(node_cls))
    assert not result.passed
    for argument in failing:
        assert _row(result, "optimality", argument).failed, str(result)


def test_non_finite_solution_fails_without_comparisons():
    result = check_optimality(U.NaNSolve(), *_inputs(U.NaNSolve))
    assert _row(result, "optimality", "solve").failed
    assert [r.argument for r in result.rows] == ["solve"]  # nothing compared with NaN


@pytest.mark.parametrize("node_cls, warning", [
    (U.AbsoluteDeviation, "SingularSystemWarning"),
    (U.SoftThreshold, "OptimalityWarning"),
])
def test_non_smooth_objective_fails_with_the_warning(node_cls, warning):
    result = check_node(node_cls(), *_inputs(node_cls))
    assert not result.passed
    assert _row(result, "gradient", warning).failed
    assert _row(result, "gradient", "input 0").failed or _row(result, "gradient",
                                                               "param theta").failed


def test_closed_form_vjp_is_checked_by_finite_differences_where_the_engine_is_invalid():
    good = check_node(U.SoftThresholdExact(), *_inputs(U.SoftThreshold))
    assert good.passed, str(good)
    assert _row(good, "optimality", "stationarity").status == "skip"  # non-smooth: not decisive
    assert _row(good, "vjp", "override").status == "skip"  # generic engine not valid here
    bad = check_node(U.SoftThresholdWrongVjp(), *_inputs(U.SoftThreshold))
    assert _row(bad, "gradient", "param theta").failed
    enforced = check_optimality(U.SoftThresholdExact(), *_inputs(U.SoftThreshold), smooth=True)
    assert _row(enforced, "optimality", "stationarity").failed


def test_large_arguments_use_random_directions():
    result = check_gradients(U.WrongVjp(), torch.randn(4, 20, dtype=torch.float64),
                             max_elements=16, directions=3)
    row = _row(result, "gradient", "input 0")
    assert row.failed and "3 random directions" in row.detail


def test_assert_functions_raise_with_a_readable_table():
    xs = _inputs(U.WrongSolve)
    with pytest.raises(AssertionError) as info:
        assert_optimal(U.WrongSolve(), *xs)
    text = str(info.value)
    assert "WrongSolve: FAILED" in text and "stationarity" in text and "FAIL" in text
    with pytest.raises(AssertionError, match="vjp +input 0"):
        assert_vjp(U.WrongVjp(), *_inputs(U.WrongVjp))
    assert assert_node(U.Smoother(), *_inputs(U.Smoother)).passed


@pytest.mark.parametrize("call, error, match", [
    (lambda: check_gradients(torch.nn.Linear(2, 2), torch.randn(2, 2)), TypeError, "node="),
    (lambda: check_gradients(U.Smoother(), "x"), TypeError, "input 0 is str"),
    (lambda: check_gradients(U.Smoother(), torch.randn(5)[0]), ValueError, "input 0"),
    (lambda: check_gradients(U.Smoother(), torch.randn(3, 5), eps=0), ValueError, "eps=0"),
    (lambda: check_optimality(U.Smoother(), torch.randn(3, 5), tol=-1), ValueError, "tol=-1"),
    (lambda: check_vjp(U.WrongVjp(), torch.randn(3, 5), samples=0), ValueError, "samples=0"),
    (lambda: check_node(U.Smoother(), torch.randn(3, 5), bogus=1), TypeError, "'bogus'"),
    (lambda: CheckRow("gradient", "x", 0.0, "-", "ok"), ValueError, "status='ok'"),
])
def test_bad_arguments_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@settings(max_examples=30, deadline=None)
@given(data=st.data(), tail=st.tuples(st.integers(1, 4), st.integers(1, 3)))
def test_node_inputs_strategy(data, tail):
    pattern = data.draw(st.sampled_from(PATTERNS))
    scale = data.draw(st.sampled_from([1e-6, 1.0, 1e6]))
    a, b = data.draw(node_inputs(tail, (2,), scale=scale, pattern=pattern))
    assert a.dtype == b.dtype == torch.float64
    assert a.shape[1:] == tail and b.shape[1:] == (2,) and a.shape[0] == b.shape[0] >= 1
    assert a.abs().max() <= scale and torch.isfinite(a).all()
    rows = a.reshape(a.shape[0], -1)
    if pattern == "ties":
        grid = a / scale * 4
        assert torch.allclose(grid, grid.round(), atol=1e-9)
    if pattern == "equal rows":
        assert (rows == rows[:, :1]).all(-1).any()
    if pattern == "zeros":
        assert (rows == 0).all(-1).any()


@settings(max_examples=6, deadline=None)
@given(xs=node_inputs((4,), batch=st.integers(1, 3)))
def test_smooth_node_passes_on_awkward_inputs(xs):
    assert_optimal(U.Smoother(), *xs)
    assert_gradients(U.Smoother(), *xs)


# -- separability ------------------------------------------------------------------------------

class _BatchCoupled(U.Smoother):
    """Sample i's objective sees the batch mean of y: not separable."""

    def objective(self, x, y):
        return super().objective(x, y) + 0.5 * (y.mean(0) ** 2).sum()


class _BatchSolve(U.Smoother):
    """A separable objective, but a solve whose answer for sample i moves with sample j."""

    def solve(self, x):
        return DeclarativeNode.solve(self, x) + 1e-3 * x.mean(0)


@pytest.mark.parametrize("node_cls", [U.Smoother, U.Pair, U.Sphere, U.Ball])
def test_separable_nodes_pass_the_separability_check(node_cls):
    result = check_separability(node_cls(), *_inputs(node_cls), seed=1)
    assert result.passed, str(result)
    assert _row(result, "separability", "objective").error <= 1e-12
    assert _row(result, "separability", "solution").status == "pass"
    if node_cls in (U.Sphere, U.Ball):
        assert _row(result, "separability", "constraints").status == "pass"


@pytest.mark.parametrize("node_cls, failing", [(_BatchCoupled, {"objective", "solution"}),
                                               (_BatchSolve, {"solution"})])
def test_non_separable_nodes_fail_it_naming_the_samples(node_cls, failing):
    node = node_cls(options=Options(max_iter=10))  # Newton cannot converge on a coupled batch
    result = check_separability(node, *_inputs(node_cls, b=4), seed=2)
    assert {r.argument for r in result.failures} == failing, str(result)
    for row in result.failures:
        assert "when sample 2 is perturbed" in row.detail and "samples [0, 1, 3]" in row.detail
        assert row.error > 1e-6


def test_check_node_and_the_command_line_include_the_separability_rows():
    result = check_node(_BatchSolve(), *_inputs(_BatchSolve, b=3))
    assert _row(result, "separability", "solution").status == "fail"
    assert _row(result, "separability", "objective").status == "pass"


def test_separability_needs_two_samples():
    row, = check_separability(U.Smoother(), *_inputs(U.Smoother, b=1)).rows
    assert (row.argument, row.status) == ("batch", "skip") and "got 1" in row.detail
