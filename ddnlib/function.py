"""The autograd bridge: one ``torch.autograd.Function`` wiring a node's solve and its ``vjp``.

``declarative_apply(node, xs)`` solves the node's problem without recording a graph and returns ``y``
whose backward calls ``node.vjp``. The node's learnable parameters (those requiring grad, by name as
in ``named_parameters()``) are inputs of the Function, so their gradients flow to ``.grad`` like any
other leaf, also through ``torch.nn.utils.parametrize`` and inside ``torch.func.functional_call``.
Under ``torch.func.vmap`` the mapped dimension is folded into the batch dimension, which is exact
because the problem is separable across the batch. Samples whose input or solution is not finite
are left out of the backward pass: their input gradients are NaN and they add nothing to the
parameter gradients, so one bad sample never poisons the others. The backward is first order: double backward
(``create_graph=True``) and torch.func gradient transforms raise instead of returning wrong numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["declarative_apply"]

_N_META = 4  # node, holder, number of inputs, parameter names


class _Holder:
    """Carries the solver's ``ctx`` from ``forward`` to ``setup_context`` for one call."""

    __slots__ = ("ctx",)

    def __init__(self):
        self.ctx = None


class _Bound(torch.nn.Module):
    """Calls ``node.vjp`` so that ``functional_call`` can substitute the node's parameters."""

    def __init__(self, node):
        super().__init__()
        self.node = node

    def forward(self, *xs, y, v, ctx):
        return self.node.vjp(*xs, y=y, v=v, ctx=ctx)


def _detach(ctx):
    if ctx is None:
        return None
    if not isinstance(ctx, Mapping):
        raise TypeError(f"solve returned ctx of type {type(ctx).__name__}: expected a Mapping")
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in ctx.items()}


def _inside_grad_transform(t: Tensor) -> bool:
    """Whether ``t`` is traced by a torch.func gradient transform (which forbids requires_grad_)."""
    try:
        t.detach().requires_grad_()
    except RuntimeError:
        return True
    return False


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class _Declarative(torch.autograd.Function):
    @staticmethod
    def forward(node, holder, n, names, *tensors):
        xs = tensors[:n]
        name = type(node).__name__
        with torch.no_grad():
            if xs[0].shape[0] == 0:
                out = node.initial_guess(*xs)
            else:
                out = node.solve(*xs)
        y, ctx = out if isinstance(out, tuple) else (out, None)
        if not isinstance(y, Tensor):
            raise TypeError(f"{name}.solve returned {type(y).__name__}: expected a Tensor")
        if y.dim() == 0 or y.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{name}.solve returned shape {tuple(y.shape)}: expected a leading "
                             f"batch dimension of size {xs[0].shape[0]}")
        if not y.is_floating_point():
            raise TypeError(f"{name}.solve returned dtype {y.dtype}: expected a floating dtype")
        holder.ctx = _detach(ctx)
        y = y.detach()
        if any(_shares_memory(y, x) for x in xs):
            y = y.clone()
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        node, holder, n, names, *tensors = inputs
        ctx.node, ctx.n, ctx.names = node, n, names
        ctx.params = tensors[n:]
        ctx.solve_ctx = holder.ctx
        ctx.save_for_backward(*tensors[:n], output)

    @staticmethod
    def backward(ctx, v):
        if _inside_grad_transform(v):
            raise NotImplementedError(
                f"{type(ctx.node).__name__}: torch.func gradient transforms (grad, vjp, jacrev) "
                "are not supported through a DeclarativeNode; use torch.autograd "
                "(torch.func.vmap and functional_call are supported).")
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"double backward through {type(ctx.node).__name__} is not supported: its "
                "gradient is first-order only. Call backward/autograd.grad without "
                "create_graph=True through a DeclarativeNode.")
        *xs, y = ctx.saved_tensors
        n, needs = ctx.n, ctx.needs_input_grad[_N_META:]
        b = y.shape[0]
        if b and all(bool(torch.isfinite(t.sum())) for t in (y, *xs)):
            # every sample finite (one reduction per tensor): no masks, no copies. The per-sample
            # masks below cost more than a closed-form vjp on CPU (e.g. 2x on (256, 512) L2Sphere)
            inputs, params = _vjp(ctx, xs, y, v, ctx.solve_ctx)
        else:  # non-finite samples are left out: NaN input gradients, no parameter contribution
            good = (torch.stack([torch.isfinite(t).reshape(b, -1).all(-1) for t in (y, *xs)]).all(0)
                    if b else torch.zeros(0, dtype=torch.bool, device=y.device))
            inputs = [torch.full_like(x, torch.nan) if need else None
                      for x, need in zip(xs, needs[:n])]
            params = [torch.zeros_like(p) for p in ctx.params]
            if good.any():
                sub_inputs, params = _vjp(ctx, [x[good] for x in xs], y[good], v[good],
                                          _rows(ctx.solve_ctx, good, b))
                for full, g in zip(inputs, sub_inputs):
                    if full is not None:
                        full[good] = g
        grads = [g if need else None for g, need in zip([*inputs, *params], needs)]
        return (None,) * _N_META + tuple(grads)

    @staticmethod
    def vmap(info, in_dims, node, holder, n, names, *tensors):
        dims = in_dims[_N_META:]
        if any(d is not None for d in dims[n:]):
            raise NotImplementedError(
                f"vmap over the parameters of {type(node).__name__} is not supported; "
                "map over its inputs only")
        size = info.batch_size
        xs = []
        for x, d in zip(tensors[:n], dims[:n]):
            x = x.movedim(d, 0) if d is not None else x.expand(size, *x.shape)
            xs.append(x.reshape(size * x.shape[1], *x.shape[2:]))
        y = _Declarative.apply(node, _Holder(), n, names, *xs, *tensors[n:])
        return y.reshape(size, -1, *y.shape[1:]), 0


