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
unchanged) and then ``δ T²`` with ``δ = 10^k`` (the inertia correction of N&W §19.3), all after the
symmetric diagonal scaling ``M = T M̂ T``, ``T² = diag max(|M_ii|, eps max_j |M_jj|)``, that keeps
every shift relative to its row. A point that passes the stopping test but has negative curvature
on the constraints (``Zᵀ M Z``, ``Z`` spanning ``null(J_h)``, not positive semi-definite: a maximum
or saddle) is left along the most negative eigenvector, so the solver does not stop at maxima
(convex samples, below, skip this test). No batched LU is used (it is unreliable on multi-threaded
CPU builds of torch at sizes ≳ 150).

Globalisation: fraction-to-boundary ``τ = 0.995`` on ``s`` and ``z`` (separate primal and dual
step lengths) and an Armijo backtracking line search on the primal step with the ℓ1 barrier merit
``φ(y, s) = f − σμ Σ log s + ν (‖h‖₁ + ‖g + s‖₁)`` (N&W §19.4), ``ν`` raised so that the step is a
descent direction. Where every sample in work is convex the line search is left out, as in
primal–dual methods for convex QPs (N&W Algorithm 16.4). Starting points need not be feasible:
``s₀ = −g(y₀)`` on rows with ``−g ≥ 10⁻³ κ``, ``max(−g, κ)`` on the others, ``κ = 0.1 max(σ_p,
‖g(y₀)‖∞)``; ``z₀ = 1``, ``λ₀ = 0``. A domain that is not among the constraints (``log y`` needs
``y > 0``) is only defended by the line search, which shortens steps that leave it: state such
domains as inequality constraints, so that the slacks keep the iterates inside.

Near the end (feasibility and complementarity residuals below ``tol^¼``) the active set is guessed
(``z > s``, the multiplier and the slack each in the units of the stopping test) and one Newton
step on the KKT system with those rows held as equalities is tried; where it gives no KKT point the
guess is corrected once as in a primal–dual active-set method (rows with a negative multiplier
leave it, violated rows join it; Hintermüller, Ito & Kunisch, SIAM J. Optim. 13, 2002) and the step
tried again. Where the KKT conditions are linear (a QP: quadratic objective, affine constraints,
below) that step is exact, so it is tried from the first iteration (residuals below 1), a sample's
first try with up to five corrections: most samples end there, and the interior iteration is the
fallback of the active-set one. A sample whose step passes the stopping test (at ``s = 0``) is
done. Once half the samples in work have stopped, the iteration continues on the others only.

Derivatives come from torch autodiff on the batch sum (the problem is separable): ``∇_y L`` with
its graph, then one vectorised backward pass (``is_grads_batched``) over the ``m + p + q`` rows of
``[∇_y L; h; g]`` gives every per-sample Hessian ``W`` and both constraint Jacobians. So one
iteration costs one forward evaluation, one gradient and one batched second-order pass, one
forward evaluation per backtracking step, and ``O(m³ + (p + q) m²)`` of batched linear algebra per
sample (two Cholesky factorisations, the predictor's and the corrector's solves), plus each
active-set try: an evaluation and the factorisation of its condensed system.

Structure (``exploit_structure``, on by default). At ``y₀`` the solver builds ``∇²f`` and the
constraint Jacobian ``J = ∂[h; g]/∂y`` with their graphs and asks autograd whether they depend on
``y`` at all (a path through a power with exponent 0 does not count: torch differentiates
``u ** 2`` twice into ``2 u ** 0``). Where ``∇²f`` does not, ``f`` is quadratic and is replaced by
its exact expansion ``f(y₀) + ∇f(y₀)ᵀd + ½ dᵀ∇²f d`` (``d = y − y₀``); where ``J`` does not, the
constraints are affine, ``c(y) = c(y₀) + J d``; where ``J`` does but the per-row Hessians
``∇²c_k`` do not (and the batch of them, ``b (p + q) m²`` numbers, is at most ``2²²``), they are
quadratic, ``c_k(y) = c_k(y₀) + J_k d + ½ dᵀ∇²c_k d``. The parts so detected are never evaluated
again (for a QP an iteration is batched linear algebra only); the others keep the autodiff pass
above. A matrix equal in every sample (a shared ``Q``, ``G``, ``A``) is kept once, so that products
with it are one matrix product. A sample whose ``∇²f`` is positive semi-definite (to ``√eps``) and
whose constraints are affine is convex. Autograd sees through smooth code only: a branch
(``abs``, ``where``, ``clamp``) makes a piecewise function look affine or quadratic near ``y₀``.
So the result is certified: at the returned point the stopping test is recomputed from the user's
functions by autodiff (first order: one gradient and one pass over the ``p + q`` constraint rows),
and a converged sample that fails it, or one that did not converge where the expansions and
autodiff disagree at its last point, is solved again from ``y₀`` without the expansions.

A sample stops when, with ``tol = Options.solver_tol``,

    ‖r_d‖∞ ≤ tol S_d,   ‖[h; g + s]‖∞ ≤ tol S_p,   max s∘z ≤ tol S_p S_d / ‖J‖∞,
    S_d = σ_d + ‖∇f‖∞,   S_p = min(σ_p, max(‖c‖∞, ‖J‖∞ ‖y‖∞)) + ‖J‖∞ ‖y‖∞,

(each residual relative to the size of the terms it balances; complementarity is a slack, of
the constraints' size, times a multiplier, of the size of ``∇f`` per ``J``), with floors ``σ ≤ 1``
from the problem's sizes at ``y₀`` (``_scales``): 1 on problems of size one or more, smaller on
smaller ones (with a floor of 1 a ball of radius 10⁻³ in float32 "converged" to answers 20–66 %
off), and ``σ_p`` lowered to the constraints' size at the point reached (a start of size one far
outside a box of width 10⁻⁴). (Complementarity relative to ``|f|`` let a simplex projection of
data of size 10⁶, where ``f ≈ ½‖x‖²``, stop 30 % off.)
Samples that do not stop within ``Options.max_iter`` iterations are reported
(:class:`~ddnlib.NonConvergenceWarning`, an error in strict mode) with their residuals. The
inequality multipliers handed back are ``z`` where ``z > s`` (so measured: active) and 0
elsewhere (the multipliers of the active-set step where that ended the sample), so the backward
needs no least-squares recovery of multipliers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonConvergenceWarning, report
from .options import Options
from .linalg import trusted_cholesky, unit_floor
from .problem import Problem, batched_jacobian, grad
from .solution import Solution

__all__ = ["IPMResult", "interior_point", "solve"]

_TAU = 0.995
_ARMIJO = 1e-4
_MAX_BACKTRACKS = 30
_MAX_CACHED = 2**22  # most numbers b (p + q) m² kept for constant constraint Hessians


@dataclass
class IPMResult:
    """What :func:`interior_point` returns; per-sample tensors have a leading batch dimension.

    ``y (b, *out)``, ``eq_multipliers λ (b, p)``, ``ineq_multipliers μ (b, q)`` (zero on inactive
    rows), ``converged (b,)``, ``iterations (b,)`` (iterations each sample ran) and ``residual
    (b,)`` (the largest of the three relative residuals of the stopping test). Where the problem
    was found to be a QP (quadratic objective, affine constraints; certified), ``hessian (b, m, m)``
    and ``constraint_jacobian (b, p + q, m)`` are its constant derivatives, for the backward pass
    (:class:`~ddnlib.Solution`); else ``None``. ``tol``: the stopping tolerance (every test, the
    certification included, is by autodiff of the user's functions at ``y``).
    """

    y: Tensor
    eq_multipliers: Tensor
    ineq_multipliers: Tensor
    converged: Tensor
    iterations: Tensor
    residual: Tensor
    tol: float
    hessian: Tensor | None = None
    constraint_jacobian: Tensor | None = None

    def solution(self) -> Solution:
        """The result as the :class:`~ddnlib.Solution` a node's ``solve`` returns (multipliers of
        the constraint kinds present, the statistics in ``stats``)."""
        return Solution(self.y, self.eq_multipliers if self.eq_multipliers.shape[1] else None,
                        self.ineq_multipliers if self.ineq_multipliers.shape[1] else None,
                        stats={"converged": self.converged, "iterations": self.iterations,
                               "residual": self.residual},
                        hessian=self.hessian, constraint_jacobian=self.constraint_jacobian,
                        certified=self.tol if bool(self.converged.all()) else None)


