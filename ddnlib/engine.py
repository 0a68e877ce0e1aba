"""The generic implicit-differentiation engine: the vector–Jacobian product of an argmin.

Let ``y(x, θ)`` solve ``min_y f`` subject to ``h = 0`` and ``g ≤ 0`` with multipliers ``ν = (λ, μ)``,
Lagrangian ``L = f + λᵀh + μᵀg`` and active constraints ``c = [h; g_active]`` with Jacobian
``A = ∂c/∂y``. Differentiating the KKT conditions ``∇_y L = 0``, ``c = 0`` gives, for an incoming
gradient ``v = ∂ℓ/∂y``,

    [H  Aᵀ] [u]   [−v]
    [A  0 ] [w] = [ 0],     H = ∇²_yy L,

    ∂ℓ/∂(x, θ) = ∂/∂(x, θ) [ ⟨∇_y L(x, y, ν), u⟩ + ⟨c(x, y), w⟩ ]   (y, ν, u, w held fixed).

So the backward pass is one (batched, per-sample) linear solve and one mixed second-order VJP, with
no loop over input or output dimensions and none over the batch: the problem is separable, so the
gradient of the batch sum holds every per-sample gradient, and parameter gradients come out summed
over the batch. Without constraints the system is ``H u = −v``.

The stages are those of jaxopt's ``root_vjp``: build the KKT point (:meth:`Problem.kkt
<ddnlib.problem.Problem.kkt>`, :mod:`ddnlib.kkt`), solve the system with the node's linear solver
(:mod:`ddnlib.linear_solvers`), report, and take one VJP of a surrogate. The Newton/KKT step of the
optimality check, ``[H Aᵀ; A 0] [d; dν] = −[∇_y L; c]``, rides along as a second right-hand side of
the same solve.

Forward mode (:func:`implicit_jvp`) differentiates the same KKT conditions in a direction
``(dx, dθ)`` of the inputs and parameters: with the same KKT matrix,

    [H  Aᵀ] [dy]     [∂_(x,θ) ∇_y L · (dx, dθ)]
    [A  0 ] [dν] = − [∂_(x,θ) c   · (dx, dθ)],

one linear solve per direction; the right-hand side is a JVP of ``(∇_y L, c)`` at fixed
``(y, ν)``, taken as the transpose of a VJP (two reverse passes, so every objective that the
backward supports works). A node with a closed-form ``vjp`` gets its JVP as the transpose of that
vjp (:func:`transposed_vjp`), exact because the vjp is linear in ``v``.

Gould, Hartley & Campbell, "Deep Declarative Networks", TPAMI 2021, Proposition 4.5.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .linalg import solve_spd
from .linear_solvers import CG, Dense, chosen, report_solve
from .problem import Problem, batched_jacobian, grad
from .solution import Solution, as_solution

__all__ = ["implicit_vjp", "implicit_jvp", "transposed_vjp", "differentiable_vjp"]

CHECK_CG_TOL = 0.1  # the optimality check needs only the size of its step
DEGENERACY = 0.1  # a constraint gradient below this share of optimality_tol is degenerate


def _kkt_system(node, xs: Sequence[Tensor], y: Tensor, solution: Solution) -> tuple:
    """``(problem, kkt, operator, solver)`` at ``y`` for the backward and forward modes (graph
    mode on); degenerate constraints are reported when the node's checks are on."""
    options = node.options
    problem = Problem(node, xs, y.shape)
    kkt = problem.kkt(y, solution, options)
    if options.check_optimality:
        kkt.report_rank(options.strict, DEGENERACY * options.tol("optimality_tol", y.dtype))
    # the forward Newton's factor of H at its last iterate (one sub-tolerance step from y)
    factor = solution.hessian_cholesky
    reuse = (factor is not None and not kkt.constrained and not options.damping
             and factor.shape == (problem.batch, problem.m, problem.m))
    op = kkt.operator(options.damping, factor=factor.to(y.dtype) if reuse else None)
    return problem, kkt, op, chosen(options.solver, op)


def _as_solution(y: Tensor, ctx) -> Solution:
    return ctx if isinstance(ctx, Solution) else as_solution((y, ctx))


