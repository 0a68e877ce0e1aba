"""Implicit backward vs autograd unrolled through the solver: time and memory.

Both variants run the same forward iteration on :class:`~benchmarks.problems.SmoothDenoiser`,
``K`` steps of gradient descent ``y ← y − η ∇_y f`` from ``y = x`` with ``η = 2 / (2 + 4w)``:

* **implicit**: the node's ``solve`` runs the steps without a graph; the backward is the engine's
  (one Hessian solve + one mixed VJP at the returned ``y``);
* **unrolled**: the same steps recorded by autograd and back-propagated through.

Memory is the bytes autograd saves for the backward pass (unique storages packed through
``saved_tensors_hooks``; the input ``x`` and the parameter are not counted). It does not include
the transient workspace of the backward itself (the dense engine forms ``b m²`` Hessian entries).
Gradients are taken for ``x`` and the learnable weight. A note reports how far the unrolled
gradient is from the implicit one at the converged solution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddnlib import Options

from .harness import Report, Settings, interleaved, saved_bytes
from .problems import SmoothDenoiser, denoiser_gradient

CASE = "unrolled"
BATCH = 16


def gradient_descent(x: Tensor, w: Tensor, iters: int) -> Tensor:
    """``iters`` steps of gradient descent on the denoiser objective from ``y = x``."""
    step = 2 / (2 + 4 * w)
    y = x
    for _ in range(iters):
        y = y - step * denoiser_gradient(x, y, w)
    return y


class GDDenoiser(SmoothDenoiser):
    """The denoiser whose forward solve is ``iters`` steps of :func:`gradient_descent`."""

    def __init__(self, iters: int):
        # The optimality check is off: few iterations leave y short of the minimiser on purpose.
        super().__init__(options=Options(check_optimality=False))
        self.iters = iters

    def solve(self, x: Tensor) -> Tensor:
        return gradient_descent(x, self.log_w.exp(), self.iters)


def run(report: Report, settings: Settings) -> None:
    m = 32 if settings.quick else 256
    iterations = (5, 20) if settings.quick else (5, 10, 20, 50)
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(BATCH, m, generator=gen, dtype=torch.float64)).requires_grad_()
    v = torch.randn(BATCH, m, generator=gen, dtype=torch.float64)
    converged = GDDenoiser(iters=400)
    wanted = [x, converged.log_w]
    reference = torch.autograd.grad(converged(x), wanted, v)
    memory = {}
    for iters in iterations:
        node = GDDenoiser(iters)
        node.load_state_dict(converged.state_dict())
        params = [x, node.log_w]

        def implicit(node=node, params=params):
            return torch.autograd.grad(node(x), params, v)

        def unrolled(iters=iters, params=params):
            y = gradient_descent(x, node.log_w.exp(), iters)
            return torch.autograd.grad(y, params, v)

        setting = f"denoiser b={BATCH} m={m}, {iters} iterations"
        times = interleaved({"implicit": implicit, "unrolled": unrolled}, settings)
        report.add(CASE, f"{setting}: forward + backward", times, baseline="implicit",
                   iterations=iters)
        mem = {"implicit": saved_bytes(lambda: node(x), exclude=params)[0],
               "unrolled": saved_bytes(lambda: gradient_descent(x, node.log_w.exp(), iters),
                                       exclude=params)[0]}
        report.add(CASE, f"{setting}: saved for backward", mem, baseline="implicit", unit="B",
                   iterations=iters)
        memory[iters] = mem
        errors = [((g - r).norm() / r.norm()).item() for g, r in zip(unrolled(), reference)]
        report.note(CASE, f"{iters} iterations: relative error of the unrolled gradient against "
                    f"the converged implicit one: x {errors[0]:.2g}, w {errors[1]:.2g}")
    k = 20
    ratio = memory[k]["unrolled"] / memory[k]["implicit"]
    report.target(CASE, f"unrolled / implicit bytes saved for backward at {k} iterations",
                  ratio, "≥ 5x", ratio >= 5)
    implicit_bytes = [mem["implicit"] for mem in memory.values()]
    spread = max(implicit_bytes) / min(implicit_bytes)
    report.target(CASE, f"implicit saved bytes, max / min over {list(iterations)} iterations",
                  spread, "≈ 1 (flat)", spread <= 1.1)