def solve(node, *xs: Tensor, y0: Tensor | None = None, options: Options | None = None,
          exploit_structure: bool = True) -> Solution:
    """Solve ``node`` at ``xs`` by :func:`interior_point`, as a node's ``solve`` would.

    Starts from ``y0`` (default ``node.initial_guess(*xs)``) with ``options`` (default
    ``node.options``). A node opts in with ``def solve(self, *xs): return interior_point.solve(self,
    *xs)``; the default solver does the same for inequality-constrained nodes.
    """
    y0 = node.initial_guess(*xs) if y0 is None else y0
    return interior_point(Problem(node, xs, y0.shape), y0, options or node.options,
                          exploit_structure=exploit_structure).solution()


def interior_point(problem: Problem, y0: Tensor, options: Options, *,
                   exploit_structure: bool = True) -> IPMResult:
    """Solve ``problem`` from ``y0 (b, *out)`` (need not be feasible); see the module docstring.

    With ``exploit_structure`` the parts of the problem that autograd shows to be quadratic
    (objective) or affine / quadratic (constraints) are expanded once at ``y0`` instead of being
    differentiated at every iteration, and the result is certified by autodiff (module docstring);
    without it every iteration differentiates the user's functions.

    A sample with a non-finite input comes back as NaN (not converged) without touching the
    others; a sample whose inputs are finite but whose objective or constraints are not finite at
    ``y0`` is a ``ValueError`` naming it.
    """
    b, m = problem.batch, problem.m
    finite_in = torch.ones(b, dtype=torch.bool, device=y0.device)
    for x in problem.xs:
        if x.is_floating_point() and x.dim() and x.shape[0] == b:
            finite_in &= torch.isfinite(x.reshape(b, -1)).all(-1)
    if not finite_in.all():
        return _without(problem, y0, options, finite_in, exploit_structure)
    tol = options.tol("solver_tol", y0.dtype)
    y0 = y0.detach().reshape(b, m)
    model = _Model(problem, y0, expand=exploit_structure)
    out = _solve(model, y0, options, tol)
    qp = model.linear_kkt
    if model.expanded:
        # the expansions are checked where they were used: the stopping test from autodiff
        redo = ~_certified(model, out, tol)
        if redo.any():
            qp = False
            idx = redo.nonzero().flatten()
            out.y, out.lam, out.mu = out.y.clone(), out.lam.clone(), out.mu.clone()
            sub = _select(problem, idx)
            again = _solve(_Model(sub, y0[idx], expand=False), y0[idx], options, tol)
            for name in ("y", "lam", "mu", "converged", "iterations", "residual"):
                getattr(out, name)[idx] = getattr(again, name)
    _report(problem, out.converged, out.residual, out.iterations, options, tol)
    return IPMResult(problem.unflatten(out.y), out.lam, out.mu, out.converged, out.iterations,
                     out.residual, tol, *((model.quad[2], model.lin[1]) if qp else ()))


@dataclass
class _Outcome:
    """The state :func:`_solve` ends in: ``y``, ``λ``, the handed-back ``μ`` and, for the
    certification, the slacks ``s`` (0 where polished) and ``z``."""

    y: Tensor
    lam: Tensor
    mu: Tensor
    s: Tensor
    z: Tensor
    polished: Tensor
    converged: Tensor
    iterations: Tensor
    residual: Tensor


def _solve(model: _Model, y: Tensor, options: Options, tol: float) -> _Outcome:
    """The interior-point iteration on ``model`` from ``y (b, m)``; nothing reported.

    Once half the samples in work have stopped, the iteration goes on with the others only (the
    stopped ones are stored), so that stragglers do not cost a full batch per iteration."""
    b = y.shape[0]
    dtype, device = y.dtype, y.device
    f0, h0, g0 = model.values(y)
    _check_finite(f0, h0, g0)
    p, q = h0.shape[1], g0.shape[1]
    lam, z = y.new_zeros(b, p), y.new_zeros(b, q)
    plain = model.evaluate(y, lam, z)  # of f alone (no multipliers)
    if model.scales is None:  # from ∇²f alone: with z = 1 the constraints' curvature weighed in
        # at an arbitrary scale (an objective of size 10⁻¹² in a unit ball stopped 3 % off)
        model.scales = _scales(plain, y)
    first = plain
    if q:  # z₀: the size of a multiplier, ∇f per J (1 on a problem of size one)
        z = _sizes(plain, y, model.scales)[2].nan_to_num(1.0, 1.0, 1.0).unsqueeze(-1).expand(b, q)
        z = z.contiguous()
        first = model.evaluate(y, lam, z)
    # slacks: s = −g where the start is clearly inside (then g + s = 0 stays exact for linear
    # constraints and y stays strictly feasible), else κ = 0.1 max(σ_p, ‖g‖∞)
    kappa = 0.1 * torch.maximum(_amax(g0.abs()), model.scales[1]).unsqueeze(-1)
    s = torch.where(-g0 >= 1e-3 * kappa, -g0, torch.maximum(-g0, kappa))
    nu = y.new_zeros(b)
    running = torch.ones(b, dtype=torch.bool, device=device)
    converged = torch.zeros_like(running)
    iterations = torch.zeros(b, dtype=torch.long, device=device)
    residual = torch.full((b,), float("inf"), dtype=dtype, device=device)
    escapes = torch.zeros_like(iterations)
    polished = torch.zeros_like(running)
    may_escape = ~model.convex
    whole, idx, stored = model, None, None  # idx: the samples in work, when not all
    # where the KKT conditions are linear (a QP) the active-set step is exact: it is tried from
    # residuals of order one, a sample's first try with up to five corrections of its guess (a
    # primal–dual active-set method), later ones (and elsewhere, near the end only) with one
    near_at, first_tries = (1.0, 6) if model.linear_kkt else (tol**0.25, 2)
    tries = torch.full((b,), first_tries, dtype=torch.long, device=device)
    for it in range(options.max_iter + 1):
        if it and 2 * int(running.sum()) <= running.numel():
            state = (y, s, z, lam, converged, iterations, residual, polished)
            if idx is None:
                idx, stored = torch.arange(b, device=device), [t.clone() for t in state]
            for full, t in zip(stored, state):
                full[idx] = t
            keep = running.nonzero().flatten()
            idx, model = idx[keep], model.select(keep)
            y, s, z, lam, converged, iterations, residual, polished, nu, running, escapes, \
                may_escape, tries = (t[keep] for t in (*state, nu, running, escapes, may_escape,
                                                       tries))
        ev = first if it == 0 else model.evaluate(y, lam, z)
        finite = _finite(ev.gL) & torch.isfinite(ev.f) & torch.isfinite(ev.a_max)
        rd, re, ri = ev.gL, ev.h, ev.g + s
        parts = _residuals(ev, y, rd, torch.cat([re, ri], 1), s * z, model.scales)
        res = parts.amax(0)
        residual = torch.where(running, res, residual)
        done = running & (res <= tol)
        escaping = None
        candidates = done & may_escape & (escapes < 5)
        if candidates.any():  # a KKT point with negative curvature on the constraints is left
            escaping, y_esc, s_esc = _escape(model, ev, y, s, z, nu, candidates, p)
            y = torch.where(escaping.unsqueeze(-1), y_esc, y)
            s = torch.where(escaping.unsqueeze(-1), s_esc, s)
            escapes += escaping.long()
            done &= ~escaping
        # the active-set step (module docstring) ends the samples where it gives a KKT point; the
        # interior iteration is ill-conditioned near the end
        if q:
            near = running & ~done & (parts[1:].amax(0) <= near_at)
            if near.any():
                ok, y_p, lam_p, mu_p, res_p = _polish(model, y, lam, z, s, near, tol, tries)
                tries = torch.where(near, 2, tries)
                keep = ok.unsqueeze(-1)
                y, lam, z = (torch.where(keep, new, old) for new, old in ((y_p, y), (lam_p, lam),
                                                                            (mu_p, z)))
                s = torch.where(keep, torch.zeros_like(s), s)
                residual = torch.where(ok, res_p, residual)
                polished |= ok
                done |= ok
        converged |= done
        running &= ~done & finite
        if it == options.max_iter or not running.any():
            break
        iterations += running.long()
        stepping = running if escaping is None else running & ~escaping
        y, s, z, lam, nu = _step(model, ev, y, s, z, lam, nu, rd, re, ri, stepping, p, q)
    if idx is not None:
        for full, t in zip(stored, (y, s, z, lam, converged, iterations, residual, polished)):
            full[idx] = t
        y, s, z, lam, converged, iterations, residual, polished = stored
    # the active rows where the iteration ended: the final active-set step's guess, and (where
    # that step does not take, leaving y, s, z as they are) the rows whose z is handed back
    active = _active(whole, y, lam, s, z) if q else torch.zeros_like(z, dtype=torch.bool)
    final = converged & ~polished
    if final.any():
        ok, y_p, lam_p, mu_p, res_p = _polish(whole, y, lam, z, s, final, tol,
                                              torch.full_like(iterations, 2), active)
        keep = ok.unsqueeze(-1)
        y, lam, z = (torch.where(keep, new, old)
                     for new, old in ((y_p, y), (lam_p, lam), (mu_p, z)))
        s = torch.where(keep, torch.zeros_like(s), s)
        polished |= ok
    mu = torch.where(polished.unsqueeze(-1) | active, z, torch.zeros_like(z))
    return _Outcome(y, lam, mu, s, z, polished, converged, iterations, residual)