def implicit_vjp(
    node, xs: Sequence[Tensor], y: Tensor, v: Tensor,
    ctx: Solution | Mapping[str, Any] | None = None,
) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor]]:
    """Gradients of ``⟨v, y(xs, θ)⟩`` for the inputs that require grad and for ``θ``.

    Args:
        node: the :class:`~ddnlib.DeclarativeNode` (its ``options`` are read).
        xs: the inputs, each ``(b, ...)``; gradients are returned for those with ``requires_grad``.
        y: the solution ``(b, *out)``.
        v: the incoming gradient ``∂ℓ/∂y``, same shape as ``y``.
        ctx: what the forward solver returned beside ``y``: a :class:`~ddnlib.Solution` or a
            mapping with the ``"lambda"`` / ``"mu"`` multipliers.

    Returns:
        ``(input_grads, param_grads)``: a tuple aligned with ``xs`` (``None`` where not required) and
        a dict from parameter name to gradient for every parameter of ``node`` requiring grad.
    """
    options = node.options
    params = {name: p for name, p in node.named_parameters() if p.requires_grad}
    wanted = [x for x in xs if x.requires_grad] + list(params.values())
    if y.numel() == 0 or not wanted:  # an empty batch or an empty output: zero gradients
        return tuple(torch.zeros_like(x) if x.requires_grad else None for x in xs), {
            name: torch.zeros_like(p) for name, p in params.items()
        }
    if torch.is_grad_enabled() and getattr(_GRAPH, "on", False):
        return _vjp_with_graph(node, xs, y, v, params, wanted)
    solution = _as_solution(y, ctx)
    with torch.enable_grad():
        problem, kkt, op, solver = _kkt_system(node, xs, y, solution)
        # column 0: the backward system; column 1: the Newton/KKT step of the optimality check,
        # unless the forward solver certified optimality to the check's tolerance already
        tol = options.tol("optimality_tol", y.dtype)
        check = options.check_optimality and not (solution.certified is not None
                                                  and solution.certified <= tol)
        By = -problem.flatten(v).to(y.dtype).unsqueeze(-1)
        if not check and op.factor is not None and isinstance(solver, Dense):
            # the forward's factor of a positive definite H: one solve, nothing to report
            u = torch.cholesky_solve(By, op.factor)[..., 0]
            grads = grad(kkt.surrogate(u, None), wanted)
            return _split(grads, xs, params)
        Bc = kkt.c.new_zeros(*kkt.c.shape, 1)
        if check:
            gL, c = kkt.residual()
            By, Bc = torch.cat([By, gL.unsqueeze(-1)], -1), torch.cat([Bc, c.unsqueeze(-1)], -1)
        rtol = None
        if isinstance(solver, CG) and check:
            rtol = torch.tensor([[0.0], [CHECK_CG_TOL]], dtype=y.dtype, device=y.device)
        U, W, info = solver.solve(op, By, Bc, rtol)
        what = "the KKT matrix" if kkt.constrained else "the Hessian"
        report_solve(info, options.strict, what, kkt.hessian() if info.not_pd.any()
                     and not isinstance(solver, CG) and not kkt.constrained else None)
        if check:
            kkt.optimality(U[..., 1], tol).report(options.strict)
        grads = grad(kkt.surrogate(U[..., 0], W[..., 0]), wanted)
    return _split(grads, xs, params)


def _split(grads: list[Tensor], xs: Sequence[Tensor], params: Mapping[str, Tensor]) -> tuple:
    """``(input_grads, param_grads)`` from the gradients of ``wanted`` (inputs requiring grad, then
    the parameters)."""
    it = iter(grads)
    input_grads = tuple(next(it) if x.requires_grad else None for x in xs)
    return input_grads, {name: next(it) for name in params}


_GRAPH = threading.local()  # set while a vjp must be differentiable (see differentiable_vjp)


@contextmanager
def differentiable_vjp():
    """Within this context (and with grad mode on), :func:`implicit_vjp` returns gradients that
    are differentiable functions of ``xs``, ``θ``, ``y`` and ``v`` (double backward; the autograd
    bridge enters it for ``create_graph=True``, :func:`transposed_vjp` to differentiate in
    ``v``)."""
    before = getattr(_GRAPH, "on", False)
    _GRAPH.on = True
    try:
        yield
    finally:
        _GRAPH.on = before


def _vjp_with_graph(node, xs, y, v, params, wanted):
    """The unconstrained backward as a differentiable function of ``(xs, θ, y, v)`` (double
    backward): ``g = (∂_(x,θ) ∇_y f)ᵀ u`` with ``u = −H⁻¹ v`` from a differentiable dense solve,
    and ``g`` taken as a VJP with ``u`` as its cotangent, so that ``u``'s own dependence on
    ``(x, θ, y, v)`` is recorded but not traversed. With ``y`` attached to the graph (the node's
    output), autograd adds the dependence through ``y`` by the node's implicit backward again."""
    options = node.options
    problem = Problem(node, xs, y.shape)
    if problem.constrained:
        raise NotImplementedError(
            f"double backward through {type(node).__name__}: its problem has constraints, and "
            "the differentiable backward covers unconstrained problems only (the multipliers' "
            "own derivatives are not formed); differentiate it once, or use forward mode "
            "(torch.func.jvp, jacfwd) for second-order quantities of the layers around it")
    yf = problem.flatten(y)
    if not yf.requires_grad:
        yf = yf.detach().requires_grad_()
    grad_f = grad(problem.objective(yf).sum(), [yf], create_graph=True)[0]
    H = batched_jacobian(grad_f, yf, create_graph=True)
    H = 0.5 * (H + H.transpose(-1, -2))
    U, info = solve_spd(H, -problem.flatten(v).to(yf.dtype).unsqueeze(-1), options.damping)
    report_solve(info, options.strict, "the Hessian", H.detach())
    return _split(grad(grad_f, wanted, U[..., 0], create_graph=True), xs, params)


