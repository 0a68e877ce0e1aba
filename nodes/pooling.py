"""Robust global pooling: ``y = argmin_u Σ_i φ(u − x_i; c[, α])`` over the pooled dimensions.

The pooled input is folded into a batch of one-dimensional problems, ``x (R, N)`` with one row
per kept index (e.g. ``R = B·C`` for ``(B, C, N)``), ``y (R,)``, and the threshold ``c`` and
Barron's shape ``α`` enter as per-row inputs ``(R,)``. So :class:`RobustPooling` has no parameters
of its own: a scalar or per-channel ``c`` is expanded to the rows by ordinary autograd, and the
learnable ``c``/``α`` of the modules live in ``torch.nn.utils.parametrize`` parametrisations
(``c = exp(θ_c)``, ``α = lo + (hi − lo)·sigmoid(θ_α)``).

Backward (closed form, :meth:`RobustPooling.vjp`): at a minimiser ``Σ_i φ′(y − x_i) = 0``, so with
``w_i = φ″(y − x_i)`` and ``H = Σ_i w_i``,

    ∂y/∂x_i = w_i / H,    ∂y/∂c = Σ_i w_i (y − x_i) / (c H),    ∂y/∂α = −Σ_i ∂φ′/∂α / H.

The forward pass stores ``w`` (one tensor like ``x``) and the per-row sums while each block of
rows is in cache, so the backward is one multiply; the fused path stores only the sums, and its
backward recomputes ``w`` in one compiled pass. Where ``H ≤ 0`` (a flat or degenerate
minimum, e.g. Huber with no point within ``c`` of ``y``) the gradient of that row is set to zero
and a :class:`~ddnlib.SingularSystemWarning` is reported (``Options(damping=γ)`` uses ``H + γ``).
Huber and the truncated quadratic are not differentiable when some ``|y − x_i| = c``; the
inlier-side derivative is used there. The truncated quadratic and Welsch can have several global
minimisers (e.g. two equally dense clusters); the solver returns one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from ddnlib import DeclarativeNode, Options
from ddnlib.errors import SingularSystemWarning, report
from ddnlib.pickling import Picklable

from .penalties import PENALTIES, Penalty, get_penalty
from .pooling_fused import compiled, mark_failed, want_fused
from .pooling_solvers import SolverSettings, solve_rows

__all__ = ["RobustPooling", "RobustGlobalPool1d", "RobustGlobalPool2d", "robust_global_pool"]

_FLOATS = (torch.float32, torch.float64)


class RobustPooling(DeclarativeNode):
    """``y_r = argmin_u Σ_i φ(u − x_ri; c_r, α_r)`` for ``x (R, N)``, ``c (R,)``, ``α (R,)``.

    Args:
        penalty: one of :data:`~ddnlib.nodes.penalties.PENALTIES` (or a ``Penalty``).
        starts: candidate starts per row of the multi-start solver that settles the rows the
            histogram search of non-convex penalties leaves open (every entry of a row with at
            most ``starts`` entries is one).
        fused: the compiled (``torch.compile``) Newton iteration for convex penalties: ``True``,
            ``False``, or ``None`` to choose automatically (:mod:`~ddnlib.nodes.pooling_fused`).
        options: ``solver_tol``, ``max_iter``, ``damping`` and ``strict`` are read.
    """

    rejects_non_finite_inputs = True  # solve raises on a row without a finite result

    def __init__(self, penalty: str | Penalty = "pseudo_huber", *, starts: int = 64,
                 fused: bool | None = None, options: Options | None = None):
        super().__init__(options)
        self.penalty = get_penalty(penalty)
        if not isinstance(starts, int) or isinstance(starts, bool) or starts < 1:
            raise ValueError(f"starts={starts!r}: expected a positive integer")
        if fused not in (None, True, False):
            raise TypeError(f"fused={fused!r}: expected None (automatic), True or False")
        self.starts = starts
        self.fused = fused

    def extra_repr(self) -> str:
        return f"penalty={self.penalty.name!r}, starts={self.starts}, fused={self.fused}"

    def objective(self, x: Tensor, c: Tensor, alpha: Tensor, y: Tensor) -> Tensor:
        """``Σ_i φ(y_r − x_ri; c_r, α_r)``, shape ``(R,)``."""
        return self.penalty.value(y[:, None] - x, c[:, None], alpha[:, None]).sum(1)

    def initial_guess(self, x: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
        """Declares the output shape ``(R,)`` (the result for an empty batch)."""
        return x.new_zeros(x.shape[0])

    def forward(self, x: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
        """Pool each row of ``x (R, N)``; ``c`` and ``alpha`` are ``(R,)``."""
        if isinstance(x, Tensor) and x.dim() != 2:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (R, N), one row per problem")
        if isinstance(x, Tensor) and x.shape[1] == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected at least one entry per row")
        for name, t in (("c", c), ("alpha", alpha)):
            if isinstance(t, Tensor) and t.dim() != 1:
                raise ValueError(f"{name} has shape {tuple(t.shape)}: expected (R,), one per row")
        return super().forward(x, c, alpha)

    def solve(self, x: Tensor, c: Tensor, alpha: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Solve every row (:mod:`~ddnlib.nodes.pooling_solvers`); ``ctx`` holds what the
        closed-form backward needs, computed block by block while ``x`` is in cache."""
        c_ok = ((c > 0) & torch.isfinite(c)).all()
        if not bool(c_ok & torch.isfinite(alpha).all()):  # one synchronisation when all is well
            if not bool(c_ok):
                raise ValueError(f"c={_shown(c)}: expected finite c > 0")
            raise ValueError(f"alpha={_shown(alpha)}: expected finite values")
        options = self.options
        fused = want_fused(self.fused, self.penalty, self.penalty.convex(alpha), x.numel())
        settings = SolverSettings(options.tol("solver_tol", x.dtype), options.max_iter,
                                  options.strict, self.starts, fused)
        wanted = (x.requires_grad, c.requires_grad, alpha.requires_grad)
        x, c, alpha = x.detach(), c.detach(), alpha.detach()  # solve records no graph
        ctx: dict[str, Any] = {}
        on_block = None
        if any(wanted):
            on_block = lambda rows, xb, yb, work: self._fill(  # noqa: E731
                ctx, wanted, x, rows, xb, yb, c[rows], alpha[rows], work)
        y = solve_rows(self.penalty, x, c, alpha, settings, on_block)
        return y, ctx

    def _fill(self, ctx: dict, wanted: tuple[bool, bool, bool], x_all: Tensor, rows: slice,
              x: Tensor, y: Tensor, c: Tensor, alpha: Tensor,
              work: tuple[Tensor, Tensor] | None) -> None:
        """Backward quantities of ``rows``: ``w = κφ″(y − x)`` (κ: only ratios are used),
        ``H = Σ w``, ``Σ w z``, ``Σ ∂φ′/∂α``, in ``ctx`` (allocated for ``x_all`` on the first
        block). ``work`` (a scratch buffer like ``x`` for ``z``) is ``None`` on the fused path:
        then the sums are compiled (:mod:`~ddnlib.nodes.pooling_fused`) and ``w`` is not stored
        but recomputed by the backward (``ctx["recompute"]``)."""
        need_x, need_c, need_alpha = wanted
        if not ctx:
            r = x_all.shape[0]
            ctx["curvature"] = x_all.new_empty(r)
            if need_x and work is not None:
                ctx["weights"] = torch.empty_like(x_all)
            ctx["recompute"] = need_x and work is None
            if need_c:
                ctx["moment"] = x_all.new_empty(r)
            if need_alpha:
                ctx["alpha_term"] = x_all.new_empty(r)
        c, alpha = c[:, None], alpha[:, None]
        fill = compiled(self.penalty, "fill") if work is None and not need_alpha else None
        if fill is not None:
            try:
                ctx["curvature"][rows], moment = fill(x, y, c, alpha)
            except Exception as error:  # a compiler missing or failing: eager from here on
                mark_failed(self.penalty, error)
            else:
                if need_c:
                    ctx["moment"][rows] = moment
                return
        z = y[:, None] - x if work is None else torch.sub(y[:, None], x, out=work[0])
        # written straight into the stored weights
        w = self.penalty.scaled_curvature(z, c, alpha, ctx["weights"][rows] if "weights" in ctx
                                          else None)
        ctx["curvature"][rows] = w.sum(1)
        if need_alpha:
            ctx["alpha_term"][rows] = self.penalty.alpha_derivative(z, c, alpha).sum(1)
        if need_c:
            ctx["moment"][rows] = z.mul_(w).sum(1)  # z is not needed after this

    def _weights(self, x: Tensor, y: Tensor, c: Tensor, alpha: Tensor, scale: Tensor) -> Tensor:
        """``scale · κφ″(y − x)``, the gradient for ``x`` where the forward did not store ``w``
        (compiled, or eagerly if compiling fails)."""
        fn = compiled(self.penalty, "weights")
        if fn is not None:
            try:
                return fn(x, y, c[:, None], alpha[:, None], scale)
            except Exception as error:  # a compiler missing or failing: eager from here on
                mark_failed(self.penalty, error)
        w = self.penalty.scaled_curvature(y[:, None] - x, c[:, None], alpha[:, None])
        return w.mul_(scale[:, None])

    def vjp(self, x: Tensor, c: Tensor, alpha: Tensor, *, y: Tensor, v: Tensor,
            ctx: Mapping[str, Any] | None = None
            ) -> tuple[tuple[Tensor | None, ...], dict[str, Tensor]]:
        """Closed-form gradients for ``x``, ``c`` and ``α`` (see the module docstring)."""
        need = (x.requires_grad, c.requires_grad, alpha.requires_grad)
        ok = (not need[0] or "weights" in ctx or ctx.get("recompute")) if ctx else False
        if not ok or any(n and k not in ctx for n, k in zip(need[1:], ("moment", "alpha_term"))):
            ctx = {}
            xd = x.detach()
            with torch.no_grad():
                self._fill(ctx, need, xd, slice(None), xd, y.detach(), c.detach(),
                           alpha.detach(), (torch.empty_like(xd),))
        curvature = ctx["curvature"]
        if self.options.damping:  # H + γ in the units of φ″: κ H + κ γ (κ = c² may overflow)
            kappa = self.penalty.curvature_scale(c.detach().double())
            curvature = (curvature.double() + kappa * self.options.damping).to(curvature.dtype)
        regular = curvature > 0
        scale = v.to(curvature.dtype)
        if bool(regular.all()):
            scale = scale / curvature
        else:
            singular = ~regular
            rows = singular.nonzero().flatten()[:8].tolist()
            report(SingularSystemWarning,
                   f"robust pooling ({self.penalty.name}): Σφ″(y − x_i) ≤ 0 at {int(singular.sum())}"
                   f" rows (first {rows}); the minimum is flat or degenerate there and their "
                   "gradients are set to zero. Options(damping=...) regularises.",
                   self.options.strict)
            scale = torch.where(regular, scale / torch.where(regular, curvature, 1.0), 0.0)
        gx = None
        if need[0]:
            gx = (ctx["weights"] * scale[:, None] if "weights" in ctx else
                  self._weights(x.detach(), y.detach(), c.detach(), alpha.detach(), scale))
        gc = None
        if need[1]:
            gc = scale * ctx["moment"] / c if self.penalty.uses_c else torch.zeros_like(c)
        ga = -scale * ctx["alpha_term"] if need[2] else None
        return (gx, gc, ga), {}