def _certified(model: _Model, out: _Outcome, tol: float) -> Tensor:
    """Which samples of ``out`` (solved on the expansions of ``model``) stand up to the user's
    functions differentiated by autodiff: a converged sample where the stopping test that ended
    it (polished: at ``s = 0`` with ``μ``; else the interior test) passes (that residual is stored
    in ``out.residual``), a sample that did not converge where ``∇L`` and the constraint values
    agree with the expansions' to the same tolerances (so that solving it again would not help)."""
    truth = _Model(model.problem, model.y0, expand=False)
    ev = truth.evaluate(out.y, out.lam, out.z, second_order=False)
    pol = out.polished.unsqueeze(-1)
    feas = torch.where(pol, ev.g.clamp_min(0), ev.g + out.s)
    comp = torch.where(pol, out.z * ev.g, out.s * out.z)
    parts = _residuals(ev, out.y, ev.gL, torch.cat([ev.h, feas], 1), comp, model.scales)
    res = parts.amax(0)
    out.residual = torch.where(out.converged, res, out.residual)
    ok = torch.isfinite(res) & (res <= tol)
    if bool(out.converged.all()):
        return ok
    em = model.evaluate(out.y, out.lam, out.z, second_order=False)
    gap = _residuals(ev, out.y, ev.gL - em.gL, torch.cat([ev.h - em.h, ev.g - em.g], 1),
                     ev.f.new_zeros(ev.f.shape[0], 0), model.scales)[:2].amax(0)
    return torch.where(out.converged, ok, torch.isfinite(gap) & (gap <= tol))


def _select(problem: Problem, idx: Tensor) -> Problem:
    """The problem of the samples ``idx`` (inputs without the batch dimension are shared)."""
    return Problem(problem.node, [x[idx] if x.dim() and x.shape[0] == problem.batch else x
                                  for x in problem.xs],
                   torch.Size((idx.numel(),)) + problem.out_shape[1:])


def _residuals(ev: _Eval, y: Tensor, rd: Tensor, feas: Tensor, comp: Tensor,
               scales: Tensor) -> Tensor:
    """The three relative residuals ``(3, b)`` of the stopping test: stationarity, feasibility,
    complementarity, with the floors ``σ (2, b)`` of :func:`_scales` (module docstring)."""
    scale_d, scale_p, dual = _sizes(ev, y, scales)
    return torch.stack([rd.abs().amax(-1) / scale_d, _amax(feas.abs()) / scale_p,
                        _amax(comp.abs()) / (scale_p * dual)])


