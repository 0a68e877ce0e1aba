"""Nodes written as objective + constraints only, against the specialised tools (issue 16).

* OptNet-style QP, ``b = 64, n = 20``, 10 inequalities, 2 equalities:
  ``argmin ½ yᵀQy + xᵀy`` s.t. ``G y ≤ h``, ``A y = 0`` — ddnlib's batched interior point
  (:mod:`ddnlib.interior_point`, the default for such nodes; it finds the problem a QP and
  iterates on its expansion), the same with ``exploit_structure=False`` (autodiff of the user's
  functions every iteration) and the opt-in per-sample SLSQP vs qpth (batched primal–dual
  interior point) and cvxpylayers. Forward and backward (input gradient) timed apart.
* Simplex projection, ``b = 128, n = 16``: the interior point (both ways) and qpth vs the
  sort-based closed form.
* Sphere ``‖y‖ = r`` as an equality, ``b = 64, n ∈ {16, 256}``: the default (the interior point at
  ``n = 16``; the matrix-free SQP at ``n = 256``, beyond ``dense_max``; there the dense interior
  point forced takes ~30 s and is not timed) vs ``r x/‖x‖``; the generic backward vs autograd
  through the closed form.
* Smooth unconstrained (:class:`~benchmarks.problems.SmoothDenoiser`), ``b = 16, m ∈ {16, 64,
  256}``: the default Newton vs a hand-written batched Newton (closed-form gradient and Hessian);
  the generic backward vs the hand-written implicit gradient ``H⁻¹ v``, the per-output-dimension
  loop and torchopt's ``custom_root``.

Peers are optional (``pip install -e '.[bench]'``) and their rows are skipped when absent. Every
variant's result is checked against the reference before it is timed. float64, 1 thread.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddnlib import DeclarativeNode, Options, interior_point
from ddnlib.solvers import slsqp_solve

from .engine_vs_loop import loop_backward
from .harness import Report, Settings, interleaved
from .problems import SmoothDenoiser
from .torchopt_peer import custom_root_layer

CASE = "constrained"
F64 = torch.float64


class OptNetQP(DeclarativeNode):
    """``argmin ½ yᵀQy + xᵀy`` s.t. ``G y ≤ h``, ``A y = 0`` (``y = 0`` strictly feasible)."""

    def __init__(self, n: int = 20, q: int = 10, p: int = 2, seed: int = 0,
                 ipm: bool = True, options: Options | None = None, structure: bool = True):
        super().__init__(options)
        gen = torch.Generator().manual_seed(seed)
        L = torch.randn(n, n, generator=gen, dtype=F64) / n**0.5
        self.register_buffer("Q", L @ L.T + torch.eye(n, dtype=F64))
        self.register_buffer("G", torch.randn(q, n, generator=gen, dtype=F64))
        self.register_buffer("h", torch.rand(q, generator=gen, dtype=F64) + 0.1)
        self.register_buffer("A", torch.randn(p, n, generator=gen, dtype=F64))
        self.ipm, self.structure = ipm, structure

    def objective(self, x, y):
        return 0.5 * ((y @ self.Q) * y).sum(-1) + (x * y).sum(-1)

    def inequality_constraints(self, x, y):
        return y @ self.G.T - self.h

    def equality_constraints(self, x, y):
        return y @ self.A.T

    def initial_guess(self, x):
        return torch.zeros_like(x)

    def solve(self, x):
        if not self.ipm:
            return slsqp_solve(self, x)
        return interior_point.solve(self, x, exploit_structure=self.structure)


class Simplex(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``1ᵀy = 1``, ``y ≥ 0``."""

    def __init__(self, ipm: bool = True, structure: bool = True):
        super().__init__()
        self.ipm, self.structure = ipm, structure

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return y.sum(-1, keepdim=True) - 1

    def inequality_constraints(self, x, y):
        return -y

    def solve(self, x):
        if not self.ipm:
            return super().solve(x)
        return interior_point.solve(self, x, exploit_structure=self.structure)


