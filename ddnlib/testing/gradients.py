"""Finite-difference gradient check of a node, for every input and every learnable parameter.

For each argument ``a`` (an input or a parameter requiring grad) of the solution map
``y(x_1, …, x_n; θ)`` the check compares, in float64,

    analytic  Vᵀ (∂y/∂a) U       (rows by backward passes through the node, i.e. its ``vjp``)
    numeric   Vᵀ [y(a + h u) − y(a − h u)] / 2h   for every column u of U

where ``U`` and ``V`` are identity matrices (the full Jacobian, entry by entry) for arguments and
outputs with at most ``max_elements`` entries, and ``directions`` random Gaussian directions
otherwise. The step ``h = eps · (1 + max_j |a_j u_j|)`` follows the scale of the argument.
An entry passes when ``|analytic − numeric| ≤ atol + rtol · |numeric|`` (as ``torch.allclose``).
Parameters are substituted through ``torch.func.functional_call`` on a float64 copy of the node.
The shifted copies of an input are stacked along the batch dimension and solved in one call (the
problem is separable across the batch, the contract of a node); each parameter shift is one solve.
A column that fails at ``h`` is retried at ``h · {1e-2, 1e2, 1e-4, 1e4}`` and its closest finite
difference counts: ``h`` follows the scale of the argument's entry, while the solution may curve on
a smaller scale (truncation error) or other entries of the sample may be much larger (rounding
error). Neither is a wrong gradient; a wrong gradient fails at every step.
Nodes solved by the default solvers (``Options.solver_tol`` unset) run with ``solver_tol =
FD_SOLVER_TOL`` during the check: the default float64 tolerance is relative to ``‖y‖∞``, so with
inputs of 1e6 the solution error alone would dominate a finite difference over a step of ~1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..node import DeclarativeNode
from ._common import captured, float64_copy, float64_inputs, node_name, warning_rows
from .report import CheckResult, CheckRow

__all__ = ["check_gradients"]

FD_SOLVER_TOL = 1e-12
RETRY_FACTORS = (1e-2, 1e2, 1e-4, 1e4)

_MAX_STACK = 4096  # samples per batched solve of shifted inputs


def check_gradients(
    node: DeclarativeNode,
    *xs: Tensor,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    max_elements: int = 64,
    directions: int = 8,
    seed: int = 0,
) -> CheckResult:
    """Compare the node's gradients with central finite differences, in float64.

    Args:
        node: the node to check (not modified: a float64 copy is checked).
        xs: the inputs, each ``(b, ...)``.
        eps: relative finite-difference step.
        atol: absolute part of the per-entry tolerance ``atol + rtol · |numeric|``.
        rtol: relative part of that tolerance.
        max_elements: arguments (and outputs) up to this size are checked entry by entry; larger
            ones along ``directions`` random directions.
        directions: number of random directions for large arguments.
        seed: seeds the random directions.

    Returns:
        A :class:`CheckResult` with one row per argument (worst absolute error, relative error in
        the detail) and one failing row per kind of ddnlib warning raised while checking.
    """
    for name, value in (("eps", eps), ("atol", atol), ("rtol", rtol)):
        if not value > 0:
            raise ValueError(f"{name}={value!r}: expected a positive number")
    for name, value in (("max_elements", max_elements), ("directions", directions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    result = CheckResult(node_name(node))
    node64, xs64 = float64_copy(node), float64_inputs(xs)
    for module in node64.modules():
        if isinstance(module, DeclarativeNode) and module.options.solver_tol is None:
            module.options = module.options.replace(solver_tol=FD_SOLVER_TOL)
    names = [name for name, p in node64.named_parameters() if p.requires_grad]
    params = dict(node64.named_parameters())
    args = list(xs64) + [params[k].detach().clone() for k in names]
    labels = [f"input {i}" for i in range(len(xs64))] + [f"param {k}" for k in names]
    n = len(xs64)
    generator = torch.Generator().manual_seed(seed)

    def solution(*a: Tensor) -> Tensor:
        return torch.func.functional_call(node64, dict(zip(names, a[n:])), tuple(a[:n]))

    tol = f"atol {atol:g} + rtol {rtol:g}·|fd|"
    with captured() as caught:
        try:
            rows = _analytic_rows(solution, args, max_elements, directions, generator)
        except Exception as error:  # the node's forward or backward failed: report, don't hide
            result.rows.append(CheckRow("gradient", "backward", float("nan"), tol, "fail",
                                        f"{type(error).__name__}: {error}"))
            rows = None
        if rows is not None:
            V, JtV = rows
            for i, label in enumerate(labels):
                try:
                    row = _check_argument(solution, args, i, n, label, V, JtV[i], eps, atol, rtol,
                                          tol, max_elements, directions, generator)
                except Exception as error:  # a shifted solve failed (e.g. strict mode)
                    row = CheckRow("gradient", label, float("nan"), tol, "fail",
                                   f"finite differences: {type(error).__name__}: {error}")
                result.rows.append(row)
    return result.extend(warning_rows("gradient", caught))


def _probes(numel: int, max_elements: int, directions: int, generator, dtype) -> Tensor:
    """Columns of ``U``: the identity for small arguments, random unit directions otherwise."""
    if numel <= max_elements:
        return torch.eye(numel, dtype=dtype)
    U = torch.randn(numel, directions, generator=generator, dtype=dtype)
    return U / U.abs().amax(0)


def _analytic_rows(solution, args, max_elements, directions, generator):
    """``V`` (out × k) and, per argument, ``(∂y/∂a)ᵀ V`` (numel × k) by backward passes."""
    leaves = [a.detach().requires_grad_() for a in args]
    with torch.enable_grad():
        y = solution(*leaves)
        V = _probes(y.numel(), max_elements, directions, generator, y.dtype)
        cols = [[] for _ in leaves]
        for k in range(V.shape[1]):
            grads = torch.autograd.grad(y, leaves, V[:, k].reshape(y.shape), retain_graph=True,
                                        allow_unused=True)
            for col, g, a in zip(cols, grads, leaves):
                col.append(torch.zeros_like(a) if g is None else g.detach())
    return V, [torch.stack([c.reshape(-1) for c in col], dim=1) for col in cols]


def _stacked_solutions(solution, args, i, n_inputs, shifts) -> Tensor:
    """``y`` at ``args`` with input ``i`` shifted by each row of ``shifts`` (flat), as rows.

    The shifted copies are stacked along the batch dimension and solved together (in chunks of at
    most ``_MAX_STACK`` samples): exact because the problem is separable across the batch.
    """
    a = args[i]
    b = a.shape[0]
    per_chunk = max(1, _MAX_STACK // max(b, 1))
    out = []
    for chunk in shifts.split(per_chunk):
        c = chunk.shape[0]
        shifted = (a.reshape(1, -1) + chunk).reshape(c * b, *a.shape[1:])
        others = [x.repeat(c, *([1] * (x.dim() - 1))) for x in args[:n_inputs]]
        others[i] = shifted
        y = solution(*others, *args[n_inputs:])
        out.append(y.reshape(c, -1))
    return torch.cat(out)


def _check_argument(solution, args, i, n_inputs, label, V, JtV, eps, atol, rtol, tol,
                    max_elements, directions, generator) -> CheckRow:
    a = args[i]
    if a.numel() == 0:
        return CheckRow("gradient", label, float("nan"), tol, "skip", "empty")
    U = _probes(a.numel(), max_elements, directions, generator, a.dtype)
    flat = a.reshape(-1)
    steps = eps * (1 + (flat.abs().unsqueeze(1) * U.abs()).amax(0))  # h per column of U
    an = JtV.T @ U

    def finite_difference(h: Tensor) -> Tensor:
        shifts = torch.cat([U * h, -U * h], dim=1).T  # (2k, numel): a + h u, a − h u
        with torch.no_grad():
            if i < n_inputs:
                ends = _stacked_solutions(solution, args, i, n_inputs, shifts)
            else:
                ends = torch.stack([solution(*args[:i], (flat + d).reshape(a.shape), *args[i + 1:])
                                    .reshape(-1) for d in shifts])
        k = U.shape[1]
        return V.T @ ((ends[:k] - ends[k:]) / (2 * h.unsqueeze(1))).T  # (k_out, k_in)

    def excess(fd: Tensor) -> Tensor:  # per column; ≤ 0 passes, NaN counts as +inf
        over = ((an - fd).abs() - atol - rtol * fd.abs()).nan_to_num(nan=float("inf"))
        return over.amax(0) if over.numel() else over.new_zeros(over.shape[1])

    fd = finite_difference(steps)
    best = excess(fd)
    for factor in RETRY_FACTORS:  # columns failing at h: retry other steps, keep the closest
        if not bool((best > 0).any()):
            break
        retry = finite_difference(steps * factor)
        better = excess(retry) < best
        fd[:, better] = retry[:, better]
        best = torch.minimum(best, excess(retry))
    diff = (an - fd).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    scale = fd.abs().max().item() if fd.numel() else 0.0
    ok = bool(torch.isfinite(an).all() and torch.isfinite(fd).all()
              and (diff <= atol + rtol * fd.abs()).all())
    where = "entries" if U.shape[1] == a.numel() else f"{U.shape[1]} random directions"
    rel = worst / scale if scale > 0 else (float("inf") if worst > 0 else 0.0)
    detail = f"rel {rel:.3g}, max |fd| {scale:.3g}, {where}"
    return CheckRow("gradient", label, worst, tol, "pass" if ok else "fail", detail)
