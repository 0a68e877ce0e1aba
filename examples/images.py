"""Image classification with a feature-projection layer (the seed's ResNet-18 table).

A small residual network (3×3 stem, three residual stages, global average pooling) whose
penultimate features ``z ∈ R^d`` go through BatchNorm without affine parameters (the seed's
feature scaling: every feature standardised, so one radius suits all of them), then a
projection ``y = argmin_u ½‖u − z‖²`` s.t. ``‖u‖_p = r`` (sphere) or ``≤ r`` (ball),
``p ∈ {1, 2, ∞}`` (``ddnlib.nodes``), then the linear classifier. The radius is fixed or learned
(``r = exp(ρ)``); its default is the expected norm of a standardised feature vector,
``E‖z‖_p`` for ``z ~ N(0, I_d)``: ``d·√(2/π)`` (L1), ``√d`` (L2), ``≈ √(2 ln d)`` (L∞), times
``--radius-scale``.

About the collapse of the learned L∞ radius that the seed reports (docs/experiments.md):
``linf_ball:learned-seedgrad`` differentiates ``r`` as the seed's code did (a per-sample *sign*
of ``Σ_{i clipped} sign(z_i) ∂ℓ/∂y_i / |clipped|``), the plain ``learned`` variants use the exact
closed form of ``ddnlib.nodes``; ``linf_*:learned-scaled`` feeds ``y / r`` to the classifier, so
``r`` only sets *which* features are clipped and cannot be traded against the classifier's scale.

Data (default ``noisy-digits``): scikit-learn's bundled 8×8 digits made harder so that the plain
network is far from saturation — a random 3×3 square of each image replaced by noise, Gaussian
pixel noise of 0.2 × the value range (``loaders.corrupt_images``), 500 training images, the other
1,297 as the test set; drawn anew for each seed. Every variant is trained once per seed
(``--seeds``, default three) and evaluated by top-1 and mean average precision
(``common.mean_average_precision``).

Prints and writes to ``--out``: ``table.txt`` (no projection, fixed and learned radius and their
paired difference, top-1 and mAP, mean ± std over seeds; the seed's CIFAR-10 and Imagewoof tables in
the same layout; the radii), ``accuracy.csv`` (per seed), ``summary.csv``, ``accuracy.png``,
``trajectory.csv`` / ``trajectory.png`` (learned radius per step), ``checkpoints/*.pt``.

    python examples/images.py --out out/images
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import loaders  # noqa: E402

__all__ = ["ResNet", "make_projection", "default_radius", "PROJECTIONS", "VARIANTS", "DEFAULT_VARIANTS",
           "SEED_RESULTS", "comparison_table", "main"]

PROJECTIONS = ("l1_sphere", "l1_ball", "l2_sphere", "l2_ball", "linf_sphere", "linf_ball")
DEFAULT_VARIANTS = ("none",) + tuple(f"{p}:{m}" for p in PROJECTIONS for m in ("fixed", "learned"))
VARIANTS = DEFAULT_VARIANTS + ("linf_sphere:learned-scaled", "linf_ball:learned-scaled", "linf_ball:learned-seedgrad")
METRICS = {"top1": "top-1 accuracy (%)", "map": "mAP ×100"}
#: The seed's ResNet-18 results (W. Du 2021, Tables 7 and 8): per projection
#: ``(top-1 fixed, top-1 learned, mAP fixed, mAP learned)``; ``none``: ``(top-1, mAP)``.
SEED_RESULTS = {
    "CIFAR-10": {"none": (92.95, 90.27), "l1_sphere": (93.09, 92.91, 91.53, 92.88),
                 "l1_ball": (93.02, 92.64, 88.97, 93.07), "l2_sphere": (93.24, 93.32, 92.87, 94.15),
                 "l2_ball": (93.41, 93.48, 90.93, 94.34)},
    "Imagewoof": {"none": (62.23, 56.57), "l1_sphere": (79.84, 80.99, 74.08, 78.55),
                  "l1_ball": (80.35, 79.23, 72.62, 77.75), "l2_sphere": (79.61, 81.95, 76.78, 80.51),
                  "l2_ball": (80.35, 81.34, 72.86, 80.35)},
}


def default_radius(projection: str, d: int) -> float:
    """``E‖z‖_p`` for ``z ~ N(0, I_d)`` (L∞: the Gumbel approximation of the maximum)."""
    if projection.startswith("l1"):
        return d * math.sqrt(2 / math.pi)
    if projection.startswith("l2"):
        return math.sqrt(d)
    b = math.sqrt(2 * math.log(2 * d))  # max of 2d half-normal tails ≈ max |z_i|
    return b - (math.log(math.log(2 * d)) + math.log(4 * math.pi)) / (2 * b) + 0.5772 / b


class Scaled(nn.Module):
    """``y / r``: the projection's output in units of its radius."""

    def __init__(self, projection: nn.Module):
        super().__init__()
        self.projection = projection

    def forward(self, z: Tensor) -> Tensor:
        return self.projection(z) / self.projection.radius


