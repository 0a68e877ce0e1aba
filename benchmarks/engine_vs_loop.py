"""Generic engine backward vs the classical per-output-dimension autograd loop.

The classical approach builds ``H = ∂²f/∂y² (b, m, m)`` and ``B = ∂²f/∂y∂x (b, m, n)`` row by row,
one autograd call per output dimension ``j`` (the gradient of ``Σ_b ∂f/∂y_j``), then solves
``H u = −v`` and returns ``∂ℓ/∂x = Bᵀ u``. The engine does one batched Hessian build (or none:
matrix-free CG) and one mixed VJP (see ``ddnlib.engine``).

Headline: ``b = 16, m = n = 256`` on :class:`~benchmarks.problems.SmoothDenoiser` (target: engine
≥ 20x faster). Scaling: ``m ∈ {8, 32, 128, 256, 512, 1024}`` (up to 512 on the dense node, the loop up to 512),
dense and matrix-free, on a locally coupled node and a densely coupled one. The backward alone
is not where ``Options.dense_max`` should sit: the dense backward reuses the Hessian factor of the
default Newton forward, whose cost is in the forward. So the crossover is measured on forward +
backward (``m ∈ {16, 32, 64, 128, 256}``), the cost a training step pays. Only the input
gradient is asked for (parameters frozen) so that the loop, which has no batched way to get
per-sample parameter terms, does the same work.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ddnlib import Options

from .harness import Report, Settings, interleaved
from .problems import RobustRegression, SmoothDenoiser

CASE = "engine_vs_loop"
BATCH = 16


def loop_backward(node, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """``∂⟨v, y⟩/∂x`` by one autograd call per output dimension, then a Cholesky solve."""
    with torch.enable_grad():
        x_ = x.detach().requires_grad_()
        y_ = y.detach().requires_grad_()
        g = torch.autograd.grad(node.objective(x_, y_).sum(), y_, create_graph=True)[0]
        rows = [torch.autograd.grad(g[:, j].sum(), (y_, x_), retain_graph=True)
                for j in range(g.shape[1])]
    H = torch.stack([h for h, _ in rows], dim=1)
    B = torch.stack([bx for _, bx in rows], dim=1)
    u = torch.cholesky_solve(-v.unsqueeze(-1), torch.linalg.cholesky(H))
    return (B.transpose(-1, -2) @ u).squeeze(-1)


def _make(kind: str, m: int, solver: str):
    options = Options(linear_solver=solver)
    node = SmoothDenoiser(options=options) if kind == "local" else RobustRegression(m, options=options)
    return node.requires_grad_(False)


def _variants(kind: str, m: int, with_loop: bool) -> dict:
    """Backward-only callables on one solved batch: engine dense, engine CG, (loop)."""
    gen = torch.Generator().manual_seed(m)
    x = (3 * torch.randn(BATCH, m, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.randn(BATCH, m, generator=gen, dtype=torch.float64)
    variants, grads = {}, {}
    for solver in ("dense", "cg"):
        node = _make(kind, m, solver)
        y = node(x)
        variants[f"engine {solver}"] = (
            lambda y=y: torch.autograd.grad(y, x, v, retain_graph=True)[0])
    if with_loop:
        node = _make(kind, m, "dense")
        y_plain = node(x).detach()
        variants["per-dimension loop"] = lambda: loop_backward(node, x, y_plain, v)
    for name, fn in variants.items():
        grads[name] = fn()
    ref = grads["engine dense"]
    for name, g in grads.items():
        err = ((g - ref).norm() / ref.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"{CASE}: {name} disagrees with engine dense at m={m} ({err:.2e})")
    return variants


def _step(kind: str, m: int) -> dict:
    """Forward + backward callables (dense, CG) of one training step at size ``m``."""
    gen = torch.Generator().manual_seed(m)
    x = 3 * torch.randn(BATCH, m, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, m, generator=gen, dtype=torch.float64)

    def step(node):
        xr = x.clone().requires_grad_()
        return torch.autograd.grad(node(xr), xr, v)[0]

    nodes = {solver: _make(kind, m, solver) for solver in ("dense", "cg")}
    return {f"engine {solver}": (lambda node=node: step(node)) for solver, node in nodes.items()}


def _series(report: Report, settings: Settings, label: str, kind: str, sizes: list[int],
            once_from: int, variants) -> tuple[list[float], list[float]]:
    """Time ``variants(m)`` for each size (one round from ``once_from`` on: those take seconds)
    and return the dense and CG times."""
    single = dataclasses.replace(settings, repeats=1)
    dense, cg = [], []
    for m in sizes:
        times = interleaved(variants(m), single if m >= once_from else settings)
        report.add(CASE, f"{label} m={m}", times, baseline="engine dense", kind=kind, m=m)
        dense.append(times["engine dense"])
        cg.append(times["engine cg"])
    return dense, cg


def _crossover(ms: list[int], dense: list[float], cg: list[float]) -> float | None:
    """Smallest ``m`` (log-interpolated) from which CG stays faster than dense."""
    ratio = [math.log(c / d) for c, d in zip(cg, dense)]  # > 0: dense wins
    for i in range(len(ms) - 1, -1, -1):
        if ratio[i] > 0:
            if i == len(ms) - 1:
                return None
            a, b = ratio[i], ratio[i + 1]
            t = a / (a - b)
            return math.exp(math.log(ms[i]) + t * (math.log(ms[i + 1]) - math.log(ms[i])))
    return float(ms[0])


def run(report: Report, settings: Settings) -> None:
    # Headline: b = 16, m = n = 256, default (auto) options vs the loop.
    m = 64 if settings.quick else 256
    times = interleaved(_variants("local", m, with_loop=True), settings)
    setting = f"headline, denoiser b={BATCH} m=n={m}"
    report.add(CASE, setting, times, baseline="per-dimension loop")
    auto = "engine dense" if m <= Options().dense_max else "engine cg"
    speedup = times["per-dimension loop"] / times[auto]
    report.target(CASE, f"loop / engine backward time ({setting})", speedup, "≥ 20x", speedup >= 20)

    # At m ≥ 512 one dense backward takes seconds (O(b m³) on the dense node; the loop too):
    # one timed round there, no loop at 1024, and the dense node stops at 512.
    kinds = {"local": [8, 32, 128, 256, 512, 1024], "dense": [8, 32, 128, 256, 512]}
    if settings.quick:
        kinds = {"local": [8, 32]}
    for kind, sizes in kinds.items():
        dense, cg = _series(report, settings, f"scaling {kind}", kind, sizes, 512,
                            lambda m, kind=kind: _variants(kind, m, with_loop=m < 1024))
        cross = _crossover(sizes, dense, cg)
        report.note(CASE, f"{kind}-coupled node: dense/CG crossover of the backward alone at m ≈ "
                    + (f"{cross:.0f}" if cross is not None else f"> {sizes[-1]} (dense always faster)")
                    + " (the dense backward reuses the forward Newton's factor)")
        steps = [16, 32] if settings.quick else [16, 32, 64, 128, 256]
        dense_step, cg_step = _series(report, settings, f"forward + backward {kind}", kind, steps,
                                      256, lambda m, kind=kind: _step(kind, m))
        cross = _crossover(steps, dense_step, cg_step)
        report.note(CASE, f"{kind}-coupled node: dense/CG crossover of forward + backward at m ≈ "
                    + (f"{cross:.0f}" if cross is not None else f"> {steps[-1]}")
                    + f" (Options.dense_max = {Options().dense_max})")
        if len(sizes) >= 3:
            # growth exponent of the matrix-free time over the upper half of the sizes
            lo, hi = len(sizes) // 2, len(sizes) - 1
            slope = math.log(cg[hi] / cg[lo]) / math.log(sizes[hi] / sizes[lo])
            report.target(CASE, f"CG backward time ∝ m^k on the {kind}-coupled node, "
                          f"m={sizes[lo]}..{sizes[hi]}: k", slope,
                          "≈ 1 (linear)" if kind == "local" else "≤ 2 (cost of one HVP is m²)",
                          slope <= (1.3 if kind == "local" else 2.3))
