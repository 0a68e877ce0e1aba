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

One binning pass instead of the first levels (:func:`_one_histogram`): positions in bins of
``c/4`` are counted in coarse bins of ``2c`` and, in a window around the best coarse bin, in the
fine bins; as every bin width is a multiple of ``c`` the bounds of all rows are one small matrix
product (no per-row kernel); the candidate of the best fine bin gives ``U`` and the Newton
start. Rows whose coarse bins outside the window, or whose fine survivors spread over more than
``3c``, cannot be excluded go on to the levels. A run whose minimum found is worse than a point
of the run already evaluated holds another minimum: it is searched again where ``F`` descends
from that point (:func:`_descend`).

Rows that are not settled (too many open ranges, ``_LEVELS`` exhausted, a run that matters whose
ends never bracket a minimum) are returned as unresolved, for the exhaustive multi-start solver,
whose answer replaces the search's only where it is better.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .penalties import Penalty, sums_in_range
from .pooling_scratch import scratch

__all__ = ["histogram_search"]

_BINS = 32
_FINE = 0.25  # bin width / c at which the runs are refined
_LEVELS = 10
_RUNS = 3
_PROBLEMS = 8  # open ranges per row
_NEWTON_FIRST = 3  # plain Newton steps tried in a run before its ends are evaluated
_GROUP = 8  # fine bins per coarse bin of the one-histogram pass
_WINDOW = 5  # coarse bins of its fine window
_MAX_FINE = 1024  # fine bins per row it takes on (rows with a wider range: the levels)
_SPAN = 12  # fine bins (3c) the surviving ones may span in a row it takes on


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
    """Runs of surviving bins per row, the best first: ``(first, last, L)`` each ``(r, M)``,
    ``M = min(_RUNS + 1, R)`` for ``R`` the most runs any row has, ``L = inf`` where a row has
    fewer. Works on those ``R`` columns, not on the bins."""
    r, nb = survive.shape
    start = survive & ~torch.nn.functional.pad(survive, (1, 0))[:, :-1]
    end = survive & ~torch.nn.functional.pad(survive, (0, 1))[:, 1:]
    counts = start.long().cumsum(1)
    runs = max(1, int(counts[:, -1].max())) if counts.numel() else 1
    run = torch.where(survive, counts - 1, runs)  # run id, runs for none
    best = torch.full((r, runs + 1), float("inf"), dtype=bound.dtype, device=bound.device)
    best = best.scatter_reduce_(1, run, bound, "amin")[:, :runs]
    k = torch.arange(nb, device=bound.device).expand(r, nb)
    # each run has one first and one last bin: plain scatters (the others go to column runs)
    first = torch.full((r, runs + 1), nb, device=bound.device)
    first = first.scatter_(1, torch.where(start, run, runs), k)[:, :runs]
    last = torch.full((r, runs + 1), -1, device=bound.device)
    last = last.scatter_(1, torch.where(end, run, runs), k)[:, :runs]
    m = min(_RUNS + 1, nb)
    if runs > m:
        order = best.topk(m, 1, largest=False).indices
    else:
        order = best.argsort(1)
    return first.gather(1, order), last.gather(1, order), best.gather(1, order)


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
            first: tuple[Tensor, Tensor, Tensor] | None = None, safe: bool = False,
            buffers: tuple[Tensor, Tensor] | None = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """A root of ``F′`` in ``[lo, hi]`` from ``u``: plain Newton if it converges inside for
    every row (:func:`_newton_inside`); otherwise from the ends, where ``F′(lo) ≤ 0 ≤ F′(hi)``
    (rows where the ends do not bracket keep ``u``): Newton where ``F″ > 0`` and the step stays
    inside, else bisection on the sign of ``F′``. Returns ``(y, converged, moved, value)``: ``moved``
    where an end had to move out (the run's own minima, if any, were not searched); ``value``
    bounds ``F(y) / λ`` from above where plain Newton settled it (:func:`_newton_inside`), else
    ``None``. ``first``: ``(Σ κφ′, Σ κφ″, F/λ)`` at ``u`` where already known; ``safe``:
    :func:`~.penalties.sums_in_range` known to hold for the rows; ``buffers``: two flat buffers
    to work in where they hold ``x.numel()`` entries (else taken from the scratch pool)."""
    # (buffers too small: a row refined in several of its ranges at once)
    usable = buffers is not None and buffers[0].numel() >= x.numel()
    with nullcontext(buffers) if usable else scratch(x.numel(), x.dtype, x.device, 2) as work:
        work = tuple(w[:x.numel()].view(x.shape) for w in work)
        # (else overflow: the exact sums)
        fast = safe or sums_in_range(x_hi - x_lo, c.squeeze(1))
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
        if index is None:  # (a select: cheaper than a masked copy)
            y = torch.where(small, newton, y)
            y_value = None if y_value is None else torch.where(small, value, y_value)
        else:
            done = index[small]
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


