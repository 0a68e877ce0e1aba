"""Pictures of the projection nodes for the node reference (``docs/nodes.md``).

One PNG, ``docs/img/projections.png``: for p ∈ {1, 2, ∞} (columns) the ball ``‖u‖_p ≤ r`` and the
sphere ``‖u‖_p = r`` (rows) in the plane, with ``r = 1``, and arrows from example points ``x`` to
their projections ``y``, computed by the library's nodes. Points inside show how each sphere pushes
them out (and that a ball leaves them alone).

Run from the repository root: ``python docs/scripts/plot_projections.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ddnlib.nodes import L1Ball, L1Sphere, L2Ball, L2Sphere, LInfBall, LInfSphere  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "img" / "projections.png"
SUBSCRIPT = {"1": "₁", "2": "₂", "∞": "∞"}
NODES = {("ball", "1"): L1Ball, ("ball", "2"): L2Ball, ("ball", "∞"): LInfBall,
         ("sphere", "1"): L1Sphere, ("sphere", "2"): L2Sphere, ("sphere", "∞"): LInfSphere}


def example_points() -> torch.Tensor:
    """Points outside (a ring at radius 1.7), and a few inside, of the unit balls."""
    angles = torch.linspace(0, 2 * torch.pi, 17, dtype=torch.float64)[:-1] + 0.1
    outside = 1.7 * torch.stack([angles.cos(), angles.sin()], dim=-1)
    inside = torch.tensor([[0.25, 0.1], [-0.3, 0.35], [0.1, -0.4], [-0.45, -0.15]],
                          dtype=torch.float64)
    return torch.cat([outside, inside])


def unit_circle(p: str) -> torch.Tensor:
    """The unit p-sphere as a closed polyline."""
    t = torch.linspace(0, 2 * torch.pi, 400, dtype=torch.float64)
    u = torch.stack([t.cos(), t.sin()], dim=-1)
    order = {"1": 1.0, "2": 2.0, "∞": float("inf")}[p]
    return u / torch.linalg.vector_norm(u, ord=order, dim=-1, keepdim=True)


def main() -> None:
    x = example_points()
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.8), constrained_layout=True)
    for row, kind in enumerate(("ball", "sphere")):
        for col, p in enumerate(("1", "2", "∞")):
            ax = axes[row, col]
            boundary = unit_circle(p)
            if kind == "ball":
                ax.fill(boundary[:, 0], boundary[:, 1], color="tab:blue", alpha=0.15, lw=0)
            ax.plot(boundary[:, 0], boundary[:, 1], color="tab:blue", lw=1.5)
            with torch.no_grad():
                y = NODES[kind, p](radius=1.0)(x)
            for (x0, x1), (y0, y1) in zip(x.tolist(), y.tolist()):
                if abs(x0 - y0) + abs(x1 - y1) > 1e-9:
                    ax.annotate("", xy=(y0, y1), xytext=(x0, x1),
                                arrowprops=dict(arrowstyle="->", color="0.35", lw=0.9))
            ax.plot(x[:, 0], x[:, 1], "o", color="0.35", ms=3)
            ax.plot(y[:, 0], y[:, 1], "o", color="tab:red", ms=3.5)
            relation = "≤" if kind == "ball" else "="
            ax.set_title(f"L{p} {kind}:  ‖u‖{SUBSCRIPT[p]} {relation} 1")
            ax.set_aspect("equal")
            ax.set_xlim(-1.9, 1.9)
            ax.set_ylim(-1.9, 1.9)
            ax.axhline(0, color="0.85", lw=0.8, zorder=0)
            ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    fig.suptitle("Euclidean projections (grey: x, red: y = projection, r = 1)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(OUT)


if __name__ == "__main__":
    main()
