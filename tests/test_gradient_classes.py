"""Issue 15: the generic backward on every class of problem where it used to return a wrong
gradient silently, with nodes written as a user of the original DDN library writes them —
objective and constraints only, plus (where the default solver is not the point) a ``solve`` that
returns the exact answer, with or without its multipliers.

For every class, in float64 and float32, dense and matrix-free, the gradient for the inputs and
for every learnable parameter is compared with an independent reference (closed form,
perturbation theory, unrolled Sinkhorn, the sparsemax / entmax Jacobians, one Newton step at the
exact solution) and, in float64, with finite differences. A well-posed, correctly solved problem
must not emit any ``DDNWarning``; an ill-posed one (degenerate constraint, singular KKT matrix)
must warn with numbers.

``python tests/test_gradient_classes.py`` prints the table of ``docs/reliability.md`` from the
same measurements.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from ddnlib import (DDNWarning, DeclarativeNode, OptimalityWarning, Options, SingularSystemWarning,
                    Solution)

from helpers import DENSE, MATRIX_FREE, functional, learnable

F64, F32 = torch.float64, torch.float32


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class UserNode(DeclarativeNode):
    """A node whose ``solve`` is the default solver (``mode="default"``) or :meth:`exact`:
    ``y`` alone (``"exact"``), a :class:`Solution` with multipliers (``"multipliers"``), the
    ``(y, {"lambda", "mu"})`` form (``"ctx"``), or an external solver's answer accurate to ~4e-8
    (``"inexact"``, ``"inexact+multipliers"``)."""

    def __init__(self, mode: str, options: Options):
        super().__init__(options)
        self.mode = mode

    def exact(self, *xs):
        """``(y, lambda or None, mu or None)``, exact."""
        raise NotImplementedError

    def inexact(self, *xs):
        raise NotImplementedError

    def solve(self, *xs):
        if self.mode == "default":
            return super().solve(*xs)
        y, lam, mu = self.inexact(*xs) if self.mode.startswith("inexact") else self.exact(*xs)
        if self.mode in ("exact", "inexact"):
            return y
        if self.mode == "ctx":
            return y, {k: t for k, t in (("lambda", lam), ("mu", mu)) if t is not None}
        return Solution(y, eq_multipliers=lam, ineq_multipliers=mu)


# -- 1. singular Hessian, regular KKT: the top eigenvector -------------------------------------


class TopEigenvector(UserNode):
    """y = argmax yᵀSy s.t. ‖y‖² = 1, written as min −yᵀSy; S (b, n, n). At the solution
    ``H = 2(λ_max I − S)`` is singular along y; the KKT matrix is not."""

    def objective(self, S, y):
        return -torch.einsum("bi,bij,bj->b", y, S, y)

    def equality_constraints(self, S, y):
        return (y * y).sum(-1, keepdim=True) - 1

    def initial_guess(self, S):
        return S.new_ones(S.shape[0], S.shape[-1]) / math.sqrt(S.shape[-1])

    def exact(self, S):
        evals, U = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
        y = U[..., -1]
        y = y * torch.where(y.sum(-1, keepdim=True) < 0, -1.0, 1.0)
        return y, evals[..., -1:], None  # L = −yᵀSy + λ(‖y‖² − 1): λ = λ_max


def eigen_inputs(seed: int, n: int = 4, b: int = 3):
    g = _generator(seed)
    Q = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=F64))[0]
    spectrum = torch.tensor([-1.0, 0.5, 1.5, 3.0], dtype=F64)[:n]
    return (Q @ torch.diag_embed(spectrum.expand(b, n)) @ Q.transpose(-1, -2),)


def eigen_reference(node, xs, y, v):
    """Perturbation theory: dy = Σ_{j<n} u_j u_jᵀ dS_sym y / (λ_n − λ_j), so
    ∂⟨v, y⟩/∂S = sym(w yᵀ) with w = Σ_j u_j (u_jᵀ v) / (λ_n − λ_j)."""
    (S,) = xs
    evals, U = torch.linalg.eigh(0.5 * (S + S.transpose(-1, -2)))
    top = U[..., -1] * torch.sign((U[..., -1] * y).sum(-1, keepdim=True))
    c = (U[..., :-1] * v.unsqueeze(-1)).sum(-2) / (evals[..., -1:] - evals[..., :-1])
    w = (U[..., :-1] * c.unsqueeze(-2)).sum(-1)
    outer = w.unsqueeze(-1) * top.unsqueeze(-2)
    return [0.5 * (outer + outer.transpose(-1, -2))]


# -- points on a circle / sphere, projection onto a ball -------------------------------------


class SphereNode(UserNode):
    """y = argmin ½‖y − x‖² s.t. ‖y‖² = r²; learnable r. y = r x/‖x‖, λ = (‖x‖/r − 1)/2."""

    def __init__(self, mode, options, r: float = 1.0):
        super().__init__(mode, options)
        self.r = torch.nn.Parameter(torch.tensor(r, dtype=F64))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r**2

    def exact(self, x):
        n = x.norm(dim=-1, keepdim=True)
        return self.r * x / n, 0.5 * (n / self.r - 1), None


class BallNode(SphereNode):
    """y = argmin ½‖y − x‖² s.t. ‖y‖² ≤ r²; learnable r. y = x min(1, r/‖x‖),
    μ = max(‖x‖/r − 1, 0)/2."""

    equality_constraints = DeclarativeNode.equality_constraints

    def inequality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r**2

    def exact(self, x):
        n = x.norm(dim=-1, keepdim=True)
        return x * (self.r / n).clamp_max(1), None, 0.5 * (n / self.r - 1).clamp_min(0)


def sphere_inputs(seed: int, n: int = 3, b: int = 4, r: float = 1.0):
    """Directions at distances 0.3 r, 0.6 r, 2 r, 5 r from the origin (inside and outside)."""
    x = torch.randn(b, n, generator=_generator(seed), dtype=F64)
    scale = torch.tensor([0.3, 0.6, 2.0, 5.0], dtype=F64)[:b, None]
    return (r * scale * x / x.norm(dim=-1, keepdim=True),)


def sphere_reference(node, xs, y, v):
    return _autograd_reference(lambda x, r: r * x / x.norm(dim=-1, keepdim=True), node, xs, v)


def ball_reference(node, xs, y, v):
    def project(x, r):
        n = x.norm(dim=-1, keepdim=True)
        return torch.where(n > r, r * x / n, x)

    return _autograd_reference(project, node, xs, v)


def _autograd_reference(closed_form, node, xs, v):
    """Gradients of ⟨v, closed_form(*xs, *learnable parameters)⟩ by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (*xs, *learnable(node).values())]
    return list(torch.autograd.grad((closed_form(*leaves) * v).sum(), leaves))