def implicit_jvp(
    node, xs: Sequence[Tensor], y: Tensor, tangents: Sequence[Tensor | None],
    param_tangents: Mapping[str, Tensor], ctx: Solution | Mapping[str, Any] | None = None,
) -> Tensor:
    """The directional derivative ``dy (b, *out)`` of the solution for tangents of the inputs and
    parameters (see the module docstring).

    Args:
        node: the :class:`~ddnlib.DeclarativeNode` (its ``options`` are read).
        xs: the inputs, each ``(b, ...)``; those with a tangent must require grad.
        y: the solution ``(b, *out)``.
        tangents: one per input, shaped like it, or ``None`` (a zero tangent).
        param_tangents: parameter name (as in ``named_parameters()``) to its tangent; those
            parameters must require grad.
        ctx: what the forward solver returned beside ``y`` (as for :func:`implicit_vjp`).
    """
    options = node.options
    params = dict(node.named_parameters())
    pairs = [(x, t) for x, t in zip(xs, tangents) if t is not None]
    pairs += [(params[k], t) for k, t in param_tangents.items() if t is not None]
    if y.numel() == 0 or not pairs:
        return torch.zeros_like(y)
    with torch.enable_grad():
        problem, kkt, op, solver = _kkt_system(node, xs, y, _as_solution(y, ctx))
        da, dc = _directional([kkt.lagrangian_grad, kkt.c], pairs)
        dc = dc * kkt.active.to(dc.dtype)
        U, _, info = solver.solve(op, -da.detach().unsqueeze(-1), -dc.detach().unsqueeze(-1))
        report_solve(info, options.strict, "the KKT matrix" if kkt.constrained else "the Hessian")
    return problem.unflatten(U[..., 0].to(y.dtype))


def _directional(outs: Sequence[Tensor], pairs) -> list[Tensor]:
    """``J_i t`` for each output ``out_i`` and tangents ``t`` of the inputs ``pairs = [(z, t)]``,
    as the transpose of a VJP: ``J t = ∂/∂s ⟨Jᵀ s, t⟩``."""
    dummies = [torch.zeros_like(o, requires_grad=True) for o in outs]
    wanted = [z for z, _ in pairs]
    live = [(o, s) for o, s in zip(outs, dummies) if o.requires_grad and o.numel()]
    if not live:
        return [torch.zeros_like(o) for o in outs]
    pulled = torch.autograd.grad([o for o, _ in live], wanted, [s for _, s in live],
                                 create_graph=True, allow_unused=True)
    total = sum((g * t.to(g.dtype)).sum() for g, (_, t) in zip(pulled, pairs) if g is not None)
    if not isinstance(total, Tensor) or not total.requires_grad:
        return [torch.zeros_like(o) for o in outs]
    return grad(total, dummies)


def transposed_vjp(
    node, xs: Sequence[Tensor], y: Tensor, tangents: Sequence[Tensor | None],
    param_tangents: Mapping[str, Tensor], ctx: Solution | Mapping[str, Any] | None = None,
) -> Tensor:
    """``dy = J (dx, dθ)`` from ``node.vjp`` (``v ↦ Jᵀ v``, linear in ``v``): ``J t = ∂/∂v ⟨Jᵀ v, t⟩``.

    Raises ``NotImplementedError`` when the vjp's result does not depend differentiably on ``v``.
    """
    params = {k: p for k, p in node.named_parameters() if p.requires_grad}
    if y.numel() == 0:
        return torch.zeros_like(y)
    with torch.enable_grad():
        v = torch.zeros_like(y, requires_grad=True)
        with differentiable_vjp():
            input_grads, param_grads = node.vjp(*xs, y=y, v=v, ctx=ctx)
        terms = [(g, t) for g, t in zip(input_grads, tangents) if t is not None and g is not None]
        terms += [(param_grads[k], t) for k, t in param_tangents.items()
                  if t is not None and k in params and param_grads.get(k) is not None]
        total = sum((g * t.to(g.dtype)).sum() for g, t in terms)
        if not terms:
            return torch.zeros_like(y)
        if not total.requires_grad:
            raise NotImplementedError(
                f"forward-mode derivative of {type(node).__name__}: its vjp does not return a "
                "differentiable function of v, so its JVP cannot be formed by transposing it; "
                "override jvp(*xs, y=..., tangents=..., param_tangents=..., ctx=...)")
        return grad(total, [v])[0]