def _kernel(penalty: Penalty, step: float, count: int, alpha: float, gap: bool,
            device: torch.device) -> Tensor:
    """``ψ_m = f(d_m · step)`` (in float64) for ``m < count`` (``f``: the radial profile, ``c = 1``),
    ``d_m = max(0, m − 1)`` (``gap``: the distance between bins ``m`` apart) or ``d_m = m``."""
    m = torch.arange(count, dtype=torch.float64, device=device)
    d = (m - 1).clamp_min(0) if gap else m
    one = torch.ones((), dtype=torch.float64, device=device)
    return penalty.ranked(d * step, one, torch.tensor(alpha, dtype=torch.float64, device=device))


_TABLES: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}  # (penalty, α, J, width, dtype, device)
_TABLES_KEPT = 32  # all dropped when full (a learnable α misses every call)


def _tables(penalty: Penalty, alpha: float, coarse_bins: int, width: int, dtype: torch.dtype,
            device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The matrices of :func:`_one_histogram` for ``J = coarse_bins`` and a window of ``width``
    coarse bins starting at ``s`` (``S = J − width + 1`` starts), kept across calls:

    - ``(J, J + S)``: ``ψ`` of the gap between coarse bins ``j, k`` (the coarse bounds), then of
      the least distance ``d(j, s)`` from coarse bin ``j`` outside the window to it (the far part
      of the fine bounds, for every ``s``);
    - ``(W + 2G, W)``: ``ψ`` of the gap from near column ``i`` to window column ``w``;
    - ``(S, J)``: ``inf`` on the coarse bins inside the window starting at ``s``, ``0`` outside
      (added to the coarse bounds, their minimum is that of the bins outside).

    The two kernels are lowered by ``1 − 4 (W + 2G + J + 2) eps`` of ``dtype``, more than the
    rounding of the products and the sum they enter (sums of positive terms): the bounds stay
    lower bounds."""
    key = (penalty, alpha, coarse_bins, width, dtype, torch.device(device))
    try:
        found = _TABLES.get(key)
    except TypeError:  # a user's penalty that is not hashable: not kept
        key, found = None, None
    if found is not None:
        return found
    G = _GROUP
    near_cols, cols = (width + 2) * G, width * G
    deflate = 1 - 4 * (near_cols + coarse_bins + 2) * torch.finfo(dtype).eps
    jc = torch.arange(coarse_bins, device=device)
    js = torch.arange(coarse_bins - width + 1, device=device)
    gaps = _kernel(penalty, G * _FINE, coarse_bins, alpha, True, device)[
        (jc[:, None] - jc[None, :]).abs()]
    # coarse bin j is at least d = (s − 1 − j) or (j − s − width) coarse bins from the window
    d = ((js[None, :] - 1 - jc[:, None]).clamp_min(0)
         + (jc[:, None] - js[None, :] - width).clamp_min(0))  # (J, S)
    far = _kernel(penalty, G * _FINE, coarse_bins + 1, alpha, False, device)[d]
    coarse = torch.cat([gaps, far], 1).mul_(deflate).to(dtype)
    i, w = torch.arange(near_cols, device=device), torch.arange(cols, device=device)
    fine = _kernel(penalty, _FINE, near_cols + 1, alpha, True, device)[
        (i[:, None] - w[None, :] - G).abs()].mul_(deflate).to(dtype)
    inside = (jc[None, :] >= js[:, None]) & (jc[None, :] < js[:, None] + width)
    inside = torch.zeros(inside.shape, dtype=dtype, device=device).masked_fill_(inside, torch.inf)
    found = (coarse, fine, inside)
    if key is not None:
        if len(_TABLES) >= _TABLES_KEPT:
            _TABLES.clear()
        _TABLES[key] = found
    return found


def _one_histogram(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor,
                   hi: Tensor, rounding: float, work: tuple[Tensor, Tensor]):
    """The search's first levels from one pass of binning each row: positions in bins of
    ``c/4`` from ``min x``, counted in coarse bins of ``G = _GROUP`` of them, whose bounds are
    exact (every bin width a multiple of ``c``: one small matrix product for all rows, with
    :func:`_tables`); then counted again in the fine bins of the ``_WINDOW`` coarse bins around
    the best one and the coarse bin either side, which give exact fine bounds there, plus the
    coarse counts beyond at their least distance from the window (the products in the input's
    precision, the bounds lowered by their rounding). ``F`` and the Newton sums at the candidate
    of the best fine bin give the upper bound ``U``. A row is taken on when no coarse bin outside
    the window has a bound below ``U`` (every global minimiser lies in the window) and the
    surviving fine bins span at most ``_SPAN`` (wider, they may hold minima the levels' finer
    bins part). For rows spanning at most ``_MAX_FINE`` fine bins, ``α`` equal on every row;
    ``rounding``: ``Penalty.value_rounding(α)``; ``work``: two flat buffers of at least
    ``x.numel()`` entries in ``x``'s dtype (float32 or float64), overwritten. Returns ``None`` or
    ``(taken, u, (Σ κφ′, Σ κφ″, F/λ) at u, a, h, bound (r, W), U (r, 1), ends)`` with the window
    ``[a, a + W h]``, ``W = _WINDOW · G``, and ``ends`` the :func:`_ends` of the bins with
    ``bound ≤ U``."""
    r, n = x.shape
    G = _GROUP
    h = c.squeeze(1) * _FINE
    coarse_bins = int(torch.ceil((hi - lo).div(h).max() / G)) + 1
    if not coarse_bins * G <= _MAX_FINE or r * coarse_bins * G >= 1 << 24:
        return None  # bins too many (per row, or 2^24 in all)
    width = min(_WINDOW, coarse_bins)
    near_cols = (width + 2) * G
    dt, dev = x.dtype, x.device
    psi_c, psi_f, inside = _tables(penalty, float(alpha[0, 0]), coarse_bins, width, dt, dev)
    stride = (coarse_bins + 2) * G  # a row's fine bins with an empty coarse bin either side
    # the positions t in work[0]; the int32 bin numbers in work[1] and, once t is read, work[0]
    t = work[0][:r * n].view(r, n)
    fine, index = (w.view(torch.int32)[:r * n].view(r, n) for w in (work[1], work[0]))
    # the position in fine bins (≥ 0, so that the conversion's truncation is the floor),
    # numbered from the row's first padded bin; its coarse bin: ⌊·/G⌋ (G | stride, a power
    # of 2), numbered from the row's first padded coarse bin
    t = torch.sub(x, lo[:, None], out=t).mul_(h.reciprocal()[:, None])
    fine = fine.copy_(t.clamp_(0, coarse_bins * G - 1)).add_(
        torch.arange(G, r * stride, stride, device=dev, dtype=torch.int32)[:, None])
    index = torch.bitwise_right_shift(fine, _GROUP.bit_length() - 1, out=index)
    coarse = torch.bincount(index.view(-1), minlength=r * (coarse_bins + 2))
    coarse = coarse.view(r, coarse_bins + 2)[:, 1:-1].to(dt)
    # the coarse bounds (exact) and the far parts for every window start: one product
    lower = coarse @ psi_c
    lower_c = lower[:, :coarse_bins]
    start = (lower_c.argmin(1) - _WINDOW // 2).clamp(0, coarse_bins - width)  # (r,)
    # fine counts of the window and one coarse bin either side: near column i is fine bin
    # (start − 1) G + i (columns -1 and near_cols: the entries beyond)
    offset = torch.arange(0, r * stride, stride, device=dev, dtype=torch.int32) + start * G
    index = torch.sub(fine, offset.to(torch.int32)[:, None], out=index).clamp_(-1, near_cols)
    index = index.add_(torch.arange(1, r * (near_cols + 2), near_cols + 2, device=dev,
                                    dtype=torch.int32)[:, None])
    near = torch.bincount(index.view(-1), minlength=r * (near_cols + 2))
    near = near.view(r, near_cols + 2)[:, 1:-1].to(dt)
    # the fine bounds: window counts (exact part) plus the far part of the row's window start
    bound = torch.addmm(lower[:, coarse_bins:].gather(1, start[:, None]), near, psi_f)
    # the candidate: the count-weighted mean of the centres of the best fine bin and its two
    # neighbours (their centre if all three are empty), in fine bins from lo
    best = bound.argmin(1)
    weight = near.gather(1, (best + G)[:, None] + torch.arange(-1, 2, device=dev))
    mean = (weight[:, 2] - weight[:, 0]) / weight.sum(1).clamp_min(1) + (start * G + best).to(dt)
    mean = mean.add_(0.5)
    u = torch.minimum(torch.maximum(lo + mean * h, lo), hi)
    sums = _sums(penalty, u, x, c, alpha, tuple(w[:r * n].view(r, n) for w in work), value=True)
    top = _ceiling(sums[2], n, rounding)[:, None]
    # (float arithmetic: comparisons, where and bool reductions are several times slower)
    ends = _ends(torch.sub(bound, top).sign_().clamp_min_(0))
    taken = ((lower_c + inside[start]).amin(1) > top[:, 0]) & (ends[1] - ends[0] < _SPAN)
    return taken, u, sums, lo + (start * G).to(dt) * h, h, bound, top, ends


def _ceiling(f: Tensor, n: int, rounding: float) -> Tensor:
    """``f`` plus its rounding: relative (sums of ``n`` terms) and absolute (a value from
    ``Penalty.newton_value_sums``, ``rounding`` eps per entry, at least 1)."""
    eps = torch.finfo(f.dtype).eps
    return f + (1e-6 + n * eps) * f.abs() + 4 * n * eps * max(1.0, rounding)


def _ends(excluded: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``excluded`` (``(r, B)``, ``1`` on the bins excluded, ``0`` on those kept): the
    first and the last bin kept (``B`` and ``−1`` where none) and their number, as floats."""
    nb = excluded.shape[1]
    cols = torch.arange(nb, device=excluded.device, dtype=excluded.dtype)
    first = torch.addcmul(cols, excluded, excluded, value=nb + 1).amin(1).clamp_max_(nb)
    last = torch.addcmul(cols, excluded, excluded, value=-(nb + 1)).amax(1).clamp_min_(-1)
    return first, last, nb - excluded.sum(1)


def _runs_below(bound: Tensor, top: Tensor, ends: tuple[Tensor, Tensor, Tensor]
                ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_runs` of the bins with ``bound ≤ top (r, 1)``, whose :func:`_ends` are ``ends``:
    where every row keeps one run (its bins contiguous) its ends, and its least bound that of
    the row (the bins excluded are above ``top``)."""
    first, last, kept = ends
    if bool((kept == last - first + 1).all()):
        return first.long()[:, None], last.long()[:, None], bound.amin(1, keepdim=True)
    return _runs(bound <= top, bound)


def _descend(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor,
             u: Tensor, x_lo: Tensor, x_hi: Tensor, tol: float, max_iter: int):
    """The bracketed search of :func:`_refine_in` on the part of ``[lo, hi]`` where ``F``
    descends from ``u`` (``[u, hi]`` where ``F′(u) < 0``, else ``[lo, u]``): ``(y, converged,
    moved, F(y)/λ)``, not settled (``converged`` False) where ``F(y)`` is still above ``F(u)``."""
    g, _ = _sums(penalty, u, x, c, alpha)
    f_u = _objective(penalty, u, x, c, alpha)
    lo, hi = torch.where(g < 0, u, lo), torch.where(g < 0, hi, u)
    y, ok, moved = _refine_in(penalty, x, c, alpha, lo, hi, u, x_lo, x_hi, tol, max_iter, None)
    f = _objective(penalty, y, x, c, alpha)
    return y, ok & (f <= f_u), moved, f


def histogram_search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, tol: float,
                     max_iter: int) -> tuple[Tensor, Tensor]:
    """``(y (r,), resolved (r,))`` for the rows ``x (r, n)``, ``c, α (r, 1)``.

    The search runs on problems ``(row, [a, b])``; a problem whose surviving bins do not halve
    its range splits into the quarters holding surviving bins (at most ``_PROBLEMS`` per row).
    """
    # two buffers like x for the whole search (beyond the scratch pool's size, each fresh buffer
    # costs its page faults: several passes' worth)
    with scratch(x.numel(), x.dtype, x.device, 2) as work:
        return _search(penalty, x, c, alpha, tol, max_iter, work)


def _search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, tol: float, max_iter: int,
            work: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """:func:`histogram_search` in the flat buffers ``work`` (``x.numel()`` entries each)."""
    r, n = x.shape
    dev = x.device
    rounding = penalty.value_rounding(alpha)
    lo, hi = x.amin(1), x.amax(1)  # (aminmax: 10x slower on one CPU thread)
    # constant rows: y = x_1; a row with a non-finite entry is skipped (y = its min, rejected by
    # the caller's finite check)
    flat = (hi == lo) | ~torch.isfinite(lo) | ~torch.isfinite(hi)
    resolved = torch.ones_like(flat)
    best_u, best_f = lo.clone(), torch.full_like(lo, float("inf"))
    # the last level's candidates (NaN: none) with their (Σ κφ′, Σ κφ″, F/λ): the refinement
    # of the best run starts there and takes its first Newton step from these sums
    seed_u, seed = torch.full_like(lo, float("nan")), None
    sums_safe = sums_in_range(hi - lo, c.squeeze(1))  # newton_value_sums' condition
    row = (~flat).nonzero().flatten()
    finals: list[tuple[Tensor, ...]] = []  # (row, a, h, first, last, lower, bins) of refined levels
    one = None
    if sums_safe and row.numel() and bool((alpha == alpha[0]).all()):
        whole = row.numel() == r
        xp, cp, ap = (x, c, alpha) if whole else (x[row], c[row], alpha[row])
        one = _one_histogram(penalty, xp, cp, ap, lo[row], hi[row], rounding, work)
    if one is not None:  # rows the one-histogram pass takes on skip the levels
        taken, u, sums, a, h, bound, top, ends = one
        # its candidates bound every row it saw, and start the refinement of the best run
        # (also where the levels go on: on rows of a few entries a better start than theirs)
        if whole:
            best_u, best_f, seed_u, seed = u.clone(), sums[2].clone(), u, sums
        else:
            best_u[row], best_f[row] = u, sums[2]
            seed_u[row] = u
            seed = tuple(torch.zeros_like(lo).index_put_((row,), s_k) for s_k in sums)
        if bool(taken.all()):
            finals.append((row, a, h, *_runs_below(bound, top, ends), bound.shape[1]))
            row = row[:0]
        else:
            i = taken.nonzero().flatten()
            finals.append((row[i], a[i], h[i], *_runs_below(bound[i], top[i],
                                                            tuple(e[i] for e in ends)),
                           bound.shape[1]))
            row = row[~taken]
    a, b = lo[row], hi[row]
    nb = torch.arange(_BINS, device=dev)
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
        survive = bound <= _ceiling(ub, n, rounding)[:, None]
        if bool(fine.any()):
            i = fine.nonzero().flatten()
            finals.append((row[i], a[i], h[i], *_runs(survive[i], bound[i]), _BINS))
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
        for p_row, p_a, p_h, first, last, lower, bins in finals:
            if q >= lower.shape[1]:
                continue
            i = (lower[:, q] <= best_f[p_row]).nonzero().flatten()
            if i.numel() == 0:
                continue
            rows, fa, fh = p_row[i], p_a[i], p_h[i]
            run_lo = fa + (first[i, q] - 1).clamp_min(0) * fh
            run_hi = fa + (last[i, q] + 2).clamp_max(bins) * fh
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
                                      tuple(s_k[rows] for s_k in seed) if seeded else None,
                                      sums_safe, work)
            f = _objective(penalty, u, xs, cq, aq) if f is None else f
            # a known point of the run better than the minimum found: the run holds another
            # (two minima in one run); searched again on the side where F descends from there
            known, known_f = best_u[rows], best_f[rows]
            above = f > _ceiling(known_f, n, rounding)  # by more than rounding
            again = ok & above & (known >= run_lo) & (known <= run_hi)
            if bool(again.any()):
                j = again.nonzero().flatten()
                u_j, ok_j, moved_j, f_j = _descend(penalty, xs[j], cq[j], aq[j], run_lo[j],
                                                   run_hi[j], known[j], lo[rows[j]],
                                                   hi[rows[j]], tol, max_iter)
                u, f = u.index_put((j,), u_j), f.index_put((j,), f_j)
                ok, moved = ok.index_put((j,), ok_j), moved.index_put((j,), moved_j)
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
    for p_row, *_, lower, _ in finals:  # a run beyond the refined ones that might be better
        if lower.shape[1] > _RUNS:
            resolved[p_row[lower[:, _RUNS] <= best_f[p_row]]] = False
    return torch.where(flat, lo, best_u), resolved
