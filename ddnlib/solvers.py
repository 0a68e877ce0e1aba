"""Default forward solvers, used when a node does not supply ``solve``.

Unconstrained: batched Newton with Levenberg damping and a backtracking (Armijo) line search, the
direction from dense per-sample Hessians (Cholesky) for small outputs or from conjugate gradients on
Hessian-vector products (Newton-CG) for large ones (the same ``Options.linear_solver`` /
``dense_max`` switch as the backward pass). Every solver stops per sample when the Newton step is
below ``solver_tol · (1 + ‖y‖∞)`` and reports the samples that did not get there.

Equality constrained (``h(x, y) = 0``): batched SQP (:func:`sqp`), i.e. Newton on the KKT
conditions ``∇_y f + Aᵀλ = 0``, ``h = 0``: each iteration solves, per sample,

    [H  Aᵀ] [d ]   [−∇_y f]
    [A  0 ] [λ⁺] = [  −h  ],     H = ∇²_yy (f + λᵀh),  A = ∂h/∂y,

(dense KKT solve, or projected CG on the null space of ``A`` for large outputs), with Levenberg
damping ``H + γI`` where the reduced Hessian is not positive definite, and a backtracking line
search on the ℓ1 merit function ``φ(y) = f + ρ‖h‖₁`` (``ρ`` raised as needed so that ``d`` is a
descent direction, Nocedal & Wright, *Numerical Optimization*, 2nd ed., §18.3) with a second-order
correction ``−A⁺ h(y + d)`` against the Maratos effect. It returns ``(y, {"lambda": λ})``.

Inequality constrained (``g(x, y) ≤ 0``, with or without equalities): a **slow general fallback**,
scipy's SLSQP run sample by sample in a Python loop with gradients and constraint Jacobians computed
by torch (:func:`slsqp`), then refined by the SQP above with the constraints SLSQP found active held
as equalities (which gives multipliers to working precision). It returns
``(y, {"lambda": λ, "mu": μ})``. It is meant for prototyping and testing; for training, write the
node's ``solve`` (a closed form, a sort/threshold algorithm, or a batched solver) and return the
multipliers in its ``ctx`` if they are cheap.

Non-convergence (iteration cap, failed line search, SLSQP failure) is reported as a
:class:`~ddnlib.NonConvergenceWarning` with the samples, iterations and residuals (an error in
strict mode).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import numpy as np
import scipy.optimize

from .engine import _samples, recover_multipliers, use_dense
from .errors import NonConvergenceWarning, SingularSystemWarning, report
from .linalg import NullSpace, cg, solve_kkt
from .problem import Problem, batched_jacobian, grad

__all__ = ["default_solve", "newton", "sqp", "slsqp"]

_ARMIJO = 1e-4
_MAX_BACKTRACKS = 40


def default_solve(node, xs: Sequence[Tensor]) -> Tensor | tuple[Tensor, dict]:
    """Solve ``node`` at ``xs`` with the default solver for its kind of problem."""
    y0 = node.initial_guess(*xs)
    if y0.numel() == 0:  # an empty output per sample: nothing to solve
        return y0
    problem = Problem(node, xs, y0.shape)
    if problem.has_ineq:
        return slsqp(problem, y0, node.options)
    if problem.has_eq:
        y, nu, converged, residual, saddle = sqp(problem, y0, node.options)
        _report_sqp(converged, residual, node.options)
        if saddle.any():
            report(SingularSystemWarning,
                   f"SQP stopped at a KKT point that is not a strict local minimum (the reduced "
                   f"Hessian is not positive definite) at samples {_samples(saddle)}: a saddle "
                   "point or maximum reached from initial_guess. Start from another "
                   "initial_guess or supply solve().", node.options.strict)
        return y, {"lambda": nu}
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


# -- equality constrained: SQP ----------------------------------------------------------------


def sqp(problem: Problem, y0: Tensor, options, active: Tensor | None = None
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batched SQP on ``min f`` s.t. ``c_j(x, y) = 0`` for the rows ``j`` of ``c = [h; g]`` marked
    ``active (b, p + q)`` (default: all rows; the others are ignored).

    Returns ``y (b, *out)``, the multipliers ``ν (b, p + q)`` (zero on ignored rows), the mask of
    converged samples ``(b,)``, the last relative KKT step ``(b,)`` (the residual that is
    reported) and the mask ``(b,)`` of converged samples whose reduced Hessian is not positive
    definite (a saddle point or maximum: Newton's method converges to any KKT point). Samples
    whose objective or constraints are not finite come back as NaN.
    """
    b, m = problem.batch, problem.m
    tol = options.tol("solver_tol", y0.dtype)
    dense = use_dense(options, m + problem.constraints(y0.reshape(b, m)).shape[1])
    y = y0.detach().reshape(b, m).clone()
    running = torch.ones(b, dtype=torch.bool, device=y.device)
    converged = torch.zeros_like(running)
    finite = torch.ones_like(running)
    step = torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    rho = torch.zeros(b, dtype=y.dtype, device=y.device)
    saddle = torch.zeros_like(running)
    nu = None
    for _ in range(options.max_iter):
        with torch.enable_grad():
            yv = y.requires_grad_()
            f = problem.objective(yv)
            c = problem.constraints(yv)
            gf = grad(f.sum(), [yv], create_graph=True)[0]
            A = batched_jacobian(c, yv)
            if active is None:
                active = torch.ones_like(c, dtype=torch.bool)
            act = active.to(y.dtype)
            if nu is None:
                nu = recover_multipliers(gf.detach(), A.detach(), active) * act
            gL = gf + grad((c * nu).sum(), [yv], create_graph=True)[0]
            if dense:
                H = batched_jacobian(gL, yv).detach()
                d, nu_new, indefinite = _kkt_direction_dense(
                    0.5 * (H + H.transpose(-1, -2)), A.detach(), active, gf.detach(), c.detach())
                curvature = torch.einsum("bi,bij,bj->b", d, H, d)
            else:
                d, nu_new, curvature, indefinite = _kkt_direction_cg(
                    gL, yv, A.detach(), active, gf.detach(), c.detach(), options)
        y, f, c, gf, A = y.detach(), f.detach(), c.detach() * act, gf.detach(), A.detach()
        finite &= torch.isfinite(f) & torch.isfinite(gf).all(-1) & torch.isfinite(c).all(-1)
        running &= finite
        step = torch.where(running, d.abs().amax(-1) / (1 + y.abs().amax(-1)), step)
        nu = torch.where(running.unsqueeze(-1), nu_new * act, nu)
        saddle = torch.where(running, indefinite, saddle)
        converged |= running & (step <= tol)
        running &= ~(step <= tol)
        if not running.any():
            break
        # ℓ1 penalty: ρ ≥ ‖ν⁺‖∞ and ρ ≥ (∇fᵀd + ½ max(dᵀHd, 0)) / (½ ‖c‖₁) (N&W eq. 18.36).
        c1 = c.abs().sum(-1)
        slope_f = (gf * d).sum(-1)
        needed = (slope_f + 0.5 * curvature.clamp_min(0)) / (0.5 * c1).clamp_min(
            torch.finfo(y.dtype).tiny)
        needed = torch.where(c1 > 0, needed, torch.zeros_like(needed))
        rho = torch.maximum(rho, torch.maximum(1.1 * nu_new.abs().amax(-1), needed))
        y, moved = _merit_search(problem, y, f, c1, slope_f - rho * c1, d, A, active, rho, running)
        running &= moved  # a failed line search ends the sample (reported as not converged)
    y = torch.where(finite.unsqueeze(-1), y.detach(), torch.nan)
    return problem.unflatten(y), nu, converged, step, saddle & converged


