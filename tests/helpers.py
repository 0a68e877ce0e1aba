"""Shared test helpers: the linear solvers tests run under, and one float64 gradient check of a node
for every input and every learnable parameter."""

from __future__ import annotations

import pytest
import torch

from ddnlib import CG, Auto, Dense, Options

DENSE, MATRIX_FREE = Options(linear_solver=Dense()), Options(linear_solver=CG())
LINEAR_SOLVERS = pytest.mark.parametrize("options", [DENSE, MATRIX_FREE], ids=["dense", "cg"])
ALL_LINEAR_SOLVERS = pytest.mark.parametrize(
    "options", [DENSE, MATRIX_FREE, Options(linear_solver=Auto())], ids=["dense", "cg", "auto"])


def learnable(node) -> dict[str, torch.Tensor]:
    """The node's parameters that require grad, by name."""
    return {k: p for k, p in node.named_parameters() if p.requires_grad}


def functional(node, n: int):
    """``(*xs, *params) -> node(*xs)`` with the learnable parameters substituted."""
    names = list(learnable(node))

    def call(*args):
        return torch.func.functional_call(node, dict(zip(names, args[n:])), args[:n])

    return call


def gradcheck_node(node, *xs, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
    """float64 finite-difference check for every input and every learnable parameter."""
    leaves = [x.detach().requires_grad_() for x in xs]
    leaves += [p.detach().clone().requires_grad_() for p in learnable(node).values()]
    return torch.autograd.gradcheck(functional(node, len(xs)), tuple(leaves), atol=atol, rtol=rtol)


def vjp(node, xs, v) -> tuple[torch.Tensor, ...]:
    """Gradients of ``⟨v, node(xs)⟩`` for the inputs and the learnable parameters."""
    leaves = [x.detach().requires_grad_() for x in xs] + list(learnable(node).values())
    return torch.autograd.grad((node(*leaves[: len(xs)]) * v).sum(), leaves)