def _rows(solve_ctx, keep: Tensor, b: int):
    """The per-sample entries (tensors with leading size ``b``) of ``solve_ctx`` at rows ``keep``."""
    if solve_ctx is None or bool(keep.all()):
        return solve_ctx
    return {k: v[keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == b else v
            for k, v in solve_ctx.items()}


def _vjp(ctx, xs, y, v, solve_ctx) -> tuple[list, list]:
    """``ctx.node.vjp`` at the parameters the forward saw: (input grads, param grads) as lists."""
    node, names, needs = ctx.node, ctx.names, ctx.needs_input_grad[_N_META:]
    xs = [x.detach().requires_grad_(need) for x, need in zip(xs, needs[: ctx.n])]
    current = dict(node.named_parameters())
    if all(current.get(k) is p for k, p in zip(names, ctx.params)):
        input_grads, param_grads = node.vjp(*xs, y=y, v=v, ctx=solve_ctx)
    else:  # called inside functional_call: differentiate at the parameters of that call
        swapped = {f"node.{k}": p.detach().requires_grad_() for k, p in zip(names, ctx.params)}
        input_grads, param_grads = torch.func.functional_call(
            _Bound(node), swapped, tuple(xs), dict(y=y, v=v, ctx=solve_ctx))
    zeros = [torch.zeros_like(p) for p in ctx.params]
    params = [param_grads.get(k) for k in names]
    return list(input_grads), [z if g is None else g for g, z in zip(params, zeros)]


def declarative_apply(node, xs: Sequence[Tensor]) -> Tensor:
    """Solve ``node`` at ``xs`` and return ``y`` wired to ``node.vjp`` for the backward pass."""
    named = [(k, p) for k, p in node.named_parameters() if p.requires_grad]
    names = tuple(k for k, _ in named)
    return _Declarative.apply(node, _Holder(), len(xs), names, *xs, *(p for _, p in named))