class _SeedLInfBallFn(torch.autograd.Function):
    """``clamp(z, −r, r)`` with the radius gradient of the seed's published code: per sample,
    ``sign(Σ_{i∈M} σ_i v_i / |M|)`` (``M`` the clipped coordinates, ``σ = sign(z)``), summed
    over the batch. The exact derivative is ``Σ_{i∈M} σ_i v_i`` (no ``1/|M|``, no sign)."""

    @staticmethod
    def forward(ctx, z: Tensor, r: Tensor) -> Tensor:
        ctx.save_for_backward(z, r)
        return torch.maximum(torch.minimum(z, r), -r)

    @staticmethod
    def backward(ctx, v: Tensor):
        z, r = ctx.saved_tensors
        clipped = z.abs() > r
        k = clipped.sum(-1)
        per_sample = (v * z.sign() * clipped).sum(-1) / k.clamp_min(1)
        return v * ~clipped, per_sample.sign().sum().reshape(r.shape)


class _Exp(nn.Module):
    def forward(self, rho: Tensor) -> Tensor:
        return rho.exp()

    def right_inverse(self, r: Tensor) -> Tensor:
        return r.log()


class SeedGradLInfBall(nn.Module):
    """L∞-ball projection with a learned ``r = exp(ρ)`` differentiated as in the seed's code
    (:class:`_SeedLInfBallFn`): reproduces the seed's collapse of ``r`` for comparison."""

    def __init__(self, radius: float):
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)))
        parametrize.register_parametrization(self, "radius", _Exp())

    def forward(self, z: Tensor) -> Tensor:
        return _SeedLInfBallFn.apply(z, self.radius)


