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
(every global minimiser lies in it) and histograms it again; a range that does not halve splits
into the quarters that hold surviving bins (separated clusters part, and bins too coarse to prune
become four times finer), at most ``_PROBLEMS`` open ranges per row. When the bins are narrower
than ``c / 4`` the surviving bins form a few runs; the run of the smallest bound, and each further
run whose bound is below the best value found so far (at most ``3``), is refined by a safeguarded
Newton iteration on ``F′`` inside the run widened by a bin (an end where ``F`` still descends
outwards moves out until ``F′ ≤ 0`` at the left end and ``≥ 0`` at the right; Newton steps only
where ``F″ > 0``, else bisection on the sign of ``F′``), and the best point is returned. A row is
settled when every run left unrefined has a bound above the answer (up to the Newton tolerance,
and up to two minima inside one run). The cost is a few histogram passes plus about one convex
solve: when every row reaches the fine bins at once, their candidates are evaluated together with
the Newton sums there (``Penalty.newton_value_sums``) and the best run's Newton iteration starts
from them; each Newton pass also gives ``F`` at its point, which bounds ``F`` at the answer
(:func:`_newton_inside`), so a run settled by plain Newton needs no further evaluation.

Rows that are not settled (too many open ranges, ``_LEVELS`` exhausted, a run that matters whose
ends never bracket a minimum) are returned as unresolved, for the exhaustive multi-start solver.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .penalties import Penalty
from .pooling_scratch import scratch

__all__ = ["histogram_search"]

_BINS = 32
_FINE = 0.25  # bin width / c at which the runs are refined
_LEVELS = 10
_RUNS = 3
_PROBLEMS = 8  # open ranges per row
_NEWTON_FIRST = 3  # plain Newton steps tried in a run before its ends are evaluated


