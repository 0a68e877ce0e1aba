"""Helpers shared by the checks: float64 copies, solving, warning capture, input validation."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..contract import node_name
from ..errors import DDNWarning
from ..node import DeclarativeNode
from ..solution import Solution, as_solution
from .report import CheckRow

__all__ = ["float64_copy", "float64_inputs", "overrides", "solve", "captured", "warning_rows",
           "node_name"]


def float64_copy(node: DeclarativeNode) -> DeclarativeNode:
    """A deep copy of ``node`` with floating parameters and buffers in float64 (``node`` untouched)."""
    if not isinstance(node, DeclarativeNode):
        raise TypeError(f"node={node!r}: expected a ddnlib.DeclarativeNode instance")
    return copy.deepcopy(node).to(torch.float64)


def float64_inputs(xs: Sequence[Any]) -> tuple[Tensor, ...]:
    """Detached float64 copies of the node inputs ``xs`` (each ``(b, ...)``, one batch size)."""
    if not xs:
        raise TypeError("xs: expected at least one input tensor")
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise TypeError(f"input {i} is {type(x).__name__}: expected a torch.Tensor")
        if not x.is_floating_point() or x.dim() == 0:
            raise ValueError(f"input {i} has dtype {x.dtype} and shape {tuple(x.shape)}: expected "
                             "a floating tensor with a leading batch dimension")
        out.append(x.detach().to(torch.float64).clone())
    if any(x.shape[0] != out[0].shape[0] for x in out):
        raise ValueError(f"inputs have batch sizes {[x.shape[0] for x in out]}: expected one size")
    return tuple(out)


def overrides(node: DeclarativeNode, method: str) -> bool:
    """Whether ``node``'s class replaces ``DeclarativeNode.<method>``."""
    return getattr(type(node), method) is not getattr(DeclarativeNode, method)


def solve(node: DeclarativeNode, xs: Sequence[Tensor]) -> tuple[Tensor, Solution | None]:
    """``node.solve(*xs)`` without a graph, as ``(y, ctx)`` (``ctx`` as a node's ``vjp`` sees it:
    the :class:`~ddnlib.Solution`, or ``None`` when it carries nothing beside ``y``)."""
    with torch.no_grad():
        solution = as_solution(node.solve(*xs), f"{node_name(node)}.solve").detach()
    return solution.y, solution if len(solution) else None


@contextmanager
def captured() -> Iterator[list[warnings.WarningMessage]]:
    """Record ddnlib warnings raised inside the block; other warnings are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddn: list[warnings.WarningMessage] = []
        yield ddn
    for w in caught:
        if issubclass(w.category, DDNWarning):
            ddn.append(w)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def warning_rows(check: str, caught: Sequence[warnings.WarningMessage]) -> list[CheckRow]:
    """One failing row per ddnlib warning category raised during ``check``."""
    rows = []
    for category in dict.fromkeys(w.category for w in caught):
        first = next(w for w in caught if w.category is category)
        count = sum(w.category is category for w in caught)
        rows.append(CheckRow(check, category.__name__, float("nan"), "no warning", "fail",
                             f"{count}x, first: {first.message}"))
    return rows