def _kkt_direction_dense(H: Tensor, A: Tensor, active: Tensor, gf: Tensor, c: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """SQP step ``(d, λ⁺)`` from the dense KKT system, with ``H + γI`` (``γ = s · 10^k``, the
    smallest that works, ``s = 1 + max |H_ii|``) where the reduced Hessian is not positive
    definite (also returned, as a mask)."""
    U, W, info = solve_kkt(H, A, active, -gf.unsqueeze(-1), -c.unsqueeze(-1))
    todo = info.not_pd.clone()
    if todo.any():
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        scale = 1 + H.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        for k in range(-8, 17):
            idx = todo.nonzero().flatten()
            gamma = (scale[idx] * 10.0**k)[:, None, None]
            Uk, Wk, info_k = solve_kkt(H[idx] + gamma * eye, A[idx], active[idx],
                                       -gf[idx].unsqueeze(-1), -c[idx].unsqueeze(-1))
            ok = ~info_k.not_pd
            U[idx[ok]], W[idx[ok]] = Uk[ok], Wk[ok]
            todo[idx[ok]] = False
            if not todo.any():
                break
    return U.squeeze(-1), W.squeeze(-1), info.not_pd


def _kkt_direction_cg(gL: Tensor, yv: Tensor, A: Tensor, active: Tensor, gf: Tensor, c: Tensor,
                      options) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SQP step by projected CG: ``d = −A⁺c + z``, ``z`` in ``null(A)`` from truncated CG on the
    reduced system (stopped at negative curvature), ``λ⁺`` the least-squares multipliers of
    ``H d + ∇f``. Where CG meets negative curvature before moving, ``z`` is the projected steepest
    descent direction instead. Also returns ``dᵀHd`` and the mask of samples where CG met negative
    curvature."""

    def hvp(p: Tensor) -> Tensor:  # (1, b, m)
        return grad(gL, [yv], p[0], retain_graph=True)[0].unsqueeze(0)

    null = NullSpace(A, active)
    normal = -null.least_norm(c.unsqueeze(0))
    rhs = -gf.unsqueeze(0) - hvp(normal)
    max_iter = options.cg_max_iter or 2 * gf.shape[1] + 10
    z, info = cg(hvp, rhs, options.tol("cg_tol", gf.dtype), max_iter, project=null)
    stuck = info.not_pd & (z[0] == 0).all(-1)
    z = torch.where(stuck.unsqueeze(-1), null(rhs), z)
    d = normal + z
    Hd = hvp(d)
    nu = null.coefficients(-gf.unsqueeze(0) - Hd)
    return d[0], nu[0], (d * Hd).sum(-1)[0], info.not_pd


def _merit_search(problem: Problem, y: Tensor, f: Tensor, c1: Tensor, slope: Tensor, d: Tensor,
                  A: Tensor, active: Tensor, rho: Tensor, running: Tensor) -> tuple[Tensor, Tensor]:
    """Armijo backtracking on ``φ = f + ρ‖c_active‖₁`` along ``d`` (directional derivative
    ``slope``), trying the second-order correction ``y + d − A⁺ c(y + d)`` when the full step fails.

    Returns the new ``y`` and the mask of samples that moved (or are within rounding of ``φ``).
    """
    act = active.to(y.dtype)
    phi0 = f + rho * c1
    rounding = 16 * torch.finfo(y.dtype).eps * (1 + f.abs() + rho * c1)

    def merit(z: Tensor) -> tuple[Tensor, Tensor]:
        cz = problem.constraints(z) * act
        return problem.objective(z) + rho * cz.abs().sum(-1), cz

    def accepts(phi: Tensor, t: float) -> Tensor:
        return (phi <= phi0 + _ARMIJO * t * slope) | ((phi - phi0).abs() <= rounding)

    with torch.no_grad():
        phi, c_full = merit(y + d)
        ok = running & accepts(phi, 1.0)
        y_new = torch.where(ok.unsqueeze(-1), y + d, y)
        soc = running & ~ok
        if soc.any():
            z = y + d - NullSpace(A, active).least_norm(c_full.unsqueeze(0))[0]
            phi_z, _ = merit(z)
            ok_z = soc & accepts(phi_z, 1.0)
            y_new = torch.where(ok_z.unsqueeze(-1), z, y_new)
            ok |= ok_z
        searching = running & ~ok
        t = 0.5
        for _ in range(_MAX_BACKTRACKS):
            if not searching.any():
                break
            z = y + t * d
            phi, _ = merit(z)
            ok_t = searching & accepts(phi, t)
            y_new = torch.where(ok_t.unsqueeze(-1), z, y_new)
            searching &= ~ok_t
            t *= 0.5
    return y_new, ~searching


def _report_sqp(converged: Tensor, residual: Tensor, options) -> None:
    failed = ~converged
    if failed.any():
        worst = residual[failed].max().item()
        report(NonConvergenceWarning,
               f"SQP did not converge within {options.max_iter} iterations at samples "
               f"{_samples(failed)}; worst relative KKT step {worst:.3g} > tol "
               f"{options.tol('solver_tol', residual.dtype):g} (or the merit line search "
               "failed, or the problem is not finite there). Raise Options(max_iter=...), start "
               "from a better initial_guess, or supply solve().", options.strict)


# -- inequality constrained: the slow scipy fallback ---------------------------------------------


def slsqp(problem: Problem, y0: Tensor, options) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample SLSQP (scipy) refined by :func:`sqp` on the active set; ``(y, {"lambda", "mu"})``.

    Slow: a Python loop over the batch with a few torch calls per SLSQP iteration. Supply ``solve``
    for anything performance-sensitive.
    """
    b, m = problem.batch, problem.m
    dtype, device = y0.dtype, y0.device
    y_flat = y0.detach().reshape(b, m)
    p = problem.eq(y_flat).shape[1]
    q = problem.ineq(y_flat).shape[1]
    tol = options.tol("solver_tol", dtype)
    ys, nus, success, messages = [], [], [], {}
    for i in range(b):
        sample = Problem(problem.node, [x[i:i + 1] for x in problem.xs],
                         torch.Size((1,)) + problem.out_shape[1:])
        res = _slsqp_one(sample, y_flat[i], p, options, ftol=1e-2 * tol)
        ys.append(torch.as_tensor(res.x, dtype=dtype, device=device))
        multipliers = getattr(res, "multipliers", None)  # scipy >= 1.15: [λ_scipy; μ_scipy]
        if multipliers is not None and len(multipliers) == p + q:
            # scipy's Lagrangian is f − λᵀh − μᵀ(−g): λ = −λ_scipy, μ = μ_scipy.
            nu = np.concatenate([-np.asarray(multipliers[:p]), np.asarray(multipliers[p:])])
            nus.append(torch.as_tensor(nu, dtype=dtype, device=device))
        else:
            nus.append(None)
        success.append(bool(res.success))
        if not res.success:
            messages.setdefault(str(res.message), []).append(i)
    y = torch.stack(ys)
    with torch.enable_grad():
        yv = y.clone().requires_grad_()
        c = problem.constraints(yv)
        gf = grad(problem.objective(yv).sum(), [yv], retain_graph=True)[0]
        A = batched_jacobian(c, yv)
    c, A = c.detach(), A.detach()
    g = c[:, p:]
    guess = g >= -options.tol("active_tol", dtype)
    if all(nu is not None for nu in nus):
        nu_scipy = torch.stack(nus)
        guess = nu_scipy[:, p:] > 0
    else:
        eq_rows = torch.ones(b, p, dtype=torch.bool, device=device)
        nu_scipy = recover_multipliers(gf, A, torch.cat([eq_rows, guess], 1))
    active = torch.cat([torch.ones(b, p, dtype=torch.bool, device=device), guess], dim=1)

    # Refine on the active set; keep the refined point where it is a KKT point of the original
    # problem (non-negative μ, inactive inequalities satisfied).
    y_ref, nu_ref, conv_ref, _, _ = sqp(problem, problem.unflatten(y), options, active=active)
    y_ref = y_ref.reshape(b, m)
    g_ref = problem.ineq(y_ref)
    scale = 1 + y_ref.abs().amax(-1, keepdim=True)
    mu_ref = nu_ref[:, p:]
    kkt = (conv_ref & (mu_ref >= -tol * (1 + gf.abs().amax(-1, keepdim=True))).all(-1)
           & (guess | (g_ref <= tol * scale)).all(-1))
    y = torch.where(kkt.unsqueeze(-1), y_ref, y)
    nu = torch.where(kkt.unsqueeze(-1), nu_ref, nu_scipy * torch.cat([active[:, :p], guess], 1))
    failed = ~kkt & ~torch.tensor(success, device=device)
    if failed.any():
        viol = torch.cat([c[:, :p].abs(), g.clamp_min(0)], 1).amax(-1)
        detail = "; ".join(f"{msg!r} at samples {idx[:8]}" for msg, idx in messages.items())
        report(NonConvergenceWarning,
               f"SLSQP did not converge at samples {_samples(failed)} (max_iter "
               f"{options.max_iter}): {detail}; worst constraint violation "
               f"{viol[failed].max().item():.3g}. This fallback is slow and general: supply "
               "solve() for this node, or raise Options(max_iter=...).", options.strict)
    ctx = {"mu": nu[:, p:]}
    if p:
        ctx["lambda"] = nu[:, :p]
    return problem.unflatten(y), ctx


def _slsqp_one(sample: Problem, y0: Tensor, p: int, options, ftol: float):
    """SLSQP on one sample (a batch of one) with torch-computed gradients and Jacobians."""
    dtype, device = y0.dtype, y0.device

    def at(z: np.ndarray) -> Tensor:
        return torch.as_tensor(z, dtype=dtype, device=device).reshape(1, -1).requires_grad_()

    def fun(z: np.ndarray):
        with torch.enable_grad():
            yv = at(z)
            f = sample.objective(yv)
            (gz,) = grad(f.sum(), [yv])
        return f.item(), gz[0].detach().cpu().double().numpy()

    def values(kind: str, sign: float):
        def value(z: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = getattr(sample, kind)(at(z).detach())
            return sign * out[0].cpu().double().numpy()

        def jacobian(z: np.ndarray) -> np.ndarray:
            with torch.enable_grad():
                yv = at(z)
                J = batched_jacobian(getattr(sample, kind)(yv), yv)
            return sign * J[0].detach().cpu().double().numpy()

        return value, jacobian

    constraints = []
    if p:
        h, jh = values("eq", 1.0)
        constraints.append({"type": "eq", "fun": h, "jac": jh})
    g, jg = values("ineq", -1.0)  # scipy wants −g ≥ 0
    constraints.append({"type": "ineq", "fun": g, "jac": jg})
    return scipy.optimize.minimize(
        fun, y0.detach().cpu().double().numpy(), jac=True, method="SLSQP", constraints=constraints,
        options={"maxiter": options.max_iter, "ftol": ftol})
