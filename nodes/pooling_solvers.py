"""Forward solvers of the one-dimensional pooling problems ``y_r = argmin_u Σ_i φ(u − x_ri)``.

All rows are solved at once, in blocks of rows: on one thread of at most ``2**19`` entries (2 MiB
in float32, cached in L2/L3; the per-operation overhead of the vectorised iteration dominates
smaller blocks: at ``(32, 1024, 1024)`` pseudo-Huber ``2**16``-entry blocks were 1.7x slower);
with ``torch.get_num_threads() > 1`` on the CPU of ``2**16`` entries, shared among that many
Python threads (torch releases the GIL; each operation on a block runs single-threaded); ``2**18``
for the histogram search, whose many small operations are overhead-bound at ``2**16``. The
scratch buffers of a block come from :mod:`~.pooling_scratch` (kept across calls: a fresh buffer
of a MiB or more costs its page faults on every call).

* ``quadratic``: the mean.
* Convex penalties (``pseudo_huber``, ``huber``, ``general`` with ``α ≥ 1``): safeguarded Newton on
  ``g(u) = Σ φ′(u − x_i)`` (increasing), started from the row's mean (free: the finite check sums
  the rows; on normal data with or without outliers no worse a start than a sample median, which
  costs more than a Newton step), inside the bracket ``[lo, hi]`` (initially ``[min x, max x]``,
  where ``g(lo) ≤ 0 ≤ g(hi)``) that every evaluation of ``g`` shrinks. Newton steps are taken from the
  point with the smallest ``|g|`` so far; a trial that does not lower ``|g|`` only shrinks the
  bracket, and a Newton step that leaves the bracket is replaced by bisection.
* Non-convex penalties (``welsch``, ``general`` with ``α < 1``) on rows of at most
  ``_EXHAUSTIVE`` entries: every cell searched (:func:`_exhaustive`, which says why this is
  global): the cells between ``min x``, ``max x`` and the entries ``± ρ`` (the inflection
  radius), a root search of ``F′`` in each cell over which ``F′`` turns from ``−`` to ``+``.
* Longer non-convex rows: branch and bound on per-row histograms (:mod:`~.pooling_global`),
  which settles a row with a few histogram passes and about one convex solve; the rows it cannot
  settle go to the multi-start search: the objective is evaluated at ``min x``, ``max x`` and
  ``starts`` entries of the row (every entry when the row has at most ``starts``; otherwise
  evenly spaced ones), those entries ``± ρ`` and the midpoints between consecutive sorted
  candidates. Around each of the 3 best candidates the neighbouring candidates give a bracket
  ``a < m < b`` with ``F(m) ≤ F(a), F(b)``, so it holds a local minimum no worse than ``F(m)``;
  a safeguarded Newton/bisection search that only accepts decreasing steps finds it. Every cell
  between consecutive candidates where ``F′`` turns from ``−`` to ``+`` also gets a root search
  (:func:`_cell_search`: basins the 3 best candidates miss, such as two minima close together),
  and the best point is returned.
* Convex penalties with ``fused``: the same Newton iteration compiled (:mod:`~.pooling_fused`),
  on the whole input at once (row sums, minima and maxima in one compiled pass, one compiled pass
  per iteration).
* ``truncated_quadratic``: exact. A minimiser is the mean of its inliers, a window of the sorted
  row; every window ``{i : |x_i − u| ≤ c}`` arises for ``u`` at a breakpoint ``x_j ± c`` or a
  midpoint between consecutive breakpoints, and ``½ SSE(window) + ½ c² (n − |window|)`` bounds
  the objective at the window's mean (prefix sums in float64). The 4 best windows are then
  re-evaluated exactly and the best mean is polished by two inlier-mean steps (which never
  increase the objective).

Every solver stops a row when its step is at most ``tol · (|u| + min(c, max x − min x))`` (the
convex Newton solver also when a Lipschitz bound on ``Σ φ″`` proves the error after the step below
that, :func:`~.pooling_fused.decide`) and reports rows that did not
(:class:`~ddnlib.NonConvergenceWarning`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from ddnlib.errors import NonConvergenceWarning, report

from .penalties import Penalty, sums_in_range
from .pooling_fused import compiled, decide, evaluate, mark_failed
from .pooling_global import histogram_search
from .pooling_scratch import scratch

__all__ = ["SolverSettings", "solve_rows"]

_BLOCK = 1 << 16  # entries per block of rows shared among threads (256 KiB in float32)
_SERIAL_BLOCK = 1 << 19  # on one thread: per-block overhead dominates smaller blocks
_GLOBAL_BLOCK = 1 << 19  # the histogram search is overhead-bound below (many small operations)
_REFINED = 3  # local searches of the multi-start strategy
_WINDOWS = 4  # truncated-quadratic windows re-evaluated exactly
_EXHAUSTIVE = 64  # non-convex rows of at most this many entries: every cell searched


@dataclass(frozen=True)
class SolverSettings:
    """What the row solvers read: step tolerance, iteration cap, strictness, number of starts."""

    tol: float
    max_iter: int
    strict: bool
    starts: int
    fused: bool = False  # convex penalties: the compiled Newton iteration (pooling_fused)


def solve_rows(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings,
               on_block: Callable[[slice, Tensor, Tensor, tuple], None] | None = None) -> Tensor:
    """``y (r,)`` minimising ``Σ_i φ(y_r − x_ri; c_r, α_r)`` for ``x (r, n)``, ``c, α (r,)``.

    ``on_block(rows, x_block, y_block, work)`` is called after each block is solved, while the
    block is still in cache; ``work`` is two scratch buffers shaped like ``x_block`` (``None``
    on the fused path, which solves the input as one block). Rows that did not converge are
    reported.
    """
    rows, n = x.shape
    if penalty.closed_form == "mean":
        block_solver = _mean
    elif penalty.closed_form == "sorted_window":
        block_solver = _truncated_quadratic
    elif penalty.convex(alpha):
        if settings.fused:
            fused = _solve_fused(penalty, x, c, alpha, settings)
            if fused is not None:
                y, failed, total = fused
                if on_block is not None:
                    on_block(slice(None), x, y, None)
                _finish(penalty, x, y, total, failed, settings)
                return y
        block_solver = _newton
    elif penalty.radial:
        block_solver = _global
    else:
        block_solver = _multistart
    y = x.new_empty(rows)
    failed = torch.zeros(rows, dtype=torch.bool, device=x.device)
    # one pass for the finite check and the start of the convex solvers (the row means)
    total = x.sum(1)
    mean = total / n
    serial = torch.get_num_threads() == 1 or x.device.type != "cpu"
    block = _GLOBAL_BLOCK if block_solver is _global else _SERIAL_BLOCK if serial else _BLOCK
    step = max(1, block // max(n, 1))
    starts = list(range(0, rows, step))
    workers = max(1, min(torch.get_num_threads(), len(starts)))

    def run(share: list[int]) -> None:
        with scratch(min(rows, step) * n, x.dtype, x.device) as work:
            for start in share:
                sl = slice(start, start + step)
                xb = x[sl]
                views = tuple(w[:xb.numel()].view(xb.shape) for w in work)
                y[sl], failed[sl] = block_solver(penalty, xb, c[sl, None], alpha[sl, None],
                                                 settings, views, mean[sl])
                if on_block is not None:
                    on_block(sl, xb, y[sl], views)

    shares = [starts[i::workers] for i in range(workers)]
    if workers == 1 or x.device.type != "cpu":
        run(starts)
    else:  # blocks are small enough that each op runs single-threaded: one block per thread
        # grad and inference modes are thread-local: carried into the worker threads (an
        # inference tensor written outside inference mode is an error)
        grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def work(share: list[int]) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad_mode):
                run(share)

        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(work, share) for share in shares]:
                future.result()
    _finish(penalty, x, y, total, failed, settings)
    return y


def _finish(penalty: Penalty, x: Tensor, y: Tensor, total: Tensor, failed: Tensor,
            settings: SolverSettings) -> None:
    """Reject non-finite rows; report the rows that did not converge (one check of all three
    in the usual case)."""
    rows = x.shape[0]
    if bool((torch.isfinite(y).all() & torch.isfinite(total).all()) & ~failed.any()):
        return
    _check_finite(x, y, total)
    bad = int(failed.sum())
    if bad:
        idx = failed.nonzero().flatten()[:8].tolist()
        report(NonConvergenceWarning,
               f"robust pooling ({penalty.name}) did not converge in {settings.max_iter} "
               f"iterations for {bad} of {rows} rows (first rows {idx}); raise "
               "Options(max_iter=...) or check the scale of c against the data.", settings.strict)


def _mean(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings,
          work: tuple[Tensor, Tensor], mean: Tensor):
    y = _inside(mean, x.amin(1), x.amax(1))
    return y, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)


def _check_finite(x: Tensor, y: Tensor, total: Tensor) -> None:
    """A row with a non-finite entry of ``x`` (whatever its ``y``: the multi-start solvers can
    return a finite one), or whose ``y`` overflowed (the mean of huge values), is rejected;
    ``total`` is ``x.sum(1)``, finite unless an entry is not (or the sum overflows)."""
    bad = ~torch.isfinite(y)
    if not bool(torch.isfinite(total).all()):  # look closer
        bad = bad | ~torch.isfinite(x).all(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"pooled row {row} of x (values {x[row, :6].tolist()}…) has no finite "
                         "result: expected finite values")


def _inside(mean: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """A mean clamped to the row's range ``[lo, hi]``, where the minimiser of every penalty lies:
    ``Σx / n`` rounds (for equal entries an ulp outside them). A mean that overflowed stays
    non-finite, for :func:`_check_finite` to reject (clamping it would return ``hi``)."""
    return torch.where(torch.isfinite(mean), mean.clamp(lo, hi), mean)


def _start(mean: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The row mean (from the finite check's sums: free) inside ``[lo, hi]`` (an overflowed
    mean: the end of its sign, or 0 clamped in where it is NaN); as good a start as the median of
    a sample on normal data with or without outliers, and ``torch.median`` costs more than a
    Newton step."""
    return torch.nan_to_num(mean.clamp(lo, hi), nan=0.0).clamp_(lo, hi)