def _shown(t: Tensor) -> str:
    flat = t.detach().flatten()
    bad = flat[~((flat > 0) & torch.isfinite(flat))] if flat.numel() else flat
    sample = (bad if bad.numel() else flat)[:4].tolist()
    return f"tensor with values {sample}{' …' if flat.numel() > 4 else ''}"


def _as_tensor(name: str, value: float | Tensor, x: Tensor) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name}={value!r}: expected a number or a floating tensor")
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=x.dtype, device=x.device)
    if value.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but x has {x.dtype}: convert one of "
                        "them (a module follows .double() / .float())")
    if value.device != x.device:
        raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
    return value


def robust_global_pool(x: Tensor, penalty: str = "pseudo_huber", c: float | Tensor = 1.0,
                       alpha: float | Tensor = 1.0, dim: int | Sequence[int] = -1, *,
                       starts: int = 64, fused: bool | None = None,
                       options: Options | None = None) -> Tensor:
    """``y = argmin_u Σ_i φ(u − x_i; c, α)`` over the dimensions ``dim`` of ``x``.

    Args:
        x: float32 or float64 input; the result has the shape of ``x`` without ``dim``.
        penalty: a name in :data:`~ddnlib.nodes.penalties.PENALTIES`.
        c: threshold ``c > 0``: a number or a tensor broadcastable to the result's shape (e.g.
            ``(C,)`` per channel for ``x (B, C, N)``); differentiable.
        alpha: Barron's shape ``α`` (``penalty="general"`` only), like ``c``; differentiable.
        dim: the pooled dimension(s).
        starts: see :class:`RobustPooling`.
        fused: see :class:`RobustPooling`.
        options: see :class:`RobustPooling`.
    """
    node = RobustPooling(penalty, starts=starts, fused=fused, options=options)
    return _pool(node, x, c, alpha, dim)