class Sphere(DeclarativeNode):
    """``argmin ½‖y − x‖²`` s.t. ``‖y‖² = r²``: ``r x/‖x‖``; the default solver or, with ``ipm``,
    the interior point forced."""

    def __init__(self, r: float = 1.0, ipm: bool = False):
        super().__init__()
        self.r, self.ipm = r, ipm

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y * y).sum(-1, keepdim=True) - self.r**2

    def solve(self, x):
        return interior_point.solve(self, x) if self.ipm else super().solve(x)


def sort_simplex(x: Tensor) -> Tensor:
    """Projection onto the simplex by sorting (Held, Wolfe & Crowder 1974)."""
    u = torch.sort(x, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1
    k = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)
    rho = (u - css / k > 0).sum(-1, keepdim=True)
    return (x - css.gather(-1, rho - 1) / rho).clamp_min(0)


def _qpth():
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None
    return QPFunction


def _cvxpylayer(Q, G, h, A):
    """A cvxpylayers layer for the QP with parameter ``x`` (None when not installed)."""
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError:
        return None
    n = Q.shape[0]
    c, y = cp.Parameter(n), cp.Variable(n)
    cons = [G.numpy() @ y <= h.numpy()] + ([A.numpy() @ y == 0] if A is not None else [])
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, Q.numpy()) + c @ y), cons)
    layer = CvxpyLayer(problem, parameters=[c], variables=[y])
    return lambda x: layer(x, solver_args={"eps": 1e-10})[0]


def _check(name: str, got: Tensor, ref: Tensor, tol: float) -> None:
    err = (got - ref).abs().max().item()
    if not err <= tol:
        raise RuntimeError(f"{CASE}: {name} differs from the reference by {err:.3g} > {tol:g}")


def _forward_backward(report: Report, settings: Settings, setting: str, x: Tensor, v: Tensor,
                      solvers: dict, baseline: str, tol: float) -> dict[str, dict[str, float]]:
    """Time ``solvers`` (name -> differentiable ``x -> y``) forward and backward."""
    ref_y, ref_g = None, None
    outs = {}
    for name, fn in solvers.items():
        xr = x.clone().requires_grad_()
        y = fn(xr)
        (g,) = torch.autograd.grad(y, xr, v, retain_graph=True)
        if ref_y is None:
            ref_y, ref_g = y.detach(), g
        peer = not name.startswith("ddnlib")  # peers are held to their own accuracy
        _check(f"{name} forward ({setting})", y.detach(), ref_y, 1e3 * tol if peer else tol)
        _check(f"{name} backward ({setting})", g, ref_g, 1e3 * tol if peer else 100 * tol)
        if name != next(iter(solvers)):
            report.note(CASE, f"{setting}: {name} vs {next(iter(solvers))}: max |Δy| "
                        f"{(y.detach() - ref_y).abs().max().item():.2g}, max |Δ∂x| "
                        f"{(g - ref_g).abs().max().item():.2g}")
        outs[name] = (xr, y)
    fwd = interleaved({name: (lambda fn=fn: fn(x.clone().requires_grad_()))
                       for name, fn in solvers.items()}, settings)
    report.add(CASE, f"{setting}: forward", fwd, baseline=baseline)
    bwd = interleaved({name: (lambda xr=xr, y=y: torch.autograd.grad(y, xr, v, retain_graph=True))
                       for name, (xr, y) in outs.items()}, settings)
    report.add(CASE, f"{setting}: backward", bwd, baseline=baseline)
    return {"forward": fwd, "backward": bwd}


def _peer_targets(report: Report, setting: str, times: dict, ours: str, peer: str) -> None:
    if peer not in times["forward"]:
        report.note(CASE, f"{setting}: {peer} not installed, its targets not checked")
        return
    f = times["forward"][ours] / times["forward"][peer]
    b = times["backward"][ours] / times["backward"][peer]
    report.target(CASE, f"{setting}: {ours} / {peer} forward time", f, "≤ 1x", f <= 1)
    report.target(CASE, f"{setting}: {ours} / {peer} backward time", b, "≤ 1.5x", b <= 1.5)