def _scale(lo: Tensor, hi: Tensor, c: Tensor) -> Tensor:
    return torch.minimum(c.squeeze(1), hi - lo)


def _newton(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings,
            work: tuple[Tensor, Tensor], mean: Tensor):
    lo, hi = x.amin(1), x.amax(1)
    z, scratch = work
    cs = c.squeeze(1)
    fast = sums_in_range(hi - lo, cs)  # (else overflow: the exact sums)

    def sums(u: Tensor) -> tuple[Tensor, Tensor]:
        zu = torch.sub(u[:, None], x, out=z)
        if fast:
            return penalty.newton_sums(zu, c, alpha, scratch)
        d1, d2 = penalty.scaled_derivatives(zu, c, alpha)
        return d1.sum(-1), d2.sum(-1)

    lip = _lipschitz(penalty, x, cs) if fast else None
    u, g, h, lo, hi, active, trial, tol_scale = _prelude(sums, mean, lo, hi, cs, settings.tol,
                                                         lip)
    for _ in range(settings.max_iter):
        if not bool(active.any()):
            break
        u, g, h, lo, hi = evaluate(u, g, h, lo, hi, trial, *sums(trial))
        u, active, trial = decide(u, g, h, lo, hi, active, tol_scale, settings.tol, lip)
    return u, active


