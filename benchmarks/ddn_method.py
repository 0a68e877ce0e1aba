"""Benchmark-only peer: the robust pooling method of the original DDN library (anucvml/ddn),
re-implemented here from its published description, because the library itself cannot be
installed on this machine (no network; the PyPI name ``ddn`` is an unrelated package).

This is NOT the original code and is not part of ``ddnlib``. The method as documented in
``ddn/pytorch/robustpool.py`` of anucvml/ddn:

- forward: ``torch.optim.LBFGS`` on the pooled values of the whole batch at once, minimising the
  objective summed over all rows (``lr=1``, ``max_iter=100``, ``history_size=100``,
  ``tolerance_grad=1e-5``, ``tolerance_change=1e-9``, no line search), started from the mean;
  for a non-convex penalty it is run twice, from the mean and from the median, and the run with
  the smaller *total* objective is kept;
- backward: ``∂y/∂x_i = φ″(y − x_i) / Σ_j φ″(y − x_j)`` (zero where ``|Σ φ″| ≤ 1e-9``), clipped to
  ``[−1, 1]`` for Welsch; no gradient for ``c``.

The original has no Barron loss; ``general`` applies the same method to Barron's ``φ``
(non-convex for ``α < 1``: two starts), the natural extension for a comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddnlib.nodes import PENALTIES


def _lbfgs(phi, x: Tensor, y0: Tensor) -> Tensor:
    y = y0.clone().requires_grad_()
    opt = torch.optim.LBFGS([y], lr=1, max_iter=100, max_eval=None, tolerance_grad=1e-5,
                            tolerance_change=1e-9, history_size=100, line_search_fn=None)

    def closure():
        opt.zero_grad()
        f = phi(y[:, None] - x).sum()
        f.backward()
        return f

    with torch.enable_grad():
        opt.step(closure)
    return y.detach()


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str, c: float, alpha: float) -> Tensor:
        penalty = PENALTIES[name]
        ct, at = torch.tensor(c, dtype=x.dtype), torch.tensor(alpha, dtype=x.dtype)
        phi = lambda z: penalty.value(z, ct, at)  # noqa: E731
        x = x.detach()
        y = _lbfgs(phi, x, x.mean(1))
        if not penalty.convex(at):
            y_median = _lbfgs(phi, x, x.median(1).values)
            if phi(y_median[:, None] - x).sum() < phi(y[:, None] - x).sum():
                y = y_median
        ctx.save_for_backward(y[:, None] - x)
        ctx.penalty, ctx.c, ctx.alpha = penalty, ct, at
        return y

    @staticmethod
    def backward(ctx, v: Tensor):
        (z,) = ctx.saved_tensors
        w = ctx.penalty.derivatives(z, ctx.c, ctx.alpha)[1]
        total = w.sum(1, keepdim=True)
        dy = torch.where(total.abs() <= 1e-9, torch.zeros_like(w), w / total)
        if ctx.penalty.name == "welsch":
            dy = dy.clamp(-1.0, 1.0)
        return dy * v[:, None], None, None, None


def ddn_method_pool(x: Tensor, name: str, c: float = 1.0, alpha: float = 1.0) -> Tensor:
    """Pool ``x (B, C, N) → (B, C)`` the original library's way (see the module doc)."""
    return _Pool.apply(x.reshape(-1, x.shape[-1]), name, c, alpha).reshape(x.shape[:-1])
