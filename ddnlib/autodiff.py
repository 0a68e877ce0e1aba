"""Per-sample derivatives from batched reverse-mode autodiff.

Because a node's problem is separable across the batch, the gradient of ``Σ_b f_b`` with respect
to ``y (b, m)`` holds every per-sample gradient, and a backward pass with the same direction in
every sample gives every per-sample Hessian or Jacobian row at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grad", "batched_jacobian"]


def grad(
    output: Tensor,
    inputs: Sequence[Tensor],
    grad_output: Tensor | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    is_grads_batched: bool = False,
) -> list[Tensor]:
    """``torch.autograd.grad`` that returns zeros for inputs the output does not depend on."""
    inputs = list(inputs)
    if output.requires_grad:
        grads = torch.autograd.grad(
            output,
            inputs,
            grad_output,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=is_grads_batched,
        )
    else:
        grads = [None] * len(inputs)
    lead = grad_output.shape[:1] if is_grads_batched else ()
    return [
        torch.zeros(lead + x.shape, dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def batched_jacobian(out: Tensor, y: Tensor, create_graph: bool = False) -> Tensor:
    """Per-sample Jacobian ``∂out_b/∂y_b`` of shape ``(b, k, m)`` for ``out (b, k)``, ``y (b, m)``.

    One vectorised backward pass over the ``k`` basis directions (``is_grads_batched``).
    """
    b, k = out.shape
    if k == 0:
        return out.new_zeros(b, 0, y.shape[1])
    basis = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, b, k)
    rows = grad(out, [y], basis, retain_graph=True, create_graph=create_graph,
                is_grads_batched=True)[0]
    return rows.transpose(0, 1)
