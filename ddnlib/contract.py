"""The user-node contract: checks of what a node's own methods return.

A :class:`~ddnlib.DeclarativeNode` subclass supplies ``objective(*xs, y) -> (b,)``,
``initial_guess(*xs) -> (b, *out)`` (which also declares the output shape) and possibly a ``vjp``
override returning ``(input_grads, param_grads)``. A mistake there otherwise surfaces far from its
cause (an ``IndexError`` inside the objective, a NaN output, a gradient silently set to zero), so
these checks say which method returned what, for which samples, and what was expected:

- :func:`check_initial_guess`: a floating tensor ``(b, *out)`` with the inputs' batch size,
  dtype and device;
- :func:`check_objective`: one value per sample, ``(b,)`` (cheap: run at every evaluation);
- :func:`check_start`: once per default solve, at ``initial_guess``: the objective of an
  unconstrained node depends on ``y``, and the objective, its ``y``-gradient and the constraints
  are finite in every sample whose inputs are finite;
- :func:`check_vjp_result`: ``(input_grads, param_grads)`` with one entry (or ``None``) per input
  shaped like that input, and parameter gradients under names of the node's parameters, shaped
  like them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .errors import describe_samples
from .linalg import all_finite

__all__ = ["node_name", "check_initial_guess", "check_objective", "check_start",
           "check_vjp_result"]

_DECLARES = "initial_guess declares the output shape"


def node_name(node) -> str:
    """The class name of ``node`` (the user's class, also under ``torch.nn.utils.parametrize``)."""
    cls = type(node)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(node) else cls.__name__


def _default_guess(node) -> bool:
    from .node import DeclarativeNode

    return getattr(type(node), "initial_guess") is DeclarativeNode.initial_guess


def _guess_hint(node, y_shape: Sequence[int]) -> str:
    """How the output shape ``y_shape`` came about, and how to declare another one."""
    shape = tuple(y_shape)
    if _default_guess(node):
        return (f"y has shape {shape} because the default initial_guess copies input 0; "
                f"{_DECLARES}: override initial_guess(*xs) to return a start of the output's "
                "shape (b, *out)")
    return f"y has shape {shape}, as {node_name(node)}.initial_guess returned ({_DECLARES})"


def check_initial_guess(node, xs: Sequence[Tensor], y0: Any) -> Tensor:
    """``y0 = node.initial_guess(*xs)`` if it is a floating tensor ``(b, *out)`` on the inputs'
    device and in their dtype; otherwise ``TypeError`` / ``ValueError`` saying what was expected."""
    where = f"{node_name(node)}.initial_guess"
    x = xs[0]
    if not isinstance(y0, Tensor):
        raise TypeError(f"{where} returned {type(y0).__name__}: expected a torch.Tensor of shape "
                        f"(b, *out) with b={x.shape[0]}, in the inputs' dtype {x.dtype} "
                        f"({_DECLARES})")
    if y0.dtype != x.dtype:
        raise TypeError(f"{where} returned dtype {y0.dtype}: expected the inputs' dtype {x.dtype} "
                        "(e.g. x.new_zeros(b, m) rather than torch.zeros(b, m))")
    if y0.device != x.device:
        raise ValueError(f"{where} returned a tensor on {y0.device}: expected the inputs' device "
                         f"{x.device}")
    if y0.dim() == 0 or y0.shape[0] != x.shape[0]:
        raise ValueError(f"{where} returned shape {tuple(y0.shape)}: expected (b, *out) with a "
                         f"leading batch dimension b={x.shape[0]} ({_DECLARES})")
    return y0


def check_objective(node, value: Any, batch: int, y_shape: Sequence[int]) -> Tensor:
    """``value = node.objective(*xs, y)`` if it is a floating tensor of shape ``(batch,)``."""
    if (isinstance(value, Tensor) and value.is_floating_point() and value.dim() == 1
            and value.shape[0] == batch):  # the common case first: this runs at every evaluation
        return value
    where = f"{node_name(node)}.objective"
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} returned {type(value).__name__}: expected a torch.Tensor of "
                        f"shape (b,) = ({batch},), one value per sample")
    if not value.is_floating_point():
        raise TypeError(f"{where} returned dtype {value.dtype}: expected a floating tensor")
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{where} returned shape {tuple(value.shape)}: expected (b,) = "
                         f"({batch},), one value per sample (sum over the other dimensions); "
                         f"{_guess_hint(node, y_shape)}")
    return value


