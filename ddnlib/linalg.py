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

__all__ = ["NullSpace", "SolveInfo", "all_finite", "cg", "jacobi_scaling", "lstsq",
           "pinned_coordinates", "shared_by_batch", "solve_kkt", "solve_spd", "trusted_cholesky",
           "unit_floor"]


@dataclass
class SolveInfo:
    """Per-sample diagnostics of one batched solve (boolean masks of shape ``(b,)``)."""

    not_pd: Tensor
    singular: Tensor
    not_converged: Tensor | None = None
    residual: Tensor | None = None
    min_eig: Tensor | None = None  # smallest eigenvalue of the (reduced) Hessian where not_pd
    factor: Tensor | None = None  # Cholesky factor of the matrix solved, where all were trusted


def all_finite(*ts: Tensor) -> bool:
    """Whether every entry of ``ts`` is finite, by one sum each (a sum that overflows says no:
    the caller's per-sample path then decides)."""
    return bool(torch.isfinite(sum(t.sum() for t in ts)))


def _eye_like(H: Tensor) -> Tensor:
    return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)


def lstsq(M: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-norm least-squares solve of ``M X = B`` (batched), with a rank-deficiency mask.

    On CPU the rank-revealing driver ``gelsd`` is used: torch's default ``gelsy`` returns wrong,
    run-to-run different answers on matrices with zeroed columns (inactive constraint rows).
    """
    solution = torch.linalg.lstsq(M, B, driver="gelsd" if M.device.type == "cpu" else None)
    X = solution.solution
    n = M.shape[-1]
    if solution.rank is not None and solution.rank.numel() == M.shape[0]:
        singular = solution.rank < n
    else:
        singular = torch.linalg.matrix_rank(M) < n
    return X, singular


def unit_floor(size: Tensor) -> Tensor:
    """A problem's size as the floor of a relative test: ``min(size, 1)``, and 1 where ``size`` is
    not finite or below ``√tiny`` of the dtype (it says nothing of the scale there). Problems of
    size one or more are then judged as by ``1 + …``, smaller ones relative to their size."""
    floor = torch.finfo(size.dtype).tiny ** 0.5
    return torch.where(torch.isfinite(size) & (size >= floor), size.clamp_max(1.0), 1.0)


_JACOBI_RANGE = 0.25  # scale where min H_ii < eps^this · max H_ii (a wide range of curvatures)


def jacobi_scaling(H: Tensor) -> Tensor | None:
    """``D = |diag(H)|^(-1/2) (b, m)``, or ``None`` where no sample's diagonal spans a wide range
    (``min |H_ii| < eps^¼ max |H_ii|`` over the finite non-zero entries); an entry that is zero
    or not finite gets ``max |H_ii|^(-1/2)`` of its sample, so that ``D H D`` has every diagonal
    entry at most one in size (a shift of ``D H D`` is then on one scale for every coordinate).

    A symmetric positive definite ``H`` whose curvatures differ by orders of magnitude (``y log y``
    near ``y = 0``: ``H_ii = 1/y_i``) is well conditioned after this scaling (van der Sluis: the
    diagonal scaling is within a factor ``m`` of the best one), but its factorisation's pivots fall
    below the trusted level ``√eps · max |H|`` before it: without the scaling such a system is taken
    for singular and solved by a rank-truncated least squares, which cuts the small-curvature
    directions (a wrong gradient, or a Newton step that stalls)."""
    if H.shape[-1] < 2:
        return None
    shared = shared_by_batch(H)
    diag = (H[:1] if shared else H).diagonal(dim1=-2, dim2=-1)
    range_ = torch.finfo(H.dtype).eps ** _JACOBI_RANGE
    if not bool((diag.amin(-1) < range_ * diag.amax(-1)).any()):  # the common case, 4 operations
        return None
    size = diag.abs()
    usable = torch.isfinite(size) & (size > 0)
    top = torch.where(usable, size, 0.0).amax(-1, keepdim=True)
    low = torch.where(usable, size, torch.inf).amin(-1, keepdim=True)
    wide = usable.any(-1) & (low < range_ * top)[..., 0]
    if not bool(wide.any()):
        return None
    tiny = torch.finfo(H.dtype).tiny
    D = torch.where(usable, size, top).clamp_min(tiny).rsqrt()
    D = torch.where(wide.unsqueeze(-1), D, 1.0)  # the other samples as they are
    return D.expand(H.shape[0], -1) if shared else D


def trusted_cholesky(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched Cholesky ``(L, failed, weak)``: ``failed`` where it broke down (not positive
    definite), ``weak`` where it went through with a pivot ``L_ii² ≤ √eps · max |M|`` (or a
    non-finite one).

    ``cholesky_ex`` reports success on exactly singular matrices (pivots of ~1e-8 from rounding),
    so success alone says nothing about definiteness; a weak factor is not trusted. Where it went
    through, ``M`` is positive definite and ``max |M| = max_i M_ii``, the cheaper form used here.
    """
    L, info = torch.linalg.cholesky_ex(M)
    failed = info != 0
    scale = M.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(torch.finfo(M.dtype).tiny)
    pivots = L.diagonal(dim1=-2, dim2=-1).square().amin(-1) if M.shape[-1] else scale
    weak = ~failed & ~(pivots > torch.finfo(M.dtype).eps ** 0.5 * scale)
    return L, failed, weak


def pinned_coordinates(A: Tensor, active: Tensor) -> Tensor:
    """``(b, m)``: the coordinates ``y_j`` that an active row of ``A (b, r, m)`` with a single
    non-zero entry (a bound ``±y_j ≤ …`` or ``y_j = …``) fixes."""
    nonzero = A != 0
    single = (nonzero.sum(-1, keepdim=True) == 1) & active.unsqueeze(-1)
    return (single & nonzero).any(-2)


def solve_spd(H: Tensor, B: Tensor, damping: float = 0.0) -> tuple[Tensor, SolveInfo]:
    """Solve ``(H + γI) X = B`` per sample.

    Cholesky where ``H`` is safely positive definite; minimum-norm least squares (SVD) where the
    factorisation fails (``info.not_pd``) or is weak (near-singular relative to ``max |H|``);
    ``info.singular`` where ``H`` is rank deficient, i.e. ``X`` is not determined. Where every
    sample factorised, ``info.factor`` is the Cholesky factor of ``H + γI``.
    """
    if damping:
        H = H + damping * _eye_like(H)
    # a sample with a non-finite H or B (a NaN input) gets a NaN solution and is kept away from
    # LAPACK, which rejects the whole batch on non-finite values
    if all_finite(H, B):
        finite = None
    else:
        finite = torch.isfinite(H).all((-2, -1)) & torch.isfinite(B).all((-2, -1))
        H = torch.where(finite[:, None, None], H, _eye_like(H))
    L, not_pd, weak = trusted_cholesky(H)
    X = torch.cholesky_solve(B, L)
    singular = torch.zeros_like(not_pd)
    fallback = not_pd | weak
    if not bool(fallback.any()) and finite is None:
        return X, SolveInfo(not_pd=not_pd, singular=singular, factor=L)
    if fallback.any():
        X = X.clone()
        Xf, sing = lstsq(H[fallback], B[fallback])
        X[fallback] = Xf
        singular[fallback] = sing
    if finite is not None:
        X = torch.where(finite[:, None, None], X, float("nan"))
    return X, SolveInfo(not_pd=not_pd, singular=singular)


def solve_kkt(
    H: Tensor, A: Tensor, active: Tensor, By: Tensor, Bc: Tensor, damping: float = 0.0
) -> tuple[Tensor, Tensor, SolveInfo]:
    """Solve the KKT system per sample.

    ``[[H, Aᵀ], [A, 0]] [U; W] = [By; Bc]`` where only the rows of ``A`` marked ``active (b, p)``
    take part; inactive rows get ``W = 0``. The active rows are equilibrated (scaled to the size
    of ``H``), so that no decision depends on how the constraints are scaled. Schur complement
    ``S = A H⁻¹ Aᵀ`` with Cholesky where both ``H`` and ``S`` are safely positive definite;
    otherwise minimum-norm least squares (SVD) on the full matrix, which is exact whenever the KKT
    matrix is non-singular (e.g. ``H`` singular but positive on the null space of ``A``) and gives
    the minimum-norm multipliers for redundant constraints.

    ``info.not_pd`` marks samples whose *reduced* Hessian ``Zᵀ H Z`` (``Z`` a basis of the null
    space of the active ``A``) is not positive definite, i.e. not a strict local minimum;
    ``info.singular`` those where ``U`` is not determined (the KKT matrix has rank below
    ``m + rank A``: redundant constraints alone do not count).
    """
    if damping:
        H = H + damping * _eye_like(H)
    if all_finite(H, A, By, Bc):  # the common case: no masks
        forced = finite = None
        act = active.to(A.dtype)
    else:
        # Curvature along a coordinate that an active bound pins (a row of A with one non-zero)
        # never enters the solution: an infinite entry there (y^1.5 or y log y at y = 0) is set
        # to zero and the null-space route, which never reads it, is taken.
        pinned = pinned_coordinates(A, active)
        blind = pinned.unsqueeze(-1) | pinned.unsqueeze(-2)
        sanitised = blind & ~torch.isfinite(H)
        H = torch.where(sanitised, torch.zeros_like(H), H)
        forced = sanitised.any((-2, -1))
        # a non-finite sample (a NaN input) gets a NaN solution and is kept away from LAPACK
        finite = (torch.isfinite(H).all((-2, -1)) & torch.isfinite(A).all((-2, -1))
                  & torch.isfinite(By).all((-2, -1)) & torch.isfinite(Bc).all((-2, -1)))
        H = torch.where(finite[:, None, None], H, _eye_like(H))
        act = active.to(A.dtype) * finite[:, None].to(A.dtype)
        A = torch.where(finite[:, None, None], A, 0.0) * act.unsqueeze(-1)
        By = torch.where(finite[:, None, None], By, 0.0)
        Bc = torch.where(finite[:, None, None], Bc, 0.0) * act.unsqueeze(-1)
    # one H and A for the whole batch (a QP's)
    if finite is None and shared_by_batch(H) and shared_by_batch(A):
        U, W, d, A, Bc, fallback = _schur_shared(H[0], A[0], act, By, Bc)
    else:
        U, W, d, A, Bc, fallback = _schur(H, A, act, By, Bc)
    if forced is not None:
        fallback |= forced
    not_pd = torch.zeros_like(fallback)
    singular = torch.zeros_like(fallback)
    min_eig = None
    if fallback.any():
        U, W = U.clone(), W.clone()
        Uf, Wf, not_pd_f, singular_f, eig = _null_space_solve(H[fallback], A(fallback),
                                                              By[fallback], Bc[fallback])
        U[fallback], W[fallback] = Uf, Wf
        not_pd[fallback], singular[fallback] = not_pd_f, singular_f
        min_eig = torch.full_like(fallback, float("inf"), dtype=H.dtype)
        min_eig[fallback] = eig
    W = W * d.unsqueeze(-1)
    if finite is not None:
        U = torch.where(finite[:, None, None], U, float("nan"))
        W = torch.where(finite[:, None, None], W, float("nan"))
    return U, W, SolveInfo(not_pd=not_pd, singular=singular, min_eig=min_eig)


def shared_by_batch(M: Tensor) -> bool:
    """Whether ``M (b, ...)`` is one matrix expanded over the batch (stride 0)."""
    return M.shape[0] > 1 and M.stride(0) == 0


def _schur(H: Tensor, A: Tensor, act: Tensor, By: Tensor, Bc: Tensor) -> tuple:
    """The Schur-complement solve of :func:`solve_kkt` (``A``, ``Bc`` masked to the active rows
    ``act``): ``U, W`` (``W`` in the equilibrated rows), the row scales ``d (b, r)``, the
    equilibrated ``A`` (a function of the samples wanted) and ``Bc``, and the samples where the
    solve is not to be trusted (the null-space method takes them)."""
    A, Bc = A * act.unsqueeze(-1), Bc * act.unsqueeze(-1)
    # equilibrate: row j of A (and of Bc) scaled by d_j = s_H / ‖a_j‖, so W = d · W_scaled
    s_h = _matrix_scale(H)
    d = _row_scales(A.norm(dim=-1), s_h[:, None])
    A, Bc = A * d.unsqueeze(-1), Bc * d.unsqueeze(-1)
    L, h_not_pd, h_weak = trusted_cholesky(H)
    # Schur complement: S = A H⁻¹ Aᵀ (+ s_H I on inactive rows), W = S⁻¹ (A H⁻¹ By − Bc).
    HiAt = torch.cholesky_solve(A.transpose(-1, -2), L)
    HiBy = torch.cholesky_solve(By, L)
    S = A @ HiAt + torch.diag_embed((1 - act) * s_h[:, None])
    Ls, s_not_pd, s_weak = trusted_cholesky(S)
    AHiBy = A @ HiBy
    W = torch.cholesky_solve(AHiBy - Bc, Ls)
    U = HiBy - HiAt @ W
    bad = _inexact(A @ U - Bc, s_h, U, Bc, AHiBy) | h_not_pd | h_weak | s_not_pd | s_weak
    return U, W, d, (lambda keep: A[keep]), Bc, bad


def _schur_shared(H: Tensor, A: Tensor, act: Tensor, By: Tensor, Bc: Tensor) -> tuple:
    """:func:`_schur` for one ``H (m, m)`` and one ``A (r, m)`` shared by the batch, whose samples
    differ in their right-hand sides and active rows ``act (b, r)`` only: ``H`` is factorised
    once and ``H⁻¹ Aᵀ``, ``A H⁻¹ Aᵀ`` formed once; per sample, only the Schur complement
    ``S = (A H⁻¹ Aᵀ) ∘ act actᵀ (+ s_H I on inactive rows)`` is factorised."""
    s_h = _matrix_scale(H[None])[0]
    d1 = _row_scales(A.norm(dim=-1), s_h)
    A1 = A * d1.unsqueeze(-1)  # the equilibrated rows, shared
    d = d1 * act
    Bc = Bc * d.unsqueeze(-1)
    L, h_not_pd, h_weak = trusted_cholesky(H[None])
    HiAt = torch.cholesky_solve(A1.T, L[0])  # (m, r)
    b, m, k = By.shape
    HiBy = torch.cholesky_solve(By.transpose(0, 1).reshape(m, b * k), L[0])
    HiBy = HiBy.reshape(m, b, k).transpose(0, 1)
    S = (A1 @ HiAt) * (act.unsqueeze(-1) * act.unsqueeze(-2)) + torch.diag_embed((1 - act) * s_h)
    Ls, s_not_pd, s_weak = trusted_cholesky(S)
    mask = act.unsqueeze(-1)
    AHiBy = (HiBy.transpose(-1, -2) @ A1.T).transpose(-1, -2) * mask  # one matrix product each
    W = torch.cholesky_solve(AHiBy - Bc, Ls)
    U = HiBy - ((W * mask).transpose(-1, -2) @ HiAt.T).transpose(-1, -2)
    AU = (U.transpose(-1, -2) @ A1.T).transpose(-1, -2) * mask
    bad = _inexact(AU - Bc, s_h, U, Bc, AHiBy) | h_not_pd | h_weak | s_not_pd | s_weak
    return U, W, d, (lambda keep: A1 * act[keep].unsqueeze(-1)), Bc, bad


def _row_scales(norms: Tensor, s_h: Tensor) -> Tensor:
    """The equilibration ``d_j = s_H / ‖a_j‖`` of the constraint rows (0 for a zero row)."""
    return torch.where(norms > 0, s_h / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                       torch.zeros_like(norms))


def _matrix_scale(H: Tensor) -> Tensor:
    """``max |H_ij|`` per sample, 1 where ``H = 0``."""
    s_h = H.abs().amax((-2, -1))
    return torch.where(s_h > 0, s_h, torch.ones_like(s_h))


def _inexact(r_c: Tensor, s_h: Tensor, U: Tensor, Bc: Tensor, AHiBy: Tensor) -> Tensor:
    """Where a Schur solve is inaccurate (``S`` mixes scales: huge curvature along directions
    the constraints pin): the residual ``r_c = A U − Bc`` of the constraint rows relative to the
    terms that make it up (``A U = A H⁻¹By − A H⁻¹Aᵀ W``: at a vertex ``U = 0`` and both cancel)."""
    rtol = torch.finfo(U.dtype).eps ** 0.5
    terms = (s_h * U.abs().amax((-2, -1)) + Bc.abs().amax((-2, -1))
             + AHiBy.abs().amax((-2, -1)))
    return ~(r_c.abs().amax((-2, -1)) <= rtol * terms)


def _null_space_solve(H: Tensor, A: Tensor, By: Tensor, Bc: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The KKT system by the null-space method: ``U = A⁺ Bc + Z z`` with ``(Zᵀ H Z) z =
    Zᵀ (By − H A⁺ Bc)`` and ``W = (A⁺)ᵀ (By − H U)``, ``Z`` an orthonormal basis of ``null(A)``.

    Exact whenever the reduced Hessian ``Zᵀ H Z`` is non-singular, whatever ``H`` does along the
    directions the constraints fix (singular, or huge: the entries there never enter ``Zᵀ H Z``).
    Returns ``U, W``, the masks ``not_pd`` and ``singular`` (``Zᵀ H Z`` not positive definite /
    singular, i.e. ``U`` not determined) and the smallest reduced eigenvalue.
    """
    m = H.shape[-1]
    V, S, Qt = torch.linalg.svd(A, full_matrices=True)  # rows of Qt: range(Aᵀ) first, then null(A)
    eps = torch.finfo(A.dtype).eps * max(A.shape[-2:])
    keep = S > eps * S.amax(-1, keepdim=True) if S.shape[-1] else S.new_zeros(S.shape[0], 0).bool()
    rank = keep.sum(-1)
    null = torch.arange(m, device=H.device) >= rank.unsqueeze(-1)  # (b, m) over the rows of Qt
    inv_s = torch.where(keep, 1 / S.where(keep, torch.ones_like(S)), torch.zeros_like(S))
    k = S.shape[-1]
    V = V[..., :k]
    particular = Qt[:, :k].transpose(-1, -2) @ (inv_s.unsqueeze(-1) * (V.transpose(-1, -2) @ Bc))
    R = Qt @ H @ Qt.transpose(-1, -2)
    R = 0.5 * (R + R.transpose(-1, -2))
    both = null.unsqueeze(-1) & null.unsqueeze(-2)
    R = torch.where(both, R, torch.zeros_like(R))
    pad = R.abs().amax((-2, -1), keepdim=True)  # the range rows padded at the scale of Zᵀ H Z
    R = R + torch.diag_embed((~null).to(H.dtype)) * torch.where(pad > 0, pad, torch.ones_like(pad))
    rhs = (Qt @ (By - H @ particular)) * null.unsqueeze(-1).to(H.dtype)
    z, info = solve_spd(R, rhs)
    z = z * null.unsqueeze(-1).to(H.dtype)
    U = particular + Qt.transpose(-1, -2) @ z
    residual = By - H @ U
    W = V @ (inv_s.unsqueeze(-1) * (Qt[:, :k] @ residual))
    big = 1 + 2 * R.abs().amax((-2, -1), keepdim=True)
    eig = torch.linalg.eigvalsh(R + torch.diag_embed((~null).to(H.dtype)) * big)[..., 0]
    eig = torch.where(null.any(-1), eig, torch.full_like(eig, float("inf")))
    scale = 1 + H.abs().amax((-2, -1))
    return U, W, eig <= m * torch.finfo(H.dtype).eps * scale, info.singular, eig


class NullSpace:
    """Projector onto ``{u : A u = 0}`` for the active rows of ``A (b, p, m)``, by a thin SVD.

    The active rows are first scaled to unit norm, ``A = D⁻¹ Â`` (a zero row stays zero), so that
    rank decisions do not depend on how the constraints are scaled. With ``Â = V S Qᵀ`` (rank
    ``r``, singular values below ``max(p, m) · eps · σ_max`` dropped), the projector is
    ``I − Q Qᵀ``, ``least_norm`` applies ``A⁺`` and ``coefficients`` applies ``(A⁺)ᵀ`` (minimum-norm
    solutions in the scaled rows, exact also when ``A`` is rank deficient). ``rank_deficient
    (b,)`` marks samples whose rank is below their number of active rows (redundant constraints,
    or a row whose gradient vanishes).
    """

    def __init__(self, A: Tensor, active: Tensor):
        act = active.to(A.dtype)
        finite = torch.isfinite(A).all((-2, -1))  # a non-finite sample gets NaN, not an SVD error
        A = torch.where(finite[:, None, None], A, 0.0) * act.unsqueeze(-1)
        norms = A.norm(dim=-1)
        self.d = torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(A.dtype).tiny),
                             torch.zeros_like(norms))
        V, S, Qt = torch.linalg.svd(A * self.d.unsqueeze(-1), full_matrices=False)
        Qt = torch.where(finite[:, None, None], Qt, float("nan"))
        eps = torch.finfo(A.dtype).eps * max(A.shape[-2:], default=1)
        top = S.amax(-1, keepdim=True) if S.shape[-1] else S.new_zeros(S.shape[0], 1)
        keep = S > eps * top
        self.V, self.Qt = V, Qt
        self.inv_s = torch.where(keep, 1 / S.where(keep, torch.ones_like(S)), torch.zeros_like(S))
        self.inv_s = torch.where(finite[:, None], self.inv_s, float("nan"))
        self.keep = keep.to(A.dtype)
        n_active = active.sum(-1)
        self.rank_deficient = (keep.sum(-1) < n_active) & finite

    def least_norm(self, c: Tensor) -> Tensor:
        """``A⁺ c`` for ``c (k, b, p)``: the smallest ``u`` minimising ``‖A u − c‖``."""
        z = (self.V.transpose(-1, -2) @ (self.d.unsqueeze(-1) * c.movedim(0, -1)))
        z = z * self.inv_s.unsqueeze(-1)
        return (self.Qt.transpose(-1, -2) @ z).movedim(-1, 0)

    def coefficients(self, r: Tensor) -> Tensor:
        """``(A⁺)ᵀ r`` for ``r (k, b, m)``: the smallest ``w`` with ``Aᵀ w`` closest to ``r``."""
        z = (self.Qt @ r.movedim(0, -1)) * self.inv_s.unsqueeze(-1)
        return (self.d.unsqueeze(-1) * (self.V @ z)).movedim(-1, 0)

    def __call__(self, r: Tensor) -> Tensor:
        z = (self.Qt @ r.movedim(0, -1)) * self.keep.unsqueeze(-1)
        return r - (self.Qt.transpose(-1, -2) @ z).movedim(-1, 0)


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
    Each ``(k, b)`` system stops at ``‖r‖ ≤ tol ‖rhs‖`` (``tol`` a number or a tensor broadcasting
    to ``(k, b)``); a direction of zero curvature (at the rounding level ``m · eps`` of the
    largest Rayleigh quotient seen) stops its system and marks the sample singular, one of negative curvature marks
    it not positive definite; ``min_eig`` is the smallest Rayleigh quotient met, an upper bound of
    the smallest eigenvalue. ``matvec`` is applied only to the right-hand sides still running.
    """
    P = project if project is not None else (lambda t: t)
    dot = torch.linalg.vecdot
    tiny = torch.finfo(rhs.dtype).tiny
    # each system solved for a right-hand side of largest entry one: the curvatures pᵀMp of a
    # problem of size 10⁻¹² (or 10¹²) under- or overflow in float32 otherwise (so would ‖rhs‖)
    unit = rhs.abs().amax(-1, keepdim=True)
    unit = torch.where((unit > 0) & torch.isfinite(unit), unit, 1.0)
    rhs = rhs / unit
    x = torch.zeros_like(rhs, memory_format=torch.contiguous_format)
    r = P(rhs).clone(memory_format=torch.contiguous_format)  # updated in place below
    p = r.clone()
    rr = dot(r, r)
    stop = tol**2 * dot(rhs, rhs).clamp_min(tiny)
    running = ~(rr <= stop)  # (k, b); a NaN system runs on and is reported unconverged
    not_pd = torch.zeros_like(running)
    flat = torch.zeros_like(running)
    rayleigh_max = torch.zeros_like(rr)
    rayleigh_min = torch.full_like(rr, float("inf"))
    flat_tol = rhs.shape[-1] * torch.finfo(rhs.dtype).eps  # curvature at the level of rounding
    # a right-hand side whose systems have all stopped is retired: its state is written out and
    # the iteration goes on with the others only (no masked matvecs)
    out = [t.clone() for t in (x, rr, running, not_pd, flat, rayleigh_min)]
    cols = torch.arange(rhs.shape[0], device=rhs.device)

    def retire(keep: Tensor | None) -> None:
        gone = cols if keep is None else cols[~keep]
        pick = slice(None) if keep is None else ~keep
        for o, t in zip(out, (x, rr, running, not_pd, flat, rayleigh_min)):
            o[gone] = t[pick]

    for _ in range(max_iter):
        live = running.any(-1)  # (k,)
        if not bool(live.all()):
            retire(live)
            if not bool(live.any()):
                break
            x, r, p, rr, stop, running, not_pd, flat, rayleigh_min, rayleigh_max = (
                t[live] for t in (x, r, p, rr, stop, running, not_pd, flat, rayleigh_min,
                                  rayleigh_max))
            cols = cols[live]
        Mp = P(matvec(p))
        curvature = dot(p, Mp)
        # a Rayleigh quotient of the (projected) operator; NaN (ignored by fmax / fmin) where
        # the system has stopped
        quotient = (curvature / dot(p, p).clamp_min(tiny)).masked_fill_(~running, torch.nan)
        rayleigh_max = torch.fmax(rayleigh_max, quotient.abs())
        rayleigh_min = torch.fmin(rayleigh_min, quotient)
        stuck = quotient <= flat_tol * rayleigh_max  # zero or negative curvature, running
        if bool(stuck.any()):
            zero = quotient.abs() <= flat_tol * rayleigh_max  # singular
            flat |= zero
            not_pd |= stuck & ~zero
            running &= ~stuck
        alpha = torch.where(running, rr / curvature, 0.0).unsqueeze_(-1)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, Mp, value=-1.0)
        rr_new = dot(r, r)  # unchanged where stopped (α = 0)
        p = torch.addcmul(r, torch.where(running, rr_new / rr, 0.0).unsqueeze_(-1), p)
        rr = rr_new
        running &= ~(rr <= stop)
    retire(None)
    x, rr, running, not_pd, flat, rayleigh_min = out
    x = x * unit
    residual = (rr / dot(rhs, rhs).clamp_min(tiny)).sqrt()
    not_pd, flat = not_pd.any(0), flat.any(0)  # per sample, over the k right-hand sides
    return x, SolveInfo(not_pd=not_pd, singular=flat, not_converged=running.any(0) & ~flat,
                        residual=residual.amax(0), min_eig=rayleigh_min.amin(0))
