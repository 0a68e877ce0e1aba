"""Point-cloud classification under outliers with robust global pooling (the seed's Tables 3.1/3.2).

A PointNet-style classifier: a shared per-point MLP ``3 → w1 → w2 → C`` (BatchNorm, ReLU; the
last layer without ReLU), a **global pooling** ``(B, C, N) → (B, C)`` and an MLP head. The pooling
is max, mean, or robust pooling ``y_c = argmin_u Σ_i φ(u − x_ci; c[, α])`` (``ddnlib.nodes``) with
the outlier threshold ``c`` fixed or learned (and Barron's shape ``α`` learned for ``general``).

Protocol (the seed's): train on clean clouds, then evaluate with a fraction ``ρ`` of each test
cloud's points **replaced** by points uniform in the unit ball, ``ρ ∈ {0, 1, 10, 20, …, 90}%``.
``--mode outliers`` instead trains one model per rate with outliers at that rate (fresh outliers
each batch) and tests it at the same rate.

Every model is trained once per seed (``--seeds``, default three; a seed fixes the data set, the
initialisation, the shuffling and the outliers) and evaluated by top-1 accuracy and mean average
precision (``common.mean_average_precision``: scikit-learn's per-class average precision, macro
mean); results are mean ± sample standard deviation over the seeds.

Prints and writes to ``--out``: ``table.txt`` — ours beside the seed's published Table 3.2
(``--mode clean``) or Table 3.1 (``--mode outliers``) in the seed's layout, the full table for every
pooling, the learned ``c`` (``α``) at the end of training, the pooling's forward/backward time;
``accuracy.csv`` (per seed), ``summary.csv`` (mean, std, the seed's value), ``learned.csv`` (final
learned values per seed), ``timing.csv``, ``trajectory.csv`` (learned values per step),
``accuracy.png`` (top-1 and mAP against the outlier rate, ours and the seed's), ``trajectory.png``,
``checkpoints/*.pt``.

    python examples/pointcloud.py --out out/pointcloud
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ddnlib import NonConvergenceWarning, Options

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loaders  # noqa: E402
import shapes  # noqa: E402

__all__ = ["PointNet", "make_pooling", "POOLINGS", "DEFAULT_POOLINGS", "SEED_COLUMNS", "SEED_TABLE_3_2",
           "SEED_TABLE_3_1", "side_by_side", "main"]

ROBUST = ("pseudo_huber", "huber", "welsch", "truncated_quadratic", "general")
POOLINGS = ("max", "mean") + tuple(f"{p}:{m}" for p in ROBUST for m in ("fixed", "learned"))
DEFAULT_POOLINGS = ("max", "mean", "pseudo_huber:learned", "huber:learned", "welsch:learned")
DEFAULT_RATES = (0, 1, 10, 20, 30, 40, 50, 60, 70, 80, 90)

# The seed's columns (W. Du 2021, docs/experiments.md): M max, Q quadratic = mean, PH/H/W adaptive
# (learned c) pseudo-Huber / Huber / Welsch, TQ truncated quadratic with fixed c.
SEED_COLUMNS = {"M": "max", "Q": "mean", "PH": "pseudo_huber:learned", "H": "huber:learned",
                "W": "welsch:learned", "TQ": "truncated_quadratic:fixed"}
_T32 = """
0  88.4 84.7 86.6 86.7 85.9 85.4 95.6 93.8 95.0 95.7 95.5 93.8
1  32.6 84.9 86.6 86.8 85.8 85.3 48.6 93.8 95.0 95.7 95.5 93.0
10 6.47 83.9 86.4 86.4 85.6 85.9 8.20 93.4 94.7 95.4 94.8 93.9
20 5.95 79.6 84.9 83.8 83.9 84.9 7.73 91.9 94.0 94.6 93.9 94.6
30 5.55 70.9 79.5 78.0 81.8 83.2 6.00 87.8 91.4 91.5 92.5 92.8
40 5.35 55.3 69.4 68.9 74.1 75.6 6.41 77.6 86.5 85.4 88.0 90.6
50 4.86 32.9 52.8 58.8 62.5 57.9 5.68 62.3 76.5 75.5 80.9 85.3
60 4.42 14.5 34.4 41.6 48.0 30.6 5.08 39.1 58.7 64.4 66.7 68.5
70 4.25 5.03 20.4 21.2 28.7 11.9 4.66 22.5 40.3 49.0 48.8 47.9
80 3.11 4.10 9.20 6.70 13.6 5.11 4.21 10.8 27.2 35.9 35.8 26.7
90 3.72 4.06 5.40 4.80 7.10 4.22 4.49 8.20 17.2 18.9 17.1 9.78
"""
#: The seed's Table 3.2 (PointNet, ModelNet40, trained clean): ``{rate: {metric: {column: value}}}``,
#: metric ``"top1"`` (%) or ``"map"`` (×100).
SEED_TABLE_3_2 = {
    int(r): {"top1": dict(zip(SEED_COLUMNS, map(float, v[:6]))), "map": dict(zip(SEED_COLUMNS, map(float, v[6:])))}
    for r, *v in (line.split() for line in _T32.strip().splitlines())
}
#: The seed's Table 3.1 (outliers in training and testing at the same rate), top-1 % only.
SEED_TABLE_3_1 = {
    r: {"top1": dict(zip(SEED_COLUMNS, v))}
    for r, *v in [(0, 88.4, 84.7, 85.7, 86.8, 85.5, 85.4), (10, 79.4, 84.3, 86.4, 87.0, 85.7, 85.5),
                  (20, 76.2, 84.8, 85.9, 86.9, 85.5, 85.5), (50, 72.0, 84.0, 84.5, 84.5, 84.9, 83.9),
                  (90, 29.7, 61.7, 65.7, 65.4, 66.4, 61.8)]
}
METRICS = {"top1": "top-1 accuracy (%)", "map": "mAP ×100"}


class MaxPool(nn.Module):
    """``(B, C, N) → (B, C)``: max over points."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(-1)


