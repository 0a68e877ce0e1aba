"""Batched linear solves for the Hessian and KKT systems of the engine and the solvers.

Dense systems go through Cholesky (batched Cholesky is reliable on every backend) with a
least-squares fallback for samples that are not positive definite. Batched LU
(``torch.linalg.solve``, ``lu_factor``, ``inv``) is deliberately avoided: on CPU with more than one
thread it returns wrong answers for batched matrices of size ≳ 150 in torch 2.13.

Matrix-free systems go through batched conjugate gradients on a Hessian-vector product, projected
onto the null space of the active constraint Jacobian when there are constraints.

Shapes: ``H (b, m, m)``, ``A (b, p, m)``, right-hand sides ``(b, m, k)`` and ``(b, p, k)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SolveInfo", "solve_spd", "solve_kkt", "cg", "NullSpace"]


@dataclass
class SolveInfo:
    """Per-sample diagnostics of one batched solve (boolean masks of shape ``(b,)``)."""

    not_pd: Tensor
    singular: Tensor
    not_converged: Tensor | None = None
    residual: Tensor | None = None


def _eye_like(H: Tensor) -> Tensor:
    return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)


def _lstsq(M: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares solve of ``M X = B`` (batched), with a rank-deficiency mask."""
    solution = torch.linalg.lstsq(M, B, driver="gelsd" if M.device.type == "cpu" else None)
    X = solution.solution
    n = M.shape[-1]
    if solution.rank is not None and solution.rank.numel() == M.shape[0]:
        singular = solution.rank < n
    else:
        singular = torch.linalg.matrix_rank(M) < n
    return X, singular


def solve_spd(H: Tensor, B: Tensor, damping: float = 0.0) -> tuple[Tensor, SolveInfo]:
    """Solve ``(H + γI) X = B`` per sample; Cholesky, least squares where not positive definite."""
    if damping:
        H = H + damping * _eye_like(H)
    L, info = torch.linalg.cholesky_ex(H)
    not_pd = info != 0
    X = torch.cholesky_solve(B, L)
    singular = torch.zeros_like(not_pd)
    if not_pd.any():
        X = X.clone()
        Xf, sing = _lstsq(H[not_pd], B[not_pd])
        X[not_pd] = Xf
        singular[not_pd] = sing
    return X, SolveInfo(not_pd=not_pd, singular=singular)