def _pool(node: RobustPooling, x: Tensor, c, alpha, dim) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x is {type(x).__name__}: expected a torch.Tensor")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x has dtype {x.dtype}: expected torch.float32 or torch.float64")
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims or any(not isinstance(d, int) or isinstance(d, bool) for d in dims):
        raise TypeError(f"dim={dim!r}: expected an int or a non-empty sequence of ints")
    if any(not -x.dim() <= d < x.dim() for d in dims):
        raise ValueError(f"dim={dim!r}: out of range for x with {x.dim()} dimensions")
    pooled = sorted({d % x.dim() for d in dims})
    if len(pooled) != len(dims):
        raise ValueError(f"dim={dim!r}: repeated dimension")
    kept = [d for d in range(x.dim()) if d not in pooled]
    kept_shape = tuple(x.shape[d] for d in kept)
    n = 1
    for d in pooled:
        n *= x.shape[d]
    if n == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: the pooled dimensions {tuple(pooled)} "
                         "are empty")
    rows = x.permute(*kept, *pooled).reshape(-1, n)
    per_row = []
    for name, value in (("c", c), ("alpha", alpha)):
        t = _as_tensor(name, value, x)
        try:
            t = t.expand(kept_shape)
        except RuntimeError:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected a shape that "
                             f"broadcasts to {kept_shape}") from None
        per_row.append(t.reshape(-1))
    return node(rows, *per_row).reshape(kept_shape)


