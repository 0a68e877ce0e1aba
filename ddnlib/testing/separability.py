"""Check that a node's problem is separable across the batch (float64 copy of the node).

ddnlib differentiates sample ``i`` by batched autodiff on the assumption that sample ``i``'s
objective and constraints depend only on sample ``i`` (and the shared parameters). A node that
mixes samples (a mean over the batch, a normalisation by the batch maximum) breaks that silently:
the forward may still converge, but the derivatives are wrong. The check perturbs one sample
``k`` (its inputs and its ``y``) and measures what changes in the others:

- ``objective`` (and ``constraints``): ``max_{i≠k} |f_i(x', y') − f_i(x, y)| / (1 + |f_i|)`` with
  ``x'``, ``y'`` equal to ``x``, ``y`` except in sample ``k``; separability makes it zero (up to
  rounding, ``1e-10``);
- ``solution``: ``max_{i≠k} ‖y_i(x') − y_i(x)‖∞ / (1 + ‖y_i‖∞)`` with the node's own ``solve``;
  at most the optimality tolerance.

The perturbed sample is ``k = seed mod b``; inputs are scaled by ``1 + 0.01 u`` (``u`` uniform in
``[−1, 1]``, so a sign-constrained input keeps its sign) and ``y`` moved by ``0.01 (1 + |y|) u``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..errors import DDNWarning
from ..node import DeclarativeNode
from ._common import float64_copy, float64_inputs, node_name, solve
from .report import CheckResult, CheckRow

__all__ = ["check_separability"]

_ROUNDING = 1e-10


def check_separability(node: DeclarativeNode, *xs: Tensor, tol: float | None = None,
                       seed: int = 0) -> CheckResult:
    """Perturb one sample of ``xs`` and check that the other samples' objective, constraints and
    solution do not change (rows ``("separability", "objective" | "constraints" | "solution")``).

    Args:
        node: the node (not modified: a float64 copy is checked).
        xs: the inputs, each ``(b, ...)``; with ``b < 2`` the rows are skipped.
        tol: bound on the solution change (``None``: the node's ``optimality_tol`` in float64).
        seed: picks the perturbed sample and the perturbation.
    """
    if tol is not None and not tol > 0:
        raise ValueError(f"tol={tol!r}: expected a positive number or None")
    result = CheckResult(node_name(node))
    node64, xs64 = float64_copy(node), float64_inputs(xs)
    tol = tol if tol is not None else node64.options.tol("optimality_tol", torch.float64)
    b = xs64[0].shape[0]
    if b < 2:
        result.rows.append(CheckRow("separability", "batch", float("nan"), "b >= 2", "skip",
                                    f"needs a batch of 2 or more samples, got {b}"))
        return result
    generator = torch.Generator().manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DDNWarning)  # the solver's: check_optimality's rows
            result.extend(_rows(node64, xs64, seed % b, tol, generator))
    except Exception as error:
        result.rows.append(CheckRow("separability", "solve", float("nan"), "-", "fail",
                                    f"{type(error).__name__}: {error}"))
    return result


def _rows(node64: DeclarativeNode, xs64, k: int, tol: float, generator) -> list[CheckRow]:
    """The objective / constraints / solution rows with sample ``k`` perturbed."""
    b = xs64[0].shape[0]
    others = torch.arange(b) != k
    what = f"samples other than {k} when sample {k} is perturbed"
    rows = []
    y, _ = solve(node64, xs64)
    xs_moved = tuple(_scaled(x, k, generator) for x in xs64)
    y_moved = y.clone()
    y_moved[k] += 0.01 * (1 + y[k].abs()) * _uniform(y[k], generator)
    with torch.no_grad():
        pairs = [("objective", node64.objective(*xs64, y), node64.objective(*xs_moved, y_moved))]
        if node64.has_equality_constraints or node64.has_inequality_constraints:
            pairs.append(("constraints", _constraints(node64, xs64, y),
                          _constraints(node64, xs_moved, y_moved)))
    for argument, before, after in pairs:
        change = ((after - before).abs() / (1 + before.abs())).reshape(b, -1)[others]
        bad = _changed(change, _ROUNDING, others)
        rows.append(CheckRow(
            "separability", argument, _worst(change), f"{_ROUNDING:g} (rounding)",
            "fail" if bad else "pass", f"relative change of {argument} in {what}"
            + (f"; changed at samples {bad[:8]}: sample i must depend only on sample i"
               if bad else "")))
    y_new, _ = solve(node64, xs_moved)
    change = ((y_new - y).abs().reshape(b, -1).amax(-1)
              / (1 + y.abs().reshape(b, -1).amax(-1)))[others]
    bad = _changed(change.unsqueeze(-1), tol, others)
    rows.append(CheckRow("separability", "solution", _worst(change), f"{tol:g}",
                         "fail" if bad else "pass", f"relative change of y in {what}"
                         + (f"; changed at samples {bad[:8]}" if bad else "")))
    return rows


def _uniform(like: Tensor, generator) -> Tensor:
    return 2 * torch.rand(like.shape, generator=generator, dtype=like.dtype) - 1


def _scaled(x: Tensor, k: int, generator) -> Tensor:
    x = x.clone()
    x[k] = x[k] * (1 + 0.01 * _uniform(x[k], generator))
    return x


def _constraints(node: DeclarativeNode, xs, y: Tensor) -> Tensor:
    parts = []
    if node.has_equality_constraints:
        parts.append(node.equality_constraints(*xs, y))
    if node.has_inequality_constraints:
        parts.append(node.inequality_constraints(*xs, y))
    return torch.cat(parts, dim=-1)


def _worst(change: Tensor) -> float:
    """The largest change, NaN counted as infinite (a NaN that appeared in another sample)."""
    return torch.nan_to_num(change, nan=float("inf")).max().item() if change.numel() else 0.0


def _changed(change: Tensor, tol: float, others: Tensor) -> list[int]:
    """The samples (indices into the full batch) whose change exceeds ``tol``."""
    ids = others.nonzero().flatten()
    bad = ~(torch.nan_to_num(change, nan=float("inf")) <= tol).all(-1)
    return ids[bad].tolist()