def _qp(report: Report, settings: Settings) -> None:
    b, n, q, p = (8, 6, 4, 1) if settings.quick else (64, 20, 10, 2)
    node = OptNetQP(n, q, p).requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(b, n, generator=gen, dtype=F64)
    v = torch.randn(b, n, generator=gen, dtype=F64)
    solvers = {"ddnlib interior point": node}
    QPFunction = _qpth()
    if QPFunction is not None:
        Qb = node.Q.expand(b, n, n)
        zeros = torch.zeros(p, dtype=F64)
        solvers["qpth"] = lambda x: QPFunction(verbose=-1, eps=1e-12, maxIter=50)(
            Qb, x, node.G, node.h, node.A, zeros)
    layer = _cvxpylayer(node.Q, node.G, node.h, node.A)
    if layer is not None:
        solvers["cvxpylayers"] = layer
    if not settings.quick:
        solvers["ddnlib interior point, autodiff every iteration"] = OptNetQP(
            n, q, p, structure=False).requires_grad_(False)
        solvers["ddnlib opt-in SLSQP"] = OptNetQP(n, q, p, ipm=False).requires_grad_(False)
    setting = f"OptNet QP b={b} n={n} q={q} p={p}"
    times = _forward_backward(report, settings, setting, x, v, solvers,
                              "qpth" if "qpth" in solvers else "ddnlib interior point", 1e-6)
    _peer_targets(report, setting, times, "ddnlib interior point", "qpth")


def _simplex(report: Report, settings: Settings) -> None:
    b, n = (16, 8) if settings.quick else (128, 16)
    gen = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(b, n, generator=gen, dtype=F64)
    v = torch.randn(b, n, generator=gen, dtype=F64)
    solvers = {"sort closed form": sort_simplex, "ddnlib interior point": Simplex()}
    if not settings.quick:
        solvers["ddnlib interior point, autodiff every iteration"] = Simplex(structure=False)
    QPFunction = _qpth()
    if QPFunction is not None:
        eye = torch.eye(n, dtype=F64)
        Qb, G, h = eye.expand(b, n, n), -eye, torch.zeros(n, dtype=F64)
        A, one = torch.ones(1, n, dtype=F64), torch.ones(1, dtype=F64)
        solvers["qpth"] = lambda x: QPFunction(verbose=-1, eps=1e-12, maxIter=50)(
            Qb, -x, G, h, A, one)
    setting = f"simplex projection b={b} n={n}"
    times = _forward_backward(report, settings, setting, x, v, solvers, "sort closed form", 1e-6)
    _peer_targets(report, setting, times, "ddnlib interior point", "qpth")


def _sphere(report: Report, settings: Settings) -> None:
    b = 8 if settings.quick else 64
    for n in ((8,) if settings.quick else (16, 256)):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(b, n, generator=gen, dtype=F64)
        v = torch.randn(b, n, generator=gen, dtype=F64)
        solvers = {"closed form": lambda x: x / x.norm(dim=-1, keepdim=True),
                   "ddnlib default": Sphere()}
        if n <= Options().dense_max:  # beyond, the dense interior point is not the default
            solvers["ddnlib interior point"] = Sphere(ipm=True)
        setting = f"sphere equality b={b} n={n}"
        times = _forward_backward(report, settings, setting, x, v, solvers, "closed form", 1e-8)
        f = times["forward"]["ddnlib default"] / times["forward"]["closed form"]
        bk = times["backward"]["ddnlib default"] / times["backward"]["closed form"]
        report.target(CASE, f"{setting}: default / closed form forward", f, "≤ 30x", f <= 30)
        want = 5 if n <= 16 else 10
        report.target(CASE, f"{setting}: generic / closed form backward", bk, f"≤ {want}x",
                      bk <= want)


def _denoiser_hessian(x: Tensor, y: Tensor, w: float) -> Tensor:
    """``∇²_yy`` of the denoiser objective in closed form, ``I + w Dᵀ diag(ρ''(Dy)) D``."""
    m = y.shape[1]
    d = y[:, 1:] - y[:, :-1]
    c = w * (1 + d * d) ** -1.5
    H = torch.eye(m, dtype=y.dtype).expand(y.shape[0], m, m).clone()
    idx = torch.arange(m - 1)
    H[:, idx, idx] += c
    H[:, idx + 1, idx + 1] += c
    H[:, idx, idx + 1] -= c
    H[:, idx + 1, idx] -= c
    return H


