"""The KKT layer: what ``solve`` may return (``Solution``), the linear-solver objects, and the one
definition of "optimal" shared by the backward's warning and ``ddnlib.testing``."""

from __future__ import annotations

import warnings

import pytest
import torch

from ddnlib import (CG, Auto, DDNWarning, DeclarativeNode, Dense, OptimalityWarning, Options,
                    Solution)
from ddnlib.problem import Problem
from ddnlib.testing import check_optimality

from helpers import ALL_LINEAR_SOLVERS, gradcheck_node

F64 = torch.float64


class Ball(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``‖y‖² ≤ r²``; ``solve`` returns what ``form`` says."""

    def __init__(self, r=1.0, form="solution", options=None):
        super().__init__(options)
        self.r, self.form = r, form

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r**2

    def solve(self, x):
        norm = x.norm(dim=-1, keepdim=True)
        y = x * (self.r / norm).clamp(max=1)
        mu = ((norm / self.r - 1).clamp_min(0)) / 2  # ∇f + 2μ y = 0 on the boundary
        return {
            "solution": lambda: Solution(y, ineq_multipliers=mu, stats={"iterations": 0}),
            "tuple": lambda: (y, {"mu": mu}),
            "tensor": lambda: y,
            "renamed": lambda: (y, {"nu": mu}),
            "three": lambda: (y, {"mu": mu}, None),
            "bad size": lambda: Solution(y, ineq_multipliers=mu.expand(-1, 2)),
        }[self.form]()


def _ball_gradient(x, v, r):
    """Closed form of ``∂⟨v, y⟩/∂x`` for the projection onto the ball of radius ``r``."""
    norm = x.norm(dim=-1, keepdim=True)
    u = x / norm
    inside = norm <= r
    outside = (r / norm) * (v - u * (u * v).sum(-1, keepdim=True))
    return torch.where(inside, v, outside)


@pytest.mark.parametrize("form", ["solution", "tuple", "tensor"])
def test_every_return_form_gives_the_closed_form_gradient(form):
    x = torch.randn(6, 4, dtype=F64) * torch.tensor([0.3, 3.0]).repeat(3)[:, None].to(F64)
    v = torch.randn(6, 4, dtype=F64)
    xg = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DDNWarning)
        (gx,) = torch.autograd.grad((Ball(form=form)(xg) * v).sum(), xg)
    torch.testing.assert_close(gx, _ball_gradient(x, v, 1.0), atol=1e-8, rtol=1e-8)
    assert gradcheck_node(Ball(form=form), x)


def test_unread_ctx_key_is_reported():
    x = torch.randn(3, 4, dtype=F64) * 3
    with pytest.warns(DDNWarning, match=r"\['nu'\].*'lambda'.*'mu'"):
        Ball(form="renamed")(x)


@pytest.mark.parametrize("form, error, match", [
    ("three", TypeError, "Ball.solve returned a tuple of 3 items"),
    ("bad size", ValueError, r"'mu' multipliers of shape \(3, 2\): expected \(3, 1\)"),
])
def test_malformed_solution_is_a_clear_error(form, error, match):
    x = torch.randn(3, 4, dtype=F64, requires_grad=True) * 3
    with pytest.raises(error, match=match):
        Ball(form=form)(x).sum().backward()


def test_solution_is_a_ctx_mapping():
    y, mu = torch.zeros(2, 3), torch.ones(2, 1)
    s = Solution(y, ineq_multipliers=mu, extras={"tau": 1.0})
    assert dict(s) == {"mu": mu, "tau": 1.0}
    assert s["mu"] is mu and "lambda" not in s
    kept = s.rows(torch.tensor([False, True]))
    assert kept.y.shape == (1, 3) and kept["mu"].shape == (1, 1) and kept["tau"] == 1.0


class Quartic(DeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * (y**4).sum(-1)


@ALL_LINEAR_SOLVERS
def test_linear_solver_objects_and_strings_agree(options):
    x = torch.randn(5, 6, dtype=F64)
    v = torch.randn(5, 6, dtype=F64)
    grads = []
    for opts in (options, Options(linear_solver="dense")):
        xg = x.clone().requires_grad_()
        grads.append(torch.autograd.grad((Quartic(opts)(xg) * v).sum(), xg)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-7)


def test_options_resolve_strings_to_solver_objects():
    assert isinstance(Options().solver, Auto)
    assert Options().solver.dense_max == Options().dense_max == Auto().dense_max
    assert Options(dense_max=7).solver.dense_max == 7
    assert Options(linear_solver="cg", cg_tol=1e-3, cg_max_iter=7).solver == CG(1e-3, 7)
    assert Options(linear_solver="dense").solver == Dense()
    mine = CG(tol=1e-9)
    assert Options(linear_solver=mine).solver is mine
    with pytest.raises(ValueError, match="linear_solver=3"):
        Options(linear_solver=3)


class Sphere(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``‖y‖² = 1`` with a ``solve`` that is off by ``shift``."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True) * (1 + self.shift)


@pytest.mark.parametrize("shift", [0.0, 1e-9, 1e-3, 0.1])
def test_backward_warning_and_testing_check_agree(shift):
    """One definition of optimal: the engine warns exactly when check_optimality fails."""
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    node = Sphere(shift)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        node(x).sum().backward()
    warned = any(issubclass(w.category, OptimalityWarning) for w in caught)
    rows = check_optimality(node, x.detach(), perturbations=0).rows
    failed = any(r.status == "fail" for r in rows if r.argument in ("stationarity", "feasibility"))
    assert warned == failed == (shift >= 1e-3)


def test_kkt_point_holds_the_lagrangian_pieces():
    x = torch.randn(3, 4, dtype=F64) * 3
    node = Ball()
    y = node.solve(x).y
    kkt = Problem(node, (x,), y.shape).kkt(y)  # multipliers by least squares
    assert kkt.p == 0 and kkt.q == 1 and kkt.active.all()
    torch.testing.assert_close(kkt.mu, node.solve(x)["mu"], atol=1e-10, rtol=0)
    torch.testing.assert_close(kkt.lagrangian_grad, torch.zeros_like(y), atol=1e-10, rtol=0)
    measures = kkt.optimality(torch.zeros_like(y), 1e-6)
    assert measures.optimal.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schur_solve_at_a_vertex_needs_no_fallback(dtype, monkeypatch):
    """m active rows fix U = 0: the Schur residual cancels to rounding of the terms that make it
    up, which must not be mistaken for an inaccurate solve (the null-space fallback is exact but
    costs an SVD per sample)."""
    import ddnlib.linalg as linalg

    def fallback(*args):
        raise AssertionError("null-space fallback taken at a vertex")

    monkeypatch.setattr(linalg, "_null_space_solve", fallback)
    b, m = 6, 5
    H = torch.eye(m, dtype=dtype).expand(b, m, m) * 3
    A = torch.cat([-torch.eye(m - 1, m, dtype=dtype), torch.ones(1, m, dtype=dtype)]).expand(b, m, m)
    active = torch.ones(b, m, dtype=torch.bool)
    By = torch.randn(b, m, 2, dtype=dtype)
    U, W, info = linalg.solve_kkt(H, A, active, By, torch.zeros(b, m, 2, dtype=dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert U.abs().max() <= tol * By.abs().max()
    torch.testing.assert_close(A.transpose(-1, -2) @ W, By - H @ U, atol=tol * 10, rtol=0)
    assert not (info.not_pd | info.singular).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H_kind", ["definite", "singular"])
def test_shared_matrices_solve_as_per_sample_ones(dtype, H_kind, monkeypatch):
    """One H and A expanded over the batch (a QP's, handed over by the interior point) take the
    shared Schur path; it agrees with the per-sample path, fallbacks (a singular H: every
    sample goes to the null-space method) and all."""
    import ddnlib.linalg as linalg

    if H_kind == "definite":  # the Schur solve itself must be right, not rescued
        def fallback(*args):
            raise AssertionError("null-space fallback taken on a definite system")

        monkeypatch.setattr(linalg, "_null_space_solve", fallback)

    gen = torch.Generator().manual_seed(4)
    b, m, r = 7, 6, 4
    M = torch.randn(m, m, generator=gen, dtype=F64)
    H1 = M @ M.T + (0.1 * torch.eye(m, dtype=F64) if H_kind == "definite" else 0)
    if H_kind == "singular":  # rank m − 1: positive on the null space of the active rows only
        H1 = H1 - torch.linalg.eigh(H1).eigenvalues[0] * torch.eye(m, dtype=F64)
    A1 = torch.randn(r, m, generator=gen, dtype=F64)
    active = torch.rand(b, r, generator=gen) < 0.6
    active[0] = True  # one sample with every row active
    By = torch.randn(b, m, 2, generator=gen, dtype=F64).to(dtype)
    Bc = torch.randn(b, r, 2, generator=gen, dtype=F64).to(dtype)
    H, A = H1.to(dtype).expand(b, m, m), A1.to(dtype).expand(b, r, m)
    assert linalg.shared_by_batch(H) and linalg.shared_by_batch(A)
    U, W, info = linalg.solve_kkt(H, A, active, By, Bc)
    Uc, Wc, info_c = linalg.solve_kkt(H.contiguous(), A.contiguous(), active, By, Bc)
    tol = 1e-9 if dtype == F64 else 2e-3
    scale = 1 + Uc.abs().max()
    torch.testing.assert_close(U, Uc, atol=tol * scale, rtol=0)
    torch.testing.assert_close(W, Wc, atol=tol * (1 + Wc.abs().max()), rtol=0)
    assert torch.equal(info.not_pd, info_c.not_pd) and torch.equal(info.singular, info_c.singular)
    # and it is the solution: the KKT residuals of the active system
    act = active.to(dtype).unsqueeze(-1)
    if not info.singular.any():
        res = H @ U + (A * act).transpose(-1, -2) @ W - By
        assert res.abs().max() <= 10 * tol * (1 + By.abs().max() + H1.abs().max() * scale)


class _ScaledExactBall(DeclarativeNode):
    """``argmin s · ½‖y − x‖²`` s.t. ``‖y‖² ≤ 1``, solved exactly (``y`` only: the engine finds
    the active set and the multipliers itself)."""

    def __init__(self, s: float):
        super().__init__(Options(strict=True))
        self.s = s

    def objective(self, x, y):
        return self.s * 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1)


@pytest.mark.parametrize("s", [1e-16, 1.0, 1e12])
def test_the_active_set_does_not_depend_on_the_objective_s_scale(s):
    """The force's floor was ``√eps (1 + |f|) / (1 + ‖y‖∞)``, absolute: at ``s = 1e-16`` a
    clearly active ball constraint (μ = s (‖x‖ − 1) / 2) had a force below ``tol`` and was
    reported weakly active (strict mode: an error). Now the floor scales with ``f``."""
    x = 2 * torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(_ScaledExactBall(s)(xr).sum(), xr)
    xe = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad((xe / xe.norm(dim=-1, keepdim=True).clamp_min(1)).sum(), xe)
    torch.testing.assert_close(g, ref, atol=1e-12, rtol=0)
