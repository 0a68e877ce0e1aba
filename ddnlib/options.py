"""Settings read by the engine and the default solvers of one node."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from .linear_solvers import CG, Auto, Dense, LinearSolver

__all__ = ["Options"]

_LINEAR_SOLVERS = ("auto", "dense", "cg")


@dataclass(frozen=True)
class Options:
    """How a node is solved and differentiated.

    Attributes:
        linear_solver: the solver of the per-sample Hessian / KKT systems of the backward pass and
            of the default forward solvers' Newton and SQP steps: a
            :class:`~ddnlib.linear_solvers.LinearSolver` (``Dense()``, ``CG(tol, max_iter)``,
            ``Auto(dense_max, dense, cg)``), or a string naming one: ``"dense"`` forms per-sample
            Hessians (or KKT matrices) and factorises them; ``"cg"`` is matrix-free (conjugate
            gradients on Hessian-vector products, projected onto the active constraints);
            ``"auto"`` picks dense when the per-sample system has at most ``dense_max`` rows.
            ``dense_max``, ``cg_tol`` and ``cg_max_iter`` configure the string forms.
        dense_max: the crossover used by ``"auto"`` (see ``docs/benchmarks.md``).
        damping: ``γ ≥ 0`` added to the Hessian, ``H + γI``, in the backward solve.
        cg_tol: relative residual at which CG stops (``None``: ``sqrt(eps)`` of the dtype).
        cg_max_iter: CG iteration cap (``None``: ``2 m + 10``).
        check_optimality: run the checks of the forward solution in the backward pass: the
            optimality check (:class:`~ddnlib.Optimality`) and the test for degenerate
            constraints (:meth:`~ddnlib.KKTPoint.report_rank`). Off saves their cost.
        optimality_tol: tolerance of that check on the size of the Newton/KKT step relative to
            ``‖y‖∞ + optimality_tol`` and on constraint violation (``None``: ``1e-3`` in float32, ``1e-6``
            otherwise).
        active_tol: how close to its boundary an inequality ``g_j(y) ≤ 0`` counts as tight: first-order
            distance ``max(−g_j, 0) / ‖∇g_j‖ ≤ active_tol · (‖y‖∞ + active_tol)`` (``None``:
            ``1e-4`` in float32, ``1e-8`` otherwise); candidates within ``√active_tol`` are
            decided by their multipliers (see :func:`ddnlib.kkt.active_set`).
        strict: raise :class:`~ddnlib.DDNError` subclasses instead of warning.
        max_iter: iteration cap of the default forward solvers.
        solver_tol: stopping tolerance of the default forward solvers on the step size relative to
            ``1 + ‖y‖∞`` (``None``: ``1e-5`` in float32, ``1e-10`` otherwise).
    """

    linear_solver: str | LinearSolver = "auto"
    dense_max: int = 64
    damping: float = 0.0
    cg_tol: float | None = None
    cg_max_iter: int | None = None
    check_optimality: bool = True
    optimality_tol: float | None = None
    active_tol: float | None = None
    strict: bool = False
    max_iter: int = 100
    solver_tol: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.linear_solver, LinearSolver) and (
                not isinstance(self.linear_solver, str) or self.linear_solver not in _LINEAR_SOLVERS):
            raise ValueError(
                f"linear_solver={self.linear_solver!r}: expected one of {_LINEAR_SOLVERS} or a "
                "ddnlib.linear_solvers.LinearSolver"
            )
        for name, optional in (("dense_max", False), ("max_iter", False), ("cg_max_iter", True)):
            value = getattr(self, name)
            if not (optional and value is None) and (not _integer(value) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive integer"
                                 + (" or None" if optional else ""))
        if not _number(self.damping) or not self.damping >= 0:
            raise ValueError(f"damping={self.damping!r}: expected a finite non-negative number")
        for name in ("cg_tol", "optimality_tol", "active_tol", "solver_tol"):
            value = getattr(self, name)
            if value is not None and (not _number(value) or not value > 0):
                raise ValueError(f"{name}={value!r}: expected a finite positive number or None")
        for name in ("check_optimality", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")

    @property
    def solver(self) -> LinearSolver:
        """``linear_solver`` as a :class:`~ddnlib.linear_solvers.LinearSolver` object."""
        if isinstance(self.linear_solver, LinearSolver):
            return self.linear_solver
        cg = CG(self.cg_tol, self.cg_max_iter)
        return {"auto": Auto(self.dense_max, Dense(), cg), "dense": Dense(), "cg": cg}[
            self.linear_solver]

    def replace(self, **changes) -> "Options":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def tol(self, name: str, dtype: torch.dtype) -> float:
        """The tolerance ``name`` resolved for ``dtype`` (dtype defaults when unset)."""
        value = getattr(self, name)
        if value is not None:
            return float(value)
        single = dtype in (torch.float32, torch.float16, torch.bfloat16)
        if name == "cg_tol":
            return float(torch.finfo(dtype).eps) ** 0.5
        return {
            "optimality_tol": (1e-3, 1e-6),
            "active_tol": (1e-4, 1e-8),
            "solver_tol": (1e-5, 1e-10),
        }[name][0 if single else 1]


def _integer(value) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value) -> bool:
    """A finite real number that is not a bool."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
