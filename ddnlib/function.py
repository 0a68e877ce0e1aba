"""The autograd bridge: one ``torch.autograd.Function`` wiring a node's solve and its ``vjp``.

``declarative_apply(node, xs)`` solves the node's problem without recording a graph and returns ``y``
whose backward calls ``node.vjp``. Every parameter and buffer of the node (by name as in
``named_parameters()`` / ``named_buffers()``) is an input of the Function and is saved for the
backward, so that

- the backward runs ``node.vjp`` at exactly the tensors the forward used (also inside
  ``torch.func.functional_call`` with swapped values that do not require grad, and under
  ``torch.nn.utils.parametrize``), through ``functional_call`` on detached copies where they are
  not the node's own tensors or carry hooks: a hook on a parameter runs once per backward;
- a parameter or buffer modified in place between forward and backward raises, like any tensor
  saved by PyTorch ("modified by an inplace operation");
- gradients of the parameters that require grad flow to ``.grad`` like any other leaf.

Precision: under ``torch.autocast`` the node runs in float32 with autocast off (PyTorch's
fp32 policy for numerically sensitive ops) and returns float32; float16/bfloat16 inputs given
directly are solved in float32 and ``y`` is returned in the input dtype.

Batched backward (``autograd.grad(is_grads_batched=True)``, ``jacobian(vectorize=True)``,
``gradcheck(check_batched_grad=True)``) runs ``node.vjp`` once per vector of the batch. Under
``torch.func.vmap`` over the inputs the mapped dimension is folded into the batch dimension, which
is exact because the problem is separable across the batch; vmap over the node's parameters or
buffers (ensembles) solves one member after another. Under ``torch.compile`` the node is a graph
break: it runs eagerly between compiled regions.

Samples whose input or solution is not finite are left out of the backward pass: their input
gradients are NaN and they add nothing to the parameter gradients, so one bad sample never poisons
the others. The backward is first order: double backward (``create_graph=True``) and torch.func
gradient transforms raise instead of returning wrong numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import check_vjp_result
from .linalg import all_finite
from .solution import Solution, as_solution
from torch._C import _functorch
from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack
from torch._functorch.utils import unwrap_dead_wrappers

from .engine import differentiable_vjp

__all__ = ["declarative_apply"]

_N_META = 3  # node, holder, spec
_LOW = (torch.float16, torch.bfloat16)
_SWAP_LOCK = threading.RLock()


@dataclass(frozen=True)
class _Spec:
    """What the Function's tensor inputs are: ``n`` inputs, then the parameters, then buffers."""

    n: int
    params: tuple[str, ...]
    buffers: tuple[str, ...]


class _Holder:
    """Carries the solver's ``ctx`` from ``forward`` to ``setup_context`` for one call."""

    __slots__ = ("ctx",)

    def __init__(self):
        self.ctx = None


class _Call(torch.nn.Module):
    """Calls ``fn(node, *args, **kwargs)`` so that ``functional_call`` can substitute the node's
    parameters and buffers."""

    def __init__(self, node, fn):
        super().__init__()
        self.node, self.fn = node, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.node, *args, **kwargs)


def _at(node, spec: _Spec, state: Sequence[Tensor], fn, *args, substitute=None, force=False,
        **kwargs):
    """``fn(node, *args, **kwargs)`` at the parameters and buffers ``state`` of a forward: directly
    when they are the node's own tensors (and not ``force``), otherwise with the node's tensors
    swapped for ``substitute`` (default ``state``) by ``functional_call``. Swaps and the reads of
    ``declarative_apply`` hold one lock, so a concurrent call never captures a swapped tensor."""
    names = spec.params + spec.buffers
    current = {**dict(node.named_parameters()), **dict(node.named_buffers())}
    if not force and all(current.get(k) is t for k, t in zip(names, state)):
        return fn(node, *args, **kwargs)
    given = state if substitute is None else substitute
    swapped = {f"node.{k}": t for k, t in zip(names, given)}
    with _SWAP_LOCK:
        return torch.func.functional_call(_Call(node, fn), swapped, args, kwargs)