# -- ill-conditioned least squares, analytic centre (unconstrained) --------------------------


class LeastSquares(UserNode):
    """y = argmin ½‖A y − x‖², learnable A (n, m) with cond(AᵀA) = ``cond``."""

    def __init__(self, mode, options, cond: float = 1e6, n: int = 6, m: int = 4, seed: int = 1):
        super().__init__(mode, options)
        g = _generator(seed)
        U = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=F64))[0]
        V = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))[0]
        s = torch.logspace(0, -0.5 * math.log10(cond), m, dtype=F64)
        self.A = torch.nn.Parameter(U @ torch.diag(s) @ V.T)

    def objective(self, x, y):
        return 0.5 * ((y @ self.A.T - x) ** 2).sum(-1)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.A.shape[1])

    def gradient(self, x, A, y):
        return (y @ A.T - x) @ A

    def hessian(self, x, A, y):
        return (A.T @ A).expand(y.shape[0], -1, -1)

    def exact(self, x):
        A = self.A.to(F64)
        y = torch.linalg.lstsq(A.expand(x.shape[0], -1, -1), x.to(F64).unsqueeze(-1),
                               driver="gelsd").solution[..., 0]
        return y.to(x.dtype), None, None


class AnalyticCentre(UserNode):
    """y = argmin −Σ_i log(b_i − a_iᵀ y): the analytic centre of a polygon; b (batch, k) the
    input, learnable A (k, m)."""

    def __init__(self, mode, options, k: int = 6, seed: int = 2):
        super().__init__(mode, options)
        angles = torch.arange(k, dtype=F64) * 2 * math.pi / k
        angles = angles + 0.3 * torch.rand(k, generator=_generator(seed), dtype=F64)
        self.A = torch.nn.Parameter(torch.stack([angles.cos(), angles.sin()], -1))

    def objective(self, b, y):
        return -torch.log(b - y @ self.A.T).sum(-1)

    def initial_guess(self, b):
        return b.new_zeros(b.shape[0], self.A.shape[1])

    def gradient(self, b, A, y):
        return (1 / (b - y @ A.T)) @ A

    def hessian(self, b, A, y):
        d = 1 / (b - y @ A.T) ** 2
        return torch.einsum("ki,bk,kj->bij", A, d, A)

    def exact(self, b):
        A, b64 = self.A.to(F64), b.to(F64)
        y = b64.new_zeros(b.shape[0], A.shape[1])
        for _ in range(60):  # damped Newton, kept strictly inside
            step = -torch.linalg.solve(self.hessian(b64, A, y), self.gradient(b64, A, y))
            t = torch.ones_like(y[:, :1])
            for _ in range(40):
                inside = ((b64 - (y + t * step) @ A.T) > 0).all(-1, keepdim=True)
                t = torch.where(inside, t, 0.5 * t)
            y = y + t * step
        return y.to(b.dtype), None, None


def newton_reference(node, xs, y, v):
    """One Newton step from the exact solution, ``y* − H⁻¹ ∇f(x, θ, y*)`` (y*, H fixed), has the
    implicit derivative of the solution; differentiated by autograd."""
    node64 = copy.deepcopy(node).to(F64)
    ystar = node64.exact(*xs)[0].detach()
    H = node64.hessian(*xs, node64.A.detach(), ystar)

    def one_step(x, A):
        return ystar - torch.linalg.solve(H, node64.gradient(x, A, ystar))

    return _autograd_reference(one_step, node64, xs, v)