def make_projection(variant: str, d: int, radius_scale: float = 1.0) -> nn.Module:
    """The projection layer of ``variant`` (one of :data:`VARIANTS`) for ``d`` features."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if variant == "none":
        return nn.Identity()
    from ddnlib import nodes

    name, mode = variant.split(":")
    cls = {
        "l1_sphere": nodes.L1Sphere, "l1_ball": nodes.L1Ball,
        "l2_sphere": nodes.L2Sphere, "l2_ball": nodes.L2Ball,
        "linf_sphere": nodes.LInfSphere, "linf_ball": nodes.LInfBall,
    }[name]  # fmt: skip
    r0 = radius_scale * default_radius(name, d)
    if mode == "learned-seedgrad":
        return SeedGradLInfBall(r0)
    node = cls(radius=r0, learn_radius=mode != "fixed")
    return Scaled(node) if mode == "learned-scaled" else node


class Block(nn.Module):
    """Basic residual block: ``relu(x̂ + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = (
            nn.Identity() if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.skip(x) + self.body(x))


class ResNet(nn.Module):
    """``(B, C, H, W) → (B, classes)``: stem, stages of widths ``w, 2w, 4w`` (strides 1, 2, 2),
    global average pooling, BatchNorm (no affine), ``projection``, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, projection: nn.Module, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.scale = nn.BatchNorm1d(4 * w, affine=False)
        self.projection = projection
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.projection(self.scale(self.body(x))))


def _parser():
    p = common.base_parser(__doc__.split("\n")[0], "out/images")
    p.add_argument("--data", default="noisy-digits", choices=("noisy-digits", "digits", "cifar10", "folder"),
                   help="scikit-learn's bundled 8x8 digits made harder (occlusion and noise, see "
                        "loaders.corrupt_images), the plain digits, or CIFAR-10 / an image folder in --data-dir")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from: {', '.join(VARIANTS)}; or 'all'")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--image-size", type=int, default=64, help="image folder: side after resize/crop")
    p.add_argument("--radius-scale", type=float, default=1.0, help="factor on the default radius")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                   help="adam, or the seed's SGD (momentum 0.9, weight decay 1e-4)")
    p.add_argument("--radius-lr", type=float, default=None, help="learning rate of the radius (default: --lr)")
    p.add_argument("--limit", type=int, default=None,
                   help="use at most this many training images (noisy-digits: default 500, the rest of the "
                        "1,797 digits is the test set)")
    p.add_argument("--noise", type=float, default=0.2, help="noisy-digits: pixel noise std, fraction of the range")
    p.add_argument("--occlusion", type=int, default=3, help="noisy-digits: side of the random occluding square")
    p.set_defaults(epochs=10, lr=3e-3, batch_size=64)
    return p


def load_data(args, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], int]:
    """``(train_x, train_y, test_x, test_y, class_names, pad)``: standardised float images and
    the translation (pixels) of the training augmentation. The digits are split (and, for
    noisy-digits, corrupted) anew for each seed; a real data set is the same for every seed."""
    if args.data in ("digits", "noisy-digits"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32))[:, None]
        y = torch.from_numpy(digits.target.astype(np.int64))
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(y), generator=gen)
        if args.data == "noisy-digits":
            x = loaders.corrupt_images(x, args.noise, args.occlusion, gen)
            cut = 500 if args.limit is None else args.limit
        else:
            cut = int(0.7 * len(y))
        tx, ty, vx, vy = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
        names, pad = [str(i) for i in range(10)], 1
    elif args.data == "cifar10":
        tx, ty, names = loaders.load_cifar10(args.data_dir, "train")
        vx, vy, _ = loaders.load_cifar10(args.data_dir, "test")
        pad = 4
    else:
        tx, ty, names = loaders.load_image_folder(args.data_dir, "train", args.image_size)
        vx, vy, _ = loaders.load_image_folder(args.data_dir, "val", args.image_size)
        pad = args.image_size // 8
    if args.limit is not None:
        tx, ty = tx[: args.limit], ty[: args.limit]
    tx, vx = loaders.standardize(tx, vx)
    return tx, ty, vx, vy, names, pad


def _tick(projection: str) -> str:
    """``"linf_ball"`` → ``"L∞\nball"``."""
    norm, shape = projection.split("_")
    return f"{norm.upper().replace('LINF', 'L∞')}\n{shape}"


def _plot(out: Path, results: dict, trajectories: dict, seeds: list[int], data: str) -> list[str]:
    """``accuracy.png`` (top-1, mAP and the paired learned − fixed difference per projection) and,
    when a radius was learned, ``trajectory.png``; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projections = [p for p in PROJECTIONS if any(v.startswith(p + ":") for v in results)]
    modes = [m for m in ("fixed", "learned") if any(v.endswith(":" + m) for v in results)]
    colors = {"fixed": "C0", "learned": "C1"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    x = np.arange(len(projections))
    for ax, metric in zip(axes[:2], METRICS):
        if "none" in results:
            m, s = common.mean_std(results["none"][metric])
            ax.axhspan(m - s, m + s, color="0.5", alpha=0.2, lw=0)
            ax.axhline(m, color="0.3", ls="--", lw=1, label=f"no projection ({m:.1f}±{s:.1f})")
        for k, mode in enumerate(modes):
            vals = [results.get(f"{p}:{mode}", {}).get(metric) for p in projections]
            ms = [common.mean_std(v) if v is not None else (np.nan, 0.0) for v in vals]
            ax.bar(x + (k - (len(modes) - 1) / 2) * 0.38, [a for a, _ in ms], 0.36, yerr=[b for _, b in ms],
                   capsize=3, color=colors[mode], label=f"{mode} radius")
        ax.set_xticks(x, [_tick(p) for p in projections])
        ax.set(ylim=(0, 112), yticks=range(0, 101, 20), ylabel=METRICS[metric], title=f"{METRICS[metric]} (mean ± std, {common.plural(len(seeds), 'seed')})")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="upper center", ncol=3, framealpha=0.9)
    ax = axes[2]
    if len(modes) == 2:
        for k, metric in enumerate(METRICS):
            diffs = [results[f"{p}:learned"][metric] - results[f"{p}:fixed"][metric]
                     if f"{p}:learned" in results and f"{p}:fixed" in results else None for p in projections]
            ms = [common.mean_std(d) if d is not None else (np.nan, 0.0) for d in diffs]
            ax.errorbar(x + (k - 0.5) * 0.2, [a for a, _ in ms], yerr=[b for _, b in ms], fmt="os"[k], capsize=3,
                        color=f"C{k + 2}", label={"top1": "top-1 (points)", "map": "mAP ×100"}[metric])
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)
    ax.set_xticks(x, [_tick(p) for p in projections])
    ax.set(ylabel="learned − fixed (same seed)", title="gain of the learned radius (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Projection before the classifier, {data}", fontsize=11)
    common.save_figure(fig, out / "accuracy.png")
    if not trajectories:
        return ["accuracy.png"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    styles = {"learned": "-", "learned-scaled": "--", "learned-seedgrad": ":"}
    for k, (name, hists) in enumerate(trajectories.items()):
        key = next(k for k in hists[0][0] if k.endswith(".radius"))
        n = min(len(h) for h in hists)
        v = torch.tensor([[h[i][key] / h[0][key] for i in range(n)] for h in hists], dtype=torch.float64)
        step = [hists[0][i]["step"] for i in range(n)]
        proj, mode = name.split(":")
        color = f"C{PROJECTIONS.index(proj)}"
        every = max(1, n // 8)  # markers staggered and later lines thinner: coinciding curves stay visible
        ax.plot(step, v.mean(0), ls=styles[mode], color=color, lw=max(0.8, 2.6 - 0.35 * k), label=name,
                marker="os^"[list(styles).index(mode)], markevery=(k * every // len(trajectories), every), ms=4)
        if len(hists) > 1:
            ax.fill_between(step, v.min(0).values, v.max(0).values, color=color, alpha=0.1, lw=0)
    lo, hi = ax.get_ylim()
    log = hi / max(lo, 1e-12) > 4  # a log axis only where the radii spread over a wide range
    ax.set(xlabel="training step", ylabel="learned r / initial r" + (" (log scale)" if log else ""),
           yscale="log" if log else "linear",
           title=f"learned radius during training (mean over {common.plural(len(seeds), 'seed')}, band: min–max)")
    if log:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    common.save_figure(fig, out / "trajectory.png")
    return ["accuracy.png", "trajectory.png"]


def _optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """Adam, or the seed's SGD; the radius has its own learning rate ``--radius-lr``."""
    radius = [p for n, p in model.named_parameters() if "radius" in n]
    rest = [p for n, p in model.named_parameters() if "radius" not in n]
    groups = [{"params": rest}] + ([{"params": radius, "lr": args.radius_lr or args.lr}] if radius else [])
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(groups, lr=args.lr)


def comparison_table(results: dict, seeds_label: str) -> str:
    """Rows: projections; columns: top-1 and mAP of the fixed and learned radius and their paired
    difference (learned − fixed on the same seed), each mean±std over seeds."""
    projections = [p for p in PROJECTIONS if f"{p}:fixed" in results or f"{p}:learned" in results]
    cells = []
    for p in projections:
        row = []
        for metric in METRICS:
            f, g = results.get(f"{p}:fixed", {}).get(metric), results.get(f"{p}:learned", {}).get(metric)
            row += [common.format_mean_std(f), common.format_mean_std(g),
                    None if f is None or g is None else common.format_mean_std(g - f)]
        cells.append(row)
    table = common.format_table("projection", projections, ["fixed", "learned", "learned-fixed"] * 2, cells,
                                [("top-1 %", 3), ("mAP ×100", 3)])
    if "none" in results:
        table = (f"no projection: top-1 {common.format_mean_std(results['none']['top1'])}, "
                 f"mAP {common.format_mean_std(results['none']['map'])}\n{table}")
    return f"ours ({seeds_label})\n{table}"


def seed_table() -> str:
    """The seed's published ResNet-18 tables (CIFAR-10 Table 7, Imagewoof Table 8) in the layout of
    :func:`comparison_table` (one run each, no spread published)."""
    parts = []
    for data, rows in SEED_RESULTS.items():
        names = list(rows)[1:]
        cells = [[f"{v:.2f}" for v in rows[p][:2]] + [f"{rows[p][1] - rows[p][0]:+.2f}"]
                 + [f"{v:.2f}" for v in rows[p][2:]] + [f"{rows[p][3] - rows[p][2]:+.2f}"] for p in names]
        none = rows["none"]
        parts.append(f"the seed, {data} (ResNet-18)\nno projection: top-1 {none[0]:.2f}, mAP {none[1]:.2f}\n"
                     + common.format_table("projection", names, ["fixed", "learned", "learned-fixed"] * 2, cells,
                                           [("top-1 %", 3), ("mAP ×100", 3)]))
    return "\n\n".join(parts)


def run(args) -> dict:
    """The study; returns ``{variant: {"top1": array (seeds,), "map": array (seeds,)}}``."""
    started, cpu0 = time.perf_counter(), time.process_time()
    device = common.resolve_device(args.device)
    seeds = common.parse_seeds(args.seeds)
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    d = 4 * args.width
    per_seed = {v: {m: [] for m in METRICS} for v in variants}
    trajectories, rows, steps = {}, [], []
    for si, seed in enumerate(seeds):
        common.set_seed(seed, args.threads, device)
        train_x, train_y, test_x, test_y, names, pad = load_data(args, seed)
        if si == 0:
            print(f"data: {args.data}, {len(train_y)} train / {len(test_y)} test images {tuple(train_x.shape[1:])}, "
                  f"{len(names)} classes; {d} features; {args.epochs} epochs; seeds {seeds}; device {device}",
                  flush=True)
        flip = args.data not in ("digits", "noisy-digits")
        for variant in variants:
            torch.manual_seed(seed)
            model = ResNet(train_x.shape[1], len(names), make_projection(variant, d, args.radius_scale), args.width)
            model = model.to(device)
            opt = _optimizer(model, args)
            augment_gen = torch.Generator().manual_seed(seed + 1)
            proj = model.projection.projection if isinstance(model.projection, Scaled) else model.projection
            r0 = getattr(proj, "radius", None)
            r0 = None if r0 is None else float(r0.detach())
            t0 = time.perf_counter()
            history = common.train(
                model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
                generator=torch.Generator().manual_seed(seed), device=device,
                augment=lambda x: loaders.random_crop_flip(x, pad, flip, augment_gen), desc=f"{variant} seed {seed}",
                progress=not args.no_progress,
            )  # fmt: skip
            train_s = time.perf_counter() - t0
            top1, ap = common.evaluate(model, test_x, test_y, 256, device)
            per_seed[variant]["top1"].append(top1)
            per_seed[variant]["map"].append(ap)
            learned = common.learned_values(model)
            if learned:
                trajectories.setdefault(variant, []).append(history)
                steps += [{"variant": variant, "seed": seed, **h} for h in history]
            radius = None if r0 is None else float(proj.radius.detach())
            rows.append({"variant": variant, "seed": seed, "top1": round(top1, 4), "map": round(ap, 4),
                         "initial_radius": r0, "radius": radius, "train_s": round(train_s, 1)})
            common.save_checkpoint(out / "checkpoints" / f"{variant.replace(':', '-')}-seed{seed}.pt", model,
                                   variant=variant, seed=seed, epochs=args.epochs)
            print(f"  seed {seed}  {variant:<28} train {train_s:6.1f}s  top-1 {top1:5.1f}%  mAP {ap:5.1f}"
                  + ("" if radius is None else f"  r={radius:.4g}"), flush=True)
    results = {v: {m: np.asarray(x, dtype=float) for m, x in per_seed[v].items()} for v in variants}
    seeds_label = f"{args.data}, {len(test_y)} test images; mean±std (sample std) over seeds {','.join(map(str, seeds))}"
    parts = [comparison_table(results, seeds_label)]
    others = [v for v in variants if v != "none" and v.split(":")[1] not in ("fixed", "learned")]
    if others:
        cells = [[common.format_mean_std(results[v]["top1"]), common.format_mean_std(results[v]["map"])] for v in others]
        parts.append("other variants (y/r: the classifier sees y / r; seed's dr: the seed's L∞ radius derivative)\n"
                     + common.format_table("variant", others, ["top-1 %", "mAP ×100"], cells))
    radii = [v for v in variants if any(r["radius"] is not None and r["variant"] == v for r in rows)]
    if radii:
        cells = [[f"{next(r['initial_radius'] for r in rows if r['variant'] == v):.4g}",
                  common.format_mean_std([r["radius"] for r in rows if r["variant"] == v], 3)] for v in radii]
        parts.append("radius: initial and at the end of training\n"
                     + common.format_table("variant", radii, ["initial", "final"], cells))
    parts.append(seed_table())
    report = "\n\n".join(parts)
    (out / "table.txt").write_text(report + "\n")
    summary = [{"variant": v, "seeds": len(seeds), **{f"{m}_{s}": round(x, 3) for m in METRICS
                                                       for s, x in zip(("mean", "std"), common.mean_std(results[v][m]))}}
               for v in variants]
    common.write_csv(out / "accuracy.csv", rows)
    common.write_csv(out / "summary.csv", summary)
    written = ["table.txt", "accuracy.csv", "summary.csv"]
    if steps:
        common.write_csv(out / "trajectory.csv", steps)
        written.append("trajectory.csv")
    written += _plot(out, results, trajectories, seeds, seeds_label.split(";")[0])
    print(f"\n{report}")
    print(f"\nwritten to {out}/: {' '.join(written)} checkpoints/ ({len(variants) * len(seeds)} models)"
          f"\ntotal {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU")
    return results


def main(argv=None) -> int:
    return common.run_program(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
