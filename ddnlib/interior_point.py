"""Batched primal–dual interior-point solver for smooth constrained problems, all samples at once.

Per sample (``y (m)``, ``h (p)`` equalities, ``g (q)`` inequalities, slacks ``s > 0``)

    min_y f(y)   subject to   h(y) = 0,   g(y) + s = 0,   s ≥ 0,

with multipliers ``λ (p)`` and ``z (q) ≥ 0``. Each iteration takes a Newton step on the perturbed
KKT conditions

    r_d = ∇f + J_hᵀλ + J_gᵀz = 0,   r_e = h = 0,   r_i = g + s = 0,   r_c = s∘z − σμ = 0,

``μ = sᵀz / q``, with Mehrotra's predictor–corrector choice of the centring ``σ = (μ_aff/μ)³``
(Nocedal & Wright, *Numerical Optimization*, 2nd ed., Algorithm 16.4 / §19.3). Eliminating ``ds``
and ``dz`` (``D = Z S⁻¹``) leaves the condensed system

    [W + J_gᵀ D J_g   J_hᵀ] [dy]   [−r_d − J_gᵀ(D r_i − S⁻¹ r_c)]
    [J_h              0   ] [dλ] = [−r_e                        ],     W = ∇²_yy (f + λᵀh + zᵀg),

solved by batched Cholesky of ``M = W + J_gᵀ D J_g`` and of the Schur complement ``J_h M⁻¹ J_hᵀ``
(least squares, ``gelsd``, where the latter is singular: redundant equality constraints). Where
``M`` does not factorise (a non-convex problem, or ``W`` positive definite only on the null space
of ``J_h``) the solver adds the augmented-Lagrangian term ``ρ J_hᵀJ_h`` (which leaves the solution
unchanged) and then ``δI`` with ``δ = s · 10^k``, ``s = 1 + max |W_ii|`` (the inertia correction of
N&W §19.3), which also keeps it from stopping at maxima. No batched LU is used (it is unreliable on
multi-threaded CPU builds of torch at sizes ≳ 150).

Globalisation: fraction-to-boundary ``τ = 0.995`` on ``s`` and ``z`` (separate primal and dual
step lengths) and an Armijo backtracking line search on the primal step with the ℓ1 barrier merit
``φ(y, s) = f − σμ Σ log s + ν (‖h‖₁ + ‖g + s‖₁)`` (N&W §19.4), ``ν`` raised so that the step is a
descent direction. Starting points need not be feasible: ``s₀ = max(−g(y₀), κ)``,
``κ = 0.1 max(1, ‖g(y₀)‖∞)``, ``z₀ = 1``, ``λ₀ = 0``.

Derivatives come from torch autodiff on the batch sum (the problem is separable): ``∇_y L`` with its
graph, then one vectorised backward pass (``is_grads_batched``) over the ``m + p + q`` rows of
``[∇_y L; h; g]`` gives every per-sample Hessian ``W`` and both constraint Jacobians. So one
iteration costs one forward evaluation, one gradient and one batched second-order pass, plus one
forward evaluation per backtracking step.

A sample stops when, with ``tol = Options.solver_tol``,

    ‖r_d‖∞ ≤ tol (1 + ‖∇f‖∞),   ‖[h; g + s]‖∞ ≤ tol (1 + ‖J‖∞ ‖y‖∞),   max s∘z ≤ tol (1 + |f|),

(each residual relative to the size of the terms it balances). Samples that do not stop within
``Options.max_iter`` iterations are reported (:class:`~ddnlib.NonConvergenceWarning`, an error in
strict mode) with their residuals. The inequality multipliers handed back are ``z`` where
``z > s`` (the constraint is active) and 0 elsewhere, so the backward needs no least-squares
recovery of multipliers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonConvergenceWarning, report
from .options import Options
from .problem import Problem, batched_jacobian, grad

__all__ = ["IPMResult", "interior_point", "solve"]

_TAU = 0.995
_ARMIJO = 1e-4
_MAX_BACKTRACKS = 30


@dataclass
class IPMResult:
    """What :func:`interior_point` returns; per-sample tensors have a leading batch dimension.

    ``y (b, *out)``, ``eq_multipliers λ (b, p)``, ``ineq_multipliers μ (b, q)`` (zero on inactive
    rows), ``converged (b,)``, ``iterations (b,)`` (iterations each sample ran) and ``residual
    (b,)`` (the largest of the three relative residuals of the stopping test).
    """

    y: Tensor
    eq_multipliers: Tensor
    ineq_multipliers: Tensor
    converged: Tensor
    iterations: Tensor
    residual: Tensor

    def ctx(self) -> dict[str, Tensor]:
        """The multipliers as a node's ``solve`` returns them in ``ctx``."""
        ctx = {}
        if self.eq_multipliers.shape[1]:
            ctx["lambda"] = self.eq_multipliers
        if self.ineq_multipliers.shape[1]:
            ctx["mu"] = self.ineq_multipliers
        return ctx