def least_squares_inputs(seed: int, b: int = 3, n: int = 6):
    return (torch.randn(b, n, generator=_generator(seed), dtype=F64),)


def centre_inputs(seed: int, b: int = 3, k: int = 6):
    return (1 + torch.rand(b, k, generator=_generator(seed), dtype=F64),)


# -- redundant equality constraints: entropic optimal transport ------------------------------


class EntropicTransport(UserNode):
    """P = argmin ⟨C, P⟩ + ε Σ P log P s.t. P 1 = r, Pᵀ 1 = c (both marginals written out:
    H + W rows of rank H + W − 1); C (b, H, W) the input, learnable log ε; r, c fixed."""

    def __init__(self, mode, options, eps: float = 1.0, H: int = 3, W: int = 4, seed: int = 3):
        super().__init__(mode, options)
        self.log_eps = torch.nn.Parameter(torch.tensor(math.log(eps), dtype=F64))
        c = 0.5 + torch.rand(W, generator=_generator(seed), dtype=F64)
        self.register_buffer("r", torch.full((H,), 1.0 / H, dtype=F64))
        self.register_buffer("c", c / c.sum())

    def objective(self, C, P):
        return (C * P).sum((-2, -1)) + self.log_eps.exp() * (P * P.log()).sum((-2, -1))

    def equality_constraints(self, C, P):
        return torch.cat([P.sum(-1) - self.r, P.sum(-2) - self.c], dim=-1)

    def initial_guess(self, C):
        return (self.r[:, None] * self.c[None, :]).expand_as(C).clone()

    def exact(self, C):
        r, c = self.r.to(F64), self.c.to(F64)  # consistent marginals also for a float32 node
        P, f, g = sinkhorn(C.to(F64), r / r.sum(), c / c.sum(), self.log_eps.to(F64).exp())
        eps = self.log_eps.to(F64).exp()
        lam = torch.cat([-f - eps, -g], dim=-1)  # C + ε(log P + 1) + α_i + β_j = 0
        return P.to(C.dtype), lam.to(C.dtype), None


def sinkhorn(C, r, c, eps, max_iter: int = 3000):
    """Log-domain Sinkhorn to rounding level (row sums within 4 eps of r):
    ``P = exp((f_i + g_j − C_ij)/ε)``; differentiable (unrolled)."""
    f = C.new_zeros(C.shape[:-1])
    g = C.new_zeros(C.shape[0], C.shape[-1])
    for _ in range(max_iter):
        f = eps * (r.log() - torch.logsumexp((g.unsqueeze(-2) - C) / eps, -1))
        g = eps * (c.log() - torch.logsumexp((f.unsqueeze(-1) - C) / eps, -2))
        P = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - C) / eps)
        if (P.sum(-1) - r).abs().max() <= 4 * torch.finfo(C.dtype).eps * r.max():
            break
    return P, f, g


def transport_inputs(seed: int, b: int = 2, H: int = 3, W: int = 4):
    return (torch.rand(b, H, W, generator=_generator(seed), dtype=F64),)


def transport_reference(node, xs, y, v):
    def plan(C, log_eps):
        return sinkhorn(C, node.r.to(F64), node.c.to(F64), log_eps.exp())[0]

    return _autograd_reference(plan, node, xs, v)


class QuadraticTransport(UserNode):
    """P = argmin ⟨C, P⟩ + (γ/2)‖P‖² s.t. P 1 = r, Pᵀ 1 = c (both marginals), −P ≤ 0: redundant
    equalities together with active bounds (a sparse plan for small γ); learnable log γ."""

    def __init__(self, mode, options, gamma: float = 1.0, H: int = 3, W: int = 4, seed: int = 3):
        super().__init__(mode, options)
        self.log_gamma = torch.nn.Parameter(torch.tensor(math.log(gamma), dtype=F64))
        c = 0.5 + torch.rand(W, generator=_generator(seed), dtype=F64)
        self.register_buffer("r", torch.full((H,), 1.0 / H, dtype=F64))
        self.register_buffer("c", c / c.sum())

    def objective(self, C, P):
        return (C * P).sum((-2, -1)) + 0.5 * self.log_gamma.exp() * (P * P).sum((-2, -1))

    def equality_constraints(self, C, P):
        return torch.cat([P.sum(-1) - self.r, P.sum(-2) - self.c], dim=-1)

    def inequality_constraints(self, C, P):
        return -P.flatten(1)

    def initial_guess(self, C):
        return (self.r[:, None] * self.c[None, :]).expand_as(C).clone()

    def exact(self, C):
        C64, gamma = C.to(F64), self.log_gamma.to(F64).exp()
        r, c = self.r.to(F64), self.c.to(F64)
        support = torch.stack([_qot_support(Ci, r / r.sum(), c / c.sum(), gamma) for Ci in C64])
        P, lam = qot_on_support(C64, r / r.sum(), c / c.sum(), gamma, support)
        H = C.shape[1]
        mu = (C64 + lam[:, :H, None] + lam[:, None, H:]) * ~support  # C + α_i + β_j off S
        return P.to(C.dtype), lam.to(C.dtype), mu.flatten(1).clamp_min(0).to(C.dtype)


