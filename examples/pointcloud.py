"""Point-cloud classification under outliers with robust global pooling (the seed's Tables 3.1/3.2).

A PointNet-style classifier: a shared per-point MLP ``3 → w1 → w2 → C`` (BatchNorm, ReLU; the
last layer without ReLU), a **global pooling** ``(B, C, N) → (B, C)`` and an MLP head. The pooling
is max, mean, or robust pooling ``y_c = argmin_u Σ_i φ(u − x_ci; c[, α])`` (``ddnlib.nodes``) with
the outlier threshold ``c`` fixed or learned (and Barron's shape ``α`` learned for ``general``).

Protocol (the seed's): train on clean clouds, then evaluate with a fraction ``ρ`` of each test
cloud's points **replaced** by points uniform in the unit ball, ``ρ ∈ {0, 1, 10, 20, …, 90}%``.
``--mode outliers`` instead trains one model per rate with outliers at that rate (fresh outliers
each batch) and tests it at the same rate.

Writes to ``--out``: ``table.txt`` (rows: pooling, columns: outlier rate, top-1 %),
``accuracy.csv``, ``accuracy.png``, ``trajectory.csv`` / ``trajectory.png`` (learned ``c``, ``α``
per step), ``timing.csv`` (pooling forward and forward+backward ms per batch), ``checkpoints/*.pt``.

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

__all__ = ["PointNet", "make_pooling", "POOLINGS", "DEFAULT_POOLINGS", "main"]

ROBUST = ("pseudo_huber", "huber", "welsch", "truncated_quadratic", "general")
POOLINGS = ("max", "mean") + tuple(f"{p}:{m}" for p in ROBUST for m in ("fixed", "learned"))
DEFAULT_POOLINGS = (
    "max", "mean",
    "pseudo_huber:fixed", "pseudo_huber:learned",
    "huber:fixed", "huber:learned",
    "welsch:learned",
)  # fmt: skip
DEFAULT_RATES = (0, 1, 10, 20, 30, 40, 50, 60, 70, 80, 90)


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
    """``(B, N, 3) → (B, classes)`` logits: shared MLP, global pooling, MLP head."""

    def __init__(self, num_classes: int, pooling: nn.Module, widths=(32, 64, 64), dropout=0.3):
        super().__init__()
        layers, d = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(d, w, 1), nn.BatchNorm1d(w)]
            if i < len(widths) - 1:
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
    p.add_argument("--per-class", type=int, default=40, help="embedded data: training clouds per class")
    p.add_argument("--test-per-class", type=int, default=16, help="embedded data: test clouds per class")
    p.add_argument("--classes", type=int, default=len(shapes.CLASSES), help="embedded data: classes")
    p.add_argument("--widths", default="32,64,64", help="per-point MLP widths")
    p.add_argument("--c", type=float, default=1.0, help="fixed c, and initial value of learned c")
    p.set_defaults(epochs=8, lr=3e-3)
    return p


def _csv_ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected comma-separated integers") from None


def load_data(args) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """``(train_x, train_y, test_x, test_y, class_names)``; clouds ``(n, num_points, 3)``."""
    if args.data == "shapes":
        kw = dict(seed=args.seed, num_points=args.num_points, num_classes=args.classes)
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


def time_pooling(pool: nn.Module, features: Tensor, repeats: int = 5) -> tuple[float, float]:
    """Median forward and median forward+backward ms of ``pool`` on a feature batch ``(B, C, N)``."""
    x = features.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            pool(x)

    def fwd_bwd():
        pool(x).sum().backward()

    return common.median_ms(fwd, repeats), common.median_ms(fwd_bwd, repeats)


def _plot(out: Path, rates, results: dict, trajectories: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, accs in results.items():
        style = "--" if name.endswith(":fixed") else "-"
        ax.plot(rates, accs, style, marker="o", ms=3, label=name)
    ax.set(xlabel="outlier rate (%)", ylabel="top-1 accuracy (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, out / "accuracy.png")
    if not trajectories:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, hist in trajectories.items():
        for key in [k for k in hist[0] if k.endswith((".c", ".alpha"))]:
            ax.plot([h["step"] for h in hist], [h[key] for h in hist], label=f"{name} {key.split('.')[-1]}")
    ax.set(xlabel="training step", ylabel="learned value", title="learned c and α during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    common.save_figure(fig, out / "trajectory.png")


def run(args) -> dict:
    """The study; returns ``{pooling: [accuracy per rate]}``."""
    started = time.perf_counter()
    device = common.resolve_device(args.device)
    common.set_seed(args.seed, args.threads, device)
    specs = list(POOLINGS) if args.poolings == "all" else [s.strip() for s in args.poolings.split(",") if s.strip()]
    for s in specs:
        if s not in POOLINGS:
            raise ValueError(f"--poolings: {s!r} is not one of {', '.join(POOLINGS)}")
    rates = _csv_ints(args.rates, "rates")
    if any(not 0 <= r <= 100 for r in rates):
        raise ValueError(f"--rates {args.rates!r}: expected percentages in [0, 100]")
    widths = tuple(_csv_ints(args.widths, "widths"))
    train_x, train_y, test_x, test_y, names = load_data(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    print(f"data: {args.data}, {len(train_y)} train / {len(test_y)} test clouds, {len(names)} classes, "
          f"{train_x.shape[1]} points; mode {args.mode}; device {device}", flush=True)
    # the same outliers for every pooling: one fixed test set per rate
    tests = {r: shapes.add_outliers(test_x, r / 100, _outlier_generator(args.seed, r, 1)) for r in rates}
    results, trajectories, timing, rows, steps = {}, {}, [], [], []
    train_rates = rates if args.mode == "outliers" else [None]
    for spec in specs:
        accs = []
        for train_rate in train_rates:
            torch.manual_seed(args.seed)
            model = PointNet(len(names), make_pooling(spec, args.c), widths).to(device)
            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            shuffle = torch.Generator().manual_seed(args.seed)
            augment = None
            if train_rate:
                gen = _outlier_generator(args.seed, train_rate, 0)
                augment = lambda x, r=train_rate, g=gen: shapes.add_outliers(x, r / 100, g)  # noqa: E731
            label = spec if train_rate is None else f"{spec} @{train_rate}%"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NonConvergenceWarning)
                t0 = time.perf_counter()
                history = common.train(
                    model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size,
                    optimizer=opt, generator=shuffle, device=device, augment=augment, desc=label,
                    progress=progress,
                )  # fmt: skip
                train_s = time.perf_counter() - t0
                eval_rates = rates if train_rate is None else [train_rate]
                accs += [common.accuracy(model, tests[r], test_y, 2 * args.batch_size, device) for r in eval_rates]
            unconverged = _count_nonconvergence(caught)
            tag = spec.replace(":", "-") + ("" if train_rate is None else f"-train{train_rate}")
            common.save_checkpoint(out / "checkpoints" / f"{tag}.pt", model, pooling=spec,
                                   train_rate=train_rate, seed=args.seed, epochs=args.epochs)
            learned = common.learned_values(model)
            if learned:
                trajectories[label] = history
                steps += [{"pooling": spec, "train_rate": train_rate, **h} for h in history]
            print(f"  {label:<24} train {train_s:6.1f}s  acc {accs[-len(eval_rates)]:5.1f}% at {eval_rates[0]}%  "
                  + " ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in learned.items())
                  + (f"  [{unconverged}]" if unconverged else ""), flush=True)
        results[spec] = accs
        rows += [{"pooling": spec, "mode": args.mode, "outlier_rate": r, "accuracy": a} for r, a in zip(rates, accs)]
        # forward/backward time of the pooling alone, on this model's features of a test batch
        model.eval()
        with torch.no_grad():
            feats = model.point_features(tests[rates[-1]][: args.batch_size].to(device))
        fwd_ms, both_ms = time_pooling(model.pool, feats)
        timing.append({"pooling": spec, "batch": tuple(feats.shape), "forward_ms": round(fwd_ms, 3),
                       "forward_backward_ms": round(both_ms, 3)})
    title = f"top-1 accuracy (%), {'trained clean' if args.mode == 'clean' else 'trained with outliers'}"
    table = common.format_table("pooling \\ outliers %", specs, [str(r) for r in rates], results.values())
    timing_table = "\n".join(f"{t['pooling']:<22} forward {t['forward_ms']:8.2f} ms   forward+backward "
                             f"{t['forward_backward_ms']:8.2f} ms" for t in timing)
    (out / "table.txt").write_text(f"{title}\n{table}\n\npooling time per batch {timing[0]['batch']}\n{timing_table}\n")
    common.write_csv(out / "accuracy.csv", rows)
    common.write_csv(out / "timing.csv", timing)
    if steps:
        common.write_csv(out / "trajectory.csv", steps)
    _plot(out, rates, results, trajectories, title)
    print(f"\n{title}\n{table}\n\npooling time per batch {timing[0]['batch']}\n{timing_table}")
    print(f"\nwritten to {out}/: table.txt accuracy.csv accuracy.png timing.csv trajectory.csv checkpoints/"
          f"\ntotal {time.perf_counter() - started:.0f} s wall, {time.process_time():.0f} s CPU")
    return results


def main(argv=None) -> int:
    return common.run_program(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
