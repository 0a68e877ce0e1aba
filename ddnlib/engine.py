"""The generic implicit-differentiation engine: the vector–Jacobian product of an argmin.

Let ``y(x, θ)`` solve ``min_y f`` subject to ``h = 0`` and ``g ≤ 0`` with multipliers ``ν = (λ, μ)``,
Lagrangian ``L = f + λᵀh + μᵀg`` and active constraints ``c = [h; g_active]`` with Jacobian
``A = ∂c/∂y``. Differentiating the KKT conditions ``∇_y L = 0``, ``c = 0`` gives, for an incoming
gradient ``v = ∂ℓ/∂y``,

    [H  Aᵀ] [u]   [−v]
    [A  0 ] [w] = [ 0],     H = ∇²_yy L,

    ∂ℓ/∂(x, θ) = ∂/∂(x, θ) [ ⟨∇_y L(x, y, ν), u⟩ + ⟨c(x, y), w⟩ ]   (y, ν, u, w held fixed).

So the backward pass is one (batched, per-sample) linear solve and one mixed second-order VJP, with
no loop over input or output dimensions and none over the batch: the problem is separable, so the
gradient of the batch sum holds every per-sample gradient, and parameter gradients come out summed
over the batch. Without constraints the system is ``H u = −v``.

Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Proposition 4.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .errors import OptimalityWarning, SingularSystemWarning, NonConvergenceWarning, report
from .linalg import NullSpace, SolveInfo, cg, solve_kkt, solve_spd
from .problem import Problem, batched_jacobian, grad

__all__ = ["implicit_vjp", "active_set", "recover_multipliers", "use_dense"]

CHECK_CG_TOL = 0.1


def use_dense(options, rows: int) -> bool:
    """Whether a per-sample system with ``rows`` rows is solved densely under ``options``."""
    if options.linear_solver == "auto":
        return rows <= options.dense_max
    return options.linear_solver == "dense"


def active_set(problem: Problem, c: Tensor, ctx: Mapping[str, Any] | None, tol: float) -> Tensor:
    """Mask ``(b, p + q)`` of the constraints treated as equalities.

    Equalities always; an inequality when the solver's multiplier ``mu_j > tol`` (if ``ctx`` carries
    ``"mu"``), otherwise when ``g_j(y) ≥ −tol``.
    """
    p = c.shape[1] - (problem.ineq_rows if problem.has_ineq else 0)
    eq = torch.ones_like(c[:, :p], dtype=torch.bool)
    if ctx and ctx.get("mu") is not None:
        ineq = ctx["mu"].reshape(c.shape[0], -1) > tol
    else:
        ineq = c[:, p:] >= -tol
    return torch.cat([eq, ineq], dim=1)


def recover_multipliers(grad_f: Tensor, A: Tensor, active: Tensor) -> Tensor:
    """``ν = argmin ‖∇_y f + Aᵀν‖`` per sample over the active rows (inactive ``ν_j = 0``)."""
    At = (A * active.unsqueeze(-1).to(A.dtype)).transpose(-1, -2)
    # a non-finite sample (a NaN input) gets NaN multipliers and is kept away from LAPACK
    finite = torch.isfinite(At).all((-2, -1)) & torch.isfinite(grad_f).all(-1)
    At = torch.where(finite[:, None, None], At, 0.0)
    rhs = torch.where(finite[:, None], -grad_f, 0.0).unsqueeze(-1)
    nu = torch.linalg.lstsq(At, rhs).solution.squeeze(-1)
    return torch.where(finite[:, None], nu, float("nan"))


def _given_multipliers(problem: Problem, ctx, c: Tensor) -> Tensor | None:
    if not ctx or (ctx.get("lambda") is None and ctx.get("mu") is None):
        return None
    parts = []
    for key, present, rows in (("lambda", problem.has_eq, c.shape[1] - problem.ineq_rows),
                               ("mu", problem.has_ineq, problem.ineq_rows)):
        if not present:
            continue
        value = ctx.get(key)
        if value is None:
            return None
        parts.append(value.detach().reshape(c.shape[0], rows).to(c.dtype))
    return torch.cat(parts, dim=1)


def _samples(mask: Tensor, limit: int = 8) -> str:
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:limit]))
    return f"[{shown}{', …' if len(idx) > limit else ''}] ({len(idx)} of {mask.numel()})"


def _report_solve(info: SolveInfo, H: Tensor | None, strict: bool, what: str) -> None:
    if info.singular.any():
        report(SingularSystemWarning,
               f"{what} is singular or rank deficient at samples {_samples(info.singular)}; "
               "the minimum-norm least-squares solution was used. Add damping "
               "(Options(damping=...)) or check that the problem has a unique solution.", strict)
    elif info.not_pd.any():
        detail = ""
        if info.min_eig is not None:
            detail = f" (smallest reduced-Hessian eigenvalue {info.min_eig.min().item():.3g})"
        elif H is not None:
            eig = torch.linalg.eigvalsh(H[info.not_pd]).amin(-1)
            detail = f" (smallest eigenvalue {eig.min().item():.3g})"
        report(SingularSystemWarning,
               f"{what} is not positive definite at samples {_samples(info.not_pd)}{detail}; "
               "the forward solution may not be a strict local minimum.", strict)
    if info.not_converged is not None and info.not_converged.any():
        report(NonConvergenceWarning,
               f"CG did not converge for {what} at samples {_samples(info.not_converged)}; "
               f"worst relative residual {info.residual.max().item():.3g}. Raise "
               "Options(cg_max_iter=...) or use linear_solver='dense'.", strict)


def implicit_vjp(
    node, xs: Sequence[Tensor], y: Tensor, v: Tensor, ctx: Mapping[str, Any] | None = None
) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor]]:
    """Gradients of ``⟨v, y(xs, θ)⟩`` for the inputs that require grad and for ``θ``.

    Args:
        node: the :class:`~ddnlib.DeclarativeNode` (its ``options`` are read).
        xs: the inputs, each ``(b, ...)``; gradients are returned for those with ``requires_grad``.
        y: the solution ``(b, *out)``.
        v: the incoming gradient ``∂ℓ/∂y``, same shape as ``y``.
        ctx: what the forward solver returned beside ``y`` (``"lambda"``, ``"mu"`` multipliers).

    Returns:
        ``(input_grads, param_grads)``: a tuple aligned with ``xs`` (``None`` where not required) and
        a dict from parameter name to gradient for every parameter of ``node`` requiring grad.
    """
    options = node.options
    b = y.shape[0]
    params = {name: p for name, p in node.named_parameters() if p.requires_grad}
    wanted = [x for x in xs if x.requires_grad] + list(params.values())
    if y.numel() == 0 or not wanted:  # an empty batch or an empty output: zero gradients
        return tuple(torch.zeros_like(x) if x.requires_grad else None for x in xs), {
            name: torch.zeros_like(p) for name, p in params.items()
        }
    strict = options.strict
    with torch.enable_grad():
        problem = Problem(node, xs, y.shape)
        yf = y.detach().reshape(b, problem.m).requires_grad_()
        vf = v.reshape(b, problem.m).to(y.dtype)
        grad_f = grad(problem.objective(yf).sum(), [yf], create_graph=True)[0]
        if problem.constrained:
            c = problem.constraints(yf)
            A = batched_jacobian(c, yf)
            active = active_set(problem, c, ctx, options.tol("active_tol", y.dtype))
            nu = _given_multipliers(problem, ctx, c)
            if nu is None:
                nu = recover_multipliers(grad_f.detach(), A, active)
            nu = nu * active.to(nu.dtype)
            lagrangian_grad = grad_f + grad((c * nu.detach()).sum(), [yf], create_graph=True)[0]
            null = NullSpace(A.detach(), active)
            if null.rank_deficient.any():
                report(SingularSystemWarning,
                       f"the active constraint Jacobian is rank deficient at samples "
                       f"{_samples(null.rank_deficient)} (rank {_rank_detail(null, active)}); "
                       "the minimum-norm multipliers were used. Remove redundant constraints: "
                       "gradients are only reliable when the active constraints are independent.",
                       strict)
        else:
            c = yf.new_zeros(b, 0)
            A = yf.new_zeros(b, 0, problem.m)
            active = torch.zeros(b, 0, dtype=torch.bool, device=y.device)
            lagrangian_grad = grad_f

        # Right-hand sides: column 0 is the backward system, column 1 the Newton/KKT step of the
        # optimality check (step d with H d + Aᵀ dν = −∇L, A d = −c).
        check = options.check_optimality
        By = torch.stack([-vf, -lagrangian_grad.detach()] if check else [-vf], dim=-1)
        Bc = torch.stack([torch.zeros_like(c), -c.detach()] if check else [torch.zeros_like(c)], -1)
        rows = problem.m + c.shape[1]
        what = "the KKT matrix" if problem.constrained else "the Hessian"
        if use_dense(options, rows):
            H = batched_jacobian(lagrangian_grad, yf)
            H = 0.5 * (H + H.transpose(-1, -2))
            if problem.constrained:
                U, W, info = solve_kkt(H, A.detach(), active, By, Bc, options.damping)
                info.singular &= ~null.rank_deficient  # reported above
            else:
                U, info = solve_spd(H, By, options.damping)
                W = By.new_zeros(b, 0, By.shape[-1])
            _report_solve(info, H, strict, what)
        else:
            U, W = _solve_matrix_free(lagrangian_grad, yf, null if problem.constrained else None,
                                      By, Bc, options)
        u, w = U[..., 0], W[..., 0]
        if check:
            _check_optimality(problem, y, U[..., 1], c.detach(), A.detach(),
                              nu if problem.constrained else None, grad_f.detach(), options)
        surrogate = (lagrangian_grad * u.detach()).sum() + (c * w.detach()).sum()
        grads = grad(surrogate, wanted)
    it = iter(grads)
    input_grads = tuple(next(it) if x.requires_grad else None for x in xs)
    return input_grads, {name: next(it) for name in params}


def _solve_matrix_free(g: Tensor, yf: Tensor, null: NullSpace | None, By: Tensor, Bc: Tensor,
                       options) -> tuple[Tensor, Tensor]:
    """(Projected) CG with Hessian-vector products by double backward through ``g = ∇_y L``."""
    damping = options.damping

    def hvp(p: Tensor) -> Tensor:  # p (k, b, m)
        out = torch.stack([grad(g, [yf], pk, retain_graph=True)[0] for pk in p])
        return out + damping * p if damping else out

    rhs_y = By.movedim(-1, 0)  # (k, b, m)
    # The backward system to cg_tol; the optimality-check step (second column) only needs its
    # size, so it stops at a relative residual of CHECK_CG_TOL.
    tol = torch.full((rhs_y.shape[0], 1), options.tol("cg_tol", yf.dtype), dtype=yf.dtype,
                     device=yf.device)
    tol[1:] = tol[1:].clamp_min(CHECK_CG_TOL)
    max_iter = options.cg_max_iter or 2 * yf.shape[1] + 10
    if null is None:
        x, info = cg(hvp, rhs_y, tol, max_iter)
        W = By.new_zeros(yf.shape[0], 0, By.shape[-1])
        _report_solve(info, None, options.strict, "the Hessian")
        return x.movedim(0, -1), W
    particular = null.least_norm(Bc.movedim(-1, 0))
    z, info = cg(hvp, rhs_y - hvp(particular), tol, max_iter, project=null)
    _report_solve(info, None, options.strict, "the KKT system")
    u = particular + z
    w = null.coefficients(rhs_y - hvp(u))
    return u.movedim(0, -1), w.movedim(0, -1)


def _rank_detail(null: NullSpace, active: Tensor) -> str:
    i = null.rank_deficient.nonzero()[0, 0]
    rank, rows = int(null.keep[i].sum().item()), int(active[i].sum().item())
    return f"{rank} < {rows} active rows at sample {int(i)}"


def _check_optimality(problem: Problem, y: Tensor, step: Tensor, c: Tensor, A: Tensor,
                      nu: Tensor | None, grad_f: Tensor, options) -> None:
    """Report samples whose Newton/KKT step is large, that violate a constraint, or whose
    inequality multipliers have the wrong sign.

    Violation is measured in units of ``y``: ``|h_j| / ‖∇_y h_j‖`` and ``max(g_j, 0) / ‖∇_y g_j‖``
    (the first-order distance to the constraint), against ``optimality_tol · (1 + ‖y‖∞)``.
    """
    tol = options.tol("optimality_tol", y.dtype)
    scale = 1 + y.reshape(y.shape[0], -1).abs().amax(-1)
    if c.shape[1] > 0:
        p = c.shape[1] - problem.ineq_rows
        violation = torch.cat([c[:, :p].abs(), c[:, p:].clamp_min(0)], dim=1)
        distance = violation / A.norm(dim=-1)  # inf where a violated row has a zero gradient
        distance = torch.where(violation > 0, distance, torch.zeros_like(distance)).amax(-1)
        infeasible = ~(distance <= tol * scale)
        if infeasible.any():
            report(OptimalityWarning,
                   f"the forward solution violates the constraints at samples "
                   f"{_samples(infeasible)}: largest violation {violation.amax().item():.3g} "
                   f"(distance {distance[infeasible].max().item():.3g} in units of y, relative "
                   f"tol {tol:g}). Gradients at an infeasible point are unreliable.",
                   options.strict)
    size = step.abs().amax(-1) / scale
    bad = ~(size <= tol)
    if bad.any():
        report(OptimalityWarning,
               f"the forward solution fails the optimality check at samples {_samples(bad)}: "
               f"relative Newton/KKT step up to {size[bad].max().item():.3g} > tol {tol:g}. "
               "The solver did not reach a stationary, feasible point; gradients there are "
               "unreliable.", options.strict)
    if nu is not None and problem.has_ineq:
        mu = nu[:, nu.shape[1] - problem.ineq_rows:]
        limit = tol * (1 + grad_f.abs().amax(-1, keepdim=True))
        wrong = (mu < -limit).any(-1)
        if wrong.any():
            report(OptimalityWarning,
                   f"inequality multipliers with the wrong sign at samples {_samples(wrong)} "
                   f"(most negative {mu.min().item():.3g}): the point is not a KKT point of "
                   "the inequality-constrained problem.", options.strict)