def solve_kkt(
    H: Tensor, A: Tensor, active: Tensor, By: Tensor, Bc: Tensor, damping: float = 0.0
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Solve the KKT system per sample.

    ``[[H, Aᵀ], [A, 0]] [U; W] = [By; Bc]`` where only the rows of ``A`` marked ``active (b, p)``
    take part; inactive rows get ``W = 0``. Schur complement with Cholesky when ``H`` is positive
    definite, least squares on the full matrix otherwise.
    """
    if damping:
        H = H + damping * _eye_like(H)
    act = active.to(A.dtype)
    A = A * act.unsqueeze(-1)
    Bc = Bc * act.unsqueeze(-1)
    inactive_diag = torch.diag_embed(1 - act)
    L, info = torch.linalg.cholesky_ex(H)
    not_pd = info != 0
    # Schur complement: S = A H⁻¹ Aᵀ (+ I on inactive rows), W = S⁻¹ (A H⁻¹ By − Bc).
    HiAt = torch.cholesky_solve(A.transpose(-1, -2), L)
    HiBy = torch.cholesky_solve(By, L)
    S = A @ HiAt + inactive_diag
    Ls, info_s = torch.linalg.cholesky_ex(S)
    W = torch.cholesky_solve(A @ HiBy - Bc, Ls)
    U = HiBy - HiAt @ W
    fallback = not_pd | (info_s != 0)
    singular = torch.zeros_like(not_pd)
    if fallback.any():
        U, W = U.clone(), W.clone()
        m = H.shape[-1]
        top = torch.cat([H[fallback], A[fallback].transpose(-1, -2)], dim=-1)
        bottom = torch.cat([A[fallback], inactive_diag[fallback]], dim=-1)
        K = torch.cat([top, bottom], dim=-2)
        X, sing = _lstsq(K, torch.cat([By[fallback], Bc[fallback]], dim=-2))
        U[fallback], W[fallback] = X[..., :m, :], X[..., m:, :]
        singular[fallback] = sing
    return U, W, SolveInfo(not_pd=not_pd, singular=singular)


class NullSpace:
    """Orthogonal projector onto ``{u : A u = 0}`` for the active rows of ``A (b, p, m)``."""

    def __init__(self, A: Tensor, active: Tensor):
        act = active.to(A.dtype)
        self.A = A * act.unsqueeze(-1)
        gram = self.A @ self.A.transpose(-1, -2) + torch.diag_embed(1 - act)
        self.L, info = torch.linalg.cholesky_ex(gram)
        self.rank_deficient = info != 0

    def least_norm(self, c: Tensor) -> Tensor:
        """``Aᵀ (A Aᵀ)⁻¹ c`` for ``c (k, b, p)``: the smallest ``u`` with ``A u = c``."""
        z = torch.cholesky_solve(c.movedim(0, -1), self.L)
        return (self.A.transpose(-1, -2) @ z).movedim(-1, 0)

    def coefficients(self, r: Tensor) -> Tensor:
        """``(A Aᵀ)⁻¹ A r`` for ``r (k, b, m)``: the multipliers with ``Aᵀ w`` closest to ``r``."""
        Ar = self.A @ r.movedim(0, -1)
        return torch.cholesky_solve(Ar, self.L).movedim(-1, 0)

    def __call__(self, r: Tensor) -> Tensor:
        return r - (self.A.transpose(-1, -2) @ self.coefficients(r).movedim(0, -1)).movedim(-1, 0)


def cg(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,
    tol: float | Tensor,
    max_iter: int,
    project: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, SolveInfo]:
    """Batched (projected) conjugate gradients for ``M x = rhs`` with ``rhs (k, b, m)``.

    ``matvec`` applies the symmetric operator to a ``(k, b, m)`` tensor. With ``project`` the
    iteration runs in the range of that projector (null-space CG for equality constraints).
    Each ``(k, b)`` system stops at ``‖r‖ ≤ tol ‖rhs‖`` (``tol`` a number or a ``(b,)`` tensor); a direction of non-positive curvature
    stops its system and marks the sample not positive definite.
    """
    P = project if project is not None else (lambda t: t)
    x = torch.zeros_like(rhs)
    r = P(rhs)
    p = r.clone()
    rr = (r * r).sum(-1)
    stop = tol**2 * (rhs * rhs).sum(-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    done = rr <= stop
    not_pd = torch.zeros_like(done)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        Mp = P(matvec(p))
        curvature = (p * Mp).sum(-1)
        negative = (curvature <= 0) & ~done
        not_pd |= negative
        done |= negative
        alpha = torch.where(done, torch.zeros_like(rr), rr / curvature.where(~done, torch.ones_like(rr)))
        x = x + alpha.unsqueeze(-1) * p
        r = r - alpha.unsqueeze(-1) * Mp
        rr_new = (r * r).sum(-1)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / rr.where(~done, torch.ones_like(rr)))
        p = r + beta.unsqueeze(-1) * p
        rr = torch.where(done, rr, rr_new)
        done |= rr <= stop
    residual = (rr / (rhs * rhs).sum(-1).clamp_min(torch.finfo(rhs.dtype).tiny)).sqrt()
    not_pd = not_pd.any(0)  # per sample, over the k right-hand sides
    return x, SolveInfo(not_pd=not_pd, singular=torch.zeros_like(not_pd),
                        not_converged=(~done).any(0), residual=residual.amax(0))
