"""The per-sample optimisation problem of a node, seen through a flat ``y`` of shape ``(b, m)``.

For a node with inputs ``xs`` and output ``y`` of shape ``(b, *out)`` the problem is, per sample,

    min_y f(x, y)   subject to   h(x, y) = 0  (p rows),   g(x, y) ≤ 0  (q rows).

:meth:`Problem.kkt` builds its KKT point (:class:`~ddnlib.kkt.KKTPoint`) at a given ``y``: the one
place where gradients, constraint Jacobians, the active set and the multipliers are assembled for
the backward pass, the forward solvers and :mod:`ddnlib.testing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .autodiff import batched_jacobian, grad
from .contract import check_objective
from .kkt import KKTPoint, kkt_point

if TYPE_CHECKING:
    from .options import Options
    from .solution import Solution

__all__ = ["Problem", "grad", "batched_jacobian"]


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

    @property
    def constrained(self) -> bool:
        return self.has_eq or self.has_ineq

    def unflatten(self, y: Tensor) -> Tensor:
        return y.reshape(self.out_shape)

    def flatten(self, y: Tensor) -> Tensor:
        return y.reshape(self.batch, self.m)

    def objective(self, y: Tensor) -> Tensor:
        f = self.node.objective(*self.xs, self.unflatten(y))
        return check_objective(self.node, f, self.batch, self.out_shape)  # ddnlib.contract

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
        g = self.node.inequality_constraints(*self.xs, self.unflatten(y))
        return _check_rows(g, (self.batch, None), "inequality_constraints")

    def constraints(self, y: Tensor) -> Tensor:
        """``c = [h; g]`` of shape ``(b, p + q)``."""
        return torch.cat([self.eq(y), self.ineq(y)], dim=1)

    def kkt(self, y: Tensor, solution: "Solution | None" = None, options: "Options | None" = None,
            *, multipliers: Tensor | None = None, active: Tensor | None = None) -> KKTPoint:
        """The KKT point at ``y`` (see :func:`ddnlib.kkt.kkt_point`)."""
        return kkt_point(self, y, solution, options if options is not None else self.node.options,
                         multipliers=multipliers, active=active)


def _check_rows(value, shape: tuple, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} returned {type(value).__name__}: expected a Tensor")
    if value.dim() != len(shape) or value.shape[0] != shape[0]:
        expected = "(b,)" if len(shape) == 1 else "(b, k)"
        raise ValueError(
            f"{what} returned shape {tuple(value.shape)}: expected {expected} with b={shape[0]}"
        )
    return value
