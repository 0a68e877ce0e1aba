"""The KKT point of a problem at ``y``: the one place the Lagrangian's pieces are assembled.

For ``min_y f`` subject to ``h = 0`` (p rows) and ``g ≤ 0`` (q rows) at a point ``y (b, m)``:

- ``c = [h; g] (b, p + q)`` and its Jacobian ``A = ∂c/∂y (b, p + q, m)``;
- the active set ``(b, p + q)``: every equality, and the inequalities that :func:`active_set`
  decides from their distance to the boundary and their multipliers (scale-aware);
- the multipliers ``ν = [λ; μ]``: the solver's where it returned them, else the least-squares
  solution of ``∇_y f + Aᵀν = 0`` over the active rows (zero on the inactive ones);
- the Lagrangian gradient ``∇_y L = ∇_y f + Aᵀν`` with its graph, whose derivatives give the
  Hessian ``H = ∇²_yy L`` (dense or as Hessian-vector products) and the mixed second derivatives
  of the backward pass.

:class:`KKTPoint` is consumed by the backward pass (:func:`ddnlib.engine.implicit_vjp`), the
default forward solvers (:mod:`ddnlib.solvers`) and the optimality check of
:func:`ddnlib.testing.check_optimality`. Its :meth:`~KKTPoint.optimality` is the single definition
of "optimal" (:class:`Optimality`) that both the backward's warning and the testing toolkit report.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .autodiff import batched_jacobian, grad
from .errors import OptimalityWarning, SingularSystemWarning, describe_samples, report
from .linalg import NullSpace, lstsq, shared_by_batch
from .linear_solvers import KKTOperator
from .solution import Solution, multipliers_tensor

if TYPE_CHECKING:
    from .options import Options
    from .problem import Problem

__all__ = ["KKTPoint", "Optimality", "kkt_point", "active_set", "least_squares_multipliers"]


def least_squares_multipliers(grad_f: Tensor, A: Tensor, active: Tensor) -> Tensor:
    """``ν = argmin ‖∇_y f + Aᵀν‖`` per sample over the active rows, minimum norm (inactive
    ``ν_j = 0``); ``grad_f (b, m)``, ``A (b, r, m)``, ``active (b, r)``."""
    At = (A * active.unsqueeze(-1).to(A.dtype)).transpose(-1, -2)
    # a non-finite sample (a NaN input) gets NaN multipliers and is kept away from LAPACK
    finite = torch.isfinite(At).all((-2, -1)) & torch.isfinite(grad_f).all(-1)
    At = torch.where(finite[:, None, None], At, 0.0)
    rhs = torch.where(finite[:, None], -grad_f, 0.0).unsqueeze(-1)
    nu = lstsq(At, rhs)[0].squeeze(-1)
    return torch.where(finite[:, None], nu, float("nan"))


def _row_norms(A: Tensor) -> Tensor:
    """``‖a_j‖ (b, r)`` of the rows of ``A (b, r, m)``, computed once where ``A`` is shared by the
    batch (stride 0)."""
    if shared_by_batch(A):
        return A[0].norm(dim=-1).expand(A.shape[:2])
    return A.norm(dim=-1)


def _tight(g: Tensor, norms: Tensor, y: Tensor, tol: float) -> Tensor:
    """Inequalities ``(b, q)`` whose first-order distance ``max(−g_j, 0) / ‖∇g_j‖`` (``norms``
    the ``‖∇g_j‖``) is at most ``tol · (‖y‖∞ + tol)``: on the boundary to the accuracy ``tol``
    relative to the point, absolute only below ``tol`` (as :class:`Optimality`'s scale). At the
    answer ``y = 0`` (relu of a negative ``x``) ``‖y‖∞`` is rounding itself: relative to it, an
    external solver's ``y_j = 2e-16`` on a bound was "inactive", a wrong gradient."""
    distance = (-g).clamp_min(0) / norms  # inf for a slack row without a gradient
    distance = torch.where(g >= 0, torch.zeros_like(distance), distance)
    scale = y.abs().amax(-1, keepdim=True) + tol
    return distance <= tol * scale


def active_set(grad_f: Tensor, f: Tensor, A: Tensor, p: int, g: Tensor, tight: Tensor,
               mu: Tensor | None, y: Tensor, tol: float, norms: Tensor | None = None,
               curvature: Callable[[], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The constraints ``(b, p + q)`` held as equalities, and the ``(b,)`` samples where the
    decision is ambiguous (a weakly active inequality).

    The decision combines the primal and the dual evidence, both scale-aware. An inequality's
    *force* is ``μ_j ‖∇g_j‖ / (‖∇_y f‖ + φ)``: its share of the stationarity balance ``∇_y f +
    Σ μ_j ∇g_j = 0``, with the floor ``φ = √eps ‖H y‖∞`` (the size of the gradient's terms) where
    ``∇_y f`` is below ``√eps (1 + |f|) / (1 + ‖y‖∞)`` and may vanish at the answer, else
    ``√eps |f| / (‖y‖∞ + tol)``; every part scales with the objective.

    - With the solver's ``μ``: active where the force exceeds ``√tol``, or where the constraint
      is tight and ``μ_j > 0`` (weakly active: dropping it changes the gradient).
    - Otherwise the candidates are the inequalities within the loose distance
      ``√tol · (‖y‖∞ + √tol)`` of their boundary (an inexact external solution is accurate to
      far less than ``tol``); least-squares multipliers over the equalities and the candidates
      decide: a candidate with a force above ``√tol`` is active, and so is a tight one
      (distance ``≤ tol · (‖y‖∞ + tol)``; a negative multiplier there is reported by the
      optimality check).

    A tight inequality whose force is within ``tol`` of zero is weakly active (``g_j = 0`` and
    ``μ_j = 0`` to the accuracy of the solution): the decision is ambiguous and reported. Where
    ``∇_y f`` itself vanishes (the unconstrained minimiser lies on the boundary: sparsemax of a
    one-hot ``x``, where ``f``, ``∇f`` and every multiplier are rounding), the force has no unit;
    a tight row whose force is not decisive (at most ``√tol``) is then also weakly active when
    ``μ_j ‖∇g_j‖ ≤ tol · ‖H y‖∞``, the size of the gradient's terms (``curvature()``, the
    ``(b,)`` norms of the Lagrangian's Hessian times ``y``, computed only when such a row exists).
    ``norms``: the ``‖∇g_j‖ (b, q)`` if at hand.
    """
    b = g.shape[0]
    eq = torch.ones(b, p, dtype=torch.bool, device=g.device)
    rtol = torch.finfo(g.dtype).eps ** 0.5
    if curvature is not None:
        curvature = functools.cache(curvature)  # (b,) ‖H y‖∞, one product or HVP, at most once
    gnorm, y_size = grad_f.norm(dim=-1), y.abs().amax(-1)
    # the force's unit where ∇f itself vanishes at the answer: the size of its terms, ‖H y‖∞
    # (computed only there); elsewhere √eps |f| per the length of y. (With √eps (1 + |f|) /
    # (1 + ‖y‖∞) everywhere an objective of 1e-12 had every force below √tol: rows dropped.)
    floor = rtol * f.abs() / (y_size + tol)
    small = gnorm <= rtol * (1 + f.abs()) / (1 + y_size)
    if curvature is not None and bool(small.any()):
        floor = torch.where(small, rtol * curvature(), floor)
    unit = (gnorm + floor.clamp_min(torch.finfo(g.dtype).tiny)).unsqueeze(-1)
    norms = _row_norms(A[:, p:]) if norms is None else norms
    dual = tol ** 0.5

    def force(m: Tensor) -> Tensor:
        return m * norms / unit

    def weak(m: Tensor, strength: Tensor) -> Tensor:
        rows = tight & (strength.abs() <= tol)
        undecided = tight & ~rows & (strength.abs() <= dual)
        if curvature is not None and bool(undecided.any()):
            rows |= undecided & ((m * norms).abs() <= tol * curvature().unsqueeze(-1))
        return rows.any(-1)

    if mu is not None:
        strength = force(mu)
        on = (strength > dual) | (tight & (mu > 0))  # weakly active: tight, positive μ
        return torch.cat([eq, on], dim=1), weak(mu, strength)
    candidates = _tight(g, norms, y, dual)
    nu = least_squares_multipliers(grad_f, A, torch.cat([eq, candidates], dim=1))
    strength = force(nu[:, p:])
    ineq = candidates & ((strength > dual) | tight)
    return torch.cat([eq, ineq], dim=1), weak(nu[:, p:], strength)


@dataclass
class Optimality:
    """Per-sample optimality measures of a point (each ``(b,)``) and the tolerance they meet.

    - ``step``: the Newton/KKT step ``d`` (``[H Aᵀ; A 0] [d; dν] = −[∇_y L; c]``) relative to the
      point, ``‖d‖∞ / (‖y‖∞ + tol)`` — small at a stationary, feasible point, at every scale of
      ``y`` (a ball of radius 1e-3 is judged as one of radius 1);
    - ``violation``: the first-order distance to the constraints, ``max_j c_j⁺ / ‖∇_y c_j‖``
      (``|h_j|`` for equalities), relative to ``‖y‖∞ + tol``; ``inf`` where a violated row has a
      zero gradient;
    - ``wrong_sign``: ``max(−μ_j, 0) / (1 + ‖∇_y f‖∞)`` over the tight or active inequalities.

    A sample is optimal when all three are at most ``tol``.
    """

    step: Tensor
    violation: Tensor
    wrong_sign: Tensor
    tol: float

    @property
    def optimal(self) -> Tensor:
        return (self.step <= self.tol) & (self.violation <= self.tol) & (self.wrong_sign <= self.tol)

    def report(self, strict: bool) -> None:
        """Warn (raise when ``strict``) about every sample that is not optimal."""
        tol = self.tol
        infeasible = ~(self.violation <= tol)
        if infeasible.any():
            report(OptimalityWarning,
                   f"the forward solution violates the constraints at samples "
                   f"{describe_samples(infeasible)}: distance to the constraints up to "
                   f"{self.violation[infeasible].max().item():.3g} relative to |y| (tol "
                   f"{tol:g}). Gradients at an infeasible point are unreliable.", strict)
        bad = ~(self.step <= tol)
        if bad.any():
            report(OptimalityWarning,
                   f"the forward solution fails the optimality check at samples "
                   f"{describe_samples(bad)}: relative Newton/KKT step up to "
                   f"{self.step[bad].max().item():.3g} > tol {tol:g}. The solver did not reach a "
                   "stationary, feasible point; gradients there are unreliable.", strict)
        wrong = ~(self.wrong_sign <= tol)
        if wrong.any():
            report(OptimalityWarning,
                   f"inequality multipliers with the wrong sign at samples "
                   f"{describe_samples(wrong)} (up to {self.wrong_sign[wrong].max().item():.3g} "
                   "relative to 1 + |grad f|): the point is not a KKT point of the "
                   "inequality-constrained problem.", strict)


class KKTPoint:
    """The KKT point of a problem at ``y`` (built by :func:`kkt_point`; see the module docstring).

    Attributes (``r = p + q`` constraint rows; tensors with a graph are marked):
        y: the point ``(b, m)``, a leaf requiring grad.
        f: the objective ``(b,)``.
        grad_f: ``∇_y f (b, m)`` (with its graph only for an unconstrained problem).
        c: ``[h; g] (b, r)`` (graph).
        A: ``∂c/∂y (b, r, m)``.
        p, q: the numbers of equality and inequality rows.
        active: ``(b, r)`` rows treated as equalities.
        nu: ``[λ; μ] (b, r)``, zero on inactive rows.
        lagrangian_grad: ``∇_y L (b, m)`` (graph).
    """

    def __init__(self, y: Tensor, f: Tensor, grad_f: Tensor, c: Tensor, A: Tensor, p: int,
                 active: Tensor, nu: Tensor, mu_given: Tensor | None, lagrangian_grad: Tensor,
                 tight: Tensor, jacobian: Tensor | None = None):
        self.y, self.f, self.grad_f, self.c, self.A, self.p = y, f, grad_f, c, A, p
        self.q = c.shape[1] - p
        self.active, self.nu, self.lagrangian_grad = active, nu, lagrangian_grad
        self._mu_given, self._tight, self._jacobian = mu_given, tight, jacobian
        self._hessian: Tensor | None = None
        self._null: NullSpace | None = None

    @property
    def constrained(self) -> bool:
        return self.c.shape[1] > 0

    @property
    def mu(self) -> Tensor:
        """The inequality multipliers ``(b, q)``."""
        return self.nu[:, self.p:]

    @property
    def lam(self) -> Tensor:
        """The equality multipliers ``(b, p)``."""
        return self.nu[:, :self.p]

    def hvp(self, P: Tensor) -> Tensor:
        """``H P`` for ``P (k, b, m)``, ``H = ∇²_yy L`` per sample, by double backward."""
        if P.shape[0] == 1:
            return grad(self.lagrangian_grad, [self.y], P[0], retain_graph=True)[0].unsqueeze(0)
        return torch.stack([grad(self.lagrangian_grad, [self.y], Pk, retain_graph=True)[0]
                            for Pk in P])

    def hessian(self) -> Tensor:
        """The dense symmetric ``H = ∇²_yy L (b, m, m)`` (one batched backward pass)."""
        if self._hessian is None:
            H = batched_jacobian(self.lagrangian_grad, self.y).detach()
            self._hessian = 0.5 * (H + H.transpose(-1, -2))
        return self._hessian

    def null_space(self) -> NullSpace:
        """The null space of the active rows of ``A``."""
        if self._null is None:
            self._null = NullSpace(self.A, self.active)
        return self._null

    def operator(self, damping: float = 0.0, convexify: bool = False,
                 factor: Tensor | None = None) -> KKTOperator:
        """The KKT matrix ``[H + γI, Aᵀ; A, 0]`` (active rows) for a linear solver, with a
        Cholesky ``factor`` of ``H + γI`` already at hand if given (see :class:`KKTOperator`)."""
        return KKTOperator(self.hvp, self.y.shape[1], self.A if self.constrained else None,
                           self.active if self.constrained else None, self.hessian, damping,
                           convexify, null_space=self.null_space if self.constrained else None,
                           factor=factor)

    def residual(self) -> tuple[Tensor, Tensor]:
        """Right-hand sides ``(−∇_y L, −c)`` of the Newton/KKT step, detached: ``(b, m), (b, r)``."""
        return -self.lagrangian_grad.detach(), -self.c.detach()

    def report_rank(self, strict: bool, tol: float) -> Tensor:
        """Warn where an active constraint is degenerate; returns that ``(b,)`` mask.

        Row ``j`` is degenerate when its gradient vanishes on the scale of its own curvature,
        ``‖∇c_j‖ < tol · ‖∇²c_j â_j‖ · ‖y‖`` (``â_j`` the unit gradient): linear independence of
        the constraint gradients fails and the KKT conditions no longer determine the gradient
        (``h = (‖y‖² − 1)²`` rather than ``‖y‖² − 1``). Redundant constraints (dependent but
        non-vanishing gradients, e.g. both marginals of a transport plan) are not degenerate: the
        solve uses their minimum-norm multipliers and the gradient is right.
        """
        b = self.y.shape[0]
        none = torch.zeros(b, dtype=torch.bool, device=self.y.device)
        if not self.constrained or not self.c.requires_grad:
            return none
        with torch.enable_grad():
            J = self._jacobian if self._jacobian is not None else batched_jacobian(
                self.c, self.y, create_graph=True)
            if not J.requires_grad:  # linear constraints: no curvature, never degenerate
                return none
            norms = self.A.norm(dim=-1, keepdim=True)
            # along the unit gradient; along y's direction where the gradient is exactly zero
            probe = torch.where(norms > 0, self.A, self.y.detach().unsqueeze(1).expand_as(self.A))
            probe = probe / probe.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(probe.dtype).tiny)
            curvature = batched_jacobian((J * probe).sum(-1), self.y).detach().norm(dim=-1)
            norms = norms.squeeze(-1)
        length = self.y.detach().norm(dim=-1, keepdim=True)
        rows = self.active & (norms < tol * curvature * length)
        degenerate = rows.any(-1)
        if degenerate.any():
            i, j = rows.nonzero()[0].tolist()
            report(SingularSystemWarning,
                   f"constraint gradients vanish at the solution at samples "
                   f"{describe_samples(degenerate)} (row {j} of sample {i}: |grad c| = "
                   f"{norms[i, j].item():.3g} against curvature {curvature[i, j].item():.3g} "
                   f"over |y| = {length[i, 0].item():.3g}): the constraints are degenerate "
                   "(linearly dependent to first order) and the KKT conditions do not determine "
                   "the gradient. Write each constraint so that its gradient does not vanish on "
                   "the feasible set (e.g. |y|^2 - 1 rather than (|y|^2 - 1)^2).", strict)
        return degenerate

    def optimality(self, step: Tensor, tol: float) -> Optimality:
        """The :class:`Optimality` of this point given its Newton/KKT step ``step (b, m)``."""
        y = self.y.detach()
        scale = y.abs().amax(-1) + tol  # relative to the point; absolute only below tol
        c = self.c.detach()
        zeros = torch.zeros_like(scale)
        if self.constrained:
            violation = torch.cat([c[:, :self.p].abs(), c[:, self.p:].clamp_min(0)], dim=1)
            distance = violation / self.A.norm(dim=-1)  # inf where a violated row has no gradient
            distance = torch.where(violation > 0, distance, torch.zeros_like(distance))
            violation = distance.amax(-1) / scale
        else:
            violation = zeros
        if self.q:
            mu = self._mu_given if self._mu_given is not None else self.mu
            considered = self.active[:, self.p:] | self._tight
            wrong = (-mu * considered.to(mu.dtype)).clamp_min(0).amax(-1)
            wrong_sign = wrong / (1 + self.grad_f.detach().abs().amax(-1))
        else:
            wrong_sign = zeros
        return Optimality(step.abs().amax(-1) / scale, violation, wrong_sign, tol)

    def surrogate(self, u: Tensor, w: Tensor | None) -> Tensor:
        """``⟨∇_y L, u⟩ + ⟨c, w⟩``: its gradient in ``(x, θ)`` is the backward pass's (see
        :mod:`ddnlib.engine`) with ``u (b, m)``, ``w (b, r)`` held fixed (``w`` unused without
        constraints)."""
        out = (self.lagrangian_grad * u.detach()).sum()
        return out + (self.c * w.detach()).sum() if self.constrained else out


def kkt_point(problem: "Problem", y: Tensor, solution: Solution | None, options: "Options", *,
              multipliers: Tensor | None = None, active: Tensor | None = None) -> KKTPoint:
    """Build the :class:`KKTPoint` of ``problem`` at ``y (b, *out)`` (graph enabled inside).

    ``solution`` may carry the solver's multipliers (used when it carries every kind the problem
    has). A forward solver iterating on its own estimates passes ``multipliers (b, r)`` and its
    working set ``active (b, r)`` instead.
    """
    b = problem.batch
    where = f"{type(problem.node).__name__}.solve"
    with torch.enable_grad():
        yf = problem.flatten(y.detach()).clone().requires_grad_()
        f = problem.objective(yf)
        if problem.constrained:
            h, g = problem.eq(yf), problem.ineq(yf)
            c = torch.cat([h, g], dim=1)
        else:
            c = yf.new_zeros(b, 0)
        if c.shape[1] == 0:
            grad_f = grad(f.sum(), [yf], create_graph=True)[0]
            none = torch.zeros(b, 0, dtype=torch.bool, device=yf.device)
            return KKTPoint(yf, f.detach(), grad_f, c, yf.new_zeros(b, 0, problem.m), 0, none,
                            c.detach(), None, grad_f, none)
        p, q = h.shape[1], g.shape[1]
        active_tol = options.tol("active_tol", yf.dtype)
        lam = mu = None
        if solution is not None:
            lam = multipliers_tensor(solution.eq_multipliers, b, p, yf.dtype, "'lambda'", where)
            mu = multipliers_tensor(solution.ineq_multipliers, b, q, yf.dtype, "'mu'", where)
        handed = _handed(solution, "hessian", (b, problem.m, problem.m), yf.dtype)
        A_graph = _handed(solution, "constraint_jacobian", (b, p + q, problem.m), yf.dtype)
        if A_graph is None:  # (an affine Jacobian handed over has no graph: never degenerate)
            A_graph = batched_jacobian(c, yf, create_graph=True)  # its graph serves report_rank
        A = A_graph.detach()
        if multipliers is None and (lam is not None or not p) and (mu is not None or not q):
            multipliers = torch.cat([lam if p else h.new_zeros(b, 0),
                                     mu if q else g.new_zeros(b, 0)], dim=1)
        if multipliers is not None:
            # known multipliers: ∇_y L in one backward pass, ∇_y f from it
            known = multipliers.detach()
            full = grad(f.sum() + (c * known).sum(), [yf], create_graph=True)[0]
            grad_f = full.detach() - _transpose_times(A, known)
        else:
            grad_f_graph = grad(f.sum(), [yf], create_graph=True)[0]
            grad_f = grad_f_graph.detach()
        f = f.detach()
        norms = _row_norms(A[:, p:])
        tight = _tight(g.detach(), norms, yf.detach(), active_tol)
        if active is None and not q:
            active = torch.ones_like(c, dtype=torch.bool)
        elif active is None:
            gradient = full if multipliers is not None else grad_f_graph

            def curvature() -> Tensor:  # ‖H y‖∞ per sample, H the Hessian of f (+ known ν c)
                if handed is not None:  # the solver's (a QP's constant ∇²L): one product
                    return (handed @ yf.detach().unsqueeze(-1)).abs().amax((-2, -1))
                Hy = grad(gradient, [yf], yf.detach(), retain_graph=True)[0]
                return Hy.detach().abs().amax(-1)

            active, ambiguous = active_set(grad_f, f, A, p, g.detach(), tight, mu,
                                           yf.detach(), active_tol, norms, curvature)
            if ambiguous.any():
                report(OptimalityWarning,
                       f"weakly active inequality constraints at samples "
                       f"{describe_samples(ambiguous)}: g_j = 0 with multiplier mu_j = 0, where "
                       "the solution map is not differentiable; the gradient returned is the "
                       "one with these constraints held active (one one-sided derivative).",
                       options.strict)
        if multipliers is None:
            nu = least_squares_multipliers(grad_f, A, active) * active.to(grad_f.dtype)
            lagrangian_grad = grad_f_graph + grad((c * nu).sum(), [yf], create_graph=True)[0]
        else:
            nu = known * active.to(known.dtype)
            dropped = known - nu  # multipliers of rows the active set leaves out
            lagrangian_grad = full
            if bool((dropped != 0).any()):
                lagrangian_grad = full - _transpose_times(A_graph, dropped)
    point = KKTPoint(yf, f, grad_f, c, A, p, active, nu, mu, lagrangian_grad, tight, A_graph)
    point._hessian = handed
    return point


def _transpose_times(A: Tensor, w: Tensor) -> Tensor:
    """``Aᵀ w (b, m)`` per sample for ``A (b, r, m)``, ``w (b, r)``: one matrix product where ``A``
    is shared by the batch (stride 0)."""
    if shared_by_batch(A):
        return w @ A[0]
    return (w.unsqueeze(-2) @ A)[..., 0, :]


def _handed(solution: Solution | None, name: str, shape: tuple, dtype: torch.dtype
            ) -> Tensor | None:
    """The derivative ``name`` that the forward solver handed over in ``solution`` (see
    :class:`~ddnlib.Solution`), detached in ``dtype``, where it has ``shape``; else ``None``."""
    value = getattr(solution, name, None) if solution is not None else None
    if value is None or tuple(value.shape) != shape:
        return None
    return value.detach().to(dtype)
