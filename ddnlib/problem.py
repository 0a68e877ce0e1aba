"""The per-sample optimisation problem of a node, seen through a flat ``y`` of shape ``(b, m)``.

For a node with inputs ``xs`` and output ``y`` of shape ``(b, *out)`` the problem is, per sample,

    min_y f(x, y)   subject to   h(x, y) = 0  (p rows),   g(x, y) ≤ 0  (q rows).

Because the problem is separable across the batch, the gradient of ``Σ_b f_b`` with respect to
``y`` holds every per-sample gradient, and a backward pass with the same direction in every sample
gives every per-sample Hessian or Jacobian row at once. The helpers below build on that.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Problem", "grad", "batched_jacobian"]


def grad(
    output: Tensor,
    inputs: Sequence[Tensor],
    grad_output: Tensor | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    is_grads_batched: bool = False,
) -> list[Tensor]:
    """``torch.autograd.grad`` that returns zeros for inputs the output does not depend on."""
    inputs = list(inputs)
    if output.requires_grad:
        grads = torch.autograd.grad(
            output,
            inputs,
            grad_output,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=is_grads_batched,
        )
    else:
        grads = [None] * len(inputs)
    lead = grad_output.shape[:1] if is_grads_batched else ()
    return [
        torch.zeros(lead + x.shape, dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def batched_jacobian(out: Tensor, y: Tensor) -> Tensor:
    """Per-sample Jacobian ``∂out_b/∂y_b`` of shape ``(b, k, m)`` for ``out (b, k)``, ``y (b, m)``.

    One vectorised backward pass over the ``k`` basis directions (``is_grads_batched``).
    """
    b, k = out.shape
    if k == 0:
        return out.new_zeros(b, 0, y.shape[1])
    basis = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, b, k)
    rows = grad(out, [y], basis, retain_graph=True, is_grads_batched=True)[0]
    return rows.transpose(0, 1)


class Problem:
    """The problem of ``node`` at inputs ``xs``, with ``y`` flattened to ``(b, m)``."""

    def __init__(self, node, xs: Sequence[Tensor], out_shape: torch.Size):
        self.node = node
        self.xs = tuple(xs)
        self.out_shape = torch.Size(out_shape)
        self.batch = out_shape[0]
        self.m = out_shape[1:].numel()
        self.has_eq = node.has_equality_constraints
        self.has_ineq = node.has_inequality_constraints
        self.ineq_rows = 0  # q, known once the inequality constraints have been evaluated

    @property
    def constrained(self) -> bool:
        return self.has_eq or self.has_ineq

    def unflatten(self, y: Tensor) -> Tensor:
        return y.reshape(self.out_shape)

    def objective(self, y: Tensor) -> Tensor:
        f = self.node.objective(*self.xs, self.unflatten(y))
        return _check_rows(f, (self.batch,), "objective")

    def eq(self, y: Tensor) -> Tensor:
        """``h(x, y)`` of shape ``(b, p)`` (``p = 0`` without equality constraints)."""
        if not self.has_eq:
            return y.new_zeros(self.batch, 0)
        h = self.node.equality_constraints(*self.xs, self.unflatten(y))
        return _check_rows(h, (self.batch, None), "equality_constraints")

    def ineq(self, y: Tensor) -> Tensor:
        """``g(x, y)`` of shape ``(b, q)`` (``q = 0`` without inequality constraints)."""
        if not self.has_ineq:
            return y.new_zeros(self.batch, 0)
        g = _check_rows(self.node.inequality_constraints(*self.xs, self.unflatten(y)),
                        (self.batch, None), "inequality_constraints")
        self.ineq_rows = g.shape[1]
        return g

    def constraints(self, y: Tensor) -> Tensor:
        """``c = [h; g]`` of shape ``(b, p + q)``."""
        return torch.cat([self.eq(y), self.ineq(y)], dim=1)

    def lagrangian_grad(self, y: Tensor, multipliers: Tensor | None = None) -> Tensor:
        """``∇_y (f + νᵀc)`` of shape ``(b, m)`` with its graph kept (``y`` must require grad)."""
        total = self.objective(y).sum()
        if multipliers is not None and multipliers.shape[1] > 0:
            total = total + (self.constraints(y) * multipliers).sum()
        return grad(total, [y], create_graph=True)[0]


def _check_rows(value, shape: tuple, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} returned {type(value).__name__}: expected a Tensor")
    if value.dim() != len(shape) or value.shape[0] != shape[0]:
        expected = "(b,)" if len(shape) == 1 else "(b, k)"
        raise ValueError(
            f"{what} returned shape {tuple(value.shape)}: expected {expected} with b={shape[0]}"
        )
    return value
