"""Global minimum of a non-convex pooling row, ``y = argmin_u F(u)``, ``F(u) = Σ_i φ(u − x_i)``,
by branch and bound on histograms (for penalties ``φ(z) = f(|z|/c)`` with ``f`` increasing:
Welsch, Barron's loss with ``α < 1``).

Bound. Split a range ``[a, b]`` of ``u`` into ``B`` bins of width ``h`` and count the entries of
the row per bin (entries below ``a`` / above ``b`` in two outside bins). An entry in bin ``j`` is
at least ``max(0, |j − k| − 1)·h`` from any ``u`` in bin ``k``, so

    F(u) ≥ L_k = Σ_j count_j f(max(0, |j − k| − 1)·h / c)    for every u in bin k,

one small Toeplitz product per row. ``F`` evaluated at the centre of the bin with the smallest
bound gives an upper bound ``U`` on the minimum; a bin with ``L_k > U`` cannot hold a global
minimiser.

Search. Level 0 is ``[min x, max x]``. Each level keeps the range spanned by the surviving bins
(every global minimiser lies in it) and histograms it again, until the bins are narrower than
``c / 4``. There the surviving bins form a few runs; the run of the smallest bound, and each
further run whose bound is below the best value found so far (at most ``3``), is refined by a
safeguarded Newton iteration on ``F′`` inside the run (a bracket with ``F′ ≤ 0`` at its left end
and ``≥ 0`` at its right end, Newton steps taken only where ``F″ > 0``), and the best point is
returned. A row is settled (the answer is the minimum over all runs, up to the Newton tolerance
and up to two minima inside one run) when every run left unrefined has a bound above the
answer. The cost is a few histogram passes plus about one convex solve.

Rows the bound cannot narrow (the surviving range does not halve at a level: clusters further
apart than ``B·c/4``, or ``c`` far below the spacing of the data) or that are not settled are
returned as unresolved, for the exhaustive multi-start solver.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .penalties import Penalty

__all__ = ["histogram_search"]

_BINS = 32
_FINE = 0.25  # bin width / c at which the runs are refined
_LEVELS = 10
_RUNS = 3


def _objective(penalty: Penalty, u: Tensor, x: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
    """``F(u_r) / λ`` per row (the row-ranked objective)."""
    return penalty.ranked(u[:, None] - x, c, alpha).sum(1)


def _bounds(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, a: Tensor,
            h: Tensor) -> Tensor:
    """``L (r, B)``, the lower bounds of ``F`` over the bins ``[a + k h, a + (k+1) h]``."""
    r = x.shape[0]
    t = ((x - a[:, None]) / h[:, None]).floor_().clamp_(-1, _BINS).add_(1)
    index = t.to(torch.int64) + (torch.arange(r, device=x.device) * (_BINS + 2))[:, None]
    counts = torch.bincount(index.flatten(), minlength=r * (_BINS + 2)).view(r, _BINS + 2)
    gaps = (torch.arange(_BINS + 2, device=x.device, dtype=x.dtype) - 1).clamp_min(0) * h[:, None]
    psi = penalty.ranked(gaps, c, alpha)  # (r, B + 2): f(gap_m / c), gap_m = max(0, m − 1) h
    # L_k = Σ_j count_j ψ_|j−k|: windows of the mirrored ψ (a strided view, no gather)
    windows = torch.cat([psi.flip(1)[:, :-1], psi], 1).unfold(1, _BINS + 2, 1)
    bound = torch.bmm(windows, counts.to(x.dtype)[:, :, None]).squeeze(2).flip(1)
    return bound[:, 1:-1]


def _runs(survive: Tensor, bound: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Runs of surviving bins per row, the best ``_RUNS + 1`` first: ``(first, last, L)`` each
    ``(r, _RUNS + 1)``, ``L = inf`` where a row has fewer runs."""
    r, nb = survive.shape
    start = survive & ~torch.nn.functional.pad(survive, (1, 0))[:, :-1]
    run = torch.where(survive, start.long().cumsum(1) - 1, nb)  # run id, nb for none
    inf = torch.full((r, nb + 1), float("inf"), dtype=bound.dtype, device=bound.device)
    best = inf.scatter_reduce(1, run, bound, "amin")[:, :nb]
    k = torch.arange(nb, device=bound.device).expand(r, nb)
    first = torch.full((r, nb + 1), nb, device=bound.device).scatter_reduce(1, run, k, "amin")
    last = torch.full((r, nb + 1), -1, device=bound.device).scatter_reduce(1, run, k, "amax")
    m = min(_RUNS + 1, nb)
    order = best.topk(m, 1, largest=False).indices
    return first[:, :nb].gather(1, order), last[:, :nb].gather(1, order), best.gather(1, order)


def _sums(penalty: Penalty, u: Tensor, x: Tensor, c: Tensor, alpha: Tensor):
    d1, d2 = penalty.scaled_derivatives(u[:, None] - x, c, alpha)
    return d1.sum(1), d2.sum(1)