def _sizes(ev: _Eval, y: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The sizes ``(b,)`` the stopping test measures against: of the gradient terms, of the
    constraint terms and of a multiplier (gradient per constraint Jacobian)."""
    scale_d = scales[0] + ev.gf.abs().amax(-1)
    y_size = y.abs().amax(-1)
    # the floor σ_p, or the constraints' size here where smaller: a start far outside a small
    # feasible set (a box of width 10⁻⁴ from y₀ of size one) makes σ_p too large for the answer
    here = unit_floor(torch.maximum(torch.maximum(_amax(ev.h.abs()), _amax(ev.g.abs())),
                                       torch.nan_to_num(ev.a_max) * y_size))
    scale_p = torch.minimum(scales[1], here) + ev.a_max * y_size
    return scale_d, scale_p, torch.where(ev.a_max > 0, scale_d / ev.a_max, scale_d)


def _active(model: _Model, y: Tensor, lam: Tensor, s: Tensor, z: Tensor) -> Tensor:
    """The inequality rows ``(b, q)`` the interior point is taking to ``g = 0``: ``z > s`` in the
    units of the stopping test (a multiplier against a slack: in a box of width 10⁻⁶ every slack
    is below every multiplier, so that a plain ``z > s`` holds both bounds of a coordinate)."""
    ev = model.evaluate(y, lam, z, second_order=False)
    _, scale_p, dual = _sizes(ev, y, model.scales)
    return z * (scale_p / dual).unsqueeze(-1) > s


def _scales(ev: _Eval, y: Tensor) -> Tensor:
    """The floors ``σ = (σ_d, σ_p) (2, b)`` of the stopping test from the problem's own sizes at
    the start ``y₀`` (``ev`` there, second order; ``c = [h; g]``), each at most 1: the gradient's
    ``σ_d = max(‖∇f‖∞, ‖W‖ ‖y₀‖∞)`` (``‖W‖ = max |W_ij|``) and the constraints' ``σ_p =
    max(‖c‖∞, ‖J‖∞ ‖y₀‖∞)``. On a problem of size one or more they are 1 (an absolute floor, as
    ``1 +``); on a smaller one the test scales with the problem (a ball of radius 10⁻³, a QP
    whose data are 10⁻⁶)."""
    y_size = y.abs().amax(-1)
    a = torch.nan_to_num(ev.a_max)
    w = torch.nan_to_num(ev.W.abs().amax((-2, -1)) if ev.W.shape[1] else torch.zeros_like(a))
    gd = torch.maximum(ev.gf.abs().amax(-1), w * y_size)
    gp = torch.maximum(torch.maximum(_amax(ev.h.abs()), _amax(ev.g.abs())), a * y_size)
    return torch.stack([unit_floor(gd), unit_floor(gp)])


def _escape(model: _Model, ev: _Eval, y: Tensor, s: Tensor, z: Tensor, nu: Tensor,
            candidates: Tensor, p: int) -> tuple[Tensor, Tensor, Tensor]:
    """Leave KKT points that are not local minima (maxima, saddles) along negative curvature.

    For the ``candidates (b,)`` (samples that pass the stopping test), the smallest eigenpair
    ``(ω, v)`` of ``Zᵀ M Z`` (``M = W + J_gᵀ D J_g``, ``Z`` an orthonormal basis of ``null(J_h)``)
    is computed; where ``ω < −√eps max |W_ii|`` the sample moves along ``d = ±Z v`` (sign:
    ``∇fᵀd ≤ 0``), corrected back onto ``h = 0`` by the second-order correction, with the longest
    step ``t ∈ {ℓ, …, 2^-20 ℓ}``, ``ℓ = ‖y‖∞ + min(1, ‖y₀‖∞)``, that lowers the merit
    ``f + ν‖h‖₁`` (N&W §19.3 and Moré & Sorensen's negative-curvature directions). Returns the mask
    of samples that moved and their new ``y`` and ``s``.
    """
    idx = candidates.nonzero().flatten()
    moved = torch.zeros_like(candidates)
    m = y.shape[1]
    A = ev.A[idx].double()
    Ah, Ag = A[:, :p], A[:, p:]
    W = ev.W[idx].double()
    M = W + _gram(Ag, (z[idx] / s[idx]).double())
    if p:
        _, S, Vh = torch.linalg.svd(Ah, full_matrices=True)
        eps = torch.finfo(S.dtype).eps * max(Ah.shape[-2:])
        rank = (S > eps * S.amax(-1, keepdim=True)).sum(-1)
        Z = Vh.transpose(-1, -2)
        null = torch.arange(m, device=y.device) >= rank.unsqueeze(-1)
    else:
        Z = torch.eye(m, dtype=M.dtype, device=M.device).expand_as(M)
        null = torch.ones(idx.numel(), m, dtype=torch.bool, device=y.device)
    R = Z.transpose(-1, -2) @ M @ Z
    R = 0.5 * (R + R.transpose(-1, -2))
    top = R.abs().amax((-2, -1), keepdim=True)
    big = torch.where(top > 0, 2 * top, 1.0)  # the range rows padded above the spectrum
    both = null.unsqueeze(-1) & null.unsqueeze(-2)
    R = torch.where(both, R, torch.zeros_like(R)) + torch.diag_embed((~null).to(R.dtype)) * big
    omega, V = torch.linalg.eigh(R)
    scale = W.diagonal(dim1=-2, dim2=-1).abs().amax(-1)  # relative: with 1 + max |W_ii| an
    scale = torch.where(scale > 0, scale, 1.0)  # objective of 1e-12 never escaped its maxima
    negative = omega[:, 0] < -torch.finfo(y.dtype).eps ** 0.5 * scale
    if not negative.any():
        return moved, y, s
    idx, Z, V, Ah, Ag = idx[negative], Z[negative], V[negative], Ah[negative], Ag[negative]
    d = (Z @ V[..., :1])[..., 0]
    d = torch.where(((ev.gf[idx].double() * d).sum(-1) > 0).unsqueeze(-1), -d, d)
    ds = -_mv(Ag, d)
    sub = model.select(idx)
    correct = _soc(Ah) if p else (lambda h: 0.0)
    yi, si, nui = y[idx], s[idx], nu[idx]
    d, ds = d.to(y.dtype), ds.to(y.dtype)
    with torch.no_grad():
        phi0 = _merit(sub, yi, si, torch.zeros_like(nui), nui)
        # the longest step: the size of y, at least the start's (at most 1)
        length = yi.abs().amax(-1) + unit_floor(sub.y0.abs().amax(-1))
        t = length.clone()
        frac = _max_step(si, ds, _TAU) if si.shape[1] else torch.ones_like(t)
        found = torch.zeros_like(negative[negative])
        y_new, s_new = yi.clone(), si.clone()
        for _ in range(21):
            tt = torch.minimum(t, frac * length)
            y_t = yi + tt[:, None] * d
            y_t = y_t + correct(sub.values(y_t)[1]) if p else y_t
            s_t = si + tt[:, None] * ds
            ok = ~found & (_merit(sub, y_t, s_t, torch.zeros_like(nui), nui) < phi0)
            y_new = torch.where(ok.unsqueeze(-1), y_t, y_new)
            s_new = torch.where(ok.unsqueeze(-1), s_t, s_new)
            found |= ok
            if found.all():
                break
            t = 0.5 * t
    y, s = y.clone(), s.clone()
    y[idx], s[idx] = y_new, s_new
    moved[idx] = found
    return moved, y, s


def _without(problem: Problem, y0: Tensor, options: Options, keep: Tensor,
             exploit_structure: bool) -> IPMResult:
    """:func:`interior_point` on the samples ``keep``, the others NaN and not converged."""
    idx = keep.nonzero().flatten()
    part = interior_point(_select(problem, idx), y0[idx], options,
                          exploit_structure=exploit_structure)

    def spread(t: Tensor, fill) -> Tensor:
        out = torch.full((problem.batch, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[idx] = t
        return out

    return IPMResult(spread(part.y, float("nan")), spread(part.eq_multipliers, float("nan")),
                     spread(part.ineq_multipliers, float("nan")), spread(part.converged, False),
                     spread(part.iterations, 0), spread(part.residual, float("nan")), part.tol)


def _polish(model: _Model, y: Tensor, lam: Tensor, z: Tensor, s: Tensor, samples: Tensor,
            tol: float, tries: Tensor, active: Tensor | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Newton steps on the KKT system with a guess of the active inequalities held as
    equalities, for ``samples (b,)``.

    The interior point approaches the active constraints at ``g ≈ −s``, ``s ≈ μ/z``; a step with
    the rows ``z > s`` active puts them at ``g = 0`` (exact for a QP). Where that is no KKT point,
    the guess is corrected as in a primal–dual active-set method (rows with a negative multiplier
    leave it, violated rows join it) and the step is taken again from the same point, ``tries
    (b,)`` steps in all. ``active (b, q)``: the first guess where already at hand (else
    :func:`_active`).
    Returns the mask of samples where a step gives a KKT point (stopping test passed with ``s =
    0``: inactive constraints satisfied, active multipliers non-negative, stationarity), the new
    ``y``, ``λ``, ``μ`` and the residual there (the input state and ``inf`` elsewhere).
    """
    ok = torch.zeros_like(samples)
    y_out, lam_out, mu_out = y.clone(), lam.clone(), z.clone()
    res_out = torch.full_like(y[:, 0], float("inf"))
    idx = samples.nonzero().flatten()
    model.hessian_factor()  # once, for every subset
    sub = model.select(idx) if idx.numel() < samples.numel() else model
    y, lam, z, s, tries = y[idx], lam[idx], z[idx], s[idx], tries[idx]
    active = _active(sub, y, lam, s, z) if active is None else active[idx]
    for attempt in range(int(tries.max()) if idx.numel() else 0):
        good, y_new, lam_new, mu_new, res, g = _active_step(sub, y, lam, z, active, tol)
        where = idx[good]
        y_out[where], lam_out[where] = y_new[good], lam_new[good]
        mu_out[where] = mu_new[good].clamp_min(0)  # (negative only within tol: _active_step)
        res_out[where], ok[where] = res[good], True
        # a row held stays with a positive multiplier; one not held joins where violated (a row
        # held has g = 0 ± rounding: by the sign of g it would never leave)
        guess = torch.where(active, mu_new > 0, g > 0)
        again = (~good & (guess != active).any(-1) & (tries > attempt + 1)).nonzero().flatten()
        if again.numel() == 0:
            break
        idx, sub = idx[again], sub.select(again)
        y, lam, z, active, tries = y[again], lam[again], z[again], guess[again], tries[again]
    return ok, y_out, lam_out, mu_out, res_out


def _active_step(model: _Model, y: Tensor, lam: Tensor, z: Tensor, active: Tensor, tol: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One Newton step of :func:`_polish` with the rows ``active (b, q)`` held as equalities:
    whether it passed, the new ``y``, ``λ``, ``μ``, the residual and ``g`` there."""
    p = lam.shape[1]
    mu = torch.where(active, z, torch.zeros_like(z))
    ev = model.evaluate(y, lam, mu).double()
    act = torch.cat([torch.ones_like(lam, dtype=torch.bool), active], 1)
    A = ev.A * act.unsqueeze(-1).double()
    c = torch.cat([ev.h, ev.g], 1) * act.double()
    known = model.hessian_factor()
    if known is None:
        K = _Condensed(ev.W, A, inactive=~act)
    else:  # W⁻¹ Aᵀ and A W⁻¹ Aᵀ of the rows held: the constant ones, masked
        r, L, WiJt, JWiJt = known
        K = _Condensed(ev.W, A, inactive=~act, factor=(r, L),
                       schur=(WiJt * act.unsqueeze(-2), JWiJt * (act.unsqueeze(-1)
                                                                  & act.unsqueeze(-2))))
    dy, dnu = K.solve(ev.gL, c)
    y_new = y + dy.to(y.dtype)
    nu_new = (torch.cat([lam, mu], 1).double() + dnu).to(y.dtype) * act
    lam_new, mu_new = nu_new[:, :p], nu_new[:, p:]
    ev_new = model.evaluate(y_new, lam_new, mu_new, second_order=False)
    g = ev_new.g
    res = _residuals(ev_new, y_new, ev_new.gL, torch.cat([ev_new.h, g.clamp_min(0)], 1),
                     mu_new * g, model.scales).amax(0)
    # a multiplier negative within tol of the multipliers' size is zero (a weakly active row:
    # its multiplier comes out ± rounding, and rejecting the step left y √tol off)
    dual = _sizes(ev_new, y_new, model.scales)[2].unsqueeze(-1)
    ok = (torch.isfinite(res) & (res <= tol) & (mu_new >= -tol * dual).all(-1)
          & torch.isfinite(y_new).all(-1))
    return ok, y_new, lam_new, mu_new, res, g


@dataclass
class _Eval:
    f: Tensor    # (b,)
    h: Tensor    # (b, p)
    g: Tensor    # (b, q)
    gL: Tensor   # (b, m)   ∇_y L
    gf: Tensor   # (b, m)   ∇_y f
    W: Tensor    # (b, m, m) ∇²_yy L, or (b, 0, m) for a first-order evaluation
    A: Tensor    # (b, p + q, m): [J_h; J_g]
    a_max: Tensor  # (b,) max |A_ij| (NaN where A is not finite)

    def double(self) -> _Eval:
        return _Eval(*(t.double() for t in (self.f, self.h, self.g, self.gL, self.gf, self.W,
                                             self.A, self.a_max)))


class _Model:
    """The problem's values and derivatives at any ``y (b, m)``: by autodiff of the user's
    functions, except for the parts found quadratic (objective) or affine / quadratic
    (constraints) at ``y₀ (b, m)``, which come from their exact expansion about ``y₀`` (module
    docstring). Without ``expand``: everything by autodiff, nothing evaluated up front."""

    def __init__(self, problem: Problem, y0: Tensor, expand: bool = True):
        self.problem, self.y0 = problem, y0
        self.quad: tuple[Tensor, Tensor, Tensor] | None = None  # f(y₀), ∇f(y₀), ∇²f
        self.lin: tuple[Tensor, Tensor, Tensor | None] | None = None  # c(y₀), J(y₀), ∇²c_k
        self.p = 0
        self.convex = torch.zeros(problem.batch, dtype=torch.bool, device=y0.device)
        self.all_convex = False
        self._factor: tuple[Tensor, Tensor] | None = None  # see hessian_factor
        self._a_max: Tensor | None = None  # max |J| per sample, for constant J
        self.scales: Tensor | None = None  # the stopping test's floors (2, b): _scales
        if expand:
            self._detect(y0)

    @property
    def expanded(self) -> bool:
        return self.quad is not None or self.lin is not None

    @property
    def linear_kkt(self) -> bool:
        """Quadratic objective and affine constraints: the KKT conditions are linear in ``y``."""
        return self.quad is not None and self.lin is not None and self.lin[2] is None

    def _detect(self, y0: Tensor) -> None:
        problem = self.problem
        b, m = y0.shape
        with torch.enable_grad():
            yv = y0.detach().requires_grad_()
            f, h, g = problem.objective(yv), problem.eq(yv), problem.ineq(yv)
            c = torch.cat([h, g], 1)
            k = c.shape[1]
            gf = grad(f.sum(), [yv], create_graph=True)[0]
            # apart: in one pass over [∇f; c] the rows of ∇²f would reach y through c's graph
            H = batched_jacobian(gf, yv, create_graph=True)
            J = batched_jacobian(c, yv, create_graph=True)
            if not _depends(H, yv):
                self.quad = (f.detach(), gf.detach(), _shared(_sym(H.detach())))
            C, constant = None, not _depends(J, yv)
            if not constant and b * k * m * m <= _MAX_CACHED:
                C = batched_jacobian(J.reshape(b, k * m), yv, create_graph=True)
                constant = not _depends(C, yv)
                C = _shared(_sym(C.detach().reshape(b, k, m, m)))
            if constant:
                self.lin = (c.detach(), _shared(J.detach()), C)
        self.p = h.shape[1]
        if self.quad is not None and self.lin is not None and C is None:
            # no maximum or saddle to escape: ∇²f ⪰ −√eps (1 + max |H_ii|), the escape's threshold
            H = self.quad[2].double()
            t = torch.finfo(y0.dtype).eps ** 0.5 * (1 + H.diagonal(dim1=-2, dim2=-1).abs().amax(-1))
            eye = torch.eye(m, dtype=H.dtype, device=H.device)
            self.convex = torch.linalg.cholesky_ex(H + t[:, None, None] * eye).info == 0
            self.all_convex = bool(self.convex.all())

    def select(self, idx: Tensor) -> _Model:
        """The model of the samples ``idx``."""
        sub = _Model(_select(self.problem, idx), self.y0[idx], expand=False)
        sub.p, sub.convex = self.p, self.convex[idx]
        sub.all_convex = self.all_convex or bool(sub.convex.all())
        if self._factor:
            sub._factor = tuple(_take(t, idx) for t in self._factor)
        if self._a_max is not None:
            sub._a_max = _take(self._a_max, idx)
        if self.scales is not None:
            sub.scales = self.scales[:, idx]
        if self.quad is not None:
            sub.quad = tuple(_take(t, idx) for t in self.quad)
        if self.lin is not None:
            sub.lin = tuple(None if t is None else _take(t, idx) for t in self.lin)
        return sub

    def hessian_factor(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Where ``W = ∇²f`` is the same at every ``y`` and for every multiplier (quadratic
        objective, affine constraints) and positive definite in every sample: its scaled Cholesky
        factor ``(T⁻¹, L)`` and, with ``J`` the constant constraint Jacobian, ``W⁻¹ Jᵀ`` and
        ``J W⁻¹ Jᵀ`` (float64), for :class:`_Condensed`; else None. Computed once (for one sample
        where ``∇²f`` and ``J`` are shared)."""
        if self._factor is None:
            self._factor = False
            if self.quad is not None and self.lin is not None and self.lin[2] is None:
                H, J = self.quad[2].double(), self.lin[1].double()
                shared = H.stride(0) == 0 and J.stride(0) == 0
                one = (lambda t: t[:1]) if shared else (lambda t: t.contiguous())
                r, L, info, _ = _scaled_cholesky(one(H))
                if bool((info == 0).all()):
                    Jt = one(J).transpose(-1, -2)
                    WiJt = r.unsqueeze(-1) * torch.cholesky_solve(r.unsqueeze(-1) * Jt, L)
                    parts = (r, L, WiJt, one(J) @ WiJt)
                    self._factor = (tuple(t.expand(H.shape[0], *t.shape[1:]) for t in parts)
                                    if shared else parts)
        return self._factor or None

    def _quadratic(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``f`` and ``∇f`` from the expansion."""
        f0, g0, H = self.quad
        d = y - self.y0
        Hd = _mv(H, d)
        return f0 + (d * (g0 + 0.5 * Hd)).sum(-1), g0 + Hd

    def _constraints(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``c = [h; g]``, ``J`` and ``(∇²c_k)`` (None: affine) from the expansion."""
        c0, J0, C = self.lin
        d = y - self.y0
        if C is None:
            return c0 + _mv(J0, d), J0, None
        Cd = _mv(C.flatten(1, 2), d).unflatten(1, C.shape[1:3])
        return c0 + _mv(J0 + 0.5 * Cd, d), J0 + Cd, C

    def values(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``f (b,)``, ``h (b, p)``, ``g (b, q)`` at ``y``, without derivatives."""
        problem = self.problem
        with torch.no_grad():
            f = problem.objective(y) if self.quad is None else self._quadratic(y)[0]
            if self.lin is None:
                return f, problem.eq(y), problem.ineq(y)
            c = self._constraints(y)[0]
        return f, c[:, :self.p], c[:, self.p:]

    def evaluate(self, y: Tensor, lam: Tensor, z: Tensor, second_order: bool = True) -> _Eval:
        """Values, ``∇L``, ``∇f``, the constraint Jacobians and (with ``second_order``) the
        Hessian of the Lagrangian at ``y``. The parts evaluated by autodiff take one gradient
        (with its graph for ``second_order``) and one vectorised backward pass over the rows
        ``[∇_y(f + wᵀc); c]`` that need it; without ``second_order`` ``W`` is ``(b, 0, m)``."""
        problem = self.problem
        b, m = y.shape
        w = torch.cat([lam, z], 1)
        auto_f, auto_c = self.quad is None, self.lin is None
        W = y.new_zeros(b, 0, m) if not second_order else None
        if auto_f or auto_c:
            with torch.enable_grad():
                yv = y.detach().requires_grad_()
                rows = []
                if auto_f:
                    fv = problem.objective(yv)
                    f = fv.detach()
                if auto_c:
                    h, g = problem.eq(yv), problem.ineq(yv)
                if auto_f or second_order:  # then the sum is not empty
                    total = ((fv.sum() if auto_f else 0)
                             + ((h * lam).sum() + (g * z).sum() if auto_c else 0))
                    gT = grad(total, [yv], create_graph=second_order, retain_graph=True)[0]
                    if second_order:
                        rows.append(gT)
                    gT = gT.detach()
                if auto_c:
                    rows += [h, g]
                    h, g = h.detach(), g.detach()
                R = batched_jacobian(torch.cat(rows, 1), yv).detach() if rows else None
            if second_order:
                W = _sym(R[:, :m])
            if auto_c:
                A = R[:, m if second_order else 0:]
        if not auto_f:
            f, gf = self._quadratic(y)
            if second_order:
                W = self.quad[2] if W is None else W + self.quad[2]
        if not auto_c:
            c, A, C = self._constraints(y)
            h, g = c[:, :self.p], c[:, self.p:]
            if second_order and C is not None:  # Σ_k w_k ∇²c_k
                W = W + (w @ C[0].flatten(1) if C.stride(0) == 0 else
                         (w.unsqueeze(-1) * C.flatten(2)).sum(1)).unflatten(1, C.shape[2:])
        Atw = _mtv(A, w)
        if auto_f and auto_c:
            gL, gf = gT, gT - Atw
        else:
            gf = gT if auto_f else gf
            gL = gf + Atw
        if not auto_c and C is None:  # constant A
            if self._a_max is None:
                self._a_max = _abs_max(A)
            a_max = self._a_max
        else:
            a_max = _abs_max(A)
        return _Eval(f, h, g, gL, gf, W, A, a_max)


def _depends(t: Tensor, y: Tensor) -> bool:
    """Whether autograd's graph of ``t`` reaches the leaf ``y``, except through a power with
    exponent 0 (derivative identically zero; torch differentiates ``u²`` as ``2u¹`` and ``u¹`` as
    ``u⁰``, so every Hessian of a square holds one)."""
    stack, seen = [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if getattr(fn, "variable", None) is y:
            return True
        if type(fn).__name__ == "PowBackward0" and fn._saved_exponent == 0:
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return False


def _sym(M: Tensor) -> Tensor:
    return 0.5 * (M + M.transpose(-1, -2))


def _shared(t: Tensor) -> Tensor:
    """``t (b, ...)`` as an expanded view of its first sample where every sample equals it."""
    first = t[:1].contiguous().expand_as(t)
    return first if t.shape[0] > 1 and torch.equal(t, first) else t.contiguous()


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """``t[idx]``, still an expanded view where ``t`` is one."""
    if t.stride(0) == 0 and t.shape[0]:
        return t[:1].expand(idx.numel(), *t.shape[1:])
    return t[idx]


class _Condensed:
    """Factorisation of the condensed system ``[[M, J_hᵀ], [J_h, 0]]`` (see module docstring).

    ``M`` is factorised after symmetric diagonal (Jacobi) scaling, ``M = T M̂ T`` with
    ``T = diag(√d)``, ``d_i = max(|M_ii|, eps max_j |M_jj|)``: the barrier term and entropy-like
    objectives spread the diagonal over many orders of magnitude, and every shift (the ``10 eps``
    safeguard, the inertia correction ``δ``, the augmentation ``ρ J_hᵀJ_h``) is relative to it.
    """

    def __init__(self, M: Tensor, Ah: Tensor, inactive: Tensor | None = None,
                 factor: tuple[Tensor, Tensor] | None = None,
                 schur: tuple[Tensor, Tensor] | None = None):
        b, m, _ = M.shape
        eps = torch.finfo(M.dtype).eps
        self.rho = M.new_zeros(b)
        if factor is not None:  # (T⁻¹, L) of M, from :meth:`_Model.hessian_factor`
            (self.r, self.L), self.augmented = factor, False
        else:
            self.r, self.L, info, Ms = _scaled_cholesky(M)
            todo = info != 0
            self.augmented = bool(todo.any())  # some ρ > 0
        if self.augmented:
            eye = torch.eye(m, dtype=M.dtype, device=M.device)
            self.L = self.L.clone()
            Ahs = Ah * self.r.unsqueeze(-2)
            AtA = Ahs.transpose(-1, -2) @ Ahs
            rho_unit = 1 / (1 + _amax(AtA.diagonal(dim1=-2, dim2=-1)))
            rho_last = 1.0 if Ah.shape[1] else 0.0
            ladder = (([(1.0, None)] if Ah.shape[1] else [])
                      + [(rho_last, 10.0**k) for k in range(17)])
            omega = None
            for rho_k, shift in ladder:
                idx = todo.nonzero().flatten()
                rho = rho_unit[idx] * rho_k
                Mk = Ms[idx] + rho[:, None, None] * AtA[idx]
                if shift is None:
                    delta = Mk.new_full((idx.numel(),), 10 * eps)
                else:
                    if omega is None:
                        omega = torch.full_like(rho_unit, 1.0)
                        omega[idx] = _smallest_eigenvalue(Mk)
                    delta = shift * (2 * (-omega[idx]).clamp_min(0) + 10 * eps)
                Mk = Mk + delta[:, None, None] * eye
                L, info = torch.linalg.cholesky_ex(Mk)
                ok = info == 0
                self.L[idx[ok]], self.rho[idx[ok]] = L[ok], rho[ok]
                todo[idx[ok]] = False
                if not todo.any():
                    break
            # samples where nothing factorised (non-finite M) keep L = I: their step is discarded
            self.L[todo] = eye
        self.Ah = Ah
        if Ah.shape[1]:
            if schur is None:
                self.MiAt = self._solve_m(Ah.transpose(-1, -2))
                S = Ah @ self.MiAt
            else:  # (M⁻¹ Ahᵀ, Ah M⁻¹ Ahᵀ) known
                self.MiAt, S = schur
            S = 0.5 * (S + S.transpose(-1, -2))
            diag = S.diagonal(dim1=-2, dim2=-1)
            if inactive is not None:  # rows of Ah that are zero: W = 0 there
                diag += inactive.to(S.dtype)
            diag += (10 * eps * (1 + diag.abs().amax(-1))).unsqueeze(-1)
            # a pivot at the shift's size is a redundant row (cholesky_ex goes through it): its
            # step along the null space would be rounding over 10 eps, so least squares there
            self.Ls, failed, weak = trusted_cholesky(S)
            self.S, self.s_singular = S, failed | weak
            self.any_singular = bool(self.s_singular.any())

    def _solve_m(self, B: Tensor) -> Tensor:
        """``(M + ρ J_hᵀJ_h + shifts)⁻¹ B`` for ``B (b, m, k)``."""
        r, L = self.r.unsqueeze(-1), self.L
        return r * torch.cholesky_solve(r * B, L[:1] if L.stride(0) == 0 else L)

    def solve(self, rt: Tensor, re: Tensor) -> tuple[Tensor, Tensor]:
        """``(dy, dλ)`` with ``M dy + J_hᵀ dλ = −rt``, ``J_h dy = −re``; ``rt (b, m)``, ``re (b, p)``."""
        if self.Ah.shape[1] and self.augmented:
            # (M + ρ J_hᵀJ_h) dy + J_hᵀ dλ = −rt − ρ J_hᵀ re is the same system (J_h dy = −re)
            rt = rt + self.rho.unsqueeze(-1) * _mtv(self.Ah, re)
        Mir = self._solve_m(rt.unsqueeze(-1))
        if not self.Ah.shape[1]:
            return -Mir[..., 0], re.new_zeros(re.shape)
        rhs = (re - _mv(self.Ah, Mir[..., 0])).unsqueeze(-1)
        dlam = torch.cholesky_solve(rhs, self.Ls)
        if self.any_singular:
            bad = self.s_singular
            dlam = dlam.clone()
            S, r = self.S[bad], rhs[bad]
            finite = torch.isfinite(S).all((-2, -1)) & torch.isfinite(r).all((-2, -1))
            S = torch.where(finite[:, None, None], S, torch.eye(S.shape[-1], dtype=S.dtype,
                                                                device=S.device))
            r = torch.where(finite[:, None, None], r, torch.zeros_like(r))
            # singular values at the shift's size (10 eps) are the redundant rows': cut, so
            # that the step has no component along them (minimum norm)
            rcond = 100 * torch.finfo(S.dtype).eps
            sol = torch.linalg.lstsq(S, r, rcond=rcond, driver=_driver(rhs)).solution
            dlam[bad] = torch.where(finite[:, None, None], sol, torch.nan)  # a NaN sample stops
        dlam = dlam[..., 0]
        return -Mir[..., 0] - _mv(self.MiAt, dlam), dlam


def _scaled_cholesky(M: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``T⁻¹ = diag max(|M_ii|, eps max_j |M_jj|)^-½``, the Cholesky factor of ``M̂ + 10 eps I``
    (``M̂ = T⁻¹ M T⁻¹``), its ``info`` and ``M̂``, for ``M (b, m, m)``. (With ``max(|M_ii|, 1)``,
    as before, a problem whose curvatures are far below one, an objective of 10⁻¹² in variables
    of size 10⁶, had its steps swamped by the ``10 eps`` safeguard and stalled.)"""
    d = M.diagonal(dim1=-2, dim2=-1).abs()
    top = d.amax(-1, keepdim=True)  # a zero or tiny diagonal entry is scaled as eps · the largest
    floor = torch.where(top > 0, top * torch.finfo(M.dtype).eps, 1.0)
    r = torch.maximum(d, floor).rsqrt()
    Ms = r.unsqueeze(-1) * M * r.unsqueeze(-2)
    shifted = Ms.clone()
    shifted.diagonal(dim1=-2, dim2=-1).add_(10 * torch.finfo(M.dtype).eps)
    L, info = torch.linalg.cholesky_ex(shifted)
    return r, L, info, Ms


def _mv(A: Tensor, v: Tensor) -> Tensor:
    """``A v`` per sample, ``A (b, k, m)``, ``v (b, m)`` → ``(b, k)``; one matrix product where
    ``A`` is the same matrix in every sample (an expanded view, stride 0)."""
    if A.stride(0) == 0:
        return v @ A[0].transpose(-1, -2)
    return (A * v.unsqueeze(-2)).sum(-1)  # no bmm: slow for small matrices on CPU


def _mtv(A: Tensor, w: Tensor) -> Tensor:
    """``Aᵀ w`` per sample, ``A (b, k, m)``, ``w (b, k)`` → ``(b, m)`` (see :func:`_mv`)."""
    if A.stride(0) == 0:
        return w @ A[0]
    return (A * w.unsqueeze(-1)).sum(-2)


def _gram(A: Tensor, D: Tensor) -> Tensor:
    """``Aᵀ diag(D) A`` per sample, ``A (b, k, m)``, ``D (b, k)`` → ``(b, m, m)``."""
    if A.stride(0) == 0:
        return (A[0].transpose(-1, -2) * D.unsqueeze(-2)) @ A[0]
    return A.transpose(-1, -2) @ (D.unsqueeze(-1) * A)


def _abs_max(A: Tensor) -> Tensor:
    """``max |A_ij|`` per sample of ``A (b, k, m)`` (0 for ``k = 0``; NaN propagates)."""
    if not A.shape[1]:
        return A.new_zeros(A.shape[0])
    if A.stride(0) == 0:
        return A[0].abs().amax().expand(A.shape[0])
    return A.abs().amax((-2, -1))


def _finite(t: Tensor) -> Tensor:
    """Whether each sample of ``t (b, ...)`` is finite (a max reduction: NaN propagates)."""
    return torch.isfinite(_amax(t.abs().flatten(1)))


def _amax(t: Tensor) -> Tensor:
    """Row maximum of ``t (b, k)``, 0 for ``k = 0``."""
    return t.amax(-1) if t.shape[-1] else t.new_zeros(t.shape[0])


def _driver(t: Tensor) -> str | None:
    return "gelsd" if t.device.type == "cpu" else None


def _direction(K: _Condensed, Ag: Tensor, s: Tensor, z: Tensor, D: Tensor, rd: Tensor,
               re: Tensor, ri: Tensor, rc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dy, ds, dz, dλ)`` of the Newton system with complementarity residual ``rc (b, q)``
    (``D = z / s``)."""
    if not Ag.shape[1]:  # no inequality rows
        dy, dlam = K.solve(rd, re)
        return dy, rc, rc, dlam
    rcs = rc / s
    rt = rd + _mtv(Ag, D * ri - rcs)
    dy, dlam = K.solve(rt, re)
    dz = D * (_mv(Ag, dy) + ri) - rcs
    ds = -(rc + s * dz) / z
    return dy, ds, dz, dlam


def _max_step(v: Tensor, dv: Tensor, tau: float) -> Tensor:
    """Largest ``α ∈ (0, 1]`` with ``v + α dv ≥ (1 − τ) v`` per sample."""
    if not v.shape[-1]:
        return v.new_ones(v.shape[0])
    return (tau * torch.where(dv < 0, v / -dv, torch.inf).amin(-1)).clamp(max=1.0)


def _max_steps(s: Tensor, ds: Tensor, z: Tensor, dz: Tensor, tau: float
               ) -> tuple[Tensor, Tensor]:
    """:func:`_max_step` for ``s`` and for ``z`` (``q > 0`` rows), in one pass."""
    a = _max_step(torch.stack([s, z]), torch.stack([ds, dz]), tau)
    return a[0], a[1]


def _step(model: _Model, ev: _Eval, y, s, z, lam, nu, rd, re, ri, running, p: int, q: int):
    """One predictor–corrector iteration with line search (without, where every sample is
    convex); frozen where not ``running``."""
    m, dtype = y.shape[1], y.dtype
    y_in, s_in, z_in, lam_in, f = y, s, z, lam, ev.f
    # the Newton direction is computed in float64 whatever the input's precision: the barrier
    # term J_gᵀDJ_g makes the condensed matrix ill-conditioned near the solution
    if dtype != torch.float64:
        y, s, z, lam, nu, rd, re, ri = (t.double() for t in (y, s, z, lam, nu, rd, re, ri))
        ev = ev.double()
    Ah, Ag = ev.A[:, :p], ev.A[:, p:]
    D = z / s
    M = ev.W + _gram(Ag, D) if q else ev.W
    M = torch.where(_finite(M)[:, None, None], M, torch.eye(m, dtype=M.dtype, device=M.device))
    K = _Condensed(M, Ah)
    if q:
        mu = (s * z).mean(-1)
        dy, ds, dz, dlam = _direction(K, Ag, s, z, D, rd, re, ri, s * z)
        a_p, a_d = _max_steps(s, ds, z, dz, 1.0)
        mu_aff = ((s + a_p[:, None] * ds) * (z + a_d[:, None] * dz)).mean(-1)
        sigma = (mu_aff / mu.clamp_min(torch.finfo(mu.dtype).tiny)).clamp(0, 1) ** 3
        target = sigma * mu
        rc = s * z + ds * dz - target.unsqueeze(-1)
        dy, ds, dz, dlam = _direction(K, Ag, s, z, D, rd, re, ri, rc)
        a_p, a_d = _max_steps(s, ds, z, dz, _TAU)
    else:
        target = y.new_zeros(y.shape[0])
        dy, ds, dz, dlam = _direction(K, Ag, s, z, D, rd, re, ri, s * z)
        a_p = a_d = y.new_ones(y.shape[0])
    if not model.all_convex:
        nu, c1, slope = _penalty(ev, y, s, z, lam, re, ri, dy, ds, dz, dlam, M, target, p, q)
    if dtype != torch.float64:
        dy, ds, dz, dlam, a_p, a_d, target, nu = (
            t.to(dtype) for t in (dy, ds, dz, dlam, a_p, a_d, target, nu))
    y, s, z, lam = y_in, s_in, z_in, lam_in
    if model.all_convex:
        # a convex QP needs no merit function: the fraction-to-boundary step (N&W Alg. 16.4)
        y_new, t = y + a_p[:, None] * dy, a_p
    else:
        correct = (lambda: _soc(Ah)) if p else None
        y_new, t = _line_search(model, f, y, s, dy, ds, a_p, target, nu, c1.to(dtype),
                                slope.to(dtype), running, correct)
    keep = running.unsqueeze(-1)
    y = torch.where(keep, y_new, y)
    s = torch.where(keep, s + t[:, None] * ds, s)
    lam = torch.where(keep, lam + t[:, None] * dlam, lam)
    z = torch.where(keep & (t > 0)[:, None], z + a_d[:, None] * dz, z)
    return y, s, z, lam, nu


def _penalty(ev: _Eval, y, s, z, lam, re, ri, dy, ds, dz, dlam, M, target, p: int, q: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The penalty ``ν`` of the ℓ1 barrier merit, the constraint violation ``‖h‖₁ + ‖g + s‖₁``
    and the merit's directional derivative along the step of :func:`_step`."""
    # ν ≥ 1.1 ‖(λ⁺, z⁺)‖∞ and large enough for descent (N&W eq. 18.36)
    c1 = re.abs().sum(-1) + ri.abs().sum(-1)
    slope_f = (ev.gf * dy).sum(-1) - (target.unsqueeze(-1) * ds / s).sum(-1)
    curvature = (dy * _mv(M, dy)).sum(-1).clamp_min(0)
    # a violation at rounding level (linear constraints once met) must not inflate ν
    rounding = 64 * torch.finfo(y.dtype).eps * (c1.new_ones(()) + ev.a_max
                                                * y.abs().amax(-1)) * max(p + q, 1)
    needed = torch.where(c1 > rounding, (slope_f + 0.5 * curvature) / (0.5 * c1).clamp_min(
        torch.finfo(y.dtype).tiny), torch.zeros_like(c1))
    new_mult = _amax(torch.cat([lam + dlam, z + dz], 1).abs())
    # ν is chosen afresh each iteration (a wild first multiplier estimate must not stay in it)
    nu = torch.maximum(1.1 * new_mult, needed)
    return nu, c1, slope_f - nu * c1


def _merit(model: _Model, y: Tensor, s: Tensor, target: Tensor, nu: Tensor) -> Tensor:
    f, h, g = model.values(y)
    c1 = h.abs().sum(-1) + (g + s).abs().sum(-1)
    phi = f - target * s.log().sum(-1) + nu * c1
    return torch.where(torch.isfinite(phi), phi, torch.full_like(phi, float("inf")))


def _soc(Ah: Tensor):
    """The second-order correction ``−J_hᵀ (J_h J_hᵀ + εI)⁻¹ h`` (against the Maratos effect:
    N&W §15.6), as a function of ``h (b, p)``."""
    S = Ah @ Ah.transpose(-1, -2)
    eps = torch.finfo(S.dtype).eps
    S = S + (10 * eps * (1 + S.diagonal(dim1=-2, dim2=-1).amax(-1)))[:, None, None] * torch.eye(
        S.shape[-1], dtype=S.dtype, device=S.device)
    L, _ = torch.linalg.cholesky_ex(S)

    def correct(h: Tensor) -> Tensor:
        w = torch.cholesky_solve(h.double().unsqueeze(-1), L)
        return -_mtv(Ah, w[..., 0]).to(h.dtype)

    return correct


def _line_search(model, f, y, s, dy, ds, a_max, target, nu, c1, slope, running, correct
                 ) -> tuple[Tensor, Tensor]:
    """Per-sample Armijo search on the merit: the full step ``a_max``, then (with equality
    constraints; ``correct()`` builds it) its second-order correction, then ``a_max 2^-k``. Returns the new ``y`` and the
    step length ``t`` taken for ``s`` and ``λ``. Where no step passes, the longest trial step at
    which the problem is finite is taken (non-monotone: the merit shortens steps, it never stalls
    a sample); ``t = 0`` where no finite trial point was found."""
    with torch.no_grad():
        log_s = s.log().sum(-1)
        phi0 = f - target * log_s + nu * c1
        rounding = 64 * torch.finfo(y.dtype).eps * (phi0.abs() + (target * log_s).abs())

        def passes(phi: Tensor, t: Tensor) -> Tensor:
            return ((phi <= phi0 + _ARMIJO * t * slope.clamp(max=0))
                    | ((phi - phi0).abs() <= rounding))

        t = a_max.clone()
        y_full = y + t[:, None] * dy
        s_full = s + t[:, None] * ds
        phi = _merit(model, y_full, s_full, target, nu)
        full_finite = torch.isfinite(phi)
        accepted = running & passes(phi, t)
        y_new = y_full
        if correct is not None and bool((running & ~accepted).any()):
            y_soc = y_full + correct()(model.values(y_full)[1])
            ok = running & ~accepted & passes(_merit(model, y_soc, s_full, target, nu), t)
            y_new = torch.where(ok.unsqueeze(-1), y_soc, y_new)
            accepted |= ok
        searching = running & ~accepted
        # fallback where nothing passes: the longest finite trial step
        fallback, t_fallback, y_fallback = full_finite, t.clone(), y_full
        for _ in range(_MAX_BACKTRACKS):
            if not searching.any():
                break
            t = torch.where(searching, 0.5 * t, t)
            y_t = y + t[:, None] * dy
            phi = _merit(model, y_t, s + t[:, None] * ds, target, nu)
            ok = searching & passes(phi, t)
            y_new = torch.where(ok.unsqueeze(-1), y_t, y_new)
            accepted |= ok
            searching &= ~ok
            first = searching & ~fallback & torch.isfinite(phi)
            t_fallback = torch.where(first, t, t_fallback)
            y_fallback = torch.where(first.unsqueeze(-1), y_t, y_fallback)
            fallback |= first
        use = ~accepted & fallback
        t = torch.where(accepted, t, torch.where(use, t_fallback, torch.zeros_like(t)))
        y_new = torch.where(accepted.unsqueeze(-1), y_new,
                            torch.where(use.unsqueeze(-1), y_fallback, y))
    return y_new, t


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


def _smallest_eigenvalue(M: Tensor) -> Tensor:
    """Smallest eigenvalue per sample; where LAPACK's ``eigh`` fails to converge on the batch
    (ill-conditioned), the Gershgorin lower bound ``min_i (M_ii − Σ_{j≠i} |M_ij|)`` (a larger,
    still sufficient shift)."""
    try:
        return torch.linalg.eigvalsh(M)[:, 0]
    except RuntimeError:
        diag = M.diagonal(dim1=-2, dim2=-1)
        return (2 * diag - M.abs().sum(-1)).amin(-1)
