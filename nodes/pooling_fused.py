"""The fused path of the convex pooling solver: one safeguarded Newton iteration per row block,
and the backward quantities stored by the forward (``w = κφ″``, ``Σ w``, ``Σ w z``), compiled by
``torch.compile`` (TorchInductor, which needs a C++ compiler on the CPU).

Eagerly an iteration is a dozen tensor operations, each a pass over the block; compiled it is
one or two loops. The iteration is the same as :func:`~.pooling_solvers._newton`'s (same start,
bracket, acceptance and stopping rule), so the answers agree with the eager solver to rounding.

When it is used (``fused`` of :class:`~ddnlib.nodes.RobustPooling` and the pooling modules):
``True`` always, ``False`` never, ``None`` (default) automatically: for a convex penalty, when a
C++ compiler is found, from the fourth call in this process whose input has at least ``2**24``
entries (compiling takes tens of seconds once per penalty and process; at that size an eager
forward takes about a second, so the compile pays for itself within a short training run). If
compiling fails the eager solver is used and a warning says why.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .penalties import Penalty

__all__ = ["compiled", "decide", "evaluate", "mark_failed", "want_fused"]

_LARGE = 1 << 24  # entries of an input from which the automatic choice counts a call
_CALLS_BEFORE = 3  # large calls seen before the automatic choice compiles
_large_calls: dict[str, int] = {}
_compiled: dict[str, Callable] = {}
_failed: set[str] = set()
_lock = threading.Lock()


def _compiler_found() -> bool:
    return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "c++", "clang++"))


def want_fused(fused: bool | None, penalty: Penalty, convex: bool, entries: int) -> bool:
    """Whether this call uses the fused path (see the module doc)."""
    if fused is not None:
        return fused and convex and penalty.name not in _failed
    if not convex or entries < _LARGE or penalty.name in _failed or not _compiler_found():
        return False
    with _lock:
        _large_calls[penalty.name] = seen = _large_calls.get(penalty.name, 0) + 1
    return seen > _CALLS_BEFORE


def decide(u: Tensor, g: Tensor, h: Tensor, lo: Tensor, hi: Tensor, active: Tensor,
           tol_scale: Tensor, tol: float, lipschitz: Tensor | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """The first half of a safeguarded Newton iteration on ``g = Σ κφ′`` (``h = Σ κφ″``) for the
    rows ``active``. A row is converged, taking the Newton step ``s = −g/h`` if it stays inside
    the bracket ``[lo, hi]``, when ``|s|`` (or the bracket) is at most ``tol_u = tol_scale +
    tol·|u|``, or when ``h`` is Lipschitz with constant ``L = lipschitz`` (per row) and
    ``L s² ≤ tol_u h``, ``4 L |s| ≤ h``: then ``|g(u + s)| ≤ L s²/2`` (Taylor) and ``h ≥ h/2``
    within ``2|s|`` of ``u``, so the root is within ``L s²/h ≤ tol_u`` of ``u + s`` (a pass saved
    at quadratic convergence). Returns ``(u, active, trial)``: the next point to evaluate, the
    Newton point or, outside the bracket, the bracket's midpoint (``u`` itself for the rows
    that are done)."""
    s = g / h
    newton = u - s
    inside = (newton > lo) & (newton < hi)  # False for NaN (h = 0)
    tol_u = torch.add(tol_scale, u.abs(), alpha=tol)
    step = s.abs()
    small = (g == 0) | (step <= tol_u) | (hi - lo <= tol_u)
    if lipschitz is not None:  # L s² ≤ tol_u h and 4 L |s| ≤ h as one test (tol_u = 0: s = 0 only)
        small = small | (inside & (lipschitz * step * torch.maximum(step, 4 * tol_u) <= tol_u * h))
    converged = active & small
    u = torch.where(converged & inside, newton, u)
    active = active & ~converged
    trial = torch.where(active, torch.where(inside, newton, 0.5 * (lo + hi)), u)
    return u, active, trial


def evaluate(u: Tensor, g: Tensor, h: Tensor, lo: Tensor, hi: Tensor, trial: Tensor, g_t: Tensor,
             h_t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The second half, given ``g_t, h_t`` at ``trial``: the bracket shrinks to the side of the
    root, and the trial replaces ``u`` if it lowers ``|g|`` (a row that is done has
    ``trial = u``: nothing changes)."""
    lo = torch.where(g_t <= 0, trial, lo)
    hi = torch.where(g_t >= 0, trial, hi)
    accept = g_t.abs() < g.abs()
    return (torch.where(accept, trial, u), torch.where(accept, g_t, g),
            torch.where(accept, h_t, h), lo, hi)