def _objective(penalty: Penalty, u: Tensor, x: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
    """``F(u_r) / λ`` per row (the row-ranked objective), in place in a scratch buffer."""
    with scratch(x.numel(), x.dtype, x.device, 1) as (z,):
        return penalty.ranked_sum(torch.sub(u[:, None], x, out=z.view(x.shape)), c, alpha)


def _bounds(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, a: Tensor,
            h: Tensor) -> tuple[Tensor, Tensor]:
    """``(L (r, B), u (r,))``: the lower bounds of ``F`` over the bins ``[a + k h, a + (k+1) h]``
    and a candidate near the entries of the three bins around the smallest bound."""
    r, n = x.shape
    # int32 bin numbers where they fit (half the memory traffic of int64 for bincount)
    itype = torch.int32 if r * (_BINS + 2) < 2**31 else torch.int64
    with scratch(r * n, x.dtype, x.device, 2) as (f, t), \
            scratch(r * n, itype, x.device, 1) as (index,):
        # bin j + 1 of x (0 and B + 1: the outside bins), numbered from row · (B + 2); in place
        f = torch.sub(x, a[:, None], out=f.view(r, n))
        t = torch.mul(f, h.reciprocal()[:, None], out=t.view(r, n)).floor_().clamp_(-1, _BINS)
        index = index.view(r, n).copy_(t).add_(
            torch.arange(1, r * (_BINS + 2), _BINS + 2, device=x.device, dtype=itype)[:, None]
        ).view(-1)
        counts = torch.bincount(index, minlength=r * (_BINS + 2))
    counts = counts.view(r, _BINS + 2).to(x.dtype)
    gaps = (torch.arange(_BINS + 2, device=x.device, dtype=x.dtype) - 1).clamp_min(0) * h[:, None]
    psi = penalty.ranked(gaps, c, alpha)  # (r, B + 2): f(gap_m / c), gap_m = max(0, m − 1) h
    # L_k = Σ_j count_j ψ_|j−k|: the counts correlated with the mirrored ψ of their row (a
    # grouped convolution: 2x faster than a product of windows, 20x than a batched bmm)
    kernel = torch.cat([psi.flip(1)[:, :-1], psi], 1)[:, None, :]  # (r, 1, 2B + 3)
    padded = torch.nn.functional.pad(counts, (_BINS + 1, _BINS + 1))[None]  # (1, r, 3B + 4)
    bound = torch.nn.functional.conv1d(padded, kernel, groups=r)[0, :, 1:-1]
    # the candidate: the count-weighted mean of the centres of the three bins around the smallest
    # bound (within h/2 of the entries' mean there; only a candidate: F is evaluated at it)
    k = bound.argmin(1, keepdim=True) + 1  # in the padded numbering
    near = torch.cat([k - 1, k, k + 1], 1)
    weight = counts.gather(1, near)
    centre = (near - 0.5).clamp(0, _BINS).to(x.dtype)  # outside bins: their inner edge
    mean = (weight * centre).sum(1) / weight.sum(1).clamp_min(1)
    return bound, a + mean * h


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


def _sums(penalty: Penalty, u: Tensor, x: Tensor, c: Tensor, alpha: Tensor,
          work: tuple[Tensor, ...] | None = None, value: bool = False):
    """``(Σ κφ′, Σ κφ″)`` at ``u``; with ``work`` (two buffers like ``x``) the in-place sums;
    with ``value`` also ``F(u) / λ`` (``Penalty.newton_value_sums``; ``None`` without ``work``)."""
    if work is None:
        d1, d2 = penalty.scaled_derivatives(u[:, None] - x, c, alpha)
        return (d1.sum(1), d2.sum(1)) + ((None,) if value else ())
    z = torch.sub(u[:, None], x, out=work[0])
    if value:
        return penalty.newton_value_sums(z, c, alpha, work[1])
    return penalty.newton_sums(z, c, alpha, work[1])


def _refine(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor,
            u: Tensor, x_lo: Tensor, x_hi: Tensor, tol: float, max_iter: int,
            first: tuple[Tensor, Tensor, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """A root of ``F′`` in ``[lo, hi]`` from ``u``: plain Newton if it converges inside for
    every row (:func:`_newton_inside`); otherwise from the ends, where ``F′(lo) ≤ 0 ≤ F′(hi)``
    (rows where the ends do not bracket keep ``u``): Newton where ``F″ > 0`` and the step stays
    inside, else bisection on the sign of ``F′``. Returns ``(y, converged, moved, value)``: ``moved``
    where an end had to move out (the run's own minima, if any, were not searched); ``value``
    bounds ``F(y) / λ`` from above where plain Newton settled it (:func:`_newton_inside`), else
    ``None``. ``first``: ``(Σ κφ′, Σ κφ″, F/λ)`` at ``u`` where already known."""
    # newton_sums may square z / c: in place only where no |z / c| reaches 1e18
    with scratch(x.numel(), x.dtype, x.device, 2) as work:
        work = tuple(w.view(x.shape) for w in work)
        fast = bool(((x_hi - x_lo) < 1e18 * c.squeeze(1)).all())
        work = work if fast else None
        found = _newton_inside(penalty, x, c, alpha, lo, hi, u, tol, work,
                               first=first if fast else None)
        if found is not None:
            y, value = found
            true = torch.ones_like(u, dtype=torch.bool)
            return y, true, ~true, value
        return (*_refine_in(penalty, x, c, alpha, lo, hi, u, x_lo, x_hi, tol, max_iter, work),
                None)


def _newton_inside(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor,
                   hi: Tensor, u: Tensor, tol: float, work: tuple[Tensor, Tensor] | None,
                   steps: int = _NEWTON_FIRST, first: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor | None] | None:
    """Plain Newton from ``u``: the local minimum it converges to if, for every row, within
    ``steps`` steps each with ``F″ > 0`` and inside ``[lo, hi]`` (a minimum of the run, as the
    bracketed search would give, without evaluating the ends); ``None`` otherwise. Converged:
    the step is below the tolerance, or a Lipschitz bound on ``Σ κφ″``
    (``Penalty.curvature_lipschitz_for``) proves the error after it below
    (:func:`~.pooling_fused.decide`).

    Returns ``(y, F(u)/λ)`` with ``u`` the iterate before the last step (its value comes with
    its sums, saving an evaluation at ``y``; ``None`` without ``work``). It bounds ``F(y)/λ``
    from above: with the Lipschitz stop, ``F″`` stays within ``[¾, 1¼]·F″(u)`` over the step
    ``d = −F′/F″``, so ``F(y) ≤ F(u) − (3/8) F′²/F″``; with the step rule, up to
    ``O(F″ d²)``, below the tolerance. A row stops at its own first converged step (its answer; it may
    go on with the others until few are left).
    ``first``: the sums and value at ``u``, if known."""
    scale = torch.minimum(c.squeeze(1), hi - lo)
    lam = penalty.curvature_lipschitz_for(alpha)
    lip = x.shape[1] * lam / c.squeeze(1) if lam < float("inf") else None
    y, y_value = torch.empty_like(u), (None if work is None else torch.empty_like(u))
    index, active = None, None  # the rows iterated (None: all); those not stopped (None: all)
    for k in range(steps):
        g, h, value = first if k == 0 and first is not None else _sums(
            penalty, u, x, c, alpha, work, value=True)
        newton = u - g / h
        if not bool(((h > 0) & (newton >= lo) & (newton <= hi)).all()):
            return None
        step, tol_u = (newton - u).abs(), tol * (u.abs() + scale)
        small = step <= tol_u
        if lip is not None:  # the error after the step is provably below tol_u (see decide)
            bound = lip * step
            small = small | ((bound * step <= tol_u * h) & (4 * bound <= h))
        if active is not None:  # rows that stopped before go on (below), unrecorded
            small = small & active
        done = small if index is None else index[small]
        y[done] = newton[small]
        if y_value is not None:
            y_value[done] = value[small]
        active = ~small if active is None else active & ~small
        if not bool(active.any()):
            return y, y_value
        u = newton
        # the rows still going on alone, once copying them costs less than the pass it saves
        if 2 * int(active.sum()) <= active.numel():
            keep = active.nonzero().flatten()
            index = keep if index is None else index[keep]
            x, c, alpha, lo, hi = x[keep], c[keep], alpha[keep], lo[keep], hi[keep]
            u, scale, active = u[keep], scale[keep], None
            lip = None if lip is None else lip[keep]
            if work is not None:
                work = tuple(w.view(-1)[:x.numel()].view(x.shape) for w in work)
    return None


def _refine_in(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor,
               u: Tensor, x_lo: Tensor, x_hi: Tensor, tol: float, max_iter: int,
               work: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
    sums = lambda u: _sums(penalty, u, x, c, alpha, work)  # noqa: E731
    g_lo, _ = sums(lo)
    g_hi, _ = sums(hi)
    moved = (g_lo > 0) | (g_hi < 0)
    # an end where F still descends outwards moves out (width doubling, then the data's range,
    # where F′(min x) ≤ 0 ≤ F′(max x) always holds) until the ends bracket a minimum
    width = hi - lo
    for k in range(5):
        out_lo, out_hi = g_lo > 0, g_hi < 0
        if not bool((out_lo | out_hi).any()):
            break
        step = width * 2.0 ** k if k < 4 else torch.full_like(width, float("inf"))
        lo = torch.where(out_lo, torch.maximum(lo - step, x_lo), lo)
        hi = torch.where(out_hi, torch.minimum(hi + step, x_hi), hi)
        g_lo = torch.where(out_lo, sums(lo)[0], g_lo)
        g_hi = torch.where(out_hi, sums(hi)[0], g_hi)
    bracketed = (g_lo <= 0) & (g_hi >= 0)
    g, h = sums(u)
    scale = torch.minimum(c.squeeze(1), hi - lo)
    done = ~bracketed
    stepped = torch.zeros_like(done)  # converged by a Newton step (accurate to rounding)
    for _ in range(max_iter):
        step_tol = tol * (u.abs() + scale)
        newton = u - g / h
        inside = (h > 0) & (newton >= lo) & (newton <= hi)  # closed: a step below an ulp
        converged = ~done & ((g == 0) | (inside & ((newton - u).abs() <= step_tol))
                             | (hi - lo <= step_tol))
        u = torch.where(converged & inside, newton, u)
        stepped = stepped | (converged & inside)
        done = done | converged
        if bool(done.all()):
            break
        trial = torch.where(inside, newton, 0.5 * (lo + hi))
        g_t, h_t = sums(trial)
        lo = torch.where(~done & (g_t <= 0), trial, lo)
        hi = torch.where(~done & (g_t >= 0), trial, hi)
        u = torch.where(done, u, trial)
        g, h = torch.where(done, g, g_t), torch.where(done, h, h_t)
    # a bracket that closed below the tolerance leaves u up to tol from the root: one more
    # Newton step (kept inside the final bracket) makes the answer accurate to rounding
    closed = done & bracketed & ~stepped
    if bool(closed.any()):
        g, h = sums(u)
        newton = u - g / h
        u = torch.where(closed & (h > 0) & (newton >= lo) & (newton <= hi), newton, u)
    return u, done & bracketed, moved


def histogram_search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, tol: float,
                     max_iter: int) -> tuple[Tensor, Tensor]:
    """``(y (r,), resolved (r,))`` for the rows ``x (r, n)``, ``c, α (r, 1)``.

    The search runs on problems ``(row, [a, b])``; a problem whose surviving bins do not halve
    its range splits into the quarters holding surviving bins (at most ``_PROBLEMS`` per row).
    """
    r, n = x.shape
    dev = x.device
    lo, hi = x.amin(1), x.amax(1)
    # constant rows: y = x_1; a row with a non-finite entry is skipped (y = its min, rejected by
    # the caller's finite check)
    flat = (hi == lo) | ~torch.isfinite(lo) | ~torch.isfinite(hi)
    resolved = torch.ones_like(flat)
    best_u, best_f = lo.clone(), torch.full_like(lo, float("inf"))
    # the last level's candidates (NaN: none) with their (Σ κφ′, Σ κφ″, F/λ): the refinement
    # of the best run starts there and takes its first Newton step from these sums
    seed_u, seed = torch.full_like(lo, float("nan")), None
    sums_safe = bool(((hi - lo) < 1e18 * c.squeeze(1)).all())  # newton_value_sums' condition
    row = (~flat).nonzero().flatten()
    a, b = lo[row], hi[row]
    nb = torch.arange(_BINS, device=dev)
    finals: list[tuple[Tensor, ...]] = []  # (row, a, h, first, last, lower) of refined levels
    for _ in range(_LEVELS):
        if row.numel() == 0:
            break
        whole = row.numel() == r and bool((row == torch.arange(r, device=dev)).all())
        xp, cp, ap = (x, c, alpha) if whole else (x[row], c[row], alpha[row])
        h = ((b - a) / _BINS).clamp_min(torch.finfo(x.dtype).tiny)
        bound, u = _bounds(penalty, xp, cp, ap, a, h)
        # bins below c / 4, or a range of a few ulps (c far below the spacing of equal entries)
        fine = (h <= _FINE * cp.squeeze(1)) | (b - a <= 64 * torch.finfo(x.dtype).eps * a.abs())
        if whole and sums_safe and bool(fine.all()):  # every row is refined next: seeds
            with scratch(x.numel(), x.dtype, dev, 2) as work:
                *sums, f = _sums(penalty, u, x, c, alpha, tuple(w.view(x.shape) for w in work),
                                 value=True)
            seed_u, seed = u, (*sums, f)
        else:
            f = _objective(penalty, u, xp, cp, ap)
        # per-row upper bound: the best value over all of the row's problems
        best_f.scatter_reduce_(0, row, f, "amin")
        hit = (f == best_f[row]).nonzero().flatten()
        best_u[row[hit]] = u[hit]
        ub = best_f[row]
        # relative rounding of the sums, and the absolute n·eps of a value from
        # Penalty.newton_value_sums (Welsch's n − Σ e)
        eps = torch.finfo(x.dtype).eps
        slack = (1e-6 + n * eps) * ub.abs() + 4 * n * eps
        survive = bound <= (ub + slack)[:, None]
        if bool(fine.any()):
            i = fine.nonzero().flatten()
            finals.append((row[i], a[i], h[i], *_runs(survive[i], bound[i])))
            if i.numel() == row.numel():  # every problem refined: none left open
                row = row[:0]
                break
        lo_k = torch.where(survive, nb, _BINS).amin(1)
        hi_k = torch.where(survive, nb, -1).amax(1)
        new_a, new_b = a + lo_k * h, a + (hi_k + 1) * h
        shrinks = ~fine & (new_b - new_a <= 0.5 * (b - a))
        split = ~fine & ~shrinks
        children_rows, children_a, children_b = [row[shrinks]], [new_a[shrinks]], [new_b[shrinks]]
        # a range that does not halve splits into quarters, each cut to its surviving bins:
        # separated clusters part, and bins too coarse to prune become four times finer
        quarter = _BINS // 4
        splits = bool(split.any())
        for q in range(4 if splits else 0):
            part = survive & (nb >= q * quarter) & (nb < (q + 1) * quarter)
            take = split & part.any(1)
            q_lo = torch.where(part, nb, _BINS).amin(1)[take]
            q_hi = torch.where(part, nb, -1).amax(1)[take]
            children_rows.append(row[take])
            children_a.append(a[take] + q_lo * h[take])
            children_b.append(a[take] + (q_hi + 1) * h[take])
        row, a, b = torch.cat(children_rows), torch.cat(children_a), torch.cat(children_b)
        if not splits:
            continue
        crowded = torch.bincount(row, minlength=r) > _PROBLEMS  # too many open ranges: give up
        if bool(crowded.any()):
            resolved[crowded] = False
            keep = ~crowded[row]
            row, a, b = row[keep], a[keep], b[keep]
    resolved[row] = False  # still open after _LEVELS
    failed: list[tuple[Tensor, Tensor]] = []
    for q in range(_RUNS):
        for p_row, p_a, p_h, first, last, lower in finals:
            if q >= lower.shape[1]:
                continue
            i = (lower[:, q] <= best_f[p_row]).nonzero().flatten()
            if i.numel() == 0:
                continue
            rows, fa, fh = p_row[i], p_a[i], p_h[i]
            run_lo = fa + (first[i, q] - 1).clamp_min(0) * fh
            run_hi = fa + (last[i, q] + 2).clamp_max(_BINS) * fh
            every = rows.numel() == r and bool((rows == torch.arange(r, device=dev)).all())
            xs, cq, aq = (x, c, alpha) if every else (x[rows], c[rows], alpha[rows])
            start = best_u[rows]
            start = torch.where((start > run_lo) & (start < run_hi), start, 0.5 * (run_lo + run_hi))
            if q == 0 and seed is not None:  # inside the best run (its widened argmin bins)
                start = torch.where((seed_u[rows] > run_lo) & (seed_u[rows] < run_hi),
                                    seed_u[rows], start)
            seeded = seed is not None and bool((start == seed_u[rows]).all())
            u, ok, moved, f = _refine(penalty, xs, cq, aq, run_lo, run_hi, start, lo[rows],
                                      hi[rows], tol, max_iter,
                                      tuple(s_k[rows] for s_k in seed) if seeded else None)
            f = _objective(penalty, u, xs, cq, aq) if f is None else f
            # a run whose ends did not bracket a minimum (or had to move out: F rises at an
            # end into the run, whose own minima were then not searched) is not settled
            unsettled = ~ok | moved
            failed.append((rows[unsettled], lower[i, q][unsettled]))  # judged against the best
            f = torch.where(ok, f, float("inf"))
            best_f.scatter_reduce_(0, rows, f, "amin")
            hit = (f == best_f[rows]).nonzero().flatten()
            best_u[rows[hit]] = u[hit]
    for rows, lower in failed:  # a run not settled by its refinement, if it matters
        resolved[rows[lower <= best_f[rows]]] = False
    for p_row, *_, lower in finals:  # a run beyond the refined ones that might be better
        if lower.shape[1] > _RUNS:
            resolved[p_row[lower[:, _RUNS] <= best_f[p_row]]] = False
    return torch.where(flat, lo, best_u), resolved
