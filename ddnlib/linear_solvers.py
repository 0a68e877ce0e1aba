"""Linear solvers for the per-sample KKT systems of the backward pass and of the forward solvers.

Every system has the form, per sample,

    [H + γI  Aᵀ] [U]   [By]
    [A       0 ] [W] = [Bc],     By (b, m, k),  Bc (b, r, k),

where only the rows of ``A (b, r, m)`` marked active take part (inactive rows get ``W = 0``) and
``r = 0`` is the plain Hessian system ``(H + γI) U = By``. A :class:`KKTOperator` describes the
matrix (a Hessian-vector product, optionally a dense Hessian, the constraint Jacobian); a
:class:`LinearSolver` — :class:`Dense`, :class:`CG` or :class:`Auto` — solves it:

    U, W, info = solver.solve(operator, By, Bc)

``info`` (:class:`~ddnlib.linalg.SolveInfo`) marks per sample what went wrong, and
:func:`report_solve` turns it into a warning (an error in strict mode). With
``operator.convexify`` (the forward solvers' Newton and SQP steps) a sample whose (reduced) Hessian
is not positive definite is solved with the smallest Levenberg shift ``γ = s·10ᵏ`` that makes it so
(``s = max |H_ii|``, 1 where that is 0), or by truncated CG, instead of the exact indefinite system.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonConvergenceWarning, SingularSystemWarning, describe_samples, report
from .linalg import (NullSpace, SolveInfo, cg, jacobi_scaling, pinned_coordinates,
                     shared_by_batch, solve_kkt, solve_spd, trusted_cholesky)

__all__ = ["KKTOperator", "LinearSolver", "Dense", "CG", "Auto", "report_solve"]

_SHIFTS = range(-8, 17)  # Levenberg shifts s·10ᵏ tried in turn


class KKTOperator:
    """The KKT matrix of a batch of problems.

    Args:
        hvp: ``P (k, b, m) -> H P (k, b, m)``, the Hessian (of the Lagrangian) applied per sample.
        m: the number of unknowns per sample.
        A: the constraint Jacobian ``(b, r, m)`` (``None``: no constraints).
        active: ``(b, r)`` mask of the rows that take part (``None``: all).
        hessian: ``() -> H (b, m, m)``, the dense symmetric Hessian, evaluated at most once
            (``None``: matrix-free solvers only).
        damping: ``γ ≥ 0`` added to ``H``.
        convexify: shift or truncate where the (reduced) Hessian is not positive definite.
        null_space: ``() -> NullSpace`` of the active rows of ``A`` (``None``: computed here).
        factor: a Cholesky factor ``(b, m, m)`` of ``H + γI`` already at hand (the forward
            solver's, :attr:`~ddnlib.Solution.hessian_cholesky`): :class:`Dense` solves an
            unconstrained system with it and never forms ``H``.
    """

    def __init__(self, hvp: Callable[[Tensor], Tensor], m: int, A: Tensor | None = None,
                 active: Tensor | None = None, hessian: Callable[[], Tensor] | None = None,
                 damping: float = 0.0, convexify: bool = False,
                 null_space: Callable[[], NullSpace] | None = None,
                 factor: Tensor | None = None):
        self._hvp, self.m, self.damping, self.convexify = hvp, m, float(damping), convexify
        self.factor = factor
        self.A = A
        self.active = (active if active is not None or A is None
                       else torch.ones(A.shape[:2], dtype=torch.bool, device=A.device))
        self._hessian, self._dense = hessian, None
        self._null_space, self._null, self._pin = null_space, None, None

    @property
    def constrained(self) -> bool:
        return self.A is not None and self.A.shape[1] > 0

    @property
    def rows(self) -> int:
        """Rows of the per-sample system, ``m + r``."""
        return self.m + (self.A.shape[1] if self.A is not None else 0)

    def hvp(self, P: Tensor) -> Tensor:
        """``(H + γI) P`` for ``P (k, b, m)``.

        Non-finite entries at coordinates that an active bound pins are set to zero: the
        curvature there (infinite for ``y^1.5`` at ``y = 0``) never enters the projected solve.
        """
        out = self._hvp(P)
        if self.constrained:
            out = torch.where(self._pinned() & ~torch.isfinite(out), torch.zeros_like(out), out)
        return out + self.damping * P if self.damping else out

    def _pinned(self) -> Tensor:
        if self._pin is None:
            self._pin = pinned_coordinates(self.A, self.active)
        return self._pin

    def hessian(self) -> Tensor:
        """The dense symmetric ``H (b, m, m)`` (without the damping)."""
        if self._dense is None:
            if self._hessian is None:
                raise ValueError("this KKTOperator has no dense Hessian: use a matrix-free solver")
            self._dense = self._hessian()
        return self._dense

    def null_space(self) -> NullSpace:
        """The projector onto the null space of the active rows of ``A``."""
        if self._null is None:
            self._null = (self._null_space() if self._null_space is not None
                          else NullSpace(self.A, self.active))
        return self._null


class LinearSolver:
    """Solves ``[H Aᵀ; A 0] [U; W] = [By; Bc]`` per sample (see the module docstring)."""

    def solve(self, op: KKTOperator, By: Tensor, Bc: Tensor, rtol: Tensor | None = None
              ) -> tuple[Tensor, Tensor, SolveInfo]:
        """``(U (b, m, k), W (b, r, k), info)``.

        ``rtol`` (broadcasting to ``(k, b)``) is the relative residual each right-hand side needs;
        iterative solvers may stop there, direct ones ignore it.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Dense(LinearSolver):
    """Dense per-sample factorisation: Cholesky of ``H`` (or of the Schur complement
    ``A H⁻¹ Aᵀ``) where it is trustworthy; otherwise minimum-norm least squares (no constraints)
    or the null-space method (:func:`~ddnlib.linalg.solve_kkt`). No batched LU (wrong on CPU
    with more than one thread at size ≳ 150 in torch 2.13). An operator's ``factor`` is used as
    it is for an unconstrained system."""

    def solve(self, op, By, Bc, rtol=None):
        if op.factor is not None and not op.constrained:
            none = torch.zeros(By.shape[0], dtype=torch.bool, device=By.device)
            return (torch.cholesky_solve(By, op.factor), By.new_zeros(By.shape[0], 0, By.shape[-1]),
                    SolveInfo(not_pd=none, singular=none, factor=op.factor))
        H = op.hessian()
        U, W, info = _dense(H, op, By, Bc, op.damping)
        if op.convexify and info.not_pd.any():
            eye = torch.eye(op.m, dtype=H.dtype, device=H.device)
            scale = H.diagonal(dim1=-2, dim2=-1).abs().amax(-1)  # shifts relative to H's size
            scale = torch.where((scale > 0) & torch.isfinite(scale), scale, 1.0)
            todo = info.not_pd.clone()
            for k in _SHIFTS:
                idx = todo.nonzero().flatten()
                gamma = op.damping + scale[idx] * 10.0**k
                Uk, Wk, info_k = _dense(H[idx] + gamma[:, None, None] * eye, op, By[idx], Bc[idx],
                                        0.0, idx)
                ok = ~info_k.not_pd
                U[idx[ok]], W[idx[ok]] = Uk[ok], Wk[ok]
                todo[idx[ok]] = False
                if not todo.any():
                    break
        return U, W, info


def _dense(H: Tensor, op: KKTOperator, By: Tensor, Bc: Tensor, damping: float,
           idx: Tensor | None = None) -> tuple[Tensor, Tensor, SolveInfo]:
    if damping:
        H = H + damping * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    D = jacobi_scaling(H)
    if D is not None:  # solve (D H D) (D⁻¹ U) = D By: the same system, its diagonal made one
        H = _keep_shared(H, D, lambda M, d: d.unsqueeze(-1) * M * d.unsqueeze(-2))
        By = D.unsqueeze(-1) * By
    if not op.constrained:
        U, info = solve_spd(H, By)
        W = By.new_zeros(By.shape[0], 0, By.shape[-1])
        if D is not None and info.factor is not None:  # D H D = L Lᵀ, so H = (D⁻¹L)(D⁻¹L)ᵀ
            info = dataclasses.replace(info, factor=info.factor / D.unsqueeze(-1))
    else:
        A, active = (op.A, op.active) if idx is None else (op.A[idx], op.active[idx])
        if D is not None:
            A = _keep_shared(A, D, lambda M, d: M * d.unsqueeze(-2))
        U, W, info = solve_kkt(H, A, active, By, Bc)
    if not op.convexify:
        info = _nearly_singular(H, info, op.constrained)
    return (U, W, info) if D is None else (D.unsqueeze(-1) * U, W, info)


def _nearly_singular(H: Tensor, info: SolveInfo, constrained: bool) -> SolveInfo:
    """``info`` with the samples whose (reduced) Hessian is singular to within ``√eps`` of its
    size marked ``singular`` too, with their smallest eigenvalue.

    A rank test at rounding level (``m · eps``) misses a matrix that is singular only to the
    accuracy of the forward solution (a repeated top eigenvalue: ``Zᵀ H Z`` with an eigenvalue of
    8e-14 instead of 0); solving with it amplifies that inaccuracy by ``1/λ_min`` (a gradient of
    2e12). Below ``√eps · max |H|`` (a condition number above ``1/√eps``, 7e7 in float64) the
    gradient is no longer determined to more than the forward's accuracy allows: reported."""
    tol = torch.finfo(H.dtype).eps ** 0.5
    scale = H.abs().amax((-2, -1))
    if constrained:
        if info.min_eig is None:
            return info
        eig = info.min_eig
        near = torch.isfinite(eig) & (eig <= tol * scale) & ~info.not_pd
    else:
        if info.factor is not None:  # every sample's Cholesky factor was trusted
            return info
        _, failed, weak = trusted_cholesky(H)
        near = weak & ~failed & ~info.not_pd
        if not bool(near.any()):
            return info
        eig = torch.full_like(scale, float("inf"))
        eig[near] = torch.linalg.eigvalsh(H[near])[..., 0]
    if not bool((near & ~info.singular).any()):
        return info
    return dataclasses.replace(info, singular=info.singular | near, min_eig=eig)


def _keep_shared(M: Tensor, D: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``fn(M, D)``, computed once and expanded again where ``M`` and ``D`` are both shared by the
    batch (stride 0)."""
    if shared_by_batch(M) and D.stride(0) == 0:
        return fn(M[:1], D[:1]).expand(M.shape)
    return fn(M, D)


@dataclass(frozen=True)
class CG(LinearSolver):
    """Matrix-free (projected) conjugate gradients on Hessian-vector products.

    With constraints: ``U = A⁺ Bc + Z``, ``Z`` by CG in the null space of the active ``A``, and
    ``W = (A⁺)ᵀ (By − H U)``. Stops at the relative residual ``tol`` (``None``: ``√eps``) or after
    ``max_iter`` iterations (``None``: ``2 m + 10``). With ``op.convexify`` a direction of
    non-positive curvature ends the iteration there (truncated CG); a sample that met it before
    moving gets the projected right-hand side (steepest descent) instead.
    """

    tol: float | None = None
    max_iter: int | None = None

    def solve(self, op, By, Bc, rtol=None):
        rhs = By.movedim(-1, 0)  # (k, b, m)
        dtype = rhs.dtype
        tol = self.tol if self.tol is not None else torch.finfo(dtype).eps ** 0.5
        if rtol is not None:
            tol = torch.maximum(torch.as_tensor(rtol, dtype=dtype, device=rhs.device),
                                torch.tensor(tol, dtype=dtype, device=rhs.device))
        max_iter = self.max_iter or 2 * op.m + 10
        if not op.constrained:
            X, info = cg(op.hvp, rhs, tol, max_iter)
            if op.convexify:
                X = _steepest_where_stuck(X, rhs, info)
            return X.movedim(0, -1), By.new_zeros(By.shape[0], 0, By.shape[-1]), info
        null = op.null_space()
        particular = null.least_norm(Bc.movedim(-1, 0))
        Z, info = cg(op.hvp, rhs - op.hvp(particular), tol, max_iter, project=null)
        if op.convexify:
            Z = _steepest_where_stuck(Z, null(rhs - op.hvp(particular)), info)
        U = particular + Z
        W = null.coefficients(rhs - op.hvp(U))
        return U.movedim(0, -1), W.movedim(0, -1), info


def _steepest_where_stuck(X: Tensor, fallback: Tensor, info: SolveInfo) -> Tensor:
    stuck = (info.not_pd | info.singular) & (X == 0).all(-1).all(0)
    return torch.where(stuck[None, :, None], fallback, X)


@dataclass(frozen=True)
class Auto(LinearSolver):
    """:class:`Dense` when the per-sample system has at most ``dense_max`` rows, else ``cg``."""

    dense_max: int = 64
    dense: LinearSolver = Dense()
    cg: LinearSolver = CG()

    def choose(self, op: KKTOperator) -> LinearSolver:
        return self.dense if op.rows <= self.dense_max else self.cg

    def solve(self, op, By, Bc, rtol=None):
        return self.choose(op).solve(op, By, Bc, rtol)


def chosen(solver: LinearSolver, op: KKTOperator) -> LinearSolver:
    """The solver that actually runs on ``op`` (``Auto`` resolved)."""
    return solver.choose(op) if isinstance(solver, Auto) else solver


def report_solve(info: SolveInfo, strict: bool, what: str, H: Tensor | None = None) -> None:
    """Warn (raise when ``strict``) about the samples ``info`` marks; ``what`` names the matrix."""
    if info.singular.any():
        detail = ""
        if info.min_eig is not None:
            detail = (f" (smallest reduced-Hessian eigenvalue "
                      f"{info.min_eig[info.singular].abs().min().item():.3g})")
        report(SingularSystemWarning,
               f"{what} is singular, rank deficient or nearly singular at samples "
               f"{describe_samples(info.singular)}"
               f"{detail}: the gradient is not determined there, or only to far less than the "
               "forward solution's accuracy (the minimum-norm least-squares solution is used "
               "where the matrix is singular). Add damping "
               "(Options(damping=...)) or check that the problem has a unique solution.", strict)
    elif info.not_pd.any():
        detail = ""
        if info.min_eig is not None:
            detail = f" (smallest reduced-Hessian eigenvalue {info.min_eig.min().item():.3g})"
        elif H is not None:
            eig = torch.linalg.eigvalsh(H[info.not_pd]).amin(-1)
            detail = f" (smallest eigenvalue {eig.min().item():.3g})"
        report(SingularSystemWarning,
               f"{what} is not positive definite at samples {describe_samples(info.not_pd)}{detail}; "
               "the forward solution may not be a strict local minimum.", strict)
    if info.not_converged is not None and info.not_converged.any():
        report(NonConvergenceWarning,
               f"CG did not converge for {what} at samples {describe_samples(info.not_converged)}; "
               f"worst relative residual {info.residual.max().item():.3g}. Raise the CG iteration "
               "cap (Options(cg_max_iter=...) or CG(max_iter=...)) or use a dense solver.", strict)