def qot_on_support(C, r, c, gamma, support):
    """The plan with support ``support (b, H, W)``: γP_ij + α_i + β_j = −C_ij on it, P = 0 off it,
    both marginals; minimum-norm (α, β) by a pseudo-inverse (differentiable, constant rank)."""
    b, H, W = C.shape
    n = H * W
    rows = torch.arange(n) // W
    cols = torch.arange(n) % W
    s = support.flatten(1).to(C.dtype)
    K = C.new_zeros(b, n + H + W, n + H + W)
    eye = torch.eye(n, dtype=C.dtype)
    K[:, :n, :n] = gamma * eye * s[..., None] + eye * (1 - s[..., None])
    E = torch.zeros(n, H + W, dtype=C.dtype)
    E[torch.arange(n), rows] = 1
    E[torch.arange(n), H + cols] = 1
    K[:, :n, n:] = s[..., None] * E
    K[:, n:, :n] = E.T
    rhs = torch.cat([-C.flatten(1) * s, r.expand(b, H), c.expand(b, W)], dim=-1)
    z = (torch.linalg.pinv(K) @ rhs.unsqueeze(-1))[..., 0]
    return z[:, :n].reshape(b, H, W) * support, z[:, n:]


def _qot_support(C, r, c, gamma):
    """The support of one plan from its dual, max rᵀα + cᵀβ − Σ max(0, α_i + β_j − C_ij)²/(2γ)
    (P_ij = max(0, α_i + β_j − C_ij)/γ), by damped generalised Newton."""
    H, W = C.shape
    z = torch.cat([torch.full((H,), C.max().item() + 1, dtype=C.dtype), torch.zeros(W, dtype=C.dtype)])

    def dual(z):
        slack = (z[:H, None] + z[None, H:] - C).clamp_min(0)
        return r @ z[:H] + c @ z[H:] - (slack**2).sum() / (2 * gamma), slack / gamma

    E = torch.zeros(H * W, H + W, dtype=C.dtype)
    E[torch.arange(H * W), torch.arange(H * W) // W] = 1
    E[torch.arange(H * W), H + torch.arange(H * W) % W] = 1
    for _ in range(200):
        value, P = dual(z)
        g = torch.cat([r - P.sum(-1), c - P.sum(-2)])
        if g.abs().max() < 1e-15:
            break
        hess = E.T @ ((P.flatten() > 0).to(C.dtype)[:, None] / gamma * E)
        # regularised: a disconnected support leaves directions of zero curvature
        step = torch.linalg.solve(hess + 1e-9 / gamma * torch.eye(H + W, dtype=C.dtype), g)
        t = 1.0
        while dual(z + t * step)[0] < value + 1e-4 * t * (g @ step) and t > 1e-20:
            t /= 2
        z = z + t * step
    return dual(z)[1] > 1e-12


def qot_reference(node, xs, y, v):
    (C,) = xs
    support = node.exact(C)[0].detach() > 0

    def plan(C, log_gamma):
        r, c = node.r / node.r.sum(), node.c / node.c.sum()
        return qot_on_support(C, r, c, log_gamma.exp(), support)[0]

    return _autograd_reference(plan, node, xs, v)


# -- degenerate constraint and a genuinely singular KKT matrix (must warn) --------------------


class DegenerateSphere(UserNode):
    """y = argmin ½‖y − x‖² s.t. (‖y‖² − 1)² = 0: the constraint gradient vanishes on the
    feasible set; the KKT conditions do not hold and do not determine the gradient."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return ((y * y).sum(-1, keepdim=True) - 1) ** 2

    def exact(self, x):
        return x / x.norm(dim=-1, keepdim=True), None, None


class FlatValley(UserNode):
    """y = argmin ½(y₁ + y₂ − x₁)² + ½y₃² s.t. y₃ = x₂: a line of minimisers (the reduced
    Hessian is singular); ``solve`` returns the minimum-norm one."""

    def objective(self, x, y):
        return 0.5 * (y[:, 0] + y[:, 1] - x[:, 0]) ** 2 + 0.5 * y[:, 2] ** 2

    def equality_constraints(self, x, y):
        return y[:, 2:] - x[:, 1:2]

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], 3)

    def exact(self, x):
        half = 0.5 * x[:, :1]
        return torch.cat([half, half, x[:, 1:2]], -1), None, None


class InconsistentSpheres(DegenerateSphere):
    """h = [‖y‖² − 1, ‖y‖² − 1.21]: two spheres with no common point; ``solve`` returns the
    projection onto the first, which violates the second by 0.21."""

    def equality_constraints(self, x, y):
        n2 = (y * y).sum(-1, keepdim=True)
        return torch.cat([n2 - 1, n2 - 1.21], dim=-1)


class BallBoundary(BallNode):
    """The ball of radius 1 with every x exactly on the sphere: the constraint is weakly active
    (g = 0, μ = 0) and the projection has no derivative there."""


def boundary_inputs(seed: int, b: int = 3, n: int = 3):
    x = torch.randn(b, n, generator=_generator(seed), dtype=F64)
    return (x / x.norm(dim=-1, keepdim=True),)


def pair_inputs(seed: int, b: int = 3, n: int = 2):
    return (torch.randn(b, n, generator=_generator(seed), dtype=F64) + 2,)


# -- simplex projection (sparsemax) and 1.5-entmax: active sets ------------------------------


class Sparsemax(UserNode):
    """y = argmin ½‖y − e^θ x‖² s.t. 1ᵀy = 1, −y ≤ 0; learnable θ. λ = τ, μ_j = τ − z_j off the
    support."""

    def __init__(self, mode, options):
        super().__init__(mode, options)
        self.theta = torch.nn.Parameter(torch.tensor(0.2, dtype=F64))

    def objective(self, x, y):
        return 0.5 * ((y - self.theta.exp() * x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def inequality_constraints(self, x, y):
        return -y

    def initial_guess(self, x):
        return torch.full_like(x, 1.0 / x.shape[-1])

    def exact(self, x):
        z = self.theta.exp() * x
        y, tau = sparsemax(z)
        return y, tau, (tau - z).clamp_min(0)

    def inexact(self, x):
        """An interior-point answer: zeros come back as ~4e-8, the support pays for them (sum 1
        to rounding); its multipliers are off by ~4e-8 on the support."""
        y, lam, mu = self.exact(x)
        g = _generator(7)
        off = y == 0
        fuzz = (2e-8 + 4e-8 * torch.rand(y.shape, generator=g, dtype=F64)).to(y.dtype)
        y_in = torch.where(off, fuzz, y)
        y_in = torch.where(off, y_in, y_in - (y_in.sum(-1, keepdim=True) - 1) / (~off).sum(-1,
                                                                                  keepdim=True))
        return y_in, lam, torch.where(off, mu, 4e-8 * torch.ones_like(mu))


def sparsemax(z):
    """Differentiable sparsemax (sort and threshold): ``(max(z − τ, 0), τ)``."""
    zs = z.sort(-1, descending=True).values
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = zs.cumsum(-1)
    support = (1 + k * zs > cs).sum(-1, keepdim=True)
    tau = (cs.gather(-1, support - 1) - 1) / support
    return (z - tau).clamp_min(0), tau


class Entmax15(Sparsemax):
    """1.5-entmax: y = argmin −zᵀy + (4/3) Σ (y_j^{3/2} − y_j) s.t. 1ᵀy = 1, −y ≤ 0,
    z = e^θ x; y = max(z/2 − t, 0)², λ = 2t + 4/3, μ_j = 2t − z_j off the support."""

    def objective(self, x, y):
        return -(self.theta.exp() * x * y).sum(-1) + (4 / 3) * (y.pow(1.5) - y).sum(-1)

    def exact(self, x):
        z = (self.theta.exp() * x).to(F64)
        lo, hi = z.amax(-1, keepdim=True) / 2 - 1, z.amax(-1, keepdim=True) / 2
        for _ in range(200):
            t = 0.5 * (lo + hi)
            big = ((z / 2 - t).clamp_min(0) ** 2).sum(-1, keepdim=True) > 1
            lo, hi = torch.where(big, t, lo), torch.where(big, hi, t)
        t = 0.5 * (lo + hi)
        y = (z / 2 - t).clamp_min(0) ** 2
        y = y / y.sum(-1, keepdim=True)
        return y.to(x.dtype), (2 * t + 4 / 3).to(x.dtype), (2 * t - z).clamp_min(0).to(x.dtype)


def simplex_inputs(seed: int, b: int = 4, n: int = 5, entmax: bool = False):
    """Scores with 2–4 entries in the support and every entry at least 0.05 from its threshold
    (z_j − τ for sparsemax, z_j/2 − t for 1.5-entmax)."""
    g = _generator(seed)
    rows = []
    while len(rows) < b:
        x = 0.6 * torch.randn(n, generator=g, dtype=F64)
        if entmax:  # √y_j = z_j/2 − t on the support, μ_j/2 = t − z_j/2 off it
            y, _, mu = (t[0] for t in Entmax15("exact", DENSE).exact(x[None]))
            gap = torch.where(y > 0, y.sqrt(), mu / 2)
        else:
            y, tau = sparsemax(math.exp(0.2) * x)
            gap = (math.exp(0.2) * x - tau).abs()
        if 2 <= (y > 0).sum() <= 4 and gap.min() > 0.05:
            rows.append(x)
    return (torch.stack(rows),)


def sparsemax_reference(node, xs, y, v):
    return _autograd_reference(lambda x, theta: sparsemax(theta.exp() * x)[0], node, xs, v)


def entmax_reference(node, xs, y, v):
    """J = diag(s) − s sᵀ/Σs with s = √y on the support (∂y/∂z, z = e^θ x)."""
    (x,) = xs
    node64 = copy.deepcopy(node).to(F64)
    s = node64.exact(x)[0].detach().sqrt()
    Jv = s * v - s * (s * v).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
    scale = node64.theta.detach().exp()
    return [scale * Jv, (Jv * scale * x).sum()]


# -- permuted constraint rows: ball ∩ orthant with an inactive box ---------------------------


class BallOrthant(UserNode):
    """y = argmin ½‖y − x‖² s.t. ‖y‖² ≤ r², −y ≤ 0, y ≤ 2, rows in the order ``perm``;
    learnable r. y = r x⁺ / max(‖x⁺‖, r)."""

    def __init__(self, mode, options, perm: tuple[int, ...] | None = None, n: int = 4):
        super().__init__(mode, options)
        self.r = torch.nn.Parameter(torch.tensor(1.0, dtype=F64))
        self.perm = list(perm) if perm is not None else list(range(2 * n + 1))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        rows = torch.cat([(y * y).sum(-1, keepdim=True) - self.r**2, -y, y - 2], dim=-1)
        return rows[:, self.perm]

    def initial_guess(self, x):
        return torch.full_like(x, 0.1)

    def exact(self, x):
        xp = x.clamp_min(0)
        n = xp.norm(dim=-1, keepdim=True)
        y = xp * (self.r / n).clamp_max(1)
        mu = torch.cat([0.5 * (n / self.r - 1).clamp_min(0), (-x).clamp_min(0),
                        torch.zeros_like(x)], dim=-1)
        return y, None, mu[:, self.perm]


def orthant_inputs(seed: int, b: int = 4, n: int = 4):
    """Mixed signs (|x_k| ≥ 0.1); ‖x⁺‖ = 0.5, 0.8 (ball inactive), 1.5, 3 (active)."""
    g = _generator(seed)
    x = torch.randn(b, n, generator=g, dtype=F64)
    x = torch.where(x.abs() >= 0.1, x, torch.where(x < 0, x - 0.1, x + 0.1))
    x[:, 0], x[:, 1] = x[:, 0].abs(), -x[:, 1].abs()
    xp = x.clamp_min(0)
    target = torch.tensor([0.5, 0.8, 1.5, 3.0], dtype=F64)[:b, None]
    return (torch.where(x > 0, x * target / xp.norm(dim=-1, keepdim=True), x),)


def orthant_reference(node, xs, y, v):
    def project(x, r):
        xp = x.clamp_min(0)
        n = xp.norm(dim=-1, keepdim=True)
        return torch.where(n > r, r * xp / n, xp)

    return _autograd_reference(project, node, xs, v)


PERMUTATIONS = [tuple(range(9)), tuple(reversed(range(9)))] + [
    tuple(torch.randperm(9, generator=_generator(s)).tolist()) for s in range(4)]


# -- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One example of an issue-15 class: ``node(mode, options)`` (float64), its inputs
    ``inputs()``, the reference gradients ``reference(node, xs, y, v)`` (None: must warn with
    ``warns``) and the forward modes tried."""

    klass: str
    example: str
    node: Callable[[str, Options], UserNode]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    reference: Callable | None
    modes: tuple[str, ...]
    warns: type | None = None
    fd: bool = True  # also a finite-difference check (float64, exact modes)
    float32: bool = True  # False: beyond float32 (cond · eps ≈ 0.1); measured, not asserted
    magnitude: bool = True  # an ill-posed case's warning must carry a magnitude
    known: dict = field(default_factory=dict)  # (mode, dtype, solver) -> open finding (xfail)


# relative gradient error allowed: the dense solve is exact to rounding; CG stops at a relative
# residual of sqrt(eps); the default forward solvers stop at a step of 1e-10 (1e-5) relative
TOL = {("float64", "dense"): 1e-9, ("float64", "cg"): 1e-6,
       ("float32", "dense"): 1e-3, ("float32", "cg"): 5e-3}
SOLVERS = {"dense": DENSE, "cg": MATRIX_FREE}
DTYPES = {"float64": F64, "float32": F32}

def _all(modes, dtypes=DTYPES, solvers=SOLVERS):
    return [(m, d, s) for m in modes for d in dtypes for s in solvers]


EXACT = ("exact", "multipliers")
CASES = [
    Case("1 singular H, regular KKT", "top eigenvector, n = 4", TopEigenvector,
         lambda: eigen_inputs(0), eigen_reference, ("default", *EXACT)),
    *[Case("1 singular H, regular KKT", f"top eigenvector, S scaled by {scale:g}",
           TopEigenvector, lambda scale=scale: (scale * eigen_inputs(0)[0],), eigen_reference,
           EXACT, fd=False)  # finite differences of step 1e-6 do not resolve S ~ 1e-6
      for scale in (1e-6, 1e6)],
    *[Case("1 singular H, regular KKT", f"point on a {name} (r learnable)",
           lambda mode, o: SphereNode(mode, o), lambda n=n: sphere_inputs(1, n=n),
           sphere_reference, ("default", "exact", "ctx"))
      for name, n in (("circle", 2), ("sphere", 3))],
    *[Case("5 scale-aware active set", f"ball, r = {r:g}, points inside and outside",
           lambda mode, o, r=r: BallNode(mode, o, r=r), lambda r=r: sphere_inputs(2, r=r),
           ball_reference, ("default", *EXACT))
      for r in (1e-3, 1.0, 1e3)],
    Case("6 ill-conditioned", "least squares, cond(AᵀA) = 1e6 (A learnable)",
         lambda mode, o: LeastSquares(mode, o), lambda: least_squares_inputs(4),
         newton_reference, ("default", "exact"), float32=False),
    Case("6 ill-conditioned", "least squares, cond(AᵀA) = 1e3 (A learnable)",
         lambda mode, o: LeastSquares(mode, o, cond=1e3), lambda: least_squares_inputs(4),
         newton_reference, ("default", "exact")),
    Case("6 ill-conditioned", "analytic centre −Σ log(b − Ay) (A learnable)",
         AnalyticCentre, lambda: centre_inputs(5), newton_reference, ("default", "exact")),
    *[Case("3 redundant constraints", f"entropic transport 3×4, both marginals, {kind} "
           f"(ε = {eps:g} learnable)", lambda mode, o, eps=eps: EntropicTransport(mode, o, eps),
           lambda: transport_inputs(6), transport_reference, ("default", *EXACT))
      for kind, eps in (("flat", 1.0), ("peaked", 0.1))],
    *[Case("3 redundant constraints + bounds", f"quadratic transport 3×4, both marginals, "
           f"P ≥ 0, {kind} (γ = {gamma:g} learnable)",
           lambda mode, o, gamma=gamma: QuadraticTransport(mode, o, gamma),
           lambda: transport_inputs(15), qot_reference, ("default", *EXACT))
      for kind, gamma in (("sparse", 0.3), ("dense", 10.0))],
    Case("2, 5 active set", "sparsemax (simplex projection, θ learnable)",
         Sparsemax, lambda: simplex_inputs(8), sparsemax_reference, ("default", *EXACT)),
    Case("5 inexact external solution", "sparsemax from a solution accurate to 4e-8",
         Sparsemax, lambda: simplex_inputs(8), sparsemax_reference,
         ("inexact", "inexact+multipliers"), fd=False),
    Case("5 active set", "1.5-entmax (θ learnable)", Entmax15,
         lambda: simplex_inputs(9, entmax=True), entmax_reference, ("default", *EXACT)),
    Case("4 degenerate constraint", "sphere written as (‖y‖² − 1)² = 0", DegenerateSphere,
         lambda: sphere_inputs(10), None, ("exact",), warns=DDNWarning),
    Case("3 inconsistent constraints", "two disjoint spheres, ‖y‖² = 1 and ‖y‖² = 1.21",
         InconsistentSpheres, lambda: sphere_inputs(13), None, ("exact",),
         warns=OptimalityWarning),
    Case("5 weakly active", "ball, every x exactly on the sphere (μ = 0)", BallBoundary,
         lambda: boundary_inputs(14), None, EXACT, warns=OptimalityWarning, magnitude=False),
    Case("singular KKT", "a line of minimisers (reduced Hessian singular)", FlatValley,
         lambda: pair_inputs(11), None, ("exact",), warns=SingularSystemWarning),
]
PERMUTED = Case("2 permuted rows", "ball ∩ orthant ∩ box, 9 rows in 6 orders", BallOrthant,
                lambda: orthant_inputs(12), orthant_reference, ("default", "exact", "ctx"))


@dataclass
class Measurement:
    error: float  # max over inputs and parameters of |g − ref|∞ / |ref|∞ (nan: no reference)
    warnings: list[warnings.WarningMessage]
    grads: list[torch.Tensor]
    errors: list[float] = field(default_factory=list)  # per input and parameter

    @property
    def ddn_warnings(self) -> list[str]:
        return [f"{w.category.__name__}: {w.message}" for w in self.warnings
                if issubclass(w.category, DDNWarning)]


def measure(case: Case, mode: str, dtype: torch.dtype, options: Options,
            node: UserNode | None = None) -> Measurement:
    """Gradients of ⟨v, y⟩ for the inputs and learnable parameters at ``dtype``, the warnings
    emitted on the way (forward and backward), and the error against the float64 reference."""
    node64 = node if node is not None else case.node(mode, options)
    xs64 = case.inputs()
    test_node = copy.deepcopy(node64).to(dtype)
    leaves = [x.to(dtype).requires_grad_() for x in xs64] + list(learnable(test_node).values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = test_node(*leaves[: len(xs64)])
        v = torch.randn(y.shape, generator=_generator(99), dtype=F64)
        grads = torch.autograd.grad((y * v.to(dtype)).sum(), leaves)
    if case.reference is None:
        return Measurement(float("nan"), caught, list(grads))
    ref = case.reference(node64, xs64, y.detach().to(F64), v)
    top = max(r.abs().max().item() for r in ref)
    errors = [(g.to(F64) - r).abs().max().item() / (r.abs().max().item() or top)
              for g, r in zip(grads, ref)]
    return Measurement(max(errors), caught, list(grads), errors)


def _params(*, well_posed: bool, cases=CASES, dtypes=DTYPES, modes=None):
    for case in cases:
        if (case.reference is None) == well_posed:
            continue
        for mode in modes or case.modes:
            for dtype in dtypes:
                if dtype == "float32" and not case.float32:
                    continue
                for solver in SOLVERS:
                    reason = case.known.get((mode, dtype, solver))
                    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                    yield pytest.param(case, mode, dtype, solver, marks=marks,
                                       id=f"{case.example}-{mode}-{dtype}-{solver}")


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case,mode,dtype,solver", list(_params(well_posed=True)))
def test_right_gradient_and_silent(case, mode, dtype, solver):
    """Gradient for inputs and parameters equal to the reference; no DDNWarning."""
    result = measure(case, mode, DTYPES[dtype], SOLVERS[solver])
    assert result.ddn_warnings == []
    tol = TOL[dtype, solver]
    assert result.error <= tol, f"relative gradient errors {result.errors} > {tol:g}"


@pytest.mark.parametrize("case,mode,dtype,solver", [
    p for p in _params(well_posed=True, dtypes=["float64"])
    if p.values[1] != "default" and p.values[0].fd])
def test_finite_differences(case, mode, dtype, solver):
    """float64 finite differences (torch.autograd.gradcheck) for inputs and parameters, with
    DDNWarnings raised."""
    node = case.node(mode, SOLVERS[solver])
    n = len(learnable(node))
    leaves = [x.requires_grad_() for x in case.inputs()]
    leaves += [p.detach().clone().requires_grad_() for p in learnable(node).values()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DDNWarning)
        assert torch.autograd.gradcheck(functional(node, len(leaves) - n), tuple(leaves),
                                        atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("case,mode,dtype,solver", list(_params(well_posed=False)))
def test_ill_posed_warns_with_numbers(case, mode, dtype, solver):
    """Every sample named by a DDNWarning; one of the expected kind carries a magnitude."""
    result = measure(case, mode, DTYPES[dtype], SOLVERS[solver])
    named = {int(i) for w in result.ddn_warnings
             for group in re.findall(r"samples \[([\d, ]+)\]", w) for i in group.split(",")}
    assert named == set(range(case.inputs()[0].shape[0])), result.ddn_warnings
    reports = [w for w in result.warnings if issubclass(w.category, case.warns)]
    assert reports, f"no {case.warns.__name__}; got {result.ddn_warnings}"
    unnamed = [re.sub(r"samples \[[\d, ]+\] \(\d+ of \d+\)", "", str(w.message)) for w in reports]
    assert not case.magnitude or any(re.search(r"\d", m) for m in unnamed), result.ddn_warnings


@pytest.mark.parametrize("case,mode,dtype,solver", list(_params(well_posed=True,
                                                                 cases=[PERMUTED])))
def test_permuted_constraint_rows(case, mode, dtype, solver):
    """Ball ∩ orthant with an inactive box, rows in 6 orders: one gradient, the closed form's."""
    options, tol = SOLVERS[solver], TOL[dtype, solver]
    results = [measure(case, mode, DTYPES[dtype], options, BallOrthant(mode, options, perm))
               for perm in PERMUTATIONS]
    for perm, result in zip(PERMUTATIONS, results):
        assert result.ddn_warnings == [], perm
        assert result.error <= tol, (perm, result.errors)
    for result in results[1:]:
        for g, g0 in zip(result.grads, results[0].grads):
            assert torch.allclose(g, g0, rtol=tol, atol=tol * g0.abs().max())


# -- the table of docs/reliability.md ---------------------------------------------------------


def table() -> str:
    """Markdown rows: class, example, forward, then per dtype and linear solver the worst
    relative gradient error (over inputs, parameters and, for the permuted rows, orders) and the
    DDNWarnings emitted."""
    heads = [f"{d} {s}" for d in DTYPES for s in SOLVERS]
    rows = ["| class | example | forward | " + " | ".join(heads) + " |", "|---" * 7 + "|"]
    for case in [*CASES, PERMUTED]:
        for mode in case.modes:
            cells = []
            for dtype in DTYPES.values():
                for options in SOLVERS.values():
                    nodes = ([BallOrthant(mode, options, perm) for perm in PERMUTATIONS]
                             if case is PERMUTED else [None])
                    try:
                        results = [measure(case, mode, dtype, options, n) for n in nodes]
                    except Exception as error:  # noqa: BLE001 - a cell of the table
                        cells.append(f"raises {type(error).__name__}")
                        continue
                    names = sorted({w.split(":")[0].replace("Warning", "")
                                    for r in results for w in r.ddn_warnings})
                    error = max(r.error for r in results)
                    cell = "" if math.isnan(error) else f"{error:.0e}"
                    cells.append(" ".join([cell, *names]).strip() or "—")
            rows.append(f"| {case.klass} | {case.example} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """No arguments: print the table. ``EXAMPLE MODE DTYPE SOLVER`` (an example's prefix): print
    that measurement (errors per input and parameter, warnings)."""
    if not argv:
        print(table())
        return
    prefix, mode, dtype, solver = argv
    case = next(c for c in [*CASES, PERMUTED] if c.example.startswith(prefix))
    nodes = ([BallOrthant(mode, SOLVERS[solver], p) for p in PERMUTATIONS]
             if case is PERMUTED else [None])
    for node in nodes:
        result = measure(case, mode, DTYPES[dtype], SOLVERS[solver], node)
        print(case.example, mode, dtype, solver, "errors", result.errors)
        for w in result.ddn_warnings:
            print("  ", w)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
