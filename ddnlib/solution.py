"""``Solution``: what a forward solver hands to the backward pass.

A node's ``solve(*xs)`` may return

- ``y`` — the solution ``(b, *out)``;
- ``(y, ctx)`` — ``ctx`` a mapping whose ``"lambda"`` ``(b, p)`` and ``"mu"`` ``(b, q)`` entries are
  the multipliers of the equality and inequality constraints, every other entry an extra for a
  custom :meth:`~ddnlib.DeclarativeNode.vjp`;
- a :class:`Solution`, which says the same with named fields and also carries solver statistics.

Multipliers follow the sign convention of the Lagrangian ``L = f + λᵀh + μᵀg`` (``μ ≥ 0`` at a
minimum). :func:`as_solution` turns each form into a :class:`Solution`; a ``Solution`` is itself a
read-only mapping over ``"lambda"``, ``"mu"`` and the extras, so a ``vjp`` written against the
``ctx`` dictionary works unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import warnings

import torch
from torch import Tensor

from .errors import DDNWarning

__all__ = ["Solution", "as_solution"]

_MULTIPLIER_KEYS = {"lambda": "eq_multipliers", "mu": "ineq_multipliers"}


@dataclass(frozen=True)
class Solution(Mapping):
    """The solution of a node's problem for a batch.

    Attributes:
        y: the solution ``(b, *out)``.
        eq_multipliers: ``λ (b, p)`` of the equality constraints, or ``None`` (the engine then
            recovers them by least squares on the stationarity condition).
        ineq_multipliers: ``μ (b, q)`` of the inequality constraints, or ``None``.
        extras: further per-call data for a custom ``vjp`` (read as ``ctx[key]``).
        stats: solver statistics (e.g. ``iterations``, ``converged (b,)``, ``residual (b,)``);
            informative only, never read by the engine.
        hessian_cholesky: the lower Cholesky factor ``(b, m, m)`` of ``∇²_yy f`` that an
            unconstrained solver formed at its last iterate, within one step below its tolerance
            of ``y`` (the default Newton solver sets it), or ``None``. The generic backward of an
            unconstrained problem with a dense linear solver and no damping solves with it
            instead of forming and factorising the Hessian again; the difference from the
            Hessian at ``y`` is of the size of that last step.
        hessian: ``∇²_yy L (b, m, m)`` at ``y`` and the multipliers, exact, or ``None``: the
            generic backward uses it instead of differentiating ``∇_y L`` again. The interior
            point sets it where it found the objective quadratic and the constraints affine.
        constraint_jacobian: ``∂[h; g]/∂y (b, p + q, m)`` of constraints that are *affine* in
            ``y`` (the same at every ``y``), or ``None``: the generic backward uses it instead of
            differentiating the constraints, and skips its degeneracy test (affine constraints
            have no curvature). Set by the interior point with :attr:`hessian`.
        certified: the tolerance to which the solver verified, with the node's own functions
            differentiated at ``y``, that every sample meets its stopping test (a stationary,
            feasible point with multipliers of the right sign), or ``None``. Where it is at most
            the node's ``optimality_tol`` the backward's optimality check, which would repeat that
            test, is skipped. The default solvers set it when every sample converged.
    """

    y: Tensor
    eq_multipliers: Tensor | None = None
    ineq_multipliers: Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    hessian_cholesky: Tensor | None = None
    hessian: Tensor | None = None
    constraint_jacobian: Tensor | None = None
    certified: float | None = None

    @property
    def has_backward_data(self) -> bool:
        """Whether the solver handed the backward pass more than ``y`` and the multipliers
        (:attr:`hessian_cholesky`, :attr:`hessian`, :attr:`constraint_jacobian`,
        :attr:`certified`)."""
        return any(t is not None for t in (self.hessian_cholesky, self.hessian,
                                           self.constraint_jacobian, self.certified))

    # -- the ctx mapping view -------------------------------------------------------------------
    def _entries(self) -> dict[str, Any]:
        entries = {key: getattr(self, name) for key, name in _MULTIPLIER_KEYS.items()}
        return {**{k: v for k, v in entries.items() if v is not None}, **self.extras}

    def __getitem__(self, key: str) -> Any:
        return self._entries()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def detach(self) -> "Solution":
        """The same solution with every tensor detached from the graph."""

        def cut(value):
            return value.detach() if isinstance(value, Tensor) else value

        return replace(self, y=cut(self.y), eq_multipliers=cut(self.eq_multipliers),
                       ineq_multipliers=cut(self.ineq_multipliers),
                       extras={k: cut(v) for k, v in self.extras.items()},
                       hessian_cholesky=cut(self.hessian_cholesky), hessian=cut(self.hessian),
                       constraint_jacobian=cut(self.constraint_jacobian))

    def rows(self, keep: Tensor) -> "Solution":
        """The samples ``keep`` (a ``(b,)`` mask) of every per-sample tensor."""
        b = self.y.shape[0]

        def take(value):
            per_sample = isinstance(value, Tensor) and value.dim() and value.shape[0] == b
            return value[keep] if per_sample else value

        return replace(self, y=take(self.y), eq_multipliers=take(self.eq_multipliers),
                       ineq_multipliers=take(self.ineq_multipliers),
                       extras={k: take(v) for k, v in self.extras.items()},
                       hessian_cholesky=take(self.hessian_cholesky), hessian=take(self.hessian),
                       constraint_jacobian=take(self.constraint_jacobian))


def as_solution(out: Any, where: str = "solve", extras_read: bool = True) -> Solution:
    """A :class:`Solution` from what ``where`` (a ``solve`` method) returned.

    Accepts a tensor ``y``, a pair ``(y, ctx)`` with ``ctx`` a mapping or ``None``, or a
    :class:`Solution`. Raises :class:`TypeError` naming ``where`` for anything else. With
    ``extras_read=False`` (the node's ``vjp`` is the generic engine, which reads only the
    multipliers) extra ``ctx`` entries are reported as a :class:`~ddnlib.DDNWarning`: a multiplier
    under another key (``"nu"``, ``"lam"``) would otherwise be ignored silently.
    """
    if isinstance(out, Solution):
        solution = out
    elif isinstance(out, Tensor):
        solution = Solution(out)
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"{where} returned a tuple of {len(out)} items: expected y, (y, ctx) "
                            "or a ddnlib.Solution")
        y, ctx = out
        if ctx is None:
            ctx = {}
        if not isinstance(ctx, Mapping):
            raise TypeError(f"{where} returned ctx of type {type(ctx).__name__}: expected a "
                            "Mapping (or return a ddnlib.Solution)")
        extras = {k: v for k, v in ctx.items() if k not in _MULTIPLIER_KEYS}
        solution = Solution(y, ctx.get("lambda"), ctx.get("mu"), extras)
    else:
        raise TypeError(f"{where} returned {type(out).__name__}: expected a Tensor y, (y, ctx) or "
                        "a ddnlib.Solution")
    if not isinstance(solution.y, Tensor):
        raise TypeError(f"{where} returned y of type {type(solution.y).__name__}: expected a Tensor")
    for key, name in _MULTIPLIER_KEYS.items():
        value = getattr(solution, name)
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{where} returned {key!r} multipliers of type "
                            f"{type(value).__name__}: expected a Tensor (b, k)")
    if solution.extras and not extras_read:
        warnings.warn(f"{where} returned ctx entries {sorted(solution.extras)} that nothing reads: "
                      "the generic backward reads only the multipliers 'lambda' (equalities) and "
                      "'mu' (inequalities). Rename them, or return a ddnlib.Solution.", DDNWarning,
                      stacklevel=4)
    return solution


def multipliers_tensor(value: Tensor | None, b: int, rows: int, dtype: torch.dtype, what: str,
                       where: str) -> Tensor | None:
    """``value`` reshaped to ``(b, rows)`` in ``dtype``, detached; ``ValueError`` on a wrong size."""
    if value is None:
        return None
    if value.numel() != b * rows:
        raise ValueError(f"{where} returned {what} multipliers of shape {tuple(value.shape)}: "
                         f"expected ({b}, {rows}), one per constraint row")
    return value.detach().reshape(b, rows).to(dtype)