class _Exp(torch.nn.Module):
    """``c = exp(θ)``: keeps a learnable ``c`` positive."""

    def forward(self, theta: Tensor) -> Tensor:
        return theta.exp()

    def right_inverse(self, c: Tensor) -> Tensor:
        return c.log()


class _Interval(torch.nn.Module):
    """``α = lo + (hi − lo) sigmoid(θ)``: keeps a learnable ``α`` in the open ``(lo, hi)``."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, theta: Tensor) -> Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(theta)

    def right_inverse(self, alpha: Tensor) -> Tensor:
        return torch.logit((alpha - self.lo) / (self.hi - self.lo))


def _initial(name: str, value, channels: int | None) -> Tensor:
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name}={value!r}: expected a number or a tensor")
    # a number is checked on the CPU, then placed on the default device (also under
    # ``with torch.device("meta")``, where no value could be read)
    device = value.device if isinstance(value, Tensor) else torch.device("cpu")
    t = torch.as_tensor(value, dtype=torch.get_default_dtype(), device=device).detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    shape = () if channels is None else (channels,)
    if t.dim() > len(shape) or (t.dim() == 1 and t.shape != shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}: expected a number"
                         f"{' or shape ' + str(shape) if channels else ''}")
    return t.expand(shape).clone()


def _placed(value, t: Tensor) -> Tensor:
    """``t`` (built from a number on the CPU) on the default device; a tensor stays where it is."""
    return t if isinstance(value, Tensor) else t.to(torch.get_default_device())


class _RobustGlobalPool(Picklable, torch.nn.Module):
    _pooled: tuple[int, ...] = ()
    _ndim = 0
    _layout = ""

    def __init__(self, penalty: str = "pseudo_huber", c: float | Tensor = 1.0,
                 learn_c: bool = False, alpha: float | Tensor = 1.0, learn_alpha: bool = False,
                 alpha_range: tuple[float, float] = (0.0, 3.0), channels: int | None = None, *,
                 starts: int = 64, fused: bool | None = None, options: Options | None = None):
        super().__init__()
        self.node = RobustPooling(penalty, starts=starts, fused=fused, options=options)
        uses_alpha = self.node.penalty.uses_alpha
        if channels is not None and (not isinstance(channels, int) or isinstance(channels, bool)
                                     or channels < 1):
            raise ValueError(f"channels={channels!r}: expected a positive integer or None")
        self.channels = channels
        if learn_alpha and not uses_alpha:
            raise ValueError(f"learn_alpha=True with penalty={penalty!r}: only 'general' has α")
        c0 = _initial("c", c, channels)
        if c0.device.type != "meta" and not bool(((c0 > 0) & torch.isfinite(c0)).all()):
            raise ValueError(f"c={c!r}: expected finite c > 0")
        self._register("c", _placed(c, c0), _Exp() if learn_c else None)
        if uses_alpha:
            lo, hi = _check_range(alpha_range)
            a0 = _initial("alpha", alpha, channels)
            if a0.device.type != "meta" and not bool(((a0 > lo) & (a0 < hi)).all()):
                raise ValueError(f"alpha={alpha!r}: expected inside the open alpha_range "
                                 f"({lo}, {hi})")
            self._register("alpha", _placed(alpha, a0), _Interval(lo, hi) if learn_alpha else None)
        else:
            self.register_buffer("alpha", torch.ones(()), persistent=False)

    def _register(self, name: str, value: Tensor, parametrization: torch.nn.Module | None):
        if parametrization is None:
            self.register_buffer(name, value)
        else:
            setattr(self, name, torch.nn.Parameter(value))
            parametrize.register_parametrization(self, name, parametrization)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x is {type(x).__name__}: expected a torch.Tensor")
        if x.dim() != self._ndim:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected {self._layout}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise ValueError(f"x has {x.shape[1]} channels (shape {tuple(x.shape)}): this module "
                             f"was built with channels={self.channels}")
        if torch.jit.is_tracing():
            raise TypeError(f"{type(self).__name__}: torch.jit.trace cannot record a declarative "
                            "node (a solver with data-dependent control flow inside a custom "
                            "autograd Function); call the module eagerly, or trace the layers "
                            "around it")
        return _pool(self.node, x, self.c, self.alpha, self._pooled)


def _check_range(alpha_range) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in alpha_range)
    except (TypeError, ValueError):
        raise ValueError(f"alpha_range={alpha_range!r}: expected two numbers (lo, hi)") from None
    if not (lo < hi) or not all(map(lambda v: abs(v) < float("inf"), (lo, hi))):
        raise ValueError(f"alpha_range={alpha_range!r}: expected finite lo < hi")
    return lo, hi


_MODULE_DOC = """Robust global pooling {shape}: ``y_bc = argmin_u Σ_i φ(u − x_bci; c, α)``.

    Args:
        penalty: one of ``{names}``.
        c: threshold ``c > 0`` (a number, or a tensor of shape ``(channels,)``).
        learn_c: learn ``c`` (parametrised ``c = exp(θ)``; ``θ`` is
            ``parametrizations.c.original`` in ``named_parameters()``).
        alpha: Barron's shape ``α`` of ``penalty="general"``, inside ``alpha_range``.
        learn_alpha: learn ``α`` (parametrised ``α = lo + (hi − lo) sigmoid(θ)``).
        alpha_range: the open interval ``(lo, hi)`` of ``α``.
        channels: ``None`` for one ``c`` (and ``α``) shared by all channels; ``C`` for one per
            channel (the input must then have ``C`` channels).
        starts: see :class:`RobustPooling`.
        fused: see :class:`RobustPooling`.
        options: see :class:`RobustPooling`.
    """


class RobustGlobalPool1d(_RobustGlobalPool):
    _pooled = (2,)
    _ndim = 3
    _layout = "(B, C, N)"


class RobustGlobalPool2d(_RobustGlobalPool):
    _pooled = (2, 3)
    _ndim = 4
    _layout = "(B, C, H, W)"


RobustGlobalPool1d.__doc__ = _MODULE_DOC.format(shape="of point clouds, (B, C, N) → (B, C)",
                                                names=tuple(PENALTIES))
RobustGlobalPool2d.__doc__ = _MODULE_DOC.format(shape="of images, (B, C, H, W) → (B, C)",
                                                names=tuple(PENALTIES))