def _iteration(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, u: Tensor, g: Tensor,
               h: Tensor, lo: Tensor, hi: Tensor, active: Tensor, trial: Tensor,
               tol_scale: Tensor, tol: float, lipschitz: Tensor | None):
    """:func:`evaluate` at ``trial`` then :func:`decide`, as one compiled graph."""
    g_t, h_t = penalty.fused_sums(trial[:, None] - x, c, alpha)
    u, g, h, lo, hi = evaluate(u, g, h, lo, hi, trial, g_t, h_t)
    u, active, trial = decide(u, g, h, lo, hi, active, tol_scale, tol, lipschitz)
    return u, g, h, lo, hi, active, trial


def _bounds(penalty: Penalty, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ x, min x, max x)`` per row in one pass (the finite check, the start, the bracket)."""
    return x.sum(1), x.amin(1), x.amax(1)


def _sums(penalty: Penalty, x: Tensor, u: Tensor, c: Tensor, alpha: Tensor):
    """``(Σ κφ′, Σ κφ″)`` at ``u``."""
    return penalty.fused_sums(u[:, None] - x, c, alpha)


def _fill(penalty: Penalty, x: Tensor, y: Tensor, c: Tensor, alpha: Tensor):
    """``(Σ w, Σ w z)`` with ``w = κ φ″(z)``, ``z = y − x``: what the backward needs besides
    ``w`` itself, which :func:`_weights` recomputes (storing it would cost a fresh buffer like
    ``x``: for large inputs its page faults alone cost more than the whole fused forward)."""
    z = y[:, None] - x
    w = penalty.scaled_curvature(z, c, alpha)
    return w.sum(1), (w * z).sum(1)


def _weights(penalty: Penalty, x: Tensor, y: Tensor, c: Tensor, alpha: Tensor, scale: Tensor):
    """``scale · κφ″(y − x)``: the gradient for ``x`` (``scale = v / Σ w``)."""
    return scale[:, None] * penalty.scaled_curvature(y[:, None] - x, c, alpha)


_KINDS = {"bounds": _bounds, "sums": _sums, "iteration": _iteration, "fill": _fill,
          "weights": _weights}


def compiled(penalty: Penalty, kind: str) -> Callable | None:
    """The compiled ``kind`` (``"bounds"``, ``"sums"``, ``"iteration"``, ``"fill"`` or
    ``"weights"``) for ``penalty``, compiled on first use with dynamic shapes (one compile
    serves every input shape); ``None`` if compiling failed before in this process."""
    key = f"{penalty.name}:{kind}"
    with _lock:
        fn = _compiled.get(key)
        if fn is None and penalty.name not in _failed:
            body = _KINDS[kind]
            fn = _compiled[key] = torch.compile(lambda *args: body(penalty, *args),
                                                dynamic=True)
    return fn


def mark_failed(penalty: Penalty, error: Exception) -> None:
    """Stop using the fused path for ``penalty`` in this process, saying why."""
    with _lock:
        _failed.add(penalty.name)
        for kind in _KINDS:
            _compiled.pop(f"{penalty.name}:{kind}", None)
    warnings.warn(f"robust pooling ({penalty.name}): the fused (torch.compile) solver failed "
                  f"({type(error).__name__}: {str(error)[:200]}); using the eager solver",
                  RuntimeWarning, stacklevel=3)
