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

Writes to ``--out``: ``table.txt``, ``accuracy.csv``, ``accuracy.png``, ``trajectory.csv`` /
``trajectory.png`` (learned radius per step), ``checkpoints/*.pt``.

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

__all__ = ["ResNet", "make_projection", "default_radius", "PROJECTIONS", "VARIANTS", "main"]

PROJECTIONS = ("l1_sphere", "l1_ball", "l2_sphere", "l2_ball", "linf_sphere", "linf_ball")
VARIANTS = ("none",) + tuple(f"{p}:{m}" for p in PROJECTIONS for m in ("fixed", "learned")) + (
    "linf_sphere:learned-scaled", "linf_ball:learned-scaled", "linf_ball:learned-seedgrad")


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
    p.add_argument("--data", default="digits", choices=("digits", "cifar10", "folder"),
                   help="scikit-learn's bundled digits, or CIFAR-10 / an image folder in --data-dir")
    p.add_argument("--variants", default="all", help=f"comma-separated, from: {', '.join(VARIANTS)}; or 'all'")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--image-size", type=int, default=64, help="image folder: side after resize/crop")
    p.add_argument("--radius-scale", type=float, default=1.0, help="factor on the default radius")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"),
                   help="adam, or the seed's SGD (momentum 0.9, weight decay 1e-4)")
    p.add_argument("--radius-lr", type=float, default=None, help="learning rate of the radius (default: --lr)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training images")
    p.set_defaults(epochs=10, lr=3e-3, batch_size=64)
    return p


def load_data(args) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str], int]:
    """``(train_x, train_y, test_x, test_y, class_names, pad)``: standardised float images and
    the translation (pixels) of the training augmentation."""
    if args.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32))[:, None]
        y = torch.from_numpy(digits.target.astype(np.int64))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))
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


def _plot(out: Path, results: dict, trajectories: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    ax.barh(names, [results[n] for n in names], color=["C0" if ":fixed" in n else "C1" for n in names])
    lo = min(results.values())
    ax.set(xlabel="top-1 accuracy (%)", xlim=(max(0, lo - 5), 100), title="projection layer variants")
    ax.invert_yaxis()
    ax.grid(alpha=0.3, axis="x")
    common.save_figure(fig, out / "accuracy.png")
    if not trajectories:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, hist in trajectories.items():
        key = next(k for k in hist[0] if k.endswith(".radius"))
        r0 = hist[0][key]
        ax.plot([h["step"] for h in hist], [h[key] / r0 for h in hist],
                {"learned": "-", "learned-scaled": "--", "learned-seedgrad": ":"}[name.split(":")[1]],
                label=name)
    ax.set(xlabel="training step", ylabel="learned r / initial r", yscale="log",
           title="learned radius during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    common.save_figure(fig, out / "trajectory.png")


def _optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """Adam, or the seed's SGD; the radius has its own learning rate ``--radius-lr``."""
    radius = [p for n, p in model.named_parameters() if "radius" in n]
    rest = [p for n, p in model.named_parameters() if "radius" not in n]
    groups = [{"params": rest}] + ([{"params": radius, "lr": args.radius_lr or args.lr}] if radius else [])
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(groups, lr=args.lr)


def run(args) -> dict:
    """The study; returns ``{variant: top-1 accuracy}``."""
    device = common.resolve_device(args.device)
    common.set_seed(args.seed, args.threads, device)
    variants = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    train_x, train_y, test_x, test_y, names, pad = load_data(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    d = 4 * args.width
    print(f"data: {args.data}, {len(train_y)} train / {len(test_y)} test images {tuple(train_x.shape[1:])}, "
          f"{len(names)} classes; {d} features; device {device}", flush=True)
    flip = args.data != "digits"
    results, trajectories, rows, steps = {}, {}, [], []
    for variant in variants:
        torch.manual_seed(args.seed)
        model = ResNet(train_x.shape[1], len(names), make_projection(variant, d, args.radius_scale), args.width)
        model = model.to(device)
        opt = _optimizer(model, args)
        augment_gen = torch.Generator().manual_seed(args.seed + 1)
        t0 = time.perf_counter()
        history = common.train(
            model, train_x, train_y, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
            generator=torch.Generator().manual_seed(args.seed), device=device,
            augment=lambda x: loaders.random_crop_flip(x, pad, flip, augment_gen), desc=variant,
            progress=not args.no_progress,
        )  # fmt: skip
        train_s = time.perf_counter() - t0
        acc = common.accuracy(model, test_x, test_y, 256, device)
        results[variant] = acc
        learned = common.learned_values(model)
        if learned:
            trajectories[variant] = history
            steps += [{"variant": variant, **h} for h in history]
        radius = getattr(model.projection, "radius", getattr(getattr(model.projection, "projection", None), "radius", None))
        radius = None if radius is None else float(radius.detach())
        rows.append({"variant": variant, "accuracy": acc, "radius": radius, "train_s": round(train_s, 1)})
        common.save_checkpoint(out / "checkpoints" / f"{variant.replace(':', '-')}.pt", model,
                               variant=variant, seed=args.seed, epochs=args.epochs)
        print(f"  {variant:<28} train {train_s:6.1f}s  top-1 {acc:5.1f}%"
              + ("" if radius is None else f"  r={radius:.4g}"), flush=True)
    projections = [p for p in PROJECTIONS if any(v.startswith(p) for v in variants)]
    cols = ["fixed r", "learned r", "learned r, y/r", "learned r, seed's dr"]
    modes = ("fixed", "learned", "learned-scaled", "learned-seedgrad")
    cells = [[results.get(f"{p}:{m}") for m in modes] for p in projections]
    table = common.format_table("projection", projections, cols, cells)
    if "none" in results:
        table = f"no projection: {results['none']:.1f}\n{table}"
    (out / "table.txt").write_text(f"top-1 accuracy (%), {args.data}\n{table}\n")
    common.write_csv(out / "accuracy.csv", rows)
    if steps:
        common.write_csv(out / "trajectory.csv", steps)
    _plot(out, results, trajectories)
    print(f"\ntop-1 accuracy (%), {args.data}\n{table}")
    print(f"\nwritten to {out}/: table.txt accuracy.csv accuracy.png trajectory.csv checkpoints/")
    return results


def main(argv=None) -> int:
    return common.run_program(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
