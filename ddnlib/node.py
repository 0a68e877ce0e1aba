"""``DeclarativeNode``: a layer whose output is the solution of an optimisation problem.

    y(x; θ) ∈ argmin_y f(x, y; θ)   subject to   h(x, y; θ) = 0,   g(x, y; θ) ≤ 0

A subclass writes ``objective`` (and optionally ``equality_constraints``,
``inequality_constraints``, ``initial_guess``, ``solve`` and ``vjp``); calling the node solves the
problem under ``torch.no_grad()`` and differentiates the solution by the implicit function theorem
(:func:`ddnlib.engine.implicit_vjp`) for every input and every learnable parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .engine import implicit_jvp, implicit_vjp, transposed_vjp
from .function import declarative_apply
from .options import Options
from .pickling import Picklable
from .solution import Solution

__all__ = ["DeclarativeNode"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # halves: solved in float32


class DeclarativeNode(Picklable, torch.nn.Module):
    """Base class of declarative nodes.

    Batch convention: every positional input has a leading batch dimension ``b`` (or 1: the input
    is shared by every sample, expanded to ``b``, and its gradient is summed), ``y`` has shape
    ``(b, *out)``, and the problem is separable across the batch (sample ``i``'s objective and
    constraints depend only on sample ``i`` and on the shared parameters).

    Nodes pickle (``pickle``, ``torch.save``, multiprocessing) also with ``parametrize``
    parametrisations on their parameters (:class:`~ddnlib.pickling.Picklable`).

    Args:
        options: how the node is solved and differentiated (:class:`~ddnlib.Options`).

    Class attributes a subclass may set:
        rejects_non_finite_inputs: ``solve`` raises on non-finite inputs, so the backward tests
            only ``y`` for finiteness, not the inputs again (a pass over them: for a pooling node
            a sizeable share of its backward).
        differentiable_vjp: the overriding ``vjp`` is written with differentiable operations of
            its arguments (double backward, see ``docs/composition.md``).
    """

    rejects_non_finite_inputs: bool = False

    def __init__(self, options: Options | None = None):
        super().__init__()
        if options is not None and not isinstance(options, Options):
            raise TypeError(f"options={options!r}: expected a ddnlib.Options or None")
        self.options = options if options is not None else Options()

    # -- the problem ----------------------------------------------------------------------------
    def objective(self, *xs_and_y: Tensor) -> Tensor:
        """``f(*xs, y) -> (b,)``: the per-sample objective. Must be overridden."""
        raise NotImplementedError(f"{type(self).__name__} must implement objective(*xs, y)")

    def equality_constraints(self, *xs_and_y: Tensor) -> Tensor:
        """``h(*xs, y) -> (b, p)``, zero when feasible. Optional."""
        raise NotImplementedError

    def inequality_constraints(self, *xs_and_y: Tensor) -> Tensor:
        """``g(*xs, y) -> (b, q)``, non-positive when feasible. Optional."""
        raise NotImplementedError

    @property
    def has_equality_constraints(self) -> bool:
        return type(self).equality_constraints is not DeclarativeNode.equality_constraints

    @property
    def has_inequality_constraints(self) -> bool:
        return type(self).inequality_constraints is not DeclarativeNode.inequality_constraints

    # -- forward --------------------------------------------------------------------------------
    def initial_guess(self, *xs: Tensor) -> Tensor:
        """Where the default solver starts, ``(b, *out)``; also declares the output shape.

        Defaults to a copy of the first input, so a node whose output has another shape (or
        dtype) overrides it; the default solvers check what it returns and the objective there
        (:mod:`ddnlib.contract`).
        """
        return xs[0].detach().clone()

    def solve(self, *xs: Tensor) -> Tensor | Solution | tuple[Tensor, Mapping[str, Any]]:
        """Solve the problem: ``y``, a :class:`~ddnlib.Solution`, or ``(y, ctx)``.

        A :class:`~ddnlib.Solution` names the multipliers of the equality and inequality
        constraints (``eq_multipliers (b, p)``, ``ineq_multipliers (b, q)``), extras for
        :meth:`vjp` and solver statistics; in the ``(y, ctx)`` form they are ``ctx["lambda"]``,
        ``ctx["mu"]`` and the other entries. The default runs the solvers of
        :mod:`ddnlib.solvers` from :meth:`initial_guess` (a tensor without constraints, a
        ``Solution`` with multipliers otherwise).
        """
        from .solvers import default_solve

        return default_solve(self, xs)

    # -- backward -------------------------------------------------------------------------------
    def vjp(
        self, *xs: Tensor, y: Tensor, v: Tensor, ctx: Mapping[str, Any] | None = None
    ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor]]:
        """Vector–Jacobian product of the solution map.

        Returns ``(input_grads, param_grads)``: gradients of ``⟨v, y⟩`` for each input in ``xs``
        that requires grad (``None`` for the others) and a dict from the name of every parameter
        that requires grad (as in ``named_parameters()``) to its gradient, summed over the batch.
        Override with a closed form where one exists; ``super().vjp(...)`` is the generic engine.
        """
        return implicit_vjp(self, xs, y, v, ctx)

    def jvp(
        self, *xs: Tensor, y: Tensor, tangents: tuple[Tensor | None, ...],
        param_tangents: Mapping[str, Tensor], ctx: Mapping[str, Any] | None = None
    ) -> Tensor:
        """Jacobian–vector product of the solution map (forward mode): ``dy``, shaped like ``y``.

        ``tangents`` has one entry per input (``None`` for a zero tangent); ``param_tangents``
        maps parameter names (as in ``named_parameters()``) to tangents. The default is
        :func:`ddnlib.engine.implicit_jvp`, or the transpose of an overridden :meth:`vjp`
        (:func:`ddnlib.engine.transposed_vjp`) so that a closed form serves both modes.
        """
        if type(self).vjp is not DeclarativeNode.vjp:
            return transposed_vjp(self, xs, y, tangents, param_tangents, ctx)
        return implicit_jvp(self, xs, y, tangents, param_tangents, ctx)

    def forward(self, *xs: Tensor) -> Tensor:
        """Solve for ``y (b, *out)``; differentiable in ``xs`` and in the node's parameters."""
        return declarative_apply(self, _check_inputs(type(self).__name__, xs))