def _solve(node, *xs):
    from .node import DeclarativeNode
    from .solvers import default_solution

    if xs[0].shape[0] == 0:
        return node.initial_guess(*xs)
    solve = node.solve  # (an instance attribute may stand in for the method)
    if getattr(solve, "__func__", None) is DeclarativeNode.solve:  # the default, with what it
        return default_solution(node, xs)                          # hands the backward pass
    return solve(*xs)


def _node_vjp(node, *xs, y, v, ctx):
    return check_vjp_result(node, node.vjp(*xs, y=y, v=v, ctx=ctx), xs,  # ddnlib.contract
                            dict(node.named_parameters()))


def _overrides_vjp(node) -> bool:
    from .node import DeclarativeNode

    return type(node).vjp is not DeclarativeNode.vjp


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _no_autocast():
    """The node computes in its inputs' precision: autocast off on CPU and CUDA."""
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return nullcontext()
    return _Both()


class _Both:
    def __enter__(self):
        self._cms = [torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False)]
        for cm in self._cms:
            cm.__enter__()

    def __exit__(self, *exc):
        for cm in reversed(self._cms):
            cm.__exit__(*exc)


class _Declarative(torch.autograd.Function):
    """``y = argmin`` of ``node`` at the inputs and state in ``tensors``: ``forward`` solves without
    a graph, ``backward`` calls ``node.vjp`` and ``jvp`` ``node.jvp`` at exactly the tensors the
    forward saw; ``holder`` carries the solver's :class:`~ddnlib.Solution` to the backward."""

    @classmethod
    def apply(cls, *args):
        # torch's Function.apply binds the arguments to forward's signature by inspect.signature
        # on every call (≈ 35 µs, as much as a small node's whole backward solve); forward takes
        # positional arguments only, so outside torch.func transforms the binding is skipped
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))

    @staticmethod
    def forward(node, holder, spec, *tensors):
        xs = tensors[:spec.n]
        name = type(node).__name__
        with torch.no_grad():
            out = _at(node, spec, tensors[spec.n:], _solve, *xs)
        solution = as_solution(out, f"{name}.solve", extras_read=_overrides_vjp(node))
        y = solution.y
        if y.dim() == 0 or y.shape[0] != xs[0].shape[0]:
            raise ValueError(f"{name}.solve returned shape {tuple(y.shape)}: expected a leading "
                             f"batch dimension of size {xs[0].shape[0]}")
        if not y.is_floating_point():
            raise TypeError(f"{name}.solve returned dtype {y.dtype}: expected a floating dtype")
        holder.ctx = solution.detach() if len(solution) or solution.has_backward_data else None
        y = y.detach()
        if any(_shares_memory(y, x) for x in xs):
            y = y.clone()
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        node, holder, spec, *tensors = inputs
        ctx.node, ctx.spec = node, spec
        ctx.solve_ctx = holder.ctx
        ctx.save_for_backward(*tensors, output)  # the version counters guard against in-place
        ctx.save_for_forward(*tensors, output)

    @staticmethod
    def backward(ctx, v):
        *tensors, y = ctx.saved_tensors
        with _no_autocast():
            grads = _peel(_backward, ctx, tensors, y, [v])
        return (None,) * _N_META + tuple(grads)

    @staticmethod
    def jvp(ctx, *tangents):
        *tensors, y = ctx.saved_tensors
        with _no_autocast(), torch.no_grad():
            return _peel(_jvp, ctx, tensors, y, list(tangents[_N_META:]))[0]

    @staticmethod
    def vmap(info, in_dims, node, holder, spec, *tensors):
        dims = in_dims[_N_META:]
        size = info.batch_size
        if any(d is not None for d in dims[spec.n:]):  # an ensemble: one member at a time
            members = [_Declarative.apply(node, _Holder(), spec, *(
                t if d is None else t.select(d, i) for t, d in zip(tensors, dims)))
                for i in range(size)]
            return torch.stack(members), 0
        xs = []
        for x, d in zip(tensors[:spec.n], dims[:spec.n]):
            x = x.movedim(d, 0) if d is not None else x.expand(size, *x.shape)
            xs.append(x.reshape(size * x.shape[1], *x.shape[2:]))
        y = _Declarative.apply(node, _Holder(), spec, *xs, *tensors[spec.n:])
        return y.reshape(size, -1, *y.shape[1:]), 0