def solve(node, *xs: Tensor, y0: Tensor | None = None, options: Options | None = None
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """Solve ``node`` at ``xs`` by :func:`interior_point`; ``(y, ctx)`` as a node's ``solve``.

    Starts from ``y0`` (default ``node.initial_guess(*xs)``) with ``options`` (default
    ``node.options``). A node opts in with ``def solve(self, *xs): return interior_point.solve(self,
    *xs)``.
    """
    y0 = node.initial_guess(*xs) if y0 is None else y0
    result = interior_point(Problem(node, xs, y0.shape), y0, options or node.options)
    return result.y, result.ctx()


def interior_point(problem: Problem, y0: Tensor, options: Options) -> IPMResult:
    """Solve ``problem`` from ``y0 (b, *out)`` (need not be feasible); see the module docstring."""
    b, m = problem.batch, problem.m
    dtype, device = y0.dtype, y0.device
    tol = options.tol("solver_tol", dtype)
    y = y0.detach().reshape(b, m).clone()
    with torch.no_grad():
        f0, h0, g0 = problem.objective(y), problem.eq(y), problem.ineq(y)
    _check_finite(f0, h0, g0)
    p, q = h0.shape[1], g0.shape[1]
    kappa = 0.1 * g0.abs().amax(-1, keepdim=True).clamp_min(1.0) if q else g0
    s = torch.maximum(-g0, kappa) if q else g0.clone()
    z = torch.ones_like(s)
    lam = y.new_zeros(b, p)
    nu = y.new_zeros(b)
    running = torch.ones(b, dtype=torch.bool, device=device)
    converged = torch.zeros_like(running)
    iterations = torch.zeros(b, dtype=torch.long, device=device)
    residual = torch.full((b,), float("inf"), dtype=dtype, device=device)
    for _ in range(options.max_iter + 1):
        ev = _evaluate(problem, y, lam, z, p)
        finite = (torch.isfinite(ev.gL).all(-1) & torch.isfinite(ev.J).all((-2, -1))
                  & torch.isfinite(ev.f))
        rd, re, ri = ev.gL, ev.h, ev.g + s
        scale_d = 1 + ev.gf.abs().amax(-1)
        scale_p = 1 + _amax(ev.J[:, m:].abs().flatten(1)) * y.abs().amax(-1)
        res = torch.stack([
            rd.abs().amax(-1) / scale_d,
            _amax(torch.cat([re, ri], 1).abs()) / scale_p,
            _amax(s * z) / (1 + ev.f.abs()),
        ]).amax(0)
        residual = torch.where(running, res, residual)
        done = running & (res <= tol)
        converged |= done
        running &= ~done & finite
        if not running.any() or int(iterations.max()) >= options.max_iter:
            break
        iterations += running.long()
        y, s, z, lam, nu = _step(problem, ev, y, s, z, lam, nu, rd, re, ri, running, p, q)
    _report(problem, converged, residual, iterations, options, tol)
    active = z > s
    mu = torch.where(active, z, torch.zeros_like(z))
    y, lam, mu = _polish(problem, y, lam, mu, active, converged, tol)
    return IPMResult(problem.unflatten(y), lam, mu, converged, iterations, residual)


def _polish(problem: Problem, y: Tensor, lam: Tensor, mu: Tensor, active: Tensor,
            converged: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """One Newton step on the KKT system with the active inequalities held as equalities.

    The interior point stops with the active constraints at ``g ≈ −s``, ``|s| ≈ μ/z``; this step
    puts them at ``g = 0`` (exact for a QP). It is kept per sample where it leaves a KKT point:
    inactive constraints satisfied, active multipliers non-negative, values finite.
    """
    p = lam.shape[1]
    m = y.shape[1]
    ev = _evaluate(problem, y, lam, mu, p)
    ev = _Eval(*(t.double() for t in (ev.f, ev.h, ev.g, ev.gL, ev.gf, ev.W, ev.J)))
    act = torch.cat([torch.ones_like(lam, dtype=torch.bool), active], 1)
    A = ev.J[:, m:] * act.unsqueeze(-1).double()
    c = torch.cat([ev.h, ev.g], 1) * act.double()
    K = _Condensed(ev.W, ev.W, A, inactive=~act)
    dy, dnu = K.solve(ev.gL, c)
    y_new = y + dy.to(y.dtype)
    nu_new = (torch.cat([lam, mu], 1).double() + dnu).to(y.dtype) * act
    with torch.no_grad():
        g_new, f_new = problem.ineq(y_new), problem.objective(y_new)
    scale = 1 + y_new.abs().amax(-1, keepdim=True)
    ok = (converged & torch.isfinite(f_new) & torch.isfinite(y_new).all(-1)
          & (active | (g_new <= tol * scale)).all(-1)
          & (nu_new[:, p:] >= 0).all(-1))
    keep = ok.unsqueeze(-1)
    return (torch.where(keep, y_new, y), torch.where(keep, nu_new[:, :p], lam),
            torch.where(keep, nu_new[:, p:], mu))


@dataclass
class _Eval:
    f: Tensor    # (b,)
    h: Tensor    # (b, p)
    g: Tensor    # (b, q)
    gL: Tensor   # (b, m)   ∇_y L
    gf: Tensor   # (b, m)   ∇_y f
    W: Tensor    # (b, m, m)
    J: Tensor    # (b, m + p + q, m): rows m.. are [J_h; J_g]


def _evaluate(problem: Problem, y: Tensor, lam: Tensor, z: Tensor, p: int) -> _Eval:
    """Values, ``∇L``, ``∇f``, the Hessian of the Lagrangian and the constraint Jacobians at ``y``."""
    m = y.shape[1]
    with torch.enable_grad():
        yv = y.detach().requires_grad_()
        f, h, g = problem.objective(yv), problem.eq(yv), problem.ineq(yv)
        total = f.sum() + (h * lam).sum() + (g * z).sum()
        gL = grad(total, [yv], create_graph=True)[0]
        J = batched_jacobian(torch.cat([gL, h, g], 1), yv).detach()
    W = J[:, :m]
    W = 0.5 * (W + W.transpose(-1, -2))
    A = J[:, m:]
    multipliers = torch.cat([lam, z], 1).unsqueeze(-1)
    gL = gL.detach()
    gf = gL - (A.transpose(-1, -2) @ multipliers).squeeze(-1)
    return _Eval(f.detach(), h.detach(), g.detach(), gL, gf, W, J)


class _Condensed:
    """Factorisation of the condensed system ``[[M, J_hᵀ], [J_h, 0]]`` (see module docstring)."""

    def __init__(self, M: Tensor, W: Tensor, Ah: Tensor, inactive: Tensor | None = None):
        b, m, _ = M.shape
        eye = torch.eye(m, dtype=M.dtype, device=M.device)
        # the scale of the regularisation is that of W: the barrier term J_gᵀDJ_g grows without
        # bound on active constraints and must not set it
        scale = 1 + W.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        eps = torch.finfo(M.dtype).eps
        AtA = Ah.transpose(-1, -2) @ Ah
        rho_unit = scale / (1 + _amax(AtA.diagonal(dim1=-2, dim2=-1)))
        self.rho = torch.zeros_like(scale)
        self.delta = 10 * eps * scale
        self.L = torch.zeros_like(M)
        todo = torch.ones(b, dtype=torch.bool, device=M.device)
        ladder = ([(0.0, None)] + ([(1.0, None)] if Ah.shape[1] else [])
                  + [(1.0 if Ah.shape[1] else 0.0, k) for k in range(-8, 17)])
        for rho_k, k in ladder:
            idx = todo.nonzero().flatten()
            rho = rho_unit[idx] * rho_k
            delta = self.delta[idx] if k is None else scale[idx] * 10.0**k
            Mk = M[idx] + rho[:, None, None] * AtA[idx] + delta[:, None, None] * eye
            L, info = torch.linalg.cholesky_ex(Mk)
            ok = info == 0
            self.L[idx[ok]], self.rho[idx[ok]], self.delta[idx[ok]] = L[ok], rho[ok], delta[ok]
            todo[idx[ok]] = False
            if not todo.any():
                break
        # samples where nothing factorised (non-finite M) keep L = I: their step is discarded
        self.L[todo] = eye
        self.Ah = Ah
        if Ah.shape[1]:
            self.MiAt = torch.cholesky_solve(Ah.transpose(-1, -2), self.L)
            S = Ah @ self.MiAt
            S = 0.5 * (S + S.transpose(-1, -2))
            if inactive is not None:  # rows of Ah that are zero: W = 0 there
                S = S + torch.diag_embed(inactive.to(S.dtype))
            s_scale = 1 + S.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
            S = S + (10 * eps * s_scale)[:, None, None] * torch.eye(
                S.shape[-1], dtype=S.dtype, device=S.device)
            self.Ls, info = torch.linalg.cholesky_ex(S)
            self.S, self.s_singular = S, info != 0

    def solve(self, rt: Tensor, re: Tensor) -> tuple[Tensor, Tensor]:
        """``(dy, dλ)`` with ``M dy + J_hᵀ dλ = −rt``, ``J_h dy = −re``; ``rt (b, m)``, ``re (b, p)``."""
        if self.Ah.shape[1]:
            rt = rt + self.rho.unsqueeze(-1) * (self.Ah.transpose(-1, -2) @ re.unsqueeze(-1))[..., 0]
        Mir = torch.cholesky_solve(rt.unsqueeze(-1), self.L)
        if not self.Ah.shape[1]:
            return -Mir[..., 0], re.new_zeros(re.shape)
        rhs = re.unsqueeze(-1) - self.Ah @ Mir
        dlam = torch.cholesky_solve(rhs, self.Ls)
        bad = self.s_singular
        if bad.any():
            dlam = dlam.clone()
            dlam[bad] = torch.linalg.lstsq(self.S[bad], rhs[bad], driver=_driver(rhs)).solution
        dy = -Mir - self.MiAt @ dlam
        return dy[..., 0], dlam[..., 0]


def _amax(t: Tensor) -> Tensor:
    """Row maximum of ``t (b, k)``, 0 for ``k = 0``."""
    return t.amax(-1) if t.shape[-1] else t.new_zeros(t.shape[0])


def _driver(t: Tensor) -> str | None:
    return "gelsd" if t.device.type == "cpu" else None


def _direction(K: _Condensed, Ag: Tensor, s: Tensor, z: Tensor, rd: Tensor, re: Tensor,
               ri: Tensor, rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dy, ds, dz, dλ)`` of the Newton system with complementarity residual ``rc (b, q)``."""
    D = z / s
    rt = rd + (Ag.transpose(-1, -2) @ (D * ri - rc / s).unsqueeze(-1))[..., 0]
    dy, dlam = K.solve(rt, re)
    dz = D * ((Ag @ dy.unsqueeze(-1))[..., 0] + ri) - rc / s
    ds = -(rc + s * dz) / z
    return dy, ds, dz, dlam


def _max_step(v: Tensor, dv: Tensor, tau: float) -> Tensor:
    """Largest ``α ∈ (0, 1]`` with ``v + α dv ≥ (1 − τ) v`` per sample."""
    ratio = torch.where(dv < 0, -tau * v / dv.where(dv < 0, -torch.ones_like(dv)),
                        torch.ones_like(v))
    return ratio.amin(-1).clamp(max=1.0) if v.shape[-1] else v.new_ones(v.shape[0])


def _step(problem: Problem, ev: _Eval, y, s, z, lam, nu, rd, re, ri, running, p: int, q: int):
    """One predictor–corrector iteration with line search; frozen where not ``running``."""
    m, dtype = y.shape[1], y.dtype
    y_in, s_in, z_in, lam_in, f = y, s, z, lam, ev.f
    # the Newton direction is computed in float64 whatever the input's precision: the barrier
    # term J_gᵀDJ_g makes the condensed matrix ill-conditioned near the solution
    y, s, z, lam, nu, rd, re, ri = (t.double() for t in (y, s, z, lam, nu, rd, re, ri))
    ev = _Eval(*(t.double() for t in (ev.f, ev.h, ev.g, ev.gL, ev.gf, ev.W, ev.J)))
    Ah, Ag = ev.J[:, m:m + p], ev.J[:, m + p:]
    M = ev.W + Ag.transpose(-1, -2) @ ((z / s).unsqueeze(-1) * Ag)
    finite = torch.isfinite(M).all((-2, -1))
    M = torch.where(finite[:, None, None], M, torch.eye(m, dtype=M.dtype, device=M.device))
    K = _Condensed(M, ev.W, Ah)
    if q:
        mu = (s * z).mean(-1)
        dy, ds, dz, dlam = _direction(K, Ag, s, z, rd, re, ri, s * z)
        a_p, a_d = _max_step(s, ds, 1.0), _max_step(z, dz, 1.0)
        mu_aff = ((s + a_p[:, None] * ds) * (z + a_d[:, None] * dz)).mean(-1)
        sigma = (mu_aff / mu.clamp_min(torch.finfo(mu.dtype).tiny)).clamp(0, 1) ** 3
        target = sigma * mu
        rc = s * z + ds * dz - target.unsqueeze(-1)
        dy, ds, dz, dlam = _direction(K, Ag, s, z, rd, re, ri, rc)
        a_p, a_d = _max_step(s, ds, _TAU), _max_step(z, dz, _TAU)
    else:
        target = y.new_zeros(y.shape[0])
        dy, ds, dz, dlam = _direction(K, Ag, s, z, rd, re, ri, s * z)
        a_p = a_d = y.new_ones(y.shape[0])
    # ℓ1 barrier merit: ν ≥ 1.1 ‖(λ⁺, z⁺)‖∞ and large enough for descent (N&W eq. 18.36)
    c1 = re.abs().sum(-1) + ri.abs().sum(-1)
    slope_f = (ev.gf * dy).sum(-1) - (target.unsqueeze(-1) * ds / s).sum(-1)
    curvature = torch.einsum("bi,bij,bj->b", dy, M, dy).clamp_min(0)
    needed = torch.where(c1 > 0, (slope_f + 0.5 * curvature) / (0.5 * c1).clamp_min(
        torch.finfo(y.dtype).tiny), torch.zeros_like(c1))
    new_mult = _amax(torch.cat([lam + dlam, z + dz], 1).abs())
    nu = torch.maximum(nu, torch.maximum(1.1 * new_mult, needed))
    slope = slope_f - nu * c1
    dy, ds, dz, dlam, a_p, a_d, target, nu, c1, slope = (
        t.to(dtype) for t in (dy, ds, dz, dlam, a_p, a_d, target, nu, c1, slope))
    y, s, z, lam = y_in, s_in, z_in, lam_in
    t = _line_search(problem, f, y, s, dy, ds, a_p, target, nu, c1, slope, running)
    keep = running.unsqueeze(-1)
    y = torch.where(keep, y + t[:, None] * dy, y)
    s = torch.where(keep, s + t[:, None] * ds, s)
    lam = torch.where(keep, lam + t[:, None] * dlam, lam)
    z = torch.where(keep & (t > 0)[:, None], z + a_d[:, None] * dz, z)
    return y, s, z, lam, nu


def _merit(problem: Problem, y: Tensor, s: Tensor, target: Tensor, nu: Tensor) -> Tensor:
    f, h, g = problem.objective(y), problem.eq(y), problem.ineq(y)
    c1 = h.abs().sum(-1) + (g + s).abs().sum(-1)
    phi = f - target * s.log().sum(-1) + nu * c1
    return torch.where(torch.isfinite(phi), phi, torch.full_like(phi, float("inf")))


def _line_search(problem, f, y, s, dy, ds, a_max, target, nu, c1, slope, running) -> Tensor:
    """Per-sample Armijo step ``t = a_max 2^-k`` on the merit; ``a_max`` where none is found and
    the full step is finite (non-monotone: the merit shortens steps, it never stalls a sample),
    0 where no finite trial point was found."""
    with torch.no_grad():
        phi0 = f - target * s.log().sum(-1) + nu * c1
        rounding = 64 * torch.finfo(y.dtype).eps * (1 + phi0.abs() + (target * s.log().sum(-1)).abs())
        t = a_max.clone()
        searching = running.clone()
        accepted = torch.zeros_like(running)
        full_finite = torch.zeros_like(running)
        for k in range(_MAX_BACKTRACKS):
            phi = _merit(problem, y + t[:, None] * dy, s + t[:, None] * ds, target, nu)
            if k == 0:
                full_finite = torch.isfinite(phi)
            ok = searching & ((phi <= phi0 + _ARMIJO * t * slope.clamp(max=0))
                              | ((phi - phi0).abs() <= rounding))
            accepted |= ok
            searching &= ~ok
            if not searching.any():
                break
            t = torch.where(searching, 0.5 * t, t)
    return torch.where(accepted, t, torch.where(full_finite, a_max, torch.zeros_like(t)))


def _check_finite(f: Tensor, h: Tensor, g: Tensor) -> None:
    for name, value in (("objective", f), ("equality_constraints", h),
                        ("inequality_constraints", g)):
        bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)
        if bad.any():
            idx = bad.nonzero().flatten()
            first = value.reshape(value.shape[0], -1)[idx[0]]
            raise ValueError(
                f"{name} is not finite at the initial guess at samples {idx[:8].tolist()} "
                f"({int(bad.sum())} of {bad.numel()}; sample {int(idx[0])}: "
                f"{first[~torch.isfinite(first)][:4].tolist()}): start from a point where the "
                "problem is defined (override initial_guess)")


def _report(problem, converged: Tensor, residual: Tensor, iterations: Tensor, options, tol
            ) -> None:
    failed = ~converged
    if failed.any():
        idx = failed.nonzero().flatten()
        worst = residual[failed].max().item()
        report(NonConvergenceWarning,
               f"interior point did not converge at samples {idx[:8].tolist()} "
               f"({int(failed.sum())} of {failed.numel()}) after up to "
               f"{int(iterations[failed].max())} iterations (max_iter {options.max_iter}); worst "
               f"relative KKT residual {worst:.3g} > tol {tol:g} (a line search that found no "
               "decrease, a non-finite value, or an infeasible problem also end a sample). Raise "
               "Options(max_iter=...), start from a better initial_guess, or supply solve().",
               options.strict)
