"""User-style nodes for the tests of ``ddnlib.testing`` and of ``python -m ddnlib gradcheck``.

Correct nodes and nodes with a planted defect (a wrong ``vjp``, a ``solve`` that does not return
the minimiser, an objective that is not smooth at the solution).
"""

from __future__ import annotations

import torch

from ddnlib import DeclarativeNode, Options


class Smoother(DeclarativeNode):
    """y = argmin_y ½‖y − x‖² + ¼ Σ_i (y_{i+1} − y_i)² + e^θ Σ_i log cosh y_i, x, y: (b, n).

    Smooth and strictly convex; one learnable scalar θ.
    """

    def __init__(self, theta: float = 0.0, options: Options | None = None):
        super().__init__(options)
        self.theta = torch.nn.Parameter(torch.tensor(float(theta)))

    def objective(self, x, y):
        fit = 0.5 * ((y - x) ** 2).sum(-1)
        coupling = 0.25 * (y.diff(dim=-1) ** 2).sum(-1)
        log_cosh = y + torch.nn.functional.softplus(-2 * y) - 0.6931471805599453
        return fit + coupling + self.theta.exp() * log_cosh.sum(-1)


class WrongVjp(Smoother):
    """Defect: the backward pass is 1.5 times the correct one."""

    def vjp(self, *xs, y, v, ctx=None):
        inputs, params = super().vjp(*xs, y=y, v=v, ctx=ctx)
        return (tuple(None if g is None else 1.5 * g for g in inputs),
                {k: 1.5 * g for k, g in params.items()})


class RightVjp(Smoother):
    """A correct override: the generic engine's result, passed through."""

    def vjp(self, *xs, y, v, ctx=None):
        return super().vjp(*xs, y=y, v=v, ctx=ctx)


class WrongSolve(Smoother):
    """Defect: ``solve`` returns 0.9 x, which is not the minimiser."""

    def solve(self, x):
        return 0.9 * x


class AbsoluteDeviation(DeclarativeNode):
    """Defect: y = argmin_y e^θ Σ_i |y_i − x_i| (= x) is not smooth at its solution.

    The Hessian there is zero: the engine warns that it is singular and its gradient is wrong.
    """

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.0))

    def objective(self, x, y):
        return self.theta.exp() * (y - x).abs().sum(-1)


class SoftThreshold(DeclarativeNode):
    """Defect: y = argmin_y ½‖y − x‖² + e^θ ‖y‖₁, not smooth where y_i = 0 (|x_i| ≤ e^θ)."""

    def __init__(self, theta: float = 0.0):
        super().__init__(Options(max_iter=8))
        self.theta = torch.nn.Parameter(torch.tensor(float(theta)))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + self.theta.exp() * y.abs().sum(-1)


class Sphere(DeclarativeNode):
    """u = argmin_u ½‖u − x‖² subject to ‖u‖² − r² = 0 (closed-form solve u = r x / ‖x‖)."""

    def __init__(self, r: float = 1.5):
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(float(r)))

    def objective(self, x, u):
        return 0.5 * ((u - x) ** 2).sum(-1)

    def equality_constraints(self, x, u):
        return ((u * u).sum(-1) - self.r**2).unsqueeze(-1)

    def solve(self, x):
        return self.r * x / x.norm(dim=-1, keepdim=True)


class SphereOffset(Sphere):
    """Defect: a feasible point of the sphere that is not the closest one to x."""

    def solve(self, x):
        z = x + 0.3 * x.flip(-1)
        return self.r * z / z.norm(dim=-1, keepdim=True)


class SphereInside(Sphere):
    """Defect: 0.9 times the solution, off the constraint ‖u‖ = r."""

    def solve(self, x):
        return 0.9 * super().solve(x)


class Ball(DeclarativeNode):
    """u = argmin_u ½‖u − x‖² subject to ‖u‖² − r² ≤ 0, returning the multiplier μ."""

    def __init__(self, r: float = 1.5):
        super().__init__()
        self.r = torch.nn.Parameter(torch.tensor(float(r)))

    def objective(self, x, u):
        return 0.5 * ((u - x) ** 2).sum(-1)

    def inequality_constraints(self, x, u):
        return ((u * u).sum(-1) - self.r**2).unsqueeze(-1)

    def solve(self, x):
        norm = x.norm(dim=-1, keepdim=True)
        u = x * (self.r / norm).clamp(max=1)
        mu = 0.5 * (norm / self.r - 1).clamp_min(0)  # u − x + 2 μ u = 0 on the boundary
        return u, {"mu": mu}


class BallWrongSign(Ball):
    """Defect: projects onto the sphere even for x inside the ball (μ < 0 there)."""

    def solve(self, x):
        norm = x.norm(dim=-1, keepdim=True)
        return self.r * x / norm, {"mu": 0.5 * (norm / self.r - 1)}


class SoftThresholdExact(SoftThreshold):
    """The soft threshold with its exact solve and closed-form vjp: correct, though non-smooth.

    y = sign(x) max(|x| − λ, 0), λ = e^θ: ∂y/∂x = 1[|x| > λ], ∂y/∂θ = −λ sign(x) 1[|x| > λ].
    """

    def solve(self, x):
        lam = self.theta.exp()
        return x.sign() * (x.abs() - lam).clamp_min(0)

    def vjp(self, x, *, y, v, ctx=None):
        lam = self.theta.exp()
        moving = (x.abs() > lam).to(v.dtype)
        grad_x = v * moving if x.requires_grad else None
        grads = {"theta": -(v * moving * x.sign()).sum() * lam} if self.theta.requires_grad else {}
        return (grad_x,), grads


class SoftThresholdWrongVjp(SoftThresholdExact):
    """Defect: the closed form misses the θ dependence of the solution."""

    def vjp(self, x, *, y, v, ctx=None):
        (grad_x,), grads = super().vjp(x, y=y, v=v, ctx=ctx)
        return (grad_x,), {k: torch.zeros_like(g) for k, g in grads.items()}


class Pair(DeclarativeNode):
    """y = argmin_y ½‖y − a‖² + ½ e^θ ‖y − b‖² + Σ log cosh y: two inputs a, b of one shape."""

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.0))

    def objective(self, a, b, y):
        log_cosh = y + torch.nn.functional.softplus(-2 * y) - 0.6931471805599453
        return (0.5 * ((y - a) ** 2).sum(-1) + 0.5 * self.theta.exp() * ((y - b) ** 2).sum(-1)
                + log_cosh.sum(-1))


class NaNSolve(Smoother):
    """Defect: ``solve`` returns NaN for the first sample."""

    def solve(self, x):
        y = x.clone()
        y[0] = float("nan")
        return y
