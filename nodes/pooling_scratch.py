"""Scratch buffers for the pooling solvers, kept across calls.

On the CPU a fresh buffer of a MiB or more is mapped from the operating system on every
allocation, and its page faults can cost more than the arithmetic done in it (measured here: about
0.4 ms per MiB, ten elementwise passes' worth). The solvers therefore compute in place in buffers
taken from this pool and given back on exit: at most ``_KEPT`` buffers per dtype and device, each
of at most ``_MAX_BYTES`` (larger requests are allocated and freed as usual). Other devices have a
caching allocator already: there the buffers are plain allocations.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["scratch"]

_KEPT = 8
_MAX_BYTES = 4 << 20
_free: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
_lock = threading.Lock()


@contextmanager
def scratch(numel: int, dtype: torch.dtype, device: torch.device, count: int = 2
            ) -> Iterator[tuple[Tensor, ...]]:
    """``count`` one-dimensional buffers of ``numel`` entries (contents undefined), not aliasing
    each other nor anything outside the ``with`` block."""
    key = (dtype, torch.device(device))
    pooled = key[1].type == "cpu" and numel * dtype.itemsize <= _MAX_BYTES
    taken: list[Tensor] = []
    if pooled:
        with _lock:
            free = _free.setdefault(key, [])
            fits = [b for b in free if b.numel() >= numel][:count]
            for b in fits:
                free.remove(b)
            taken += fits
    with torch.inference_mode(False):  # an inference tensor could not be written outside
        taken += [torch.empty(numel, dtype=dtype, device=device)
                  for _ in range(count - len(taken))]
    try:
        yield tuple(b[:numel] for b in taken)
    finally:
        if pooled:
            with _lock:
                free = _free.setdefault(key, [])
                free += taken
                free.sort(key=Tensor.numel, reverse=True)
                del free[_KEPT:]