def _peel(compute, ctx, tensors, y, extra) -> list:
    """``compute(ctx, tensors, y, extra)`` (a list of results) also under transforms of the
    backward or the jvp itself. ``extra`` is what arrives from outside (``[v]`` or the tangents,
    ``None`` for a zero tangent). A batched ``extra`` (``is_grads_batched``,
    ``jacobian(vectorize=True)``, vmap over a vjp or a jvp, ``jacfwd``) is split into its vectors,
    each computed and the results batched again at the same level; under a torch.func
    differentiation transform (``grad``, ``vjp``, ``jvp``, ``jacrev``) the tensors are
    unwrapped, the computation runs below the transform and its results are handed back as
    constants of that level (first order: a transform of a transform raises)."""
    # the wrappers of a finished torch.func transform (torch.func.vjp's pullback, jacrev) are dead
    unwrap = lambda t: None if t is None else _functorch.unwrap_if_dead(t)  # noqa: E731
    extra, y, tensors = [unwrap(t) for t in extra], unwrap(y), [unwrap(t) for t in tensors]
    everything = [*extra, y, *tensors]
    present = [t for t in everything if t is not None]
    if any(_functorch.is_legacy_batchedtensor(t) for t in extra if t is not None):
        level = _legacy_level()  # torch.autograd's own vmap (is_grads_batched)
        parts = [(torch._remove_batch_dim(t, level, 1, 0), 0)
                 if t is not None and _functorch.is_legacy_batchedtensor(t) else (t, None)
                 for t in everything]
        return _per_vector(compute, ctx, parts, len(extra),
                           lambda g: torch._add_batch_dim(g, 0, level))
    level = max(_functorch.maybe_get_level(t) for t in present)
    current = _functorch.maybe_current_level()
    if level < 0 and current is None:
        return compute(ctx, tensors, y, extra)
    if current != level:  # a transform that none of the tensors belongs to: nested transforms
        raise NotImplementedError(
            f"{type(ctx.node).__name__}: nested torch.func transforms (e.g. hessian, grad of "
            "grad, jacfwd of jacrev) through a DeclarativeNode are not supported: its derivative "
            f"runs under a transform (level {current}) that its tensors do not belong to; its "
            "torch.func derivatives are first order (torch.autograd double backward is "
            "supported, see docs/composition.md)")
    at_level = [t is not None and _functorch.maybe_get_level(t) == level for t in everything]
    if any(a and _functorch.is_batchedtensor(t) for a, t in zip(at_level, everything)):
        parts = [_functorch._unwrap_batched(t, level) if a else (t, None)
                 for a, t in zip(at_level, everything)]
        with temporarily_pop_interpreter_stack():
            grads = _per_vector(compute, ctx, parts, len(extra), lambda g: g)
        return [None if g is None else _functorch._add_batch_dim(g, 0, level) for g in grads]
    unwrapped = [_functorch._unwrap_for_grad(t, level) if a else t
                 for a, t in zip(at_level, everything)]
    with temporarily_pop_interpreter_stack():
        if any(t is not None and _functorch.is_gradtrackingtensor(t) for t in unwrapped):
            raise NotImplementedError(
                f"{type(ctx.node).__name__}: nested torch.func transforms (e.g. hessian, "
                "grad of grad, jacfwd of jacrev) through a DeclarativeNode are not supported; "
                "its torch.func derivatives are first order (torch.autograd double backward "
                "is supported, see docs/composition.md)")
        k = len(extra)
        with torch.no_grad():  # the transform's own create_graph: results are constants here
            grads = _peel(compute, ctx, unwrapped[k + 1:], unwrapped[k], unwrapped[:k])
    return [None if g is None else _functorch._wrap_for_grad(g, level) for g in grads]


def _per_vector(compute, ctx, parts, k: int, rebatch) -> list:
    """``compute`` once per index of the batch dimension of ``parts`` ((tensor, dim) pairs, dim
    ``None`` where not batched), results stacked at dim 0 and passed to ``rebatch``."""
    size = next(t.shape[d] for t, d in parts if d is not None)
    per_vector = []
    for i in range(size):
        sliced = [t if d is None or t is None else t.select(d, i) for t, d in parts]
        per_vector.append(_peel(compute, ctx, sliced[k + 1:], sliced[k], sliced[:k]))
    return [None if g[0] is None else rebatch(torch.stack(g)) for g in zip(*per_vector)]