def hand_newton(x: Tensor, w: float = 1.0, tol: float = 1e-10, max_iter: int = 50) -> Tensor:
    """Batched Newton on the (strictly convex) denoiser with closed-form derivatives, no line
    search, stopped on the same relative step test as ddnlib's."""
    from .problems import denoiser_gradient

    y = x.clone()
    wt = torch.tensor(w, dtype=x.dtype)
    for _ in range(max_iter):
        g = denoiser_gradient(x, y, wt)
        d = torch.cholesky_solve(-g.unsqueeze(-1), torch.linalg.cholesky(
            _denoiser_hessian(x, y, w)))[..., 0]
        y = y + d
        if (d.abs().amax(-1) / (1 + y.abs().amax(-1)) <= tol).all():
            break
    return y


def _smooth(report: Report, settings: Settings) -> None:
    b = 16
    try:
        import torchopt
    except ImportError:
        torchopt = None
    for m in ((16,) if settings.quick else (16, 64, 256)):
        _smooth_case(report, settings, b, m, torchopt)


def _smooth_case(report: Report, settings: Settings, b: int, m: int, torchopt) -> None:
    """The smooth denoiser at ``(b, m)``: forward and backward against the hand-written ones."""
    gen = torch.Generator().manual_seed(m)
    x = 3 * torch.randn(b, m, generator=gen, dtype=F64)
    v = torch.randn(b, m, generator=gen, dtype=F64)
    node = SmoothDenoiser().requires_grad_(False)
    fwd = interleaved({"hand-written Newton": lambda: hand_newton(x),
                       "ddnlib default (Newton)": lambda: node(x)}, settings)
    _check(f"Newton m={m}", node(x), hand_newton(x), 1e-8)
    report.add(CASE, f"smooth b={b} m={m}: forward", fwd, baseline="hand-written Newton")
    xr = x.clone().requires_grad_()
    y = node(xr)
    y_plain = y.detach()
    variants = {
        "hand-written implicit": lambda: torch.cholesky_solve(
            v.unsqueeze(-1), torch.linalg.cholesky(_denoiser_hessian(x, y_plain, 1.0)))[..., 0],
        "ddnlib generic": lambda: torch.autograd.grad(y, xr, v, retain_graph=True)[0],
        "per-dimension loop": lambda: loop_backward(node, xr, y_plain, v),
    }
    if torchopt is not None:
        y_peer = custom_root_layer(node, torchopt)(torch.zeros_like(xr), xr)
        variants["torchopt custom_root"] = (
            lambda: torch.autograd.grad(y_peer, xr, v, retain_graph=True)[0])
    ref = variants["ddnlib generic"]()
    for name, fn in variants.items():
        _check(f"{name} backward m={m}", fn(), ref, 1e-6)
    bwd = interleaved(variants, settings)
    report.add(CASE, f"smooth b={b} m={m}: backward", bwd, baseline="hand-written implicit")
    if m == 16:
        f = fwd["ddnlib default (Newton)"] / fwd["hand-written Newton"]
        bk = bwd["ddnlib generic"] / bwd["hand-written implicit"]
        report.target(CASE, f"smooth m={m}: default / hand-written forward", f, "≤ 2x", f <= 2)
        report.target(CASE, f"smooth m={m}: generic / hand-written backward", bk, "≤ 3x",
                      bk <= 3)
    if m == 256:
        s = bwd["per-dimension loop"] / bwd["ddnlib generic"]
        report.target(CASE, f"smooth m={m}: loop / generic backward", s, "≥ 20x", s >= 20)
    if "torchopt custom_root" in bwd:
        s = bwd["torchopt custom_root"] / bwd["ddnlib generic"]
        report.target(CASE, f"smooth m={m}: torchopt / generic backward", s,
                      "> 1x (ddnlib faster)", s > 1)


def run(report: Report, settings: Settings) -> None:
    _qp(report, settings)
    _simplex(report, settings)
    _sphere(report, settings)
    _smooth(report, settings)