class MeanPool(nn.Module):
    """``(B, C, N) → (B, C)``: mean over points (robust pooling with the quadratic penalty)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(-1)


def make_pooling(spec: str, c: float = 1.0) -> nn.Module:
    """The pooling module for ``spec`` (one of :data:`POOLINGS`); ``c`` is the (initial) threshold."""
    if spec not in POOLINGS:
        raise ValueError(f"pooling {spec!r}: expected one of {', '.join(POOLINGS)}")
    if spec == "max":
        return MaxPool()
    if spec == "mean":
        return MeanPool()
    from ddnlib import nodes

    penalty, mode = spec.split(":")
    learn = mode == "learned"
    # Non-convex penalties: a few starts and a short iteration cap keep training affordable on a
    # CPU; rows left unconverged are reported as NonConvergenceWarning and counted by the study.
    nonconvex = penalty in ("welsch", "general")
    options = Options(max_iter=20) if nonconvex else None
    return nodes.RobustGlobalPool1d(penalty, c=c, learn_c=learn, learn_alpha=learn and penalty == "general",
                                    starts=8 if nonconvex else 64, options=options)


class PointNet(nn.Module):
    """``(B, N, 3) → (B, classes)`` logits: shared MLP, global pooling, MLP head. With
    ``relu_before_pool`` the last point-wise layer ends with a ReLU like the others; without it
    (PointNet's original) it is linear, so mean pooling commutes with it and pools only the
    ``widths[-2]`` features of the layer before (docs/experiments.md: the clean-accuracy gap)."""

    def __init__(self, num_classes: int, pooling: nn.Module, widths=(32, 64, 64), dropout=0.3,
                 relu_before_pool: bool = True):
        super().__init__()
        layers, d = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(d, w, 1), nn.BatchNorm1d(w)]
            if i < len(widths) - 1 or relu_before_pool:
                layers.append(nn.ReLU())
            d = w
        self.features = nn.Sequential(*layers)
        self.pool = pooling
        self.head = nn.Sequential(
            nn.Linear(d, d // 2), nn.BatchNorm1d(d // 2), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(d // 2, num_classes),
        )  # fmt: skip

    def point_features(self, points: Tensor) -> Tensor:
        """Per-point features ``(B, C, N)``."""
        return self.features(points.transpose(1, 2))

    def forward(self, points: Tensor) -> Tensor:
        return self.head(self.pool(self.point_features(points)))


def _parser():
    p = common.base_parser(__doc__.split("\n")[0], "out/pointcloud")
    p.add_argument("--data", default="shapes", choices=("shapes", "modelnet40", "modelnet40-txt"),
                   help="embedded parametric shapes, or ModelNet40 (HDF5 / text files) in --data-dir")
    p.add_argument("--poolings", default=",".join(DEFAULT_POOLINGS),
                   help=f"comma-separated, from: {', '.join(POOLINGS)}; or 'all'")
    p.add_argument("--mode", default="clean", choices=("clean", "outliers"),
                   help="train on clean clouds (test at every rate) or with outliers at each rate")
    p.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="outlier rates, percent")
    p.add_argument("--num-points", type=int, default=256, help="points per cloud")
    p.add_argument("--per-class", type=int, default=80, help="embedded data: training clouds per class")
    p.add_argument("--test-per-class", type=int, default=16, help="embedded data: test clouds per class")
    p.add_argument("--classes", type=int, default=len(shapes.CLASSES), help="embedded data: classes")
    p.add_argument("--widths", default="32,64,64", help="per-point MLP widths")
    p.add_argument("--linear-features", action="store_true",
                   help="no ReLU after the last point-wise layer (PointNet's original; mean pooling then "
                        "pools only the features of the layer before)")
    p.add_argument("--c", type=float, default=1.0, help="fixed c, and initial value of learned c")
    p.set_defaults(epochs=16, lr=3e-3)
    return p


def _csv_ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected comma-separated integers") from None


def load_data(args, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """``(train_x, train_y, test_x, test_y, class_names)``; clouds ``(n, num_points, 3)``. The
    embedded data set is drawn anew for each seed; a real data set is the same for every seed."""
    if args.data == "shapes":
        kw = dict(seed=seed, num_points=args.num_points, num_classes=args.classes)
        tx, ty = shapes.make_dataset("train", args.per_class, **kw)
        vx, vy = shapes.make_dataset("test", args.test_per_class, **kw)
        return tx, ty, vx, vy, list(shapes.CLASSES)[: args.classes]
    load = loaders.load_modelnet40_h5 if args.data == "modelnet40" else loaders.load_modelnet40_txt
    tx, ty, names = load(args.data_dir, "train", args.num_points)
    vx, vy, _ = load(args.data_dir, "test", args.num_points)
    return tx, ty, vx, vy, names


def _outlier_generator(seed: int, rate: int, split: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 101 * rate + split)


def _count_nonconvergence(caught: list) -> str:
    """Re-issue the warnings caught during a run, except the pooling solver's non-convergence
    reports, which are summarised (how many calls left rows unconverged)."""
    count = 0
    for w in caught:
        if issubclass(w.category, NonConvergenceWarning):
            count += 1
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return f"{count} pooling calls left a few rows unconverged (NonConvergenceWarning)" if count else ""


def time_pooling(pool: nn.Module, features: Tensor, repeats: int = 7) -> tuple[float, float, float]:
    """Median forward, backward and forward+backward ms of ``pool`` on a feature batch ``(B, C, N)``
    (with gradients for the input and the learned parameters, as in training). Each call times
    its forward and its backward separately, after one warm-up call, so forward+backward ≥ forward."""
    x = features.detach().clone().requires_grad_(True)
    fwd, bwd = [], []
    for k in range(repeats + 1):
        t0 = time.perf_counter()
        y = pool(x)
        t1 = time.perf_counter()
        y.sum().backward()
        t2 = time.perf_counter()
        if k:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    pool.zero_grad(set_to_none=True)
    med = lambda v: 1e3 * float(torch.tensor(v).median())  # noqa: E731
    return med(fwd), med(bwd), med([f + b for f, b in zip(fwd, bwd)])


def side_by_side(metric: str, rates: list[int], results: dict, seed_table: dict) -> str:
    """Ours (mean±std over seeds) beside the seed's number for each of the seed's columns, one row
    per outlier rate: the layout of the seed's tables. ``results[pooling][metric]`` is an array
    ``(seeds, rates)``; a pooling not run, or a rate the seed did not publish, prints '-'."""
    cols = [k for k, spec in SEED_COLUMNS.items()]
    names, cells = [], []
    for j, r in enumerate(rates):
        row = []
        for k in cols:
            ours = results.get(SEED_COLUMNS[k], {}).get(metric)
            row.append(None if ours is None else common.format_mean_std(ours[:, j]))
            theirs = seed_table.get(r, {}).get(metric, {}).get(k)
            row.append(None if theirs is None else f"{theirs:.2f}" if theirs < 10 else f"{theirs:.1f}")
        names.append(str(r))
        cells.append(row)
    key = ", ".join(f"{k} {spec}" for k, spec in SEED_COLUMNS.items())
    return (common.format_table("outliers %", names, ["ours", "seed"] * len(cols), cells, [(k, 2) for k in cols])
            + f"\n({key}; '-': not run here / not published)")


def _color(spec: str, specs: list[str]) -> str:
    seed_specs = list(SEED_COLUMNS.values())
    if spec in seed_specs:
        return f"C{seed_specs.index(spec)}"
    return f"C{len(seed_specs) + [s for s in specs if s not in seed_specs].index(spec)}"


def _plot(out: Path, rates, results: dict, learned_rows: list, trajectories: dict, args, seed_table: dict,
          seeds: list[int]) -> list[str]:
    """``accuracy.png`` and (when something was learned) ``trajectory.png``; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    specs = list(results)
    ours_label = f"ours: {args.data}, mean ± std over {common.plural(len(seeds), 'seed')}"
    seed_label = "the seed: ModelNet40, " + ("Table 3.2" if args.mode == "clean" else "Table 3.1")
    metrics = [m for m in METRICS if args.mode == "clean" or m == "top1"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.2 * len(metrics), 4.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for spec in specs:
            a = results[spec][metric]
            m, s = a.mean(0), a.std(0, ddof=1) if len(a) > 1 else 0 * a[0]
            ax.plot(rates, m, "-", marker="o", ms=3, color=_color(spec, specs), label=spec)
            ax.fill_between(rates, m - s, m + s, color=_color(spec, specs), alpha=0.15, lw=0)
            key = next((k for k, v in SEED_COLUMNS.items() if v == spec), None)
            pts = [(r, seed_table[r][metric][key]) for r in sorted(seed_table) if key and metric in seed_table[r]]
            if pts:
                ax.plot(*zip(*pts), "--", marker="x", ms=4, color=_color(spec, specs), alpha=0.8)
        where = "tested" if args.mode == "clean" else "trained and tested"
        ax.set(xlabel=f"outlier rate (%) of the {where} clouds", ylabel=METRICS[metric], ylim=(0, 100),
               xlim=(min(rates) - 2, max(rates) + 2), title=f"{METRICS[metric].split(' (')[0]} against outlier rate")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=_color(s, specs), lw=2, label=s) for s in specs]
    handles += [Line2D([], [], color="k", ls="-", marker="o", ms=3, label=ours_label),
                Line2D([], [], color="k", ls="--", marker="x", ms=4, label=seed_label)]
    ncol = 4 if len(metrics) > 1 else 2  # one panel: a narrower legend, so nothing is cut off
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.suptitle("Point-cloud classification with " + ("outliers at test time only (trained clean)"
                 if args.mode == "clean" else "outliers in training and test"), fontsize=11)
    rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, min(0.45, 0.035 * rows + 0.04), 1, 1))
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    if not trajectories:
        return ["accuracy.png"]
    keys = sorted({k.split(".")[-1] for hist in trajectories.values() for h in hist[0] for k in h if k.endswith((".c", ".alpha"))},
                  key=["c", "alpha"].index)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.3), squeeze=False)
    train_rates = sorted({label[1] for label in trajectories}, key=lambda r: -1 if r is None else r)
    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
    for ax, key in zip(axes[0], keys):
        for (spec, rate), hists in trajectories.items():
            name = next((k for k in hists[0][0] if k.endswith("." + key)), None)
            if name is None:
                continue
            n = min(len(h) for h in hists)
            v = torch.tensor([[h[i][name] for i in range(n)] for h in hists], dtype=torch.float64)
            step = [hists[0][i]["step"] for i in range(n)]
            label = spec if rate is None else f"{spec}, {rate}% outliers"
            ls = styles[train_rates.index(rate) % len(styles)]
            ax.plot(step, v.mean(0), ls=ls, color=_color(spec, specs), label=label)
            if len(hists) > 1:
                ax.fill_between(step, v.min(0).values, v.max(0).values, color=_color(spec, specs), alpha=0.12, lw=0)
        ax.set(xlabel="training step", ylabel={"c": "learned threshold c", "alpha": "learned shape α"}[key],
               title=f"learned {'c' if key == 'c' else 'α'} (mean over {common.plural(len(seeds), 'seed')}, band: min–max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", ncol=2 if len(trajectories) > 6 else 1)
    common.save_figure(fig, out / "trajectory.png")
    return ["accuracy.png", "trajectory.png"]


