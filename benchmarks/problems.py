"""Smooth test nodes of the engine benchmarks, both with a Hessian whose condition number stays
bounded (≤ 1 + 4w) as the size ``m`` grows, so that CG needs a size-independent number of steps.

``ρ(z) = √(1 + z²) − 1`` is the pseudo-Huber penalty (``0 < ρ'' ≤ 1``).

* :class:`SmoothDenoiser` (local coupling, ``O(m)`` per evaluation):
  ``y = argmin_y ½‖y − x‖² + w Σ_i ρ(y_{i+1} − y_i)``, ``x, y ∈ R^m``.
* :class:`RobustRegression` (dense coupling, ``O(m²)`` per evaluation):
  ``y = argmin_y ½‖y‖² + w Σ_j ρ((A y − x)_j)``, ``A ∈ R^{m×m}`` fixed with ``‖A‖ ≈ 1``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddnlib import DeclarativeNode, Options

__all__ = ["SmoothDenoiser", "RobustRegression", "pseudo_huber", "denoiser_gradient"]


def pseudo_huber(z: Tensor) -> Tensor:
    return torch.sqrt(1 + z * z) - 1


def denoiser_gradient(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """``∇_y`` of the denoiser objective in closed form (used by the unrolled solver)."""
    d = y[:, 1:] - y[:, :-1]
    s = w * d / torch.sqrt(1 + d * d)  # w ρ'(d)
    return (y - x) + torch.nn.functional.pad(s, (1, 0)) - torch.nn.functional.pad(s, (0, 1))


class SmoothDenoiser(DeclarativeNode):
    """``argmin_y ½‖y − x‖² + w Σ_i ρ(y_{i+1} − y_i)`` with learnable ``w = exp(log_w)``."""

    def __init__(self, weight: float = 1.0, options: Options | None = None):
        super().__init__(options)
        self.log_w = torch.nn.Parameter(torch.tensor(math.log(weight), dtype=torch.float64))

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        d = y[:, 1:] - y[:, :-1]
        return 0.5 * ((y - x) ** 2).sum(-1) + self.log_w.exp() * pseudo_huber(d).sum(-1)


class RobustRegression(DeclarativeNode):
    """``argmin_y ½‖y‖² + w Σ_j ρ((A y − x)_j)`` with a fixed random ``A (m, m)``, ``‖A‖ ≈ 1``."""

    def __init__(self, m: int, weight: float = 1.0, options: Options | None = None, seed: int = 0):
        super().__init__(options)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("A", torch.randn(m, m, generator=gen, dtype=torch.float64)
                             / (2 * math.sqrt(m)))
        self.log_w = torch.nn.Parameter(torch.tensor(math.log(weight), dtype=torch.float64))

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * (y * y).sum(-1) + self.log_w.exp() * pseudo_huber(y @ self.A.T - x).sum(-1)

    def initial_guess(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], self.A.shape[1])