def check_start(node, xs: Sequence[Tensor], y0: Tensor, create_graph: bool = False
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Where the default solvers start, ``y0 = initial_guess(*xs)``: the objective depends on
    ``y`` (unless constraints may fix ``y``), and the objective, its gradient in ``y`` and the
    constraints are finite in every sample whose inputs and ``y0`` are finite (samples with
    non-finite inputs are left to the solvers, which return NaN for them). Raises ``ValueError``
    naming the samples and a value.

    Returns what it evaluated, for a solver to start from: the flat point ``y (b, m)`` (a leaf
    requiring grad), the objective ``f (b,)`` and its gradient ``∇_y f (b, m)`` (``None`` where
    ``f`` does not depend on ``y``), the gradient with its graph when ``create_graph``."""
    name = node_name(node)
    b = y0.shape[0]
    with torch.enable_grad():
        y = y0.detach().reshape(b, -1).clone().requires_grad_()
        try:
            f = node.objective(*xs, y.view(y0.shape))
        except Exception as error:
            if not _default_guess(node):
                raise
            raise ValueError(f"{name}.objective raised {type(error).__name__} at the default "
                             f"initial_guess: {error}. {_guess_hint(node, y0.shape)}") from error
        f = check_objective(node, f, b, y0.shape)
        gy = None
        if f.requires_grad:
            gy, = torch.autograd.grad(f, [y], torch.ones_like(f), allow_unused=True,
                                      create_graph=create_graph)
    constrained = node.has_equality_constraints or node.has_inequality_constraints
    if gy is None and not constrained:  # with constraints, y may be fixed by them alone
        raise ValueError(f"{name}.objective does not depend on y: its value is computed without "
                         f"y (or from y.detach()), so there is nothing to minimise; expected a "
                         f"per-sample objective f(*xs, y) of y. {_guess_hint(node, y0.shape)}")
    values = [(f"{name}.objective", f.detach().reshape(b, 1))]
    if gy is not None:
        values.append((f"the y-gradient of {name}.objective", gy.detach()))
    with torch.no_grad():
        for method, present in (("equality_constraints", node.has_equality_constraints),
                                ("inequality_constraints", node.has_inequality_constraints)):
            if present:
                c = getattr(node, method)(*xs, y0)
                if isinstance(c, Tensor) and c.dim() == 2 and c.shape[0] == b:
                    values.append((f"{name}.{method}", c))  # other forms: the solvers' message
    # one reduction when everything is finite (the common case); per-sample masks otherwise
    if not all_finite(*(v for _, v in values)):
        usable = torch.ones(b, dtype=torch.bool, device=y0.device)
        for t in (*xs, y0):
            usable &= torch.isfinite(t.detach()).reshape(b, -1).all(-1)
        for what, v in values:
            _finite(what, v, usable)
    return y, f, gy


def _finite(what: str, values: Tensor, usable: Tensor) -> None:
    bad = usable & ~torch.isfinite(values).all(-1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        row = values[i]
        value = row[~torch.isfinite(row)][0].item()
        raise ValueError(
            f"{what} is {value} at initial_guess for samples {describe_samples(bad)} (sample {i} "
            "has finite inputs): the default solvers need a finite objective, y-gradient and "
            "constraints where they start. Expected initial_guess to return a point inside the "
            "problem's domain (e.g. positive where the objective takes a log), the node's "
            "parameters to be finite, or a solve() of the node's own")


def check_vjp_result(node, result: Any, xs: Sequence[Tensor], params: Mapping[str, Tensor]
                     ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor]]:
    """``result = node.vjp(*xs, y=..., v=..., ctx=...)`` as ``(input_grads, param_grads)`` if it
    has the documented structure: a tuple of one entry per input (a tensor shaped like the input,
    or ``None``) and a mapping from names of ``params`` (the node's parameters, as in
    ``named_parameters()``) to tensors shaped like them."""
    where = f"{node_name(node)}.vjp"
    n = len(xs)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        got = (f"a {type(result).__name__} of {len(result)} items"
               if isinstance(result, (tuple, list)) else type(result).__name__)
        raise TypeError(f"{where} returned {got}: expected (input_grads, param_grads), a tuple "
                        f"with one gradient (or None) per input and a dict of parameter "
                        "gradients by name")
    input_grads, param_grads = result
    if isinstance(input_grads, Tensor):
        raise TypeError(f"{where} returned a bare Tensor of shape {tuple(input_grads.shape)} as "
                        f"input_grads: expected a tuple with one entry per input ({n} "
                        f"input{'s' if n != 1 else ''}), e.g. (grad_x,) for one input")
    if not isinstance(input_grads, (tuple, list)) or len(input_grads) != n:
        got = (f"{len(input_grads)} input gradients" if isinstance(input_grads, (tuple, list))
               else type(input_grads).__name__)
        raise TypeError(f"{where} returned {got} as input_grads: expected a tuple of {n} "
                        "(one tensor or None per input)")
    for i, (g, x) in enumerate(zip(input_grads, xs)):
        if g is not None and (not isinstance(g, Tensor) or g.shape != x.shape):
            got = f"shape {tuple(g.shape)}" if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{where} returned {got} as the gradient of input {i}: expected "
                             f"None or a tensor of the input's shape {tuple(x.shape)}")
    if not isinstance(param_grads, Mapping):
        raise TypeError(f"{where} returned {type(param_grads).__name__} as param_grads: expected "
                        "a dict from parameter names (as in named_parameters()) to gradients "
                        "({} when the node has no parameters requiring grad)")
    unknown = [k for k in param_grads if k not in params]
    if unknown:
        raise ValueError(f"{where} returned gradients for {unknown}, which are not parameters of "
                         f"{node_name(node)}: expected names from named_parameters(): "
                         f"{sorted(params)} (buffers and attributes get no gradient)")
    for k, g in param_grads.items():
        if g is not None and (not isinstance(g, Tensor) or g.shape != params[k].shape):
            got = f"shape {tuple(g.shape)}" if isinstance(g, Tensor) else type(g).__name__
            raise ValueError(f"{where} returned {got} as the gradient of parameter {k!r}: "
                             f"expected the parameter's shape {tuple(params[k].shape)}, summed "
                             "over the batch")
    return tuple(input_grads), dict(param_grads)
