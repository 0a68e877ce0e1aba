"""Default forward solvers, used when a node does not supply ``solve``.

Unconstrained: batched Newton with Levenberg damping and a backtracking (Armijo) line search, the
direction from dense per-sample Hessians (Cholesky) for small outputs or from conjugate gradients on
Hessian-vector products (Newton-CG) for large ones (the same ``Options.linear_solver`` /
``dense_max`` switch as the backward pass). Every solver stops per sample when the Newton step is
below ``solver_tol · (1 + ‖y‖∞)`` and reports the samples that did not get there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .engine import _samples, use_dense
from .errors import NonConvergenceWarning, report
from .linalg import cg
from .problem import Problem, batched_jacobian, grad

__all__ = ["default_solve", "newton"]

_ARMIJO = 1e-4
_MAX_BACKTRACKS = 40


def default_solve(node, xs: Sequence[Tensor]) -> Tensor | tuple[Tensor, dict]:
    """Solve ``node`` at ``xs`` with the default solver for its kind of problem."""
    y0 = node.initial_guess(*xs)
    problem = Problem(node, xs, y0.shape)
    if problem.constrained:
        raise NotImplementedError("constrained default solvers are not implemented yet")
    return newton(problem, y0, node.options)


def _levenberg_direction(H: Tensor, g: Tensor) -> Tensor:
    """``d = −(H + μI)⁻¹ g`` with the smallest ``μ ∈ {0, 1e-8 s, 1e-7 s, …}`` that factorises.

    ``s = 1 + max |H_ii|`` sets the scale per sample.
    """
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    scale = 1 + H.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    mu = torch.zeros_like(scale)
    d = torch.zeros_like(g)
    todo = torch.ones_like(scale, dtype=torch.bool)
    for k in range(-8, 17):
        L, info = torch.linalg.cholesky_ex(H[todo] + mu[todo, None, None] * eye)
        ok = info == 0
        idx = todo.nonzero().flatten()
        d[idx[ok]] = -torch.cholesky_solve(g[idx[ok]].unsqueeze(-1), L[ok]).squeeze(-1)
        todo[idx[ok]] = False
        if not todo.any():
            break
        mu = torch.where(todo, scale * 10.0**k, mu)
    return torch.where(todo.unsqueeze(-1), -g, d)  # steepest descent where nothing factorised


def newton(problem: Problem, y0: Tensor, options) -> Tensor:
    """Batched damped Newton on ``min_y f(x, y)`` from ``y0 (b, *out)``; returns ``y (b, *out)``."""
    b, m = problem.batch, problem.m
    tol = options.tol("solver_tol", y0.dtype)
    dense = use_dense(options, m)
    y = y0.detach().reshape(b, m).clone()
    running = torch.ones(b, dtype=torch.bool, device=y.device)
    step = torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    for _ in range(options.max_iter):
        with torch.enable_grad():
            yv = y.requires_grad_()
            f = problem.objective(yv)
            g = grad(f.sum(), [yv], create_graph=True)[0]
            if dense:
                d = _levenberg_direction(batched_jacobian(g, yv).detach(), g.detach())
            else:
                d = _newton_cg_direction(g, yv, options)
        y, f, g = y.detach(), f.detach(), g.detach()
        finite = torch.isfinite(f) & torch.isfinite(g).all(-1)
        running &= finite
        step = torch.where(running, d.abs().amax(-1) / (1 + y.abs().amax(-1)), step)
        running &= ~(step <= tol)
        if not running.any():
            break
        t = _backtrack(problem, y, f, g, d, running)
        y = torch.where(running.unsqueeze(-1), y + t.unsqueeze(-1) * d, y)
    else:
        report(NonConvergenceWarning,
               f"Newton did not converge in {options.max_iter} iterations at samples "
               f"{_samples(running)}; worst relative step {step[running].max().item():.3g} "
               f"> tol {tol:g}. Raise Options(max_iter=...) or supply solve().", options.strict)
    y = y.detach()
    return problem.unflatten(torch.where(finite.unsqueeze(-1), y, torch.nan))


def _newton_cg_direction(g: Tensor, yv: Tensor, options) -> Tensor:
    """Truncated CG on ``H d = −g`` (per-sample forcing term ``min(0.5, √‖g‖)``); ``−g`` where it
    does not give a descent direction."""

    def hvp(p: Tensor) -> Tensor:
        return grad(g, [yv], p[0], retain_graph=True)[0].unsqueeze(0)

    gd = g.detach()
    gnorm = gd.norm(dim=-1).clamp_min(torch.finfo(gd.dtype).tiny)
    forcing = gnorm.clamp(max=0.25).sqrt().clamp(min=options.tol("cg_tol", gd.dtype))
    d, _ = cg(hvp, -gd.unsqueeze(0), forcing, options.cg_max_iter or 2 * gd.shape[1] + 10)
    d = d[0]
    descent = (d * gd).sum(-1) < 0
    return torch.where(descent.unsqueeze(-1), d, -gd)


def _backtrack(problem: Problem, y: Tensor, f: Tensor, g: Tensor, d: Tensor, running: Tensor
               ) -> Tensor:
    """Per-sample Armijo step ``t ∈ {1, ½, ¼, …}`` with ``f(y + t d) ≤ f + 1e-4 t gᵀd``.

    A step whose change of ``f`` is within rounding of ``f`` is accepted too: near the minimiser
    the predicted decrease falls below the precision of ``f`` and Armijo could never hold.
    """
    slope = (g * d).sum(-1)
    t = torch.ones_like(f)
    rounding = 16 * torch.finfo(f.dtype).eps * (1 + f.abs())
    searching = running.clone()
    with torch.no_grad():
        for _ in range(_MAX_BACKTRACKS):
            f_new = problem.objective(y + t.unsqueeze(-1) * d)
            accept = (f_new <= f + _ARMIJO * t * slope) | ((f_new - f).abs() <= rounding)
            searching &= ~accept
            if not searching.any():
                break
            t = torch.where(searching, 0.5 * t, t)
    return torch.where(searching, torch.zeros_like(t), t)