def _check_inputs(name: str, xs: tuple) -> tuple[Tensor, ...]:
    """``xs`` if they are floating tensors with one batch size ``b`` (an input with a leading
    dimension of 1 is expanded to ``b``, so that autograd sums its gradient over the batch), on
    one device and in one dtype; otherwise ``TypeError`` / ``ValueError`` saying what to pass."""
    if not xs:
        raise TypeError(f"{name}() needs at least one input tensor")
    for i, x in enumerate(xs):
        if x is None:
            raise TypeError(
                f"{name}(): input {i} is None: every positional input must be a tensor with a "
                "leading batch dimension. An optional input is an attribute of the node (set "
                "self.K = None in __init__, or self.register_buffer('K', K) for a tensor that "
                "follows .to()), read in objective; a tensor shared by every sample can be "
                "passed with a leading dimension of 1"
            )
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{name}(): input {i} is {type(x).__name__}: expected a torch.Tensor of shape "
                "(b, ...), or (1, ...) for a value shared by every sample; a non-tensor setting "
                "is an attribute of the node (set in __init__), read in objective"
            )
        if x.dtype not in _FLOATS:
            raise TypeError(
                f"{name}(): input {i} has dtype {x.dtype}: expected a floating dtype (float16, "
                "bfloat16, float32 or float64)"
            )
        if x.dim() == 0:
            raise ValueError(
                f"{name}(): input {i} is 0-d: expected a leading batch dimension, shape (b, ...), "
                "or (1, ...) for a value shared by every sample (e.g. x.reshape(1))"
            )
    sizes = {x.shape[0] for x in xs} - {1}
    if len(sizes) > 1:
        shown = ", ".join(f"input {i}: {x.shape[0]}" for i, x in enumerate(xs))
        raise ValueError(
            f"{name}(): inputs have batch sizes {shown}: expected one batch size b, or 1 for an "
            "input shared by every sample"
        )
    first = xs[0]
    for i, x in enumerate(xs[1:], 1):
        if x.dtype != first.dtype:
            raise TypeError(f"{name}(): input {i} has dtype {x.dtype}, input 0 has {first.dtype}")
        if x.device != first.device:
            raise ValueError(f"{name}(): input {i} is on {x.device}, input 0 on {first.device}")
    if not sizes:
        return tuple(xs)
    b = sizes.pop()
    return tuple(x.expand(b, *x.shape[1:]) if x.shape[0] == 1 else x for x in xs)