def _legacy_level() -> int:
    """The vmap level of a tensor batched by ``torch._vmap_internals`` (``is_grads_batched``):
    the innermost one, i.e. the current nesting."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def _backward(ctx, tensors, y, extra) -> list:
    node, spec = ctx.node, ctx.spec
    v, = extra
    if torch.is_grad_enabled() and any(t.requires_grad for t in (v, *tensors)):
        return _differentiable_backward(ctx, tensors, y, v)
    xs, state = tensors[:spec.n], tensors[spec.n:]
    needs = ctx.needs_input_grad[_N_META:]
    b = y.shape[0]
    checked = (y,) if node.rejects_non_finite_inputs else (y, *xs)
    if b and all_finite(*checked):
        # every sample finite (one reduction): no masks, no copies. The per-sample
        # masks below cost more than a closed-form vjp on CPU (e.g. 2x on (256, 512) L2Sphere)
        inputs, params = _vjp(ctx, xs, state, y, v, ctx.solve_ctx)
    else:  # non-finite samples are left out: NaN input gradients, no parameter contribution
        good = (torch.stack([torch.isfinite(t).reshape(b, -1).all(-1) for t in (y, *xs)]).all(0)
                if b else torch.zeros(0, dtype=torch.bool, device=y.device))
        inputs = [torch.full_like(x, torch.nan) if need else None
                  for x, need in zip(xs, needs[:spec.n])]
        params = [torch.zeros_like(p) for p in state[:len(spec.params)]]
        if good.any():
            sub_inputs, params = _vjp(ctx, [x[good] for x in xs], state, y[good], v[good],
                                      _rows(ctx.solve_ctx, good, b))
            for full, g in zip(inputs, sub_inputs):
                if full is not None:
                    full[good] = g
    grads = [*inputs, *params] + [None] * len(spec.buffers)
    return [g if need else None for g, need in zip(grads, needs)]


def _differentiable_backward(ctx, tensors, y, v) -> list:
    """The backward with ``create_graph=True`` (double backward): ``node.vjp`` evaluated as a
    differentiable function of the forward's tensors, of ``v`` and of ``y`` (the node's output,
    with its graph), through aliases (``view_as``) of the inputs and parameters so that the
    engine's own autograd calls stop there (hooks still run once). A closed-form ``vjp`` is used
    only where the node declares ``differentiable_vjp = True`` (it is written with differentiable
    operations of its arguments); otherwise this raises, since a closed form that detaches its
    arguments would give wrong second derivatives silently."""
    node, spec = ctx.node, ctx.spec
    name = type(node).__name__
    if _overrides_vjp(node) and not getattr(node, "differentiable_vjp", False):
        raise NotImplementedError(
            f"double backward (create_graph=True) through {name}: it overrides vjp with a "
            "closed form that is first order. Set differentiable_vjp = True on the class if "
            "its vjp is written with differentiable operations of x, y, v and the parameters "
            "(no detach, no values saved by solve); otherwise differentiate it once, or use "
            "forward mode (torch.func.jvp, jacfwd)")
    needs = ctx.needs_input_grad[_N_META:]
    k = len(spec.params)
    xs = [x.view_as(x) if x.requires_grad else x.detach() for x in tensors[:spec.n]]
    aliases = [p.view_as(p) if p.requires_grad else p.detach() for p in tensors[spec.n:][:k]]
    aliases += [t.detach() for t in tensors[spec.n + k:]]
    with differentiable_vjp():
        input_grads, param_grads = _at(node, spec, tensors[spec.n:], _node_vjp, *xs, y=y, v=v,
                                       ctx=ctx.solve_ctx, substitute=aliases, force=True)
    grads = [*input_grads] + [param_grads.get(k) for k in spec.params]
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
    grads += [None] * len(spec.buffers)
    return [g if need else None for g, need in zip(grads, needs)]


def _rows(solve_ctx, keep: Tensor, b: int):
    """The per-sample entries (tensors with leading size ``b``) of ``solve_ctx`` at rows ``keep``."""
    if solve_ctx is None or bool(keep.all()):
        return solve_ctx
    if isinstance(solve_ctx, Solution):
        return solve_ctx.rows(keep)
    return {k: v[keep] if isinstance(v, Tensor) and v.dim() and v.shape[0] == b else v
            for k, v in solve_ctx.items()}


def _vjp(ctx, xs, state, y, v, solve_ctx) -> tuple[list, list]:
    """``ctx.node.vjp`` at the parameters and buffers the forward saw: (input grads, param grads)
    as lists. Detached copies stand in for them where they are not the node's own tensors any more
    (``functional_call``, transforms) or carry hooks, which the engine's own autograd calls must
    not reach."""
    spec, needs = ctx.spec, ctx.needs_input_grad[_N_META:]
    k = len(spec.params)
    xs = [x.detach().requires_grad_(need) for x, need in zip(xs, needs[:spec.n])]
    copies = [p.detach().requires_grad_(need) for p, need in zip(state[:k], needs[spec.n:])]
    copies += [t.detach() for t in state[k:]]
    # a hook on a parameter must not see the engine's own autograd calls: differentiate copies
    hooked = any(getattr(p, "_backward_hooks", None) for p in state[:k])
    input_grads, param_grads = _at(ctx.node, spec, state, _node_vjp, *xs, y=y, v=v,
                                   ctx=solve_ctx, substitute=copies, force=hooked)
    grads = [param_grads.get(name) for name in spec.params]
    return list(input_grads), [torch.zeros_like(p) if g is None else g
                               for g, p in zip(grads, state)]


def _node_jvp(node, *xs, y, tangents, param_tangents, ctx):
    return node.jvp(*xs, y=y, tangents=tangents, param_tangents=param_tangents, ctx=ctx)


def _jvp(ctx, tensors, y, tangents) -> list:
    """``ctx.node.jvp`` at the tensors the forward used (detached copies; a copy requires grad
    where its tangent is given). Tangents of buffers are ignored, as the backward gives buffers
    no gradient."""
    spec = ctx.spec
    n, k = spec.n, len(spec.params)
    xs = [x.detach().requires_grad_(t is not None) for x, t in zip(tensors[:n], tangents[:n])]
    copies = [p.detach().requires_grad_(t is not None)
              for p, t in zip(tensors[n:n + k], tangents[n:n + k])]
    copies += [t.detach() for t in tensors[n + k:]]
    param_tangents = {name: t for name, t in zip(spec.params, tangents[n:n + k]) if t is not None}
    dy = _at(ctx.node, spec, tensors[n:], _node_jvp, *xs, y=y.detach(), tangents=tuple(
        tangents[:n]), param_tangents=param_tangents, ctx=ctx.solve_ctx, substitute=copies,
        force=True)
    return [dy.to(y.dtype)]


def _state(node) -> tuple[tuple[str, ...], list[Tensor], tuple[str, ...], list[Tensor]]:
    with _SWAP_LOCK:
        params = list(node.named_parameters())
        buffers = list(node.named_buffers())
    return (tuple(k for k, _ in params), [p for _, p in params],
            tuple(k for k, _ in buffers), [t for _, t in buffers])


def declarative_apply(node, xs: Sequence[Tensor]) -> Tensor:
    """Solve ``node`` at ``xs`` and return ``y`` wired to ``node.vjp`` for the backward pass."""
    if torch.compiler.is_compiling():
        return _eager(node, xs)
    return _apply(node, xs)


def _apply(node, xs: Sequence[Tensor]) -> Tensor:
    dtype = xs[0].dtype
    autocast = torch.is_autocast_enabled(xs[0].device.type)
    if dtype in _LOW or autocast:  # compute in float32 (at least)
        xs = [x.float() if x.dtype in _LOW else x for x in xs]
    pnames, params, bnames, buffers = _state(node)
    spec = _Spec(len(xs), pnames, bnames)
    with _no_autocast():
        y = _Declarative.apply(node, _Holder(), spec, *xs, *params, *buffers)
    return y.to(dtype) if dtype in _LOW and not autocast else y


def _eager(node, xs):
    return torch.compiler.disable(_apply)(node, xs)
