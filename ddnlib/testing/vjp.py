"""Check of a node's overridden ``vjp`` against the generic engine ``DeclarativeNode.vjp``.

Per sample ``i`` (a batch of one, solved by the node's own ``solve``) and per random incoming
gradient ``v``, both vector–Jacobian products are computed for every input and every learnable
parameter (float64 copy of the node). An argument passes when

    max |override − generic| ≤ atol + rtol · max |generic|.

The generic engine is only a reference where it is valid: samples at which it warns (a singular or
indefinite Hessian / KKT matrix, a failed optimality check — typical of non-smooth problems, the
reason to override ``vjp``) are left out and counted in the detail. The finite-difference check
(:func:`~ddnlib.testing.check_gradients`) covers those samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import check_vjp_result
from ..node import DeclarativeNode
from ._common import captured, float64_copy, float64_inputs, node_name, overrides, solve
from .report import CheckResult, CheckRow

__all__ = ["check_vjp"]


def check_vjp(
    node: DeclarativeNode,
    *xs: Tensor,
    samples: int = 2,
    atol: float = 1e-8,
    rtol: float = 1e-6,
    seed: int = 0,
) -> CheckResult:
    """Compare ``node.vjp`` with ``DeclarativeNode.vjp`` on ``samples`` random ``v`` per sample.

    Returns a :class:`CheckResult` with one row per input and parameter (a single ``skip`` row if
    the node does not override ``vjp``).
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples={samples!r}: expected a positive integer")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not value > 0:
            raise ValueError(f"{name}={value!r}: expected a positive number")
    result = CheckResult(node_name(node))
    node64, xs64 = float64_copy(node), float64_inputs(xs)
    tol = f"atol {atol:g} + rtol {rtol:g}·max|generic|"
    if not overrides(node64, "vjp"):
        result.rows.append(CheckRow("vjp", "override", float("nan"), tol, "skip",
                                    "vjp not overridden: the generic engine is used"))
        return result
    names = [k for k, p in node64.named_parameters() if p.requires_grad]
    labels = [f"input {i}" for i in range(len(xs64))] + [f"param {k}" for k in names]
    worst = {label: 0.0 for label in labels}
    ref = {label: 0.0 for label in labels}
    generator = torch.Generator().manual_seed(seed)
    left_out, compared, reasons = [], 0, []
    try:
        for i in range(xs64[0].shape[0]):
            xi = tuple(x[i:i + 1].clone().requires_grad_() for x in xs64)
            y, ctx = solve(node64, xi)
            for _ in range(samples):
                v = torch.randn(y.shape, generator=generator, dtype=y.dtype)
                mine = _flatten(check_vjp_result(node64, node64.vjp(*xi, y=y, v=v, ctx=ctx), xi,
                                                 dict(node64.named_parameters())),
                                len(xi), names, "override")
                with captured() as caught:
                    generic = _flatten(DeclarativeNode.vjp(node64, *xi, y=y, v=v, ctx=ctx),
                                       len(xi), names, "generic")
                if caught:
                    left_out.append(i)
                    reasons.append(f"{caught[0].category.__name__}: {caught[0].message}")
                    break
                compared += 1
                for label, a, g in zip(labels, mine, generic):
                    worst[label] = max(worst[label], (a - g).abs().max().item())
                    ref[label] = max(ref[label], g.abs().max().item())
    except Exception as error:
        result.rows.append(CheckRow("vjp", "override", float("nan"), tol, "fail",
                                    f"{type(error).__name__}: {error}"))
        return result
    skipped = f"; generic engine not valid at samples {left_out} ({reasons[0]})" if left_out else ""
    if compared == 0:
        result.rows.append(CheckRow("vjp", "override", float("nan"), tol, "skip",
                                    "no sample to compare" + skipped))
        return result
    for label in labels:
        ok = worst[label] <= atol + rtol * ref[label]
        rel = worst[label] / ref[label] if ref[label] > 0 else worst[label]
        result.rows.append(CheckRow("vjp", label, worst[label], tol, "pass" if ok else "fail",
                                    f"rel {rel:.3g}, {compared} products compared{skipped}"))
    return result


def _flatten(out, n: int, names: list[str], which: str) -> list[Tensor]:
    """The ``(input_grads, param_grads)`` of a vjp as one list aligned with inputs + parameters."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"{which} vjp returned {type(out).__name__}: expected "
                        "(input_grads, param_grads)")
    inputs, params = out
    if len(inputs) != n:
        raise ValueError(f"{which} vjp returned {len(inputs)} input gradients: expected {n}")
    missing = [k for k in names if params.get(k) is None]
    if missing:
        raise ValueError(f"{which} vjp returned no gradient for parameters {missing}")
    grads = list(inputs) + [params[k] for k in names]
    if any(g is None for g in grads):
        raise ValueError(f"{which} vjp returned None for an input that requires grad")
    return [g.detach() for g in grads]
