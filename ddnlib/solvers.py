"""Default forward solvers, used when a node does not supply ``solve``.

Unconstrained: batched Newton with Levenberg damping and a backtracking (Armijo) line search, the
direction from dense per-sample Hessians (Cholesky, Jacobi-scaled where the curvatures span many
orders of magnitude: :func:`~ddnlib.linalg.jacobi_scaling`) for small outputs or from conjugate
gradients on Hessian-vector products (Newton-CG) for large ones (the same ``Options.linear_solver``
/ ``dense_max`` switch as the backward pass). Every solver stops per sample when the Newton step is
below ``solver_tol · (σ + ‖y‖∞)``, ``σ = min(1, max(‖y₀‖∞, ‖d₀‖∞))`` (the size of the start and of
the first step: a problem smaller than one is judged relative to its size) or, at rounding level,
below ``solver_tol · (1 + ‖y‖∞)`` and no longer halving, applies that last step, and reports the
samples that did not get there.

Inequality constrained (``g(x, y) ≤ 0``, with or without equalities), and equality constrained
where the per-sample KKT system is dense (``Options.linear_solver`` resolves to dense for its
``m + p`` rows): the batched primal–dual interior point of :mod:`ddnlib.interior_point` (all
samples at once, infeasible starts through slacks, inertia correction and a negative-curvature
escape so that it does not stop at maxima, redundant constraints by least squares). It returns a
:class:`~ddnlib.Solution` with the multipliers, so the backward needs no recovery.

Equality constrained with a matrix-free linear solver (large outputs): batched SQP (:func:`sqp`),
i.e. Newton on the KKT conditions ``∇_y f + Aᵀλ = 0``, ``h = 0``: each iteration solves, per sample,

    [H  Aᵀ] [d ]   [−∇_y f]
    [A  0 ] [λ⁺] = [  −h  ],     H = ∇²_yy (f + λᵀh),  A = ∂h/∂y,

(projected CG on the null space of ``A``), with Levenberg damping ``H + γI`` where the reduced
Hessian is not positive definite (``γ`` from the Rayleigh quotients CG meets, so that the step has
the problem's scale), and a backtracking line search on the ℓ1 merit function ``φ(y) = f +
ρ‖h‖₁`` (``ρ`` as large as needed for ``d`` to be a descent direction, Nocedal & Wright,
*Numerical Optimization*, 2nd ed., §18.3, and otherwise following Powell's rule ``ρ ← max(1.1‖λ⁺‖∞,
½(ρ + 1.1‖λ⁺‖∞))``, Powell 1978, so that one wild early multiplier does not freeze the steps for
good) with a second-order correction ``−A⁺ h(y + d)`` against the Maratos effect. It returns a
:class:`~ddnlib.Solution` with ``λ``.

Opt-in: :func:`slsqp_solve` runs scipy's SLSQP sample by sample in a Python loop (gradients and
constraint Jacobians by torch, BLAS limited to one thread through ``threadpoolctl`` when it is
installed, so that the loop does not oversubscribe the cores), refined by the SQP on the active
set. It is slow and meant as a cross-check: ``def solve(self, *xs): return slsqp_solve(self, *xs)``.

Non-convergence (iteration cap, failed line search, SLSQP failure) is reported as a
:class:`~ddnlib.NonConvergenceWarning` with the samples, iterations and residuals (an error in
strict mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

import numpy as np
import scipy.optimize

from .contract import check_initial_guess, check_start
from . import interior_point
from .errors import NonConvergenceWarning, SingularSystemWarning, describe_samples, report
from .kkt import KKTPoint, least_squares_multipliers
from .linalg import SolveInfo, jacobi_scaling, lstsq, trusted_cholesky, unit_floor
from .linear_solvers import CG, Auto, Dense, KKTOperator, chosen
from .problem import Problem, batched_jacobian, grad
from .solution import Solution

__all__ = ["default_solve", "default_solution", "newton", "sqp", "slsqp", "slsqp_solve"]

_ARMIJO = 1e-4
_MAX_BACKTRACKS = 40
_MAX_SHIFT = 16  # the largest Levenberg shift tried is max |H_ii| · 10^16
_CHORD = 1e-4  # Newton reuses a sample's Hessian factor once its step is below this, relative,
_CONTRACTION = 0.1  # for chord steps of at most this share of the step before


def default_solve(node, xs: Sequence[Tensor]) -> Tensor | Solution:
    """Solve ``node`` at ``xs`` with the default solver for its kind of problem: ``y`` without
    constraints, a :class:`~ddnlib.Solution` with the multipliers otherwise."""
    solution = default_solution(node, xs)
    constrained = node.has_equality_constraints or node.has_inequality_constraints
    return solution if constrained else solution.y


def default_solution(node, xs: Sequence[Tensor]) -> Solution:
    """:func:`default_solve` with everything the solver hands the backward pass (the autograd
    bridge calls this for nodes that keep the default ``solve``): also the Hessian factor of
    :func:`newton` where an input or a parameter of ``node`` requires grad."""
    y0 = check_initial_guess(node, xs, node.initial_guess(*xs))
    if y0.numel() == 0:  # an empty output per sample: nothing to solve
        return Solution(y0)
    problem = Problem(node, xs, y0.shape)
    options = node.options
    # finite objective and constraints at y0 (ddnlib.contract); dense Newton starts from them
    start = check_start(node, xs, y0,
                        create_graph=not problem.constrained and _dense(options, problem.m))
    if problem.has_ineq or (problem.has_eq and _dense(options, problem.m
                                                      + problem.eq(problem.flatten(y0)).shape[1])):
        return interior_point.interior_point(problem, y0, options).solution()
    if problem.has_eq:
        y, nu, converged, residual, saddle = sqp(problem, y0, node.options)
        _report_sqp(converged, residual, node.options)
        if saddle.any():
            report(SingularSystemWarning,
                   f"SQP stopped at a KKT point that is not a strict local minimum (the reduced "
                   f"Hessian is not positive definite) at samples {describe_samples(saddle)}: a "
                   "saddle point or maximum reached from initial_guess. Start from another "
                   "initial_guess or supply solve().", node.options.strict)
        return Solution(y, eq_multipliers=nu,
                        stats={"converged": converged, "residual": residual})
    # the Hessian factor is for a backward pass, which needs an input or a parameter with grad
    hand_off = (any(x.requires_grad for x in xs)
                or any(p.requires_grad for p in node.parameters()))
    return newton(problem, y0, node.options, start, hand_off)


def _dense(options, rows: int) -> bool:
    """Whether the node's linear solver is dense for a per-sample system of ``rows`` rows."""
    solver = options.solver
    if isinstance(solver, Auto):
        return rows <= solver.dense_max and isinstance(solver.dense, Dense)
    return isinstance(solver, Dense)


