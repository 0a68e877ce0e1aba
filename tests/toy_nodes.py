"""Small user-style nodes with known solutions, used by the foundation tests."""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from ddnlib import DeclarativeNode, Options


class Softplus(torch.nn.Module):
    def forward(self, t):
        return torch.nn.functional.softplus(t)

    def right_inverse(self, v):
        return v.expm1().log()


class Ridge(DeclarativeNode):
    """y = argmin ½‖A y − x‖² + ½ λ‖y‖², learnable A and λ > 0 (parametrised)."""

    def __init__(self, n=5, m=3, lam=0.7, options: Options | None = None):
        super().__init__(options)
        self.A = torch.nn.Parameter(torch.randn(n, m, dtype=torch.float64))
        self.lam = torch.nn.Parameter(torch.tensor(lam, dtype=torch.float64))
        parametrize.register_parametrization(self, "lam", Softplus())

    def objective(self, x, y):
        r = y @ self.A.T - x
        return 0.5 * (r * r).sum(-1) + 0.5 * self.lam * (y * y).sum(-1)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.A.shape[1])

    def closed_form(self, x):
        A = self.A
        M = A.T @ A + self.lam * torch.eye(A.shape[1], dtype=A.dtype)
        return torch.linalg.solve(M, A.T @ x.T).T


class Quadratic(DeclarativeNode):
    """y = argmin ½ yᵀQy − yᵀBx with Q = LLᵀ + I (non-diagonal), learnable L and B."""

    def __init__(self, n=4, m=4, options: Options | None = None):
        super().__init__(options)
        self.L = torch.nn.Parameter(torch.randn(m, m, dtype=torch.float64) / m**0.5)
        self.B = torch.nn.Parameter(torch.randn(m, n, dtype=torch.float64))

    def Q(self):
        return self.L @ self.L.T + torch.eye(self.L.shape[0], dtype=self.L.dtype)

    def objective(self, x, y):
        return 0.5 * ((y @ self.Q()) * y).sum(-1) - (y * (x @ self.B.T)).sum(-1)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.B.shape[0])

    def closed_form(self, x):
        return torch.linalg.solve(self.Q(), (x @ self.B.T).T).T


class PseudoHuberRegression(DeclarativeNode):
    """y = argmin Σ_j c²(√(1 + ((A y − x)_j / c)²) − 1) + ½ ε‖y‖², learnable A and c."""

    def __init__(self, n=6, m=3, c=0.8, options: Options | None = None):
        super().__init__(options)
        self.A = torch.nn.Parameter(torch.randn(n, m, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def objective(self, x, y):
        r = (y @ self.A.T - x) / self.c
        return (self.c**2 * (torch.sqrt(1 + r * r) - 1)).sum(-1) + 0.05 * (y * y).sum(-1)

    def initial_guess(self, x):
        return x.new_zeros(x.shape[0], self.A.shape[1])


class WeightedMean(DeclarativeNode):
    """Two inputs: y = argmin Σ_j exp(w_j)(y − x_j)² = Σ softmax(w)_j x_j, y: (b, 1)."""

    def objective(self, x, w, y):
        return (w.exp() * (y - x) ** 2).sum(-1)

    def initial_guess(self, x, w):
        return x.mean(-1, keepdim=True)

    @staticmethod
    def closed_form(x, w):
        return (torch.softmax(w, -1) * x).sum(-1, keepdim=True)


class Quartic(DeclarativeNode):
    """y = argmin ½‖y − x‖² + ¼ s Σ y⁴: smooth, strictly convex, elementwise; learnable s."""

    def __init__(self, s=1.0, options: Options | None = None):
        super().__init__(options)
        self.s = torch.nn.Parameter(torch.tensor(s, dtype=torch.float64))

    def objective(self, x, y):
        return (0.5 * (y - x) ** 2 + 0.25 * self.s * y**4).flatten(1).sum(-1)