def run(args) -> dict:
    """The study; returns ``{pooling: {"top1": array (seeds, rates), "map": array (seeds, rates)}}``."""
    started, cpu0 = time.perf_counter(), time.process_time()
    device = common.resolve_device(args.device)
    seeds = common.parse_seeds(args.seeds)
    specs = list(POOLINGS) if args.poolings == "all" else [s.strip() for s in args.poolings.split(",") if s.strip()]
    for s in specs:
        if s not in POOLINGS:
            raise ValueError(f"--poolings: {s!r} is not one of {', '.join(POOLINGS)}")
    rates = _csv_ints(args.rates, "rates")
    if not rates or any(not 0 <= r <= 100 for r in rates):
        raise ValueError(f"--rates {args.rates!r}: expected percentages in [0, 100]")
    widths = tuple(_csv_ints(args.widths, "widths"))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    train_rates = rates if args.mode == "outliers" else [None]
    per_seed = {spec: {m: [] for m in METRICS} for spec in specs}
    rows, learned_rows, steps, timing, trajectories, train_times = [], [], [], [], {}, {s: 0.0 for s in specs}
    for si, seed in enumerate(seeds):
        common.set_seed(seed, args.threads, device)
        train_x, train_y, test_x, test_y, names = load_data(args, seed)
        if si == 0:
            print(f"data: {args.data}, {len(train_y)} train / {len(test_y)} test clouds, {len(names)} classes, "
                  f"{train_x.shape[1]} points; widths {widths}{' (linear last layer)' if args.linear_features else ''}; "
                  f"mode {args.mode}; {args.epochs} epochs; seeds {seeds}; device {device}",
                  flush=True)
        # the same outliers for every pooling: one fixed test set per rate and seed
        tests = {r: shapes.add_outliers(test_x, r / 100, _outlier_generator(seed, r, 1)) for r in rates}
        for spec in specs:
            got = {m: [] for m in METRICS}
            for train_rate in train_rates:
                torch.manual_seed(seed)
                model = PointNet(len(names), make_pooling(spec, args.c), widths,
                                 relu_before_pool=not args.linear_features).to(device)
                opt = torch.optim.Adam(model.parameters(), lr=args.lr)
                shuffle = torch.Generator().manual_seed(seed)
                augment = None
                if train_rate:
                    gen = _outlier_generator(seed, train_rate, 0)
                    augment = lambda x, r=train_rate, g=gen: shapes.add_outliers(x, r / 100, g)  # noqa: E731
                label = spec if train_rate is None else f"{spec} @{train_rate}%"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", NonConvergenceWarning)
                    t0 = time.perf_counter()
                    history = common.train(
                        model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size,
                        optimizer=opt, generator=shuffle, device=device, augment=augment,
                        desc=f"{label} seed {seed}", progress=progress,
                    )  # fmt: skip
                    train_s = time.perf_counter() - t0
                    train_times[spec] += train_s
                    eval_rates = rates if train_rate is None else [train_rate]
                    for r in eval_rates:
                        top1, ap = common.evaluate(model, tests[r], test_y, 2 * args.batch_size, device)
                        got["top1"].append(top1)
                        got["map"].append(ap)
                        rows.append({"pooling": spec, "mode": args.mode, "seed": seed, "train_rate": train_rate,
                                     "outlier_rate": r, "top1": round(top1, 4), "map": round(ap, 4)})
                unconverged = _count_nonconvergence(caught)
                tag = spec.replace(":", "-") + ("" if train_rate is None else f"-train{train_rate}") + f"-seed{seed}"
                common.save_checkpoint(out / "checkpoints" / f"{tag}.pt", model, pooling=spec,
                                       train_rate=train_rate, seed=seed, epochs=args.epochs)
                learned = common.learned_values(model)
                if learned:
                    trajectories.setdefault((spec, train_rate), []).append(history)
                    steps += [{"pooling": spec, "train_rate": train_rate, "seed": seed, **h} for h in history]
                    learned_rows += [{"pooling": spec, "train_rate": 0 if train_rate is None else train_rate,
                                      "seed": seed, "name": k, "value": v} for k, v in learned.items()]
                first = len(got["top1"]) - len(eval_rates)
                print(f"  seed {seed}  {label:<26} train {train_s:6.1f}s  top-1 {got['top1'][first]:5.1f}%  "
                      f"mAP {got['map'][first]:5.1f} at {eval_rates[0]}%  "
                      + " ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in learned.items())
                      + (f"  [{unconverged}]" if unconverged else ""), flush=True)
            for m in METRICS:
                per_seed[spec][m].append(got[m])
            if si == 0:  # forward/backward time of the pooling alone, on this model's features of a test batch
                model.eval()
                with torch.no_grad():
                    feats = model.point_features(tests[rates[-1]][: args.batch_size].to(device))
                fwd_ms, bwd_ms, both_ms = time_pooling(model.pool, feats)
                timing.append({"pooling": spec, "batch": "x".join(map(str, feats.shape)), "forward_ms": round(fwd_ms, 3),
                               "backward_ms": round(bwd_ms, 3), "forward_backward_ms": round(both_ms, 3)})
    import numpy as np

    results = {spec: {m: np.asarray(v, dtype=float) for m, v in per_seed[spec].items()} for spec in specs}
    seed_table = SEED_TABLE_3_2 if args.mode == "clean" else SEED_TABLE_3_1
    seed_name = ("Table 3.2 (trained clean, outliers at test only)" if args.mode == "clean"
                 else "Table 3.1 (outliers in training and test, same rate; top-1 only)")
    spread = f"mean±std (sample std) over seeds {','.join(map(str, seeds))}"
    parts = []
    for m in METRICS:
        if args.mode == "outliers" and m == "map":
            continue
        parts.append(f"{METRICS[m]}, ours ({args.data}, {len(names)} classes; {spread}) beside the seed's {seed_name}, "
                     f"ModelNet40, 40 classes\n" + side_by_side(m, rates, results, seed_table))
    for m in METRICS:
        cells = [[common.format_mean_std(results[s][m][:, j]) for j in range(len(rates))] for s in specs]
        where = "test outlier %" if args.mode == "clean" else "train = test outlier %"
        parts.append(f"{METRICS[m]}, every pooling ({spread})\n"
                     + common.format_table(f"pooling \\ {where}", specs, [str(r) for r in rates], cells))
    if learned_rows:
        keys = sorted({(r["pooling"], r["name"].split(".")[-1]) for r in learned_rows}, key=lambda k: (specs.index(k[0]), k[1]))
        trs = sorted({r["train_rate"] for r in learned_rows})
        cells = [[common.format_mean_std([r["value"] for r in learned_rows if (r["pooling"], r["name"].split(".")[-1]) == k
                                          and r["train_rate"] == t] or None, 3) for t in trs] for k in keys]
        parts.append(f"learned values at the end of training ({spread}; initial c = {args.c:g}, α = 1)\n"
                     + common.format_table("pooling, value \\ train outlier %", [f"{p} {n}" for p, n in keys],
                                           [str(t) for t in trs], cells))
    t_cells = [[t["forward_ms"], t["backward_ms"], t["forward_backward_ms"], round(train_times[t["pooling"]], 1)]
               for t in timing]
    parts.append(f"pooling time per batch {timing[0]['batch']} (ms, median of 7 calls, seed {seeds[0]}'s trained model, "
                 f"{rates[-1]}% outliers; forward with autograd recording) and total training time (s, all seeds)\n"
                 + common.format_table("pooling", specs, ["forward ms", "backward ms", "fwd+bwd ms", "train s"],
                                       [[f"{v:.2f}" for v in row[:3]] + [f"{row[3]:.1f}"] for row in t_cells]))
    report = "\n\n".join(parts)
    (out / "table.txt").write_text(report + "\n")
    summary = []
    for spec in specs:
        key = next((k for k, v in SEED_COLUMNS.items() if v == spec), None)
        for j, r in enumerate(rates):
            row = {"pooling": spec, "mode": args.mode, "outlier_rate": r, "seeds": len(seeds)}
            for m in METRICS:
                mean, std = common.mean_std(results[spec][m][:, j])
                row |= {f"{m}_mean": round(mean, 3), f"{m}_std": round(std, 3),
                        f"seed_{m}": seed_table.get(r, {}).get(m, {}).get(key) if key else None}
            summary.append(row)
    written = ["table.txt", "accuracy.csv", "summary.csv", "timing.csv"]
    common.write_csv(out / "accuracy.csv", rows)
    common.write_csv(out / "summary.csv", summary)
    common.write_csv(out / "timing.csv", timing)
    if learned_rows:
        common.write_csv(out / "learned.csv", learned_rows)
        common.write_csv(out / "trajectory.csv", steps)
        written += ["learned.csv", "trajectory.csv"]
    written += _plot(out, rates, results, learned_rows, trajectories, args, seed_table, seeds)
    print(f"\n{report}")
    print(f"\nwritten to {out}/: {' '.join(written)} checkpoints/ ({len(specs) * len(train_rates) * len(seeds)} models)"
          f"\ntotal {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU")
    return results


def main(argv=None) -> int:
    return common.run_program(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