def slsqp_solve(node, *xs: Tensor) -> Solution:
    """The opt-in SLSQP fallback for ``node`` at ``xs`` from ``node.initial_guess(*xs)``; a
    :class:`~ddnlib.Solution` with the multipliers (see :func:`slsqp`)."""
    y0 = node.initial_guess(*xs)
    if y0.numel() == 0:
        return Solution(y0)
    problem = Problem(node, xs, y0.shape)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it the per-sample loop may oversubscribe BLAS threads
        return slsqp(problem, y0, node.options)
    with threadpool_limits(limits=1, user_api="blas"):
        return slsqp(problem, y0, node.options)


def _newton_step(kkt: KKTPoint, options, rhs_y: Tensor, rhs_c: Tensor, rtol: Tensor | None = None,
                 curvature: bool = True) -> tuple[Tensor, Tensor, Tensor | None, SolveInfo]:
    """One convexified Newton/KKT step at ``kkt`` with the node's linear solver.

    Solves ``[H Aᵀ; A 0] [d; ν⁺] = [rhs_y; rhs_c]`` (``H`` shifted or CG truncated where the
    reduced Hessian is not positive definite). Returns ``d (b, m)``, ``ν⁺ (b, r)``, the curvature
    ``dᵀHd (b,)`` of the unshifted ``H`` (``None`` unless ``curvature``) and the solve's
    :class:`~ddnlib.linalg.SolveInfo` (``not_pd``: the samples that were shifted or truncated).
    """
    op = kkt.operator(convexify=True)
    solver = chosen(options.solver, op)
    U, W, info = solver.solve(op, rhs_y.unsqueeze(-1), rhs_c.unsqueeze(-1), rtol)
    if isinstance(solver, CG) and info.not_pd.any():
        U, W = _shifted(kkt, solver, rhs_y, rhs_c, rtol, info, U, W)
    d = U[..., 0]
    dHd = None
    if curvature and isinstance(solver, CG):
        dHd = (d * kkt.hvp(d.unsqueeze(0))[0]).sum(-1)
    elif curvature:
        dHd = torch.einsum("bi,bij,bj->b", d, kkt.hessian(), d)
    return d, W[..., 0], dHd, info


