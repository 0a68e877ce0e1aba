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


_ENGINE = torch.autograd.Variable._execution_engine


def grad(
    output: Tensor,
    inputs: Sequence[Tensor],
    grad_output: Tensor | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    is_grads_batched: bool = False,
) -> list[Tensor]:
    """``torch.autograd.grad(output, inputs, grad_output, allow_unused=True)`` with zeros for the
    inputs ``output`` does not depend on.

    The autograd engine is entered directly, as ``torch.autograd.grad`` itself does after its
    argument checks, which cost about a third of a pass at the sizes of the engine's inner loops
    (30 µs of 110 µs for a Hessian-vector product at ``(16, 16)``); ``grad_output`` is therefore
    not checked here: it must have ``output``'s shape (``None``: ``output`` is a scalar), with a
    leading batch dimension when ``is_grads_batched``.
    """
    inputs = tuple(inputs)
    if output.requires_grad:
        if grad_output is None:
            if output.numel() != 1:
                raise ValueError(f"grad of an output of shape {tuple(output.shape)} needs a "
                                 "grad_output of that shape")
            grad_output = torch.ones_like(output)
        keep = create_graph if retain_graph is None else retain_graph
        if is_grads_batched:
            grads = _batched(output, inputs, grad_output, keep, create_graph)
        else:
            grads = _ENGINE.run_backward((output,), (grad_output,), keep, create_graph, inputs,
                                         True, False)
    else:
        grads = [None] * len(inputs)
    lead = grad_output.shape[:1] if is_grads_batched else ()
    return [
        torch.zeros(lead + x.shape, dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def _batched(output: Tensor, inputs: tuple, grad_outputs: Tensor, keep: bool, create: bool):
    """One backward pass for each ``grad_outputs[k]``, vectorised by torch's batching rules (what
    ``is_grads_batched=True`` runs)."""
    size = grad_outputs.shape[0]
    level = torch._C._vmapmode_increment_nesting()
    try:
        grads = _ENGINE.run_backward((output,), (torch._add_batch_dim(grad_outputs, 0, level),),
                                     keep, create, inputs, True, False)
        return [None if g is None else torch._remove_batch_dim(g, level, size, 0) for g in grads]
    finally:
        torch._C._vmapmode_decrement_nesting()


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