def _refine(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor,
            u: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """A root of ``F′`` in ``[lo, hi]`` from ``u``, where ``F′(lo) ≤ 0 ≤ F′(hi)`` (rows where the
    ends do not bracket keep ``u``): Newton where ``F″ > 0`` and the step stays inside, else
    bisection on the sign of ``F′``. Returns ``(y, converged)``."""
    g_lo, _ = _sums(penalty, lo, x, c, alpha)
    g_hi, _ = _sums(penalty, hi, x, c, alpha)
    bracketed = (g_lo <= 0) & (g_hi >= 0)
    g, h = _sums(penalty, u, x, c, alpha)
    scale = torch.minimum(c.squeeze(1), hi - lo)
    done = ~bracketed
    for _ in range(max_iter):
        step_tol = tol * (u.abs() + scale)
        newton = u - g / h
        inside = (h > 0) & (newton >= lo) & (newton <= hi)  # closed: a step below an ulp
        converged = ~done & ((g == 0) | (inside & ((newton - u).abs() <= step_tol))
                             | (hi - lo <= step_tol))
        u = torch.where(converged & inside, newton, u)
        done = done | converged
        if bool(done.all()):
            break
        trial = torch.where(inside, newton, 0.5 * (lo + hi))
        g_t, h_t = _sums(penalty, trial, x, c, alpha)
        lo = torch.where(~done & (g_t <= 0), trial, lo)
        hi = torch.where(~done & (g_t >= 0), trial, hi)
        u = torch.where(done, u, trial)
        g, h = torch.where(done, g, g_t), torch.where(done, h, h_t)
    # a bracket that closed below the tolerance leaves u up to tol from the root: one more
    # Newton step (kept inside the final bracket) makes the answer accurate to rounding
    g, h = _sums(penalty, u, x, c, alpha)
    newton = u - g / h
    u = torch.where((h > 0) & (newton >= lo) & (newton <= hi), newton, u)
    return u, done & bracketed


def histogram_search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, tol: float,
                     max_iter: int) -> tuple[Tensor, Tensor]:
    """``(y (r,), resolved (r,))`` for the rows ``x (r, n)``, ``c, α (r, 1)``."""
    r = x.shape[0]
    lo, hi = x.amin(1), x.amax(1)
    a, b = lo.clone(), hi.clone()
    flat = hi == lo  # constant rows: y = x_1
    resolved = flat.clone()
    active = ~flat
    best_u, best_f = lo.clone(), torch.full_like(lo, float("inf"))
    cs = c.squeeze(1)
    final = (torch.zeros_like(lo), torch.zeros_like(lo))  # (a, h) of the refined level
    runs = None
    for _ in range(_LEVELS):
        h = torch.where(active, (b - a) / _BINS, 1.0)
        bound = _bounds(penalty, x, c, alpha, a, h)
        k = bound.argmin(1)
        u = a + (k + 0.5) * h
        f = _objective(penalty, u, x, c, alpha)
        better = active & (f < best_f)
        best_u, best_f = torch.where(better, u, best_u), torch.where(better, f, best_f)
        slack = 1e-6 * best_f.abs() + x.shape[1] * torch.finfo(x.dtype).eps * best_f.abs()
        survive = bound <= (best_f + slack)[:, None]
        fine = active & (h <= _FINE * cs)
        if bool(fine.any()):
            first, last, lower = _runs(survive, bound)
            runs = (first, last, lower) if runs is None else tuple(
                torch.where(fine[:, None], new, old) for new, old in zip((first, last, lower), runs))
            final = (torch.where(fine, a, final[0]), torch.where(fine, h, final[1]))
            resolved = resolved | fine
        active = active & ~fine
        if not bool(active.any()):
            break
        nb = torch.arange(_BINS, device=x.device)
        first = torch.where(survive, nb, _BINS).amin(1)
        last = torch.where(survive, nb, -1).amax(1)
        new_a, new_b = a + first * h, a + (last + 1) * h
        stuck = active & (new_b - new_a > 0.5 * (b - a))
        active = active & ~stuck
        a, b = torch.where(active, new_a, a), torch.where(active, new_b, b)
        if not bool(active.any()):
            break
    resolved = resolved & ~active
    y = torch.where(flat, lo, best_u)
    if runs is None:
        return y, resolved
    first, last, lower = runs
    fa, fh = final
    for q in range(first.shape[1] - 1 if first.shape[1] > _RUNS else first.shape[1]):
        rows = (resolved & ~flat & (lower[:, q] <= best_f)).nonzero().flatten()
        if rows.numel() == 0:
            continue
        sub = lambda t: t.index_select(0, rows)  # noqa: E731
        xs, cq, aq = sub(x), sub(c), sub(alpha)
        run_lo = sub(fa) + (sub(first[:, q]) - 1).clamp_min(0) * sub(fh)
        run_hi = sub(fa) + (sub(last[:, q]) + 2).clamp_max(_BINS) * sub(fh)
        start = torch.where((sub(best_u) > run_lo) & (sub(best_u) < run_hi), sub(best_u),
                            0.5 * (run_lo + run_hi))
        u, ok = _refine(penalty, xs, cq, aq, run_lo, run_hi, start, tol, max_iter)
        f = _objective(penalty, u, xs, cq, aq)
        better = ok & (f <= sub(best_f))
        best_u[rows] = torch.where(better, u, sub(best_u))
        best_f[rows] = torch.where(better, f, sub(best_f))
        resolved[rows] = sub(resolved) & ok | ~(sub(lower[:, q]) <= sub(best_f))
    if first.shape[1] > _RUNS:  # a further run that might hold a better point: not settled
        resolved = resolved & ~(lower[:, _RUNS] <= best_f)
    return torch.where(flat, lo, best_u), resolved