def _shifted(kkt: KKTPoint, solver: CG, rhs_y: Tensor, rhs_c: Tensor, rtol: Tensor | None,
             info: SolveInfo, U: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """The Levenberg step ``(H + γI)`` for the samples where CG met non-positive curvature, as
    the dense solver takes it: ``γ = 2|q|`` from the smallest Rayleigh quotient ``q`` met (an
    upper bound of the smallest eigenvalue), raised tenfold until CG meets none. A truncated CG
    or steepest-descent step has the length of the gradient, so on a problem scaled by ``s`` it
    is ``s`` times too short; the shifted step has the problem's own scale. Samples that stay
    indefinite after :data:`_MAX_SHIFT` raises keep the truncated step ``U, W``."""
    todo = info.not_pd.clone()
    gamma = 2 * info.min_eig.abs().nan_to_num(posinf=0.0)
    for _ in range(_MAX_SHIFT):
        shift = torch.where(todo, gamma, 0.0)
        op = KKTOperator(lambda P: kkt.hvp(P) + shift[:, None] * P, kkt.y.shape[1],
                         kkt.A if kkt.constrained else None,
                         kkt.active if kkt.constrained else None, None, convexify=True,
                         null_space=kkt.null_space if kkt.constrained else None)
        keep = todo.to(rhs_y.dtype)  # the other samples' systems stop at once
        Us, Ws, got = solver.solve(op, (rhs_y * keep[:, None]).unsqueeze(-1),
                                   (rhs_c * keep[:, None]).unsqueeze(-1), rtol)
        ok = todo & ~got.not_pd & ~got.singular
        U = torch.where(ok[:, None, None], Us, U)
        W = torch.where(ok[:, None, None], Ws, W)
        todo &= ~ok
        if not todo.any():
            break
        gamma = torch.where(got.not_pd, 10 * torch.maximum(gamma, 2 * got.min_eig.abs()), gamma)
    return U, W


def newton(problem: Problem, y0: Tensor, options, start: tuple | None = None,
           hand_off: bool = True) -> Solution:
    """Batched damped Newton on ``min_y f(x, y)`` from ``y0 (b, *out)``: a
    :class:`~ddnlib.Solution` with ``y (b, *out)``.

    The direction is the convexified Newton step, or ``−∇f`` where that is not a descent
    direction. With a dense linear solver (:func:`_dense_newton`) it is the Levenberg-shifted
    Cholesky step; otherwise the node's linear solver gives it (truncated CG with the forcing term
    ``min(0.5, √‖∇f‖)``). When every sample converged and the last iteration's dense Hessians all
    factorised without a shift, their Cholesky factor comes back as ``hessian_cholesky`` (each at
    the sample's last iterate, at most the final step — below ``solver_tol`` relative — from
    ``y``), for the backward pass to reuse (only with ``hand_off``), with ``certified =
    solver_tol`` (:class:`~ddnlib.Solution`: every sample stopped on a Newton step, not on
    ``−∇f``, below the tolerance; likewise on the CG path). ``start``: ``(y, f, ∇f)``
    at ``y0`` with the graph of ``∇f`` (from :func:`~ddnlib.contract.check_start`), saving the
    first evaluation.
    """
    if _dense(options, problem.m):
        return _dense_newton(problem, y0, options, start, hand_off)
    return _newton_cg(problem, y0, options)


def _newton_cg(problem: Problem, y0: Tensor, options) -> Solution:
    """:func:`newton` with the step from the node's (matrix-free) linear solver, solved to the
    relative residual ``min(½, √(‖∇f‖ / ‖∇f(y₀)‖))`` (Dembo & Steihaug's forcing, relative to the
    start) and at least ``cg_tol``; a step that passes the stopping test from a looser solve is
    solved again to ``cg_tol`` before the sample stops."""
    b = problem.batch
    tol = options.tol("solver_tol", y0.dtype)
    cg_tol = options.tol("cg_tol", y0.dtype)
    y = problem.flatten(y0.detach()).clone()
    running = torch.ones(b, dtype=torch.bool, device=y.device)
    step = torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    factor = None  # the last dense factorisation, kept only when every sample has converged
    certified = None  # see Solution.certified
    sigma, size = None, torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    kkt = problem.kkt(y, options=options)
    g0 = None  # ‖∇f(y₀)‖, the forcing terms' unit
    confirm = torch.zeros_like(running)  # a small step from a loose solve, to be solved tightly
    for _ in range(options.max_iter):
        g = kkt.grad_f.detach()
        gnorm = g.norm(dim=-1).clamp_min(torch.finfo(g.dtype).tiny)
        g0 = gnorm if g0 is None else g0
        # Dembo–Steihaug forcing min(½, √‖∇f‖), with ‖∇f‖ relative to the start's
        forcing = torch.where(confirm, cg_tol,
                              (gnorm / g0).clamp(max=0.25).sqrt().clamp(min=cg_tol))
        d, _, _, info = _newton_step(kkt, options, -g, g.new_zeros(b, 0), forcing.unsqueeze(0),
                                     curvature=False)
        d = d.detach()
        newton_step = (d * g).sum(-1) < 0
        d = torch.where(newton_step.unsqueeze(-1), d, -g)
        f = kkt.f
        finite = torch.isfinite(f) & torch.isfinite(g).all(-1)
        running &= finite
        sigma = _length(y, d) if sigma is None else sigma
        step_now, stop, size = _step_test(d, y, sigma, size, tol)
        step = torch.where(running, step_now, step)
        # a step below tol from a CG solve to a loose residual is not yet Newton's: along the
        # Hessian's small eigenvalues it can be far too short (Rosenbrock's valley)
        confirm = stop & (forcing > cg_tol)
        done = running & stop & ~confirm
        y = torch.where(done.unsqueeze(-1), y + d, y)  # the last (tiny) step is applied too
        running &= ~done
        if not running.any():
            factor = info.factor
            # every sample stopped on a (truncated) Newton step below tol, none on −∇f
            newton_step &= ~(info.not_pd | info.singular)
            certified = tol if bool((newton_step | ~finite).all()) else None
            break
        # the full step is evaluated with the next iteration's derivatives; where it fails the
        # Armijo test the step is shortened from ½ on, and the derivatives evaluated again
        y_full = torch.where(running.unsqueeze(-1), y + d, y)
        kkt_full = problem.kkt(y_full, options=options)
        progress = kkt_full.grad_f.detach().norm(dim=-1) < gnorm
        short = running & ~_armijo(kkt_full.f, f, (g * d).sum(-1), progress=progress)
        if short.any():
            t = _backtrack(problem, y, f, g, d, short, t0=0.5)
            y = torch.where(short.unsqueeze(-1), y + t.unsqueeze(-1) * d, y_full)
            kkt = problem.kkt(y, options=options)
        else:
            y, kkt = y_full, kkt_full
    else:
        _report_newton(running, step, tol, options)
    y = problem.unflatten(torch.where(finite.unsqueeze(-1), y, torch.nan))
    if not bool(finite.all()):
        return Solution(y)
    return Solution(y, hessian_cholesky=factor, certified=certified)


def _dense_newton(problem: Problem, y0: Tensor, options, start: tuple | None,
                  hand_off: bool = True) -> Solution:
    """:func:`newton` with dense per-sample Hessians.

    Each iteration evaluates ``f`` and ``∇f`` once (:func:`_gradient`, with the graph of ``∇f``)
    and from it ``∇²f`` (:func:`_hessian`) for the Levenberg-shifted Cholesky step
    (:func:`_levenberg_step`). A sample whose previous step was below :data:`_CHORD` relative
    reuses its last trusted factor (a chord step, :func:`_chord_step`, at most
    :data:`_CONTRACTION` times the previous step: it differs from the Newton step by about
    :data:`_CHORD` of its size, so the stopping test and the accuracy are Newton's to that share);
    the Hessians are formed only when a running sample needs them — typically every iteration
    but the last, confirming one. Every decision is per sample, so a sample's iterates do not
    depend on the rest of the batch. The full step's evaluation is the next iteration's; only
    where it fails the Armijo test is the step shortened (from ½ on) and the point evaluated
    again. With ``hand_off`` the factor of the Hessians at the last iterate comes back (formed
    for it where the last step was a chord step).
    """
    b = problem.batch
    tol = options.tol("solver_tol", y0.dtype)
    y = start[0].detach() if start is not None else problem.flatten(y0.detach()).clone()
    running = torch.ones(b, dtype=torch.bool, device=y.device)
    finite = None  # (b,) once a sample was not finite; None while all are
    step = None  # the last relative steps (b,)
    near = torch.zeros_like(running)  # the previous step was below _CHORD
    chordable = False  # some running sample is near
    L = trusted = None  # the factors, and where each is trusted
    here = None  # (factors, trusted) of the Hessians at the current point, where formed
    sigma, size = None, torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    converged = False
    point = _gradient(problem, y) if start is None else start  # (y leaf, f, ∇f with its graph)
    for _ in range(options.max_iter):
        f, g = point[1].detach(), point[2].detach()
        chord, here = None, None
        if chordable:
            d_chord, slope_chord, chord = _chord_step(L, y, g, step, near & trusted, sigma)
        if chord is not None and bool((chord | ~running).all()):
            d, slope = d_chord, slope_chord
        else:
            d, L_new, slope, trusted_new, finite_now = _levenberg_step(_hessian(point), g, f)
            here = L_new, trusted_new
            if finite_now is not None:
                finite = finite_now if finite is None else finite & finite_now
                running &= finite
            if chord is None:
                L, trusted = L_new, trusted_new
            else:
                d = torch.where(chord.unsqueeze(-1), d_chord, d)
                slope = torch.where(chord, slope_chord, slope)
                L = torch.where(chord[:, None, None], L, L_new)
                trusted = torch.where(chord, trusted, trusted_new)
        sigma = _length(y, d) if sigma is None else sigma
        step, stop, size = _step_test(d, y, sigma, size, tol)  # (read for the running samples)
        y_full = torch.where(running.unsqueeze(-1), y + d, y)  # also the last (tiny) step
        running &= ~stop
        near = step <= _CHORD
        go_on, chordable = torch.stack([running.any(), (running & near).any()]).tolist()
        if not go_on:
            y, converged = y_full, True
            break
        # the full step is evaluated with the next iteration's derivatives; where it fails the
        # Armijo test the step is shortened from ½ on, and the derivatives evaluated again
        point = _gradient(problem, y_full)
        progress = point[2].detach().norm(dim=-1) < g.norm(dim=-1)
        short = running & ~_armijo(point[1].detach(), f, slope, progress=progress)
        if short.any():
            t = _backtrack(problem, y, f, g, d, short, t0=0.5)
            y = torch.where(short.unsqueeze(-1), y + t.unsqueeze(-1) * d, y_full)
            point, near = _gradient(problem, y), near & ~short
        else:
            y = y_full
    else:
        _report_newton(running, step, tol, options)
    if finite is not None and not bool(finite.all()):
        return Solution(problem.unflatten(torch.where(finite.unsqueeze(-1), y, torch.nan)))
    if not (hand_off and converged):
        return Solution(problem.unflatten(y))
    if here is None:  # a chord step last: the factors at the last iterate
        L, failed, weak = trusted_cholesky(_hessian(point))
        here = L, ~(failed | weak)
    L, trusted = here
    if not bool(trusted.all()):
        return Solution(problem.unflatten(y))
    # every sample stopped on a Newton (or chord) step below tol: the backward's check, the
    # Newton step at y, would repeat that test
    return Solution(problem.unflatten(y), hessian_cholesky=L, certified=tol)


def _chord_step(L: Tensor, y: Tensor, g: Tensor, step: Tensor, near: Tensor, sigma: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The chord step ``d = −(L Lᵀ)⁻¹ ∇f (b, m)`` with the previous factors, its slope
    ``∇fᵀd (b,)``, and the samples ``(b,)`` where it does: ``near`` ones whose step descends and
    is at most :data:`_CONTRACTION` times their previous ``step`` (both relative to
    ``σ + ‖y‖∞``, :func:`_length`)."""
    d = torch.cholesky_solve(-g.unsqueeze(-1), L)[..., 0]
    slope = (d * g).sum(-1)
    size = d.abs().amax(-1) / (sigma + y.abs().amax(-1))
    return d, slope, near & (slope < 0) & (size <= _CONTRACTION * step)


def _step_test(d: Tensor, y: Tensor, sigma: Tensor, previous: Tensor, tol: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The stopping test on the step ``d (b, m)`` at ``y``: ``(relative step, stop, ‖d‖∞)``. A
    sample stops when ``‖d‖∞ ≤ tol (σ + ‖y‖∞)`` (:func:`_length`), or where the step is at
    rounding level: below ``tol (1 + ‖y‖∞)`` and ``√tol (σ + ‖y‖∞)`` (converging), and no
    longer halving (``previous``: the last ``‖d‖∞``), which a small solution of an objective
    with terms of size one reaches first."""
    size, y_size = d.abs().amax(-1), y.abs().amax(-1)
    step = size / (sigma + y_size)
    small = (size <= tol * (1 + y_size)) & (step <= tol**0.5)
    rounding = small & ~(size < 0.5 * previous)
    return step, (step <= tol) | rounding, size


def _length(y: Tensor, d: Tensor) -> Tensor:
    """The floor ``σ (b,)`` of the step test ``‖d‖∞ ≤ tol (σ + ‖y‖∞)``: the problem's length at
    the start, ``min(1, max(‖y₀‖∞, ‖d₀‖∞))`` (``d₀`` the first step), so that a problem of size
    one or more is judged as by ``1 + ‖y‖∞`` and a smaller one relative to its size (with ``1``,
    a solution of size 10⁻⁶ in float32 passed the test with an error of 250 %); ``1`` where that
    length is not finite or below ``√tiny`` of the dtype (:func:`~ddnlib.linalg.unit_floor`)."""
    return unit_floor(torch.maximum(y.abs().amax(-1), d.abs().amax(-1)))


def _report_newton(running: Tensor, step: Tensor, tol: float, options) -> None:
    """Non-convergence of :func:`newton` at the samples ``running``, with their last steps."""
    report(NonConvergenceWarning,
           f"Newton did not converge in {options.max_iter} iterations at samples "
           f"{describe_samples(running)}; worst relative step "
           f"{step[running].max().item():.3g} > tol {tol:g}. Raise Options(max_iter=...) or "
           "supply solve().", options.strict)


def _gradient(problem: Problem, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, f, ∇_y f)`` at ``y (b, m)``: ``y`` a leaf requiring grad, ``f (b,)``, and
    ``∇_y f (b, m)`` with its graph (zero where ``f`` does not depend on ``y``)."""
    with torch.enable_grad():
        yv = y.detach().requires_grad_()
        f = problem.objective(yv)
        g = grad(f, [yv], torch.ones_like(f), create_graph=True)[0]
    return yv, f, g


def _hessian(point: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``∇²_yy f (b, m, m)`` at ``point = (y, f, ∇f)`` (from :func:`_gradient`), detached: one
    backward pass of ``∇f`` batched over the ``m`` basis directions (zero where ``f`` is linear
    in ``y``)."""
    y, _, g = point
    return batched_jacobian(g, y)


def _levenberg_step(H: Tensor, g: Tensor, f: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The Newton direction ``d (b, m)`` per sample, or ``−∇f`` where it is not a descent
    direction, with the Cholesky factor ``L (b, m, m)`` of ``H``.

    ``d = −H⁻¹∇f`` by Cholesky where ``H`` is safely positive definite (a pivot test relative to
    ``max |H|``, :func:`~ddnlib.linalg.trusted_cholesky`); by
    minimum-norm least squares where Cholesky goes through with a tiny pivot (``H`` singular or
    ill-conditioned for the dtype); ``d = −(H + γI)⁻¹∇f`` where Cholesky fails (``H`` not positive
    definite), with ``γ = s·10ᵏ``, ``s = max |H_ii|`` (1 where that is 0), for the smallest
    ``k ≥ log10 √eps`` that makes ``H + γI`` safely positive definite (Levenberg). Samples whose
    ``f``, ``∇f`` or ``H`` is not finite get ``d = −∇f`` (0 where ``∇f`` is not finite).

    Returns ``d``, ``L``, the slope ``∇fᵀd (b,)``, the samples ``(b,)`` where ``L`` is the trusted
    factor of a finite ``H``, and the mask ``(b,)`` of samples whose ``f`` and ``∇f`` are finite
    (``None``: all).
    """
    D = jacobi_scaling(H)
    if D is not None:  # the same step from D H D (D⁻¹ d) = −D ∇f; H = (D⁻¹L)(D⁻¹L)ᵀ
        Hs = D.unsqueeze(-1) * H * D.unsqueeze(-2)
        Ls, failed, weak = trusted_cholesky(Hs)
        L = Ls / D.unsqueeze(-1)
    else:
        Hs, (L, failed, weak) = H, trusted_cholesky(H)
    trusted = ~(failed | weak)
    d = torch.cholesky_solve(-g.unsqueeze(-1), L)[..., 0]
    slope = (d * g).sum(-1)
    # the common case, by one synchronisation: every H safely positive definite and everything
    # finite (then gᵀd = −‖L⁻¹g‖² < 0: d is a descent direction)
    total = f.sum() + slope.sum()
    if bool(trusted.all() & (total - total == 0) & (slope.amax() <= 0)):  # (finite total)
        return d, L, slope, trusted, None
    finite = torch.isfinite(f) & torch.isfinite(g).all(-1)
    usable = finite & torch.isfinite(H).all((-2, -1))
    g = torch.where(finite.unsqueeze(-1), g, torch.zeros_like(g))
    d = torch.where(usable.unsqueeze(-1), d, -g)
    if D is not None:  # the fallbacks below solve the scaled system for D⁻¹ d
        H, g_s = Hs, D * g
    else:
        g_s = g
    unscale = (lambda e, idx: e) if D is None else (lambda e, idx: D[idx] * e)
    weak = (usable & weak).nonzero().flatten()
    if weak.numel():
        d[weak] = unscale(lstsq(H[weak], -g_s[weak].unsqueeze(-1))[0][..., 0], weak)
    todo = (usable & failed).nonzero().flatten()
    if todo.numel():  # (with D: a shift γ D⁻² of H, each coordinate by its own curvature)
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        scale = H[todo].diagonal(dim1=-2, dim2=-1).abs().amax(-1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        for k in range(math.ceil(math.log10(torch.finfo(H.dtype).eps ** 0.5)), _MAX_SHIFT + 1):
            shifted = H[todo] + (scale * 10.0 ** k)[:, None, None] * eye
            Lk, failed_k, weak_k = trusted_cholesky(shifted)
            ok = ~(failed_k | weak_k)
            e = torch.cholesky_solve(-g_s[todo[ok]].unsqueeze(-1), Lk[ok])[..., 0]
            d[todo[ok]] = unscale(e, todo[ok])
            todo, scale = todo[~ok], scale[~ok]
            if not todo.numel():
                break
    slope = (d * g).sum(-1)
    descent = slope < 0
    d = torch.where(descent.unsqueeze(-1), d, -g)
    slope = torch.where(descent, slope, -(g * g).sum(-1))
    return d, L, slope, trusted & usable, finite


def _armijo(f_new: Tensor, f: Tensor, slope: Tensor, t: Tensor | float = 1.0,
            progress: Tensor | None = None) -> Tensor:
    """``f(y + t d) ≤ f + 1e-4 t gᵀd`` per sample (``slope = gᵀd``), or a change of ``f`` within
    its rounding: near the minimiser the predicted decrease falls below the precision of ``f``
    and Armijo could never hold. That precision is not known: ``16 eps |f|`` is always allowed,
    ``16 eps (1 + |f|)`` (terms of size one that cancel) only where the step made ``progress``
    otherwise (the gradient's norm fell): on an objective of size 10⁻¹² in float32 the absolute
    allowance alone accepted every step, uphill too. False where ``f_new`` is not finite."""
    eps = torch.finfo(f.dtype).eps
    change = (f_new - f).abs()
    within = change <= 16 * eps * f.abs()
    if progress is not None:
        within |= progress & (change <= 16 * eps * (1 + f.abs()))
    return (f_new <= f + _ARMIJO * t * slope) | within


def _backtrack(problem: Problem, y: Tensor, f: Tensor, g: Tensor, d: Tensor, running: Tensor,
               t0: float = 1.0) -> Tensor:
    """Per-sample Armijo step ``t ∈ {t0, t0/2, t0/4, …}`` (:func:`_armijo`) for the samples
    ``running``; 0 where none of :data:`_MAX_BACKTRACKS` halvings passes."""
    slope = (g * d).sum(-1)
    t = torch.full_like(f, t0)
    searching = running.clone()
    with torch.no_grad():
        for _ in range(_MAX_BACKTRACKS):
            f_new = problem.objective(y + t.unsqueeze(-1) * d)
            searching &= ~_armijo(f_new, f, slope, t)
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
    b = problem.batch
    tol = options.tol("solver_tol", y0.dtype)
    y = problem.flatten(y0.detach()).clone()
    running = torch.ones(b, dtype=torch.bool, device=y.device)
    converged = torch.zeros_like(running)
    finite = torch.ones_like(running)
    step = torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    rho = torch.zeros(b, dtype=y.dtype, device=y.device)
    saddle = torch.zeros_like(running)
    nu = sigma = None  # sigma: the step test's floor (_length)
    size = torch.full((b,), float("inf"), dtype=y.dtype, device=y.device)
    for _ in range(options.max_iter):
        if active is None:
            active = torch.ones(b, problem.constraints(y).shape[1], dtype=torch.bool,
                                device=y.device)
        act = active.to(y.dtype)
        kkt = problem.kkt(y, options=options, multipliers=nu, active=active)
        f, gf, c = kkt.f, kkt.grad_f.detach(), kkt.c.detach() * act
        d, nu_new, curvature, info = _newton_step(kkt, options, -gf, -c)
        indefinite = info.not_pd
        d, nu_new, curvature = d.detach(), nu_new.detach(), curvature.detach()
        if nu is None:
            nu = kkt.nu
        finite &= torch.isfinite(f) & torch.isfinite(gf).all(-1) & torch.isfinite(c).all(-1)
        running &= finite
        sigma = _length(y, d) if sigma is None else sigma
        step_now, stop, size = _step_test(d, y, sigma, size, tol)
        step = torch.where(running, step_now, step)
        nu = torch.where(running.unsqueeze(-1), nu_new * act, nu)
        saddle = torch.where(running, indefinite, saddle)
        done = running & stop
        y = torch.where(done.unsqueeze(-1), y + d, y)  # the last (tiny) step is applied too
        converged |= done
        running &= ~done
        if not running.any():
            break
        # ℓ1 penalty: ρ ≥ (∇fᵀd + ½ max(dᵀHd, 0)) / (½ ‖c‖₁) (N&W eq. 18.36), and Powell's
        # rule for ρ ≥ ‖ν⁺‖∞: it may come down again, halfway each iteration
        c1 = c.abs().sum(-1)
        slope_f = (gf * d).sum(-1)
        needed = (slope_f + 0.5 * curvature.clamp_min(0)) / (0.5 * c1).clamp_min(
            torch.finfo(y.dtype).tiny)
        needed = torch.where(c1 > 0, needed, torch.zeros_like(needed))
        exact = 1.1 * nu_new.abs().amax(-1)
        rho = torch.maximum(torch.maximum(exact, 0.5 * (rho + exact)), needed)
        y, moved = _merit_search(problem, y, f, c1, slope_f - rho * c1, d, kkt, rho, running)
        running &= moved  # a failed line search ends the sample (reported as not converged)
    y = torch.where(finite.unsqueeze(-1), y.detach(), torch.nan)
    return problem.unflatten(y), nu, converged, step, saddle & converged


def _merit_search(problem: Problem, y: Tensor, f: Tensor, c1: Tensor, slope: Tensor, d: Tensor,
                  kkt: KKTPoint, rho: Tensor, running: Tensor) -> tuple[Tensor, Tensor]:
    """Armijo backtracking on ``φ = f + ρ‖c_active‖₁`` along ``d`` (directional derivative
    ``slope``), trying the second-order correction ``y + d − A⁺ c(y + d)`` when the full step fails.

    Returns the new ``y`` and the mask of samples that moved (or are within rounding of ``φ``).
    """
    act = kkt.active.to(y.dtype)
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
            z = y + d - kkt.null_space().least_norm(c_full.unsqueeze(0))[0]
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
               f"{describe_samples(failed)}; worst relative KKT step {worst:.3g} > tol "
               f"{options.tol('solver_tol', residual.dtype):g} (or the merit line search "
               "failed, or the problem is not finite there). Raise Options(max_iter=...), start "
               "from a better initial_guess, or supply solve().", options.strict)


# -- inequality constrained: the slow scipy fallback ---------------------------------------------


def slsqp(problem: Problem, y0: Tensor, options) -> Solution:
    """Per-sample SLSQP (scipy) refined by :func:`sqp` on the active set, with ``λ`` and ``μ``.

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
        nu_scipy = least_squares_multipliers(gf, A, torch.cat([eq_rows, guess], 1))
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
               f"SLSQP did not converge at samples {describe_samples(failed)} (max_iter "
               f"{options.max_iter}): {detail}; worst constraint violation "
               f"{viol[failed].max().item():.3g}. This fallback is slow and general: supply "
               "solve() for this node, or raise Options(max_iter=...).", options.strict)
    return Solution(problem.unflatten(y), eq_multipliers=nu[:, :p] if p else None,
                    ineq_multipliers=nu[:, p:], stats={"converged": kkt})


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
