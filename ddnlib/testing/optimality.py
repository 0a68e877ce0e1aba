"""Optimality check of a node's forward solution ``y`` (float64 copy of the node).

Per sample, with Lagrangian ``L = f + νᵀc`` over the equalities and the active inequalities
(multipliers from the solver's ``ctx`` or recovered by least squares, as in the engine):

- stationarity: the Newton/KKT step ``d`` solving ``[H Aᵀ; A 0] [d; dν] = −[∇_y L; c]`` is small,
  ``‖d‖∞ ≤ tol · (‖y‖∞ + tol)``;
- feasibility: the first-order distance to the constraints ``max_j c_j⁺ / ‖∇_y c_j‖`` is at most
  ``tol · (‖y‖∞ + tol)``;
- multiplier sign: tight or active inequality multipliers ``μ ≥ −tol · (1 + ‖∇_y f‖∞)``;

(these three are :meth:`ddnlib.kkt.KKTPoint.optimality`, the definition the backward pass's
optimality warning uses too);
- perturbation: no nearby feasible point ``y' = y + δ`` (``‖δ‖∞ = radius · (1 + ‖y‖∞)``, moved
  back onto violated constraints by Gauss–Newton until it is as feasible as ``y``, up to
  ``10⁻³ tol (1 + ‖y‖∞)``) has ``f(y') < f(y) − ftol · (1 + |f(y)|)``;
- default solver (nodes with their own ``solve``): the default solver
  ``DeclarativeNode.solve(node, *xs)`` finds no feasible point with a lower objective (same rule).

Stationarity and the multiplier sign need derivatives at ``y``; for a non-smooth problem (a node
that overrides ``vjp``, unless ``smooth=True``) they are reported but not decisive, and the
perturbation and default-solver comparisons decide.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..autodiff import batched_jacobian
from ..linalg import lstsq
from ..linear_solvers import Dense
from ..node import DeclarativeNode
from ..problem import Problem
from ..solution import Solution, as_solution
from ._common import (captured, float64_copy, float64_inputs, node_name, overrides, solve,
                      warning_rows)
from .report import CheckResult, CheckRow

__all__ = ["check_optimality"]

_RESTORE_STEPS = 20


def check_optimality(
    node: DeclarativeNode,
    *xs: Tensor,
    tol: float | None = None,
    ftol: float = 1e-9,
    smooth: bool | None = None,
    perturbations: int = 16,
    radius: float = 1e-3,
    seed: int = 0,
) -> CheckResult:
    """Check that ``node.solve(*xs)`` returns a feasible (local) minimiser.

    Args:
        node: the node (not modified: a float64 copy is checked).
        xs: the inputs, each ``(b, ...)``.
        tol: stationarity / feasibility tolerance (``None``: the node's ``optimality_tol`` in
            float64).
        ftol: relative objective decrease that counts as "a lower objective".
        smooth: whether derivative-based rows decide (``None``: unless the node overrides ``vjp``).
        perturbations: random nearby points tried per sample.
        radius: their relative distance from ``y``.
        seed: seeds the perturbations.
    """
    for name, value in (("ftol", ftol), ("radius", radius)):
        if not value > 0:
            raise ValueError(f"{name}={value!r}: expected a positive number")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol={tol!r}: expected a positive number or None")
    if not isinstance(perturbations, int) or perturbations < 0:
        raise ValueError(f"perturbations={perturbations!r}: expected a non-negative integer")
    result = CheckResult(node_name(node))
    node64, xs64 = float64_copy(node), float64_inputs(xs)
    tol = tol if tol is not None else node64.options.tol("optimality_tol", torch.float64)
    smooth = (not overrides(node64, "vjp")) if smooth is None else smooth
    problem = None
    with captured() as caught:
        try:
            y, ctx = solve(node64, xs64)
            problem = Problem(node64, xs64, y.shape)
            result.extend(_kkt_rows(problem, y, ctx, tol, smooth))
            if not torch.isfinite(y).all():  # reported by _kkt_rows; nothing to compare with
                problem = None
            else:
                generator = torch.Generator().manual_seed(seed)
                result.rows.append(_perturbation_row(problem, y, tol, ftol, perturbations,
                                                     radius, generator))
        except Exception as error:
            result.rows.append(CheckRow("optimality", "solve", float("nan"), "-", "fail",
                                        f"{type(error).__name__}: {error}"))
    result.extend(warning_rows("optimality", caught))
    if problem is not None and overrides(node64, "solve"):
        result.rows.append(_default_solver_row(problem, node64, xs64, y, tol, ftol))
    return result


def _flat(problem: Problem, y: Tensor) -> Tensor:
    return y.reshape(problem.batch, problem.m)


def _scale(problem: Problem, y: Tensor) -> Tensor:
    return 1 + _flat(problem, y).abs().amax(-1)


def _violation(problem: Problem, yf: Tensor) -> Tensor:
    """Per-sample ``max(|h|, g⁺)`` (zeros without constraints)."""
    h, g = problem.eq(yf), problem.ineq(yf)
    parts = [h.abs(), g.clamp_min(0), yf.new_zeros(problem.batch, 1)]
    return torch.cat(parts, dim=1).amax(-1)


def _kkt_rows(problem: Problem, y: Tensor, ctx, tol: float, smooth: bool) -> list[CheckRow]:
    """The stationarity, feasibility and multiplier-sign rows: the engine's own
    :class:`~ddnlib.kkt.Optimality` of the point (dense KKT step)."""
    if not torch.isfinite(y).all():
        bad = (~torch.isfinite(_flat(problem, y))).any(-1).nonzero().flatten().tolist()
        return [CheckRow("optimality", "solve", float("nan"), "finite y", "fail",
                         f"non-finite solution at samples {bad}")]
    solution = as_solution((y, ctx)) if not isinstance(ctx, Solution) else ctx
    with torch.enable_grad():
        kkt = problem.kkt(y, solution)
        r_y, r_c = kkt.residual()
        step = Dense().solve(kkt.operator(), r_y.unsqueeze(-1), r_c.unsqueeze(-1))[0][..., 0]
    measures = kkt.optimality(step, tol)
    rows = [_row("stationarity", measures.step, tol, "relative Newton/KKT step", smooth)]
    if problem.constrained:
        rows.append(_row("feasibility", measures.violation, tol,
                         "distance to the constraints |c_j|/|grad c_j| / (|y| + tol)", True))
    if problem.has_ineq:
        rows.append(_row("multiplier sign", measures.wrong_sign, tol,
                         "max(-mu_j, 0) over tight g_j / (1 + |grad f|)", smooth))
    return rows


def _row(argument: str, per_sample: Tensor, tol: float, what: str, decisive: bool) -> CheckRow:
    worst = per_sample.max().item()
    bad = (~(per_sample <= tol)).nonzero().flatten().tolist()
    detail = what + (f"; fails at samples {bad[:8]}" if bad else "")
    status = "pass" if not bad else ("fail" if decisive else "skip")
    if bad and not decisive:
        detail += "; not decisive for a non-smooth problem (vjp overridden; smooth=True enforces)"
    return CheckRow("optimality", argument, worst, f"{tol:g}", status, detail)


def _restore(problem: Problem, yf: Tensor, target: Tensor) -> Tensor:
    """Gauss–Newton onto ``h = 0`` and the violated ``g ≤ 0`` (minimum-norm steps), until the
    violation is at most ``target (b,)``."""
    for _ in range(_RESTORE_STEPS):
        with torch.enable_grad():
            yv = yf.detach().requires_grad_()
            h, g = problem.eq(yv), problem.ineq(yv)
            c = torch.cat([h, g], dim=1)
            sel = torch.cat([torch.ones_like(h, dtype=torch.bool), g > 0], dim=1)
            A = batched_jacobian(c, yv).detach()
        c = c.detach() * sel
        if not (c.abs().amax(-1) > target).any():
            break
        A = A * sel.unsqueeze(-1).to(A.dtype)
        step = lstsq(A, -c.unsqueeze(-1))[0].squeeze(-1)
        yf = yf + step
    return yf.detach()


def _perturbation_row(problem: Problem, y: Tensor, tol: float, ftol: float, count: int,
                      radius: float, generator) -> CheckRow:
    rule = f"f(y') >= f(y) - {ftol:g}(1+|f(y)|)"
    if count == 0:
        return CheckRow("optimality", "perturbation", float("nan"), rule, "skip", "none asked")
    yf = _flat(problem, y)
    scale = _scale(problem, y)
    with torch.no_grad():
        f0 = problem.objective(yf)
        worst = torch.full_like(f0, -float("inf"))
        # as feasible as y itself, up to a slack far below the tolerance
        target = _violation(problem, yf) + 1e-3 * tol * scale
        tried = 0
        for _ in range(count):
            d = torch.randn(yf.shape, generator=generator, dtype=yf.dtype)
            d = d / d.abs().amax(-1, keepdim=True) * (radius * scale).unsqueeze(-1)
            yp = yf + d
            if problem.constrained:
                yp = _restore(problem, yp, target)
                feasible = _violation(problem, yp) <= target
            else:
                feasible = torch.ones_like(f0, dtype=torch.bool)
            drop = (f0 - problem.objective(yp)) / (1 + f0.abs())
            worst = torch.where(feasible, torch.maximum(worst, drop), worst)
            tried += int(feasible.sum())
    if tried == 0:
        return CheckRow("optimality", "perturbation", float("nan"), rule, "skip",
                        "no feasible nearby point found")
    bad = (worst > ftol).nonzero().flatten().tolist()
    detail = (f"{tried} feasible points within {radius:g}(1+|y|); worst relative decrease of f"
              + (f"; lower objective found at samples {bad[:8]}" if bad else ""))
    return CheckRow("optimality", "perturbation", worst.max().item(), rule,
                    "fail" if bad else "pass", detail)


def _default_solver_row(problem: Problem, node: DeclarativeNode, xs, y: Tensor, tol: float,
                        ftol: float) -> CheckRow:
    rule = f"f(y) <= f(y_default) + {ftol:g}(1+|f(y)|)"
    with captured() as caught:
        try:
            out = DeclarativeNode.solve(node, *xs)
        except Exception as error:
            return CheckRow("optimality", "vs default solver", float("nan"), rule, "skip",
                            f"default solver unavailable: {type(error).__name__}: {error}")
    y_default = as_solution(out, "DeclarativeNode.solve").y
    with torch.no_grad():
        yd = _flat(problem, y_default.detach())
        f0, fd = problem.objective(_flat(problem, y)), problem.objective(yd)
        usable = torch.isfinite(fd) & (_violation(problem, yd) <= tol * _scale(problem, y_default))
        gap = torch.where(usable, (f0 - fd) / (1 + f0.abs()), torch.full_like(f0, -float("inf")))
    note = f"; default solver warned {len(caught)}x" if caught else ""
    if not usable.any():
        return CheckRow("optimality", "vs default solver", float("nan"), rule, "skip",
                        "default solver found no feasible point" + note)
    bad = (gap > ftol).nonzero().flatten().tolist()
    detail = ("relative objective gap f(y) - f(y_default)" + note
              + (f"; default solver is lower at samples {bad[:8]}" if bad else ""))
    return CheckRow("optimality", "vs default solver", gap.max().item(), rule,
                    "fail" if bad else "pass", detail)
