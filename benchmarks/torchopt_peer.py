"""A peer: the same node differentiated by torchopt's implicit differentiation.

``torchopt.diff.implicit.custom_root`` with the optimality condition ``∇_y f(x, y) = 0`` (from
``torch.func.grad`` of the same objective) and its conjugate-gradient linear solve at the same
relative tolerance as ddnlib's (``sqrt(eps)``), on :class:`~benchmarks.problems.SmoothDenoiser`,
``b = 16, m = 256``, float64; both differentiate the same forward solution. Timed: the backward
pass only (input gradient). Target: ddnlib faster.
"""

from __future__ import annotations

import torch

from ddnlib import Options

from .harness import Report, Settings, Skip, interleaved
from .problems import SmoothDenoiser

CASE = "torchopt_peer"
BATCH = 16


def custom_root_layer(node, torchopt):
    """``(y0, x) -> y``: ``node``'s forward solve, differentiated by torchopt's ``custom_root``
    with the optimality condition ``∇_y f = 0`` and CG at relative tolerance ``sqrt(eps)``."""
    rtol = torch.finfo(torch.float64).eps ** 0.5

    def optimality(y, x):
        return torch.func.grad(lambda y: node.objective(x, y).sum())(y)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                        solve=torchopt.linear_solve.solve_cg(rtol=rtol))
    def solve(y0, x):
        return node.solve(x.detach())

    return solve


def run(report: Report, settings: Settings) -> None:
    try:
        import torchopt
    except ImportError as error:  # optional: pip install "ddnlib[bench]"
        raise Skip(f"torchopt is not installed ({error}); pip install -e '.[bench]'") from None
    m = 32 if settings.quick else 256
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(BATCH, m, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.randn(BATCH, m, generator=gen, dtype=torch.float64)
    node = SmoothDenoiser().requires_grad_(False)
    cg_node = SmoothDenoiser(options=Options(linear_solver="cg")).requires_grad_(False)
    y_ddn, y_cg = node(x), cg_node(x)
    y_peer = custom_root_layer(node, torchopt)(torch.zeros_like(x), x)
    variants = {
        "torchopt custom_root (CG)": lambda: torch.autograd.grad(y_peer, x, v, retain_graph=True)[0],
        "ddnlib auto": lambda: torch.autograd.grad(y_ddn, x, v, retain_graph=True)[0],
        "ddnlib cg": lambda: torch.autograd.grad(y_cg, x, v, retain_graph=True)[0],
    }
    grads = {name: fn() for name, fn in variants.items()}
    ref = grads["ddnlib auto"]
    for name, g in grads.items():
        err = ((g - ref).norm() / ref.norm()).item()
        if not err < 1e-5:
            raise RuntimeError(f"{CASE}: {name} disagrees with ddnlib auto ({err:.2e})")
    times = interleaved(variants, settings)
    baseline = "torchopt custom_root (CG)"
    report.add(CASE, f"denoiser b={BATCH} m={m}: backward", times, baseline=baseline)
    best = min(times["ddnlib auto"], times["ddnlib cg"])
    report.target(CASE, f"torchopt / ddnlib (faster of auto, cg) backward time, m={m}",
                  times[baseline] / best, "> 1x (ddnlib faster)", times[baseline] > best)