def _lipschitz(penalty: Penalty, x: Tensor, c: Tensor) -> Tensor | None:
    """Per row, a Lipschitz constant of ``Σ κφ″`` in ``u`` (``n λ / c``), or ``None``."""
    lam = penalty.curvature_lipschitz
    return None if lam == float("inf") else (x.shape[1] * lam) / c


def _prelude(sums, mean: Tensor, lo: Tensor, hi: Tensor, c: Tensor, tol: float,
             lipschitz: Tensor | None):
    """The Newton state at the start: ``g, h`` there, the bracket, the first decision."""
    tol_scale = tol * torch.minimum(c, hi - lo)
    u = _start(mean, lo, hi)
    g, h = sums(u)
    lo, hi = torch.where(g <= 0, u, lo), torch.where(g >= 0, u, hi)
    active = torch.ones_like(u, dtype=torch.bool)
    u, active, trial = decide(u, g, h, lo, hi, active, tol_scale, tol, lipschitz)
    return u, g, h, lo, hi, active, trial, tol_scale


def _solve_fused(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor,
                 settings: SolverSettings) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`_newton` on the whole input with its passes compiled (:mod:`~.pooling_fused`):
    ``(y, failed, Σ x)``, or ``None`` where the eager solver must run instead (compiling failed,
    or the fast sums' conditions do not hold)."""
    n = x.shape[1]
    fns = [compiled(penalty, kind) for kind in ("bounds", "sums", "iteration")]
    if any(fn is None for fn in fns):
        return None
    bounds, sums, iteration = fns
    c2, a2 = c[:, None], alpha[:, None]
    try:
        total, lo, hi = bounds(x)
        if not sums_in_range(hi - lo, c):
            return None  # (the fused sums square z / c and multiply by 1 / c)
        lip = _lipschitz(penalty, x, c)
        state = _prelude(lambda u: sums(x, u, c2, a2), total / n, lo, hi, c, settings.tol, lip)
        u, g, h, lo, hi, active, trial, tol_scale = state
        for _ in range(settings.max_iter):
            if not bool(active.any()):
                break
            u, g, h, lo, hi, active, trial = iteration(x, c2, a2, u, g, h, lo, hi, active,
                                                       trial, tol_scale, settings.tol, lip)
    except Exception as error:  # a compiler missing or failing: eager from here on
        mark_failed(penalty, error)
        return None
    return u, active, total


def _objective(penalty: Penalty, u: Tensor, x: Tensor, c: Tensor, alpha: Tensor) -> Tensor:
    """``F(u_k) = Σ_i φ(u_k − x_i)`` for ``u (r, k)``, in sub-blocks of at most ``_BLOCK``."""
    r, k = u.shape
    n = x.shape[1]
    out = u.new_empty(r, k)
    step = max(1, _BLOCK // max(r * n, 1))
    for j in range(0, k, step):
        z = u[:, j:j + step, None] - x[:, None, :]
        out[:, j:j + step] = penalty.ranked(z, c[:, :, None], alpha[:, :, None]).sum(2)
    return out


def _candidates(x: Tensor, starts: int, rho: Tensor | None = None) -> Tensor:
    """Sorted start points ``(r, k)``: entries of the row (every ``⌈n / starts⌉``-th) with its
    min and max, the midpoints between consecutive ones, and (given the inflection radius
    ``rho (r, 1)``) those entries ``± rho`` inside the row's range."""
    n = x.shape[1]
    stride = max(1, -(-n // starts))
    sample = x[:, ::stride]
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    points = torch.cat([sample, lo, hi], 1).sort(1).values
    cand = [points, 0.5 * (points[:, 1:] + points[:, :-1])]
    if rho is not None:
        cand += [torch.minimum(sample + rho, hi), torch.maximum(sample - rho, lo)]
    return torch.cat(cand, 1).sort(1).values


def _global(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings,
            work: tuple[Tensor, Tensor], mean: Tensor):
    """Branch and bound on histograms (:func:`~.pooling_global.histogram_search`); the rows it
    does not settle go to :func:`_multistart`."""
    if x.shape[1] <= _EXHAUSTIVE:  # short rows: every cell searched (provably global)
        return _exhaustive(penalty, x, c, alpha, settings)
    y, resolved = histogram_search(penalty, x, c, alpha, settings.tol, settings.max_iter)
    failed = torch.zeros_like(resolved)
    if not bool(resolved.all()):
        rows = (~resolved).nonzero().flatten()
        xr, cr, ar = x[rows].double(), c[rows].double(), alpha[rows].double()
        found, failed[rows] = _multistart(penalty, x[rows], c[rows], alpha[rows], settings,
                                          work, mean[rows])
        # the search's own answer where it is better (a point it refined, not settled)
        pair = torch.stack([y[rows], found], 1).double()
        better = _objective(penalty, pair, xr, cr, ar).argmin(1, keepdim=True)
        y[rows] = pair.gather(1, better).squeeze(1).to(y.dtype)
    return y, failed


def _multistart(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings,
                work: tuple[Tensor, Tensor], mean: Tensor):
    dtype = x.dtype  # objective comparisons in float64: float32 sums are too coarse to rank
    x, c, alpha = x.double(), c.double(), alpha.double()
    r, n = x.shape
    cand = _candidates(x, settings.starts, penalty.inflection(c, alpha))
    values = _objective(penalty, cand, x, c, alpha)
    k = cand.shape[1]
    m = min(_REFINED, k)
    best = values.topk(m, dim=1, largest=False).indices  # (r, m)
    left = cand.gather(1, (best - 1).clamp_min(0))
    right = cand.gather(1, (best + 1).clamp_max(k - 1))
    mid = cand.gather(1, best)
    f_mid = values.gather(1, best)
    rep = lambda t: t.repeat_interleave(m, 0)  # noqa: E731
    y, f, failed = _bracketed_search(penalty, rep(x), rep(c), rep(alpha), left.flatten(),
                                     mid.flatten(), right.flatten(), f_mid.flatten(), settings)
    # and every cell between consecutive candidates whose ends bracket a minimum (a basin the
    # 3 best candidates miss: two minima close together, or one between worse candidates)
    y_c, f_c, failed_c = _cell_search(penalty, x, c, alpha, cand, settings)
    y = torch.cat([y.view(r, m), y_c[:, None]], 1)
    f = torch.cat([f.view(r, m), f_c[:, None]], 1)
    failed = torch.cat([failed.view(r, m), failed_c[:, None]], 1)
    choice = _rank(f, failed, n).argmin(1, keepdim=True)
    return y.gather(1, choice).squeeze(1).to(dtype), failed.gather(1, choice).squeeze(1)


def _rank(f: Tensor, failed: Tensor, n: int) -> Tensor:
    """``F`` of search results for choosing the best: one whose search did not converge counts
    as worse by the rounding of ``F`` (a flat minimum where every search ends within rounding
    is reported only if no converged search reached it)."""
    return torch.where(failed, f + 64 * torch.finfo(f.dtype).eps * (f.abs() + n), f)


def _exhaustive(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, settings: SolverSettings):
    """Rows of at most ``_EXHAUSTIVE`` entries: :func:`_cell_search` on the cells between
    ``min x``, ``max x`` and the entries ``± ρ`` (``ρ``: the inflection radius, ``φ″(z) < 0`` for
    ``|z| > ρ``) clipped to ``[min x, max x]``: ``F′`` at ``2n + 2`` points (in the input's
    dtype), then a root search (in float64) in each cell where ``F′`` turns from ``−`` to ``+``,
    one per local minimum. At ``(2048, 64)`` about 8x the cost of the histogram search (85 vs
    10 ms), at ``(2048, 16)`` about 1.5x.

    Why this finds the global minimum: a global minimiser ``u*`` lies in ``[min x, max x]``, so
    in a cell, and has ``F″(u*) ≥ 0``, so an entry within ``ρ`` of it (where every entry is
    farther, every term is concave and so is ``F``: only maxima). Inside a cell the set of
    entries within ``ρ`` is fixed: ``F`` is a convex sum (those entries) plus a concave one (the
    others). If ``u*`` is its cell's only local minimum and no maximum lies between it and an
    end where ``F′`` has the other sign, ``F′`` turns from ``−`` to ``+`` over the cell and the
    root search finds ``u*``. That this always holds is not proved (convex plus concave can
    turn more often); a brute-force comparison (a grid of 20001 points plus polish, in float64;
    4800 random calls of 1–40 entries in clusters, spread and near-mirrored,
    ``c ∈ [0.05, 3]``, Welsch and Barron ``α ∈ {0.5, 0, −2}``, both dtypes) found no row where
    it fails; with the entries and midpoints as the cells' ends instead, cells holding a minimum
    and the maximum near a midpoint were missed (1 of 400 calls)."""
    dtype = x.dtype
    x, c, alpha = x.double(), c.double(), alpha.double()
    rho = penalty.inflection(c, alpha)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    cand = torch.cat([lo, hi, torch.minimum(x + rho, hi), torch.maximum(x - rho, lo)], 1)
    # F′ in float32 only where its rounding of the points moves them by far less than ρ
    coarse = bool((rho > 1e3 * torch.finfo(dtype).eps * torch.maximum(lo.abs(), hi.abs())).all())
    slopes = dtype if coarse else torch.float64
    y, _, failed = _cell_search(penalty, x, c, alpha, cand.sort(1).values, settings, slopes)
    return y.to(dtype), failed


def _cell_search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, p: Tensor,
                 settings: SolverSettings, slopes: torch.dtype = torch.float64
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, F(y), failed)`` per row (``x`` in float64): the best of the points of
    ``p (r, k)`` (sorted) where ``F′ = 0`` and of the minima of ``F`` in every cell
    ``[p_j, p_{j+1}]`` whose ends bracket one (``F′(p_j) < 0 < F′(p_{j+1})``, ``F′`` there
    computed in ``slopes``), each found by safeguarded Newton/bisection on ``F′``
    (:func:`_root_in`)."""
    r, k = p.shape
    n = x.shape[1]
    g = _slopes(penalty, *(t.to(slopes) for t in (x, c, alpha, p)))
    # a row's first point as a start (every row has a cell or a stationary point: for safety)
    y = p[:, 0].clone()
    f = penalty.ranked(y[:, None] - x, c, alpha).sum(1)
    failed = torch.zeros(r, dtype=torch.bool, device=x.device)
    # cells [p_j, p_{j+1}] where F′ turns from − to +, and zero-width ones at points with F′ = 0
    turns = (g[:, :-1] < 0) & (g[:, 1:] > 0) & (p[:, 1:] > p[:, :-1])
    row, cell = turns.nonzero().unbind(1)
    row_s, point = (g == 0).nonzero().unbind(1)
    row, starts_at, ends = (torch.cat([row, row_s]), torch.cat([cell, point]),
                            torch.cat([cell + 1, point]))
    step = max(1, (_BLOCK << 4) // max(n, 1))
    for i in range(0, row.numel(), step):  # the cells, in chunks
        rows, j0, j1 = row[i:i + step], starts_at[i:i + step], ends[i:i + step]
        u, f_u, ok = _root_in(penalty, x[rows], c[rows], alpha[rows], p[rows, j0], p[rows, j1],
                              g[rows, j0].to(x.dtype), g[rows, j1].to(x.dtype), settings)
        # or an end of the cell, where the minimum is a cusp (c far below the data's spacing:
        # the root search closes on the edge of an entry's own term)
        for end in (p[rows, j0], p[rows, j1]):
            f_end = penalty.ranked(end[:, None] - x[rows], c[rows], alpha[rows]).sum(1)
            lower = f_end < f_u
            u, f_u, ok = torch.where(lower, end, u), torch.where(lower, f_end, f_u), ok | lower
        # per row the best (a row's cells may span chunks): scatter the minimum, then its point;
        # a row fails when its answer is a point whose search did not converge
        f_u = _rank(f_u, ~ok, n)
        f_row = torch.full_like(f, float("inf")).scatter_reduce_(0, rows, f_u, "amin")
        better = f_row < f
        hit = (better[rows] & (f_u == f_row[rows])).nonzero().flatten()
        y[rows[hit]], failed[rows[hit]] = u[hit], ~ok[hit]
        f = torch.where(better, f_row, f)
    return y, f, failed


def _slopes(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, p: Tensor) -> Tensor:
    """``Σ κφ′(p_rj − x_ri)`` over ``i`` for the points ``p (r, k)`` inside the rows' ranges, in
    chunks of about ``_BLOCK · 4`` terms (the in-place sums where their conditions hold)."""
    r, k = p.shape
    n = x.shape[1]
    g = p.new_empty(r, k)
    fast = sums_in_range(x.amax(1) - x.amin(1), c.squeeze(1))
    step = max(1, (_BLOCK << 2) // max(k * n, 1))
    with scratch(min(r, step) * k * n, x.dtype, x.device) as (zb, sb):
        for i in range(0, r, step):
            xi, m = x[i:i + step], min(step, r - i)
            z = torch.sub(p[i:i + m, :, None], xi[:, None, :], out=zb[:m * k * n].view(m, k, n))
            ci, ai = c[i:i + m].repeat_interleave(k, 0), alpha[i:i + m].repeat_interleave(k, 0)
            if fast:
                gi = penalty.newton_sums(z.view(m * k, n), ci, ai, sb[:m * k * n].view(m * k, n))[0]
            else:
                gi = penalty.scaled_derivatives(z.view(m * k, n), ci, ai)[0].sum(1)
            g[i:i + m] = gi.view(m, k)
    return g


def _root_in(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, lo: Tensor, hi: Tensor,
             g_lo: Tensor, g_hi: Tensor, settings: SolverSettings
             ) -> tuple[Tensor, Tensor, Tensor]:
    """The root of ``F′`` in ``[lo, hi]`` with ``F′(lo) < 0 < F′(hi)`` (``g_lo, g_hi``: about
    ``F′`` there), from the secant point (the middle where it is not inside): Newton
    where ``F″ > 0`` and the step stays inside the bracket, else bisection; every evaluation
    shrinks the bracket. ``(u, F(u), converged)``; the problems still going on are iterated
    alone once they are at most half."""
    p, n = x.shape
    x_lo, x_hi = x.amin(1), x.amax(1)
    fast = sums_in_range(x_hi - x_lo, c.squeeze(1))
    scale = _scale(x_lo, x_hi, c)
    u = lo - g_lo * ((hi - lo) / (g_hi - g_lo))
    u = torch.where((u > lo) & (u < hi), u, 0.5 * (lo + hi))
    y, ok = u.clone(), torch.zeros_like(u, dtype=torch.bool)
    index, xs, cs, alphas = torch.arange(p, device=x.device), x, c, alpha
    with scratch(p * n, x.dtype, x.device) as (zb, sb):
        for _ in range(settings.max_iter):
            m = index.numel()
            z = torch.sub(u[:, None], xs, out=zb[:m * n].view(m, n))
            if fast:
                g, h = penalty.newton_sums(z, cs, alphas, sb[:m * n].view(m, n))
            else:
                d1, d2 = penalty.scaled_derivatives(z, cs, alphas)
                g, h = d1.sum(1), d2.sum(1)
            lo, hi = torch.where(g <= 0, u, lo), torch.where(g >= 0, u, hi)
            newton = u - g / h
            inside = (h > 0) & (newton > lo) & (newton < hi)
            tol = settings.tol * (u.abs() + scale)
            # a step below the tolerance converges, inside or not (it may round onto an end)
            small = (h > 0) & ((newton - u).abs() <= tol)
            converged = (g == 0) | small | (hi - lo <= tol)
            u = torch.where(small, torch.minimum(torch.maximum(newton, lo), hi),
                            torch.where(inside, newton, torch.where(g == 0, u, 0.5 * (lo + hi))))
            y[index[converged]], ok[index[converged]] = u[converged], True
            going = ~converged
            left = int(going.sum())
            if left == 0:
                break
            if 2 * left <= m:
                keep = going.nonzero().flatten()
                index, xs, cs, alphas = index[keep], xs[keep], cs[keep], alphas[keep]
                u, lo, hi, scale = u[keep], lo[keep], hi[keep], scale[keep]
        else:
            y[index] = torch.where(ok[index], y[index], u)
    # a point converged by its bracket closing is up to the tolerance from the root: one more
    # Newton step where it moves less than that makes it accurate to rounding
    d1, d2 = penalty.scaled_derivatives(y[:, None] - x, c, alpha)
    g, h = d1.sum(1), d2.sum(1)
    newton = y - g / h
    tol = settings.tol * (y.abs() + _scale(x.amin(1), x.amax(1), c))
    y = torch.where(ok & (h > 0) & ((newton - y).abs() <= tol), newton, y)
    return y, penalty.ranked(y[:, None] - x, c, alpha).sum(1), ok


def _bracketed_search(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor, a: Tensor, m: Tensor,
                      b: Tensor, f_m: Tensor, settings: SolverSettings):
    """Local minimum in ``[a, b]`` no worse than ``F(m)``, given ``F(m) ≤ F(a), F(b)``.

    Newton steps from ``m`` when ``φ″`` sums to a positive curvature and the step stays inside
    ``(a, b)``, otherwise halfway from ``m`` towards ``a`` or ``b`` downhill; a trial point replaces
    ``m`` when it lowers ``F`` (a Newton point also when ``F`` rises by less than its rounding
    error ``n·eps·|F|``), and otherwise becomes the new end of the bracket.
    """
    lo, hi = x.amin(1), x.amax(1)
    scale = _scale(lo, hi, c)
    d1, d2 = penalty.scaled_derivatives(m[:, None] - x, c, alpha)
    g, h = d1.sum(1), d2.sum(1)
    done = torch.zeros_like(m, dtype=torch.bool)
    noise = x.shape[1] * torch.finfo(x.dtype).eps
    for _ in range(settings.max_iter):
        tol = settings.tol * (m.abs() + scale)
        newton = m - g / h
        inside = (h > 0) & (newton > a) & (newton < b)
        converged = (g == 0) | (inside & ((newton - m).abs() <= tol)) | (b - a <= tol)
        m = torch.where(converged & inside & ~done, newton, m)
        done = done | converged
        if bool(done.all()):
            break
        towards = torch.where(g > 0, a, b)
        t = torch.where(inside, newton, 0.5 * (m + towards))
        z = t[:, None] - x
        f_t = penalty.ranked(z, c, alpha).sum(1)
        d1, d2 = penalty.scaled_derivatives(z, c, alpha)
        # a Newton step whose change of F is below rounding counts as a decrease
        better = ((f_t < f_m) | (inside & (f_t <= f_m + noise * f_m.abs()))) & ~done
        keep = ~better & ~done
        below = t < m
        a = torch.where(better & ~below, m, torch.where(keep & below, t, a))
        b = torch.where(better & below, m, torch.where(keep & ~below, t, b))
        m = torch.where(better, t, m)
        f_m = torch.where(better, f_t, f_m)
        g = torch.where(better, d1.sum(1), g)
        h = torch.where(better, d2.sum(1), h)
    f_m = penalty.ranked(m[:, None] - x, c, alpha).sum(1)
    return m, f_m, ~done


def _truncated_quadratic(penalty: Penalty, x: Tensor, c: Tensor, alpha: Tensor,
                         settings: SolverSettings, work: tuple[Tensor, Tensor], mean: Tensor):
    r, n = x.shape
    xs = x.sort(1).values
    ref = xs[:, n // 2: n // 2 + 1]
    centred = (xs - ref).double()
    zero = centred.new_zeros(r, 1)
    p1 = torch.cat([zero, centred.cumsum(1)], 1)
    p2 = torch.cat([zero, (centred * centred).cumsum(1)], 1)
    cd = c.double()
    breaks = torch.cat([centred - cd, centred + cd], 1).sort(1).values
    centres = torch.cat([breaks, 0.5 * (breaks[:, 1:] + breaks[:, :-1])], 1)
    first = torch.searchsorted(centred, centres - cd, side="left")
    last = torch.searchsorted(centred, centres + cd, side="right")
    count = (last - first).to(centred.dtype)
    s1 = p1.gather(1, last) - p1.gather(1, first)
    s2 = p2.gather(1, last) - p2.gather(1, first)
    sse = torch.where(count > 0, s2 - s1 * s1 / count.clamp_min(1), torch.zeros_like(s2))
    bound = 0.5 * sse + 0.5 * cd * cd * (n - count)
    m = min(_WINDOWS, bound.shape[1])
    pick = bound.topk(m, dim=1, largest=False).indices
    j0, j1 = first.gather(1, pick), last.gather(1, pick)  # (r, m) windows [j0, j1)
    index = torch.arange(n, device=x.device)
    inside = (index >= j0[:, :, None]) & (index < j1[:, :, None])  # (r, m, n)
    means = (xs[:, None, :] * inside).sum(2) / inside.sum(2).clamp_min(1)
    values = _objective(penalty, means, x, c, alpha)
    y = means.gather(1, values.argmin(1, keepdim=True)).squeeze(1)
    for _ in range(2):  # inlier-mean (majorise–minimise) polish
        inlier = ((y[:, None] - x).abs() <= c).to(x.dtype)
        y = torch.where(inlier.sum(1) > 0, (x * inlier).sum(1) / inlier.sum(1).clamp_min(1), y)
    y = _inside(y, xs[:, 0], xs[:, -1])
    return y, torch.zeros(r, dtype=torch.bool, device=x.device)
