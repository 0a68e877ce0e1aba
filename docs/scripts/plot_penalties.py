"""Plots of the robust pooling penalties for the node reference (``docs/nodes.md``).

For every penalty of ``ddnlib.nodes.PENALTIES`` one PNG, ``docs/img/penalty_<name>.png``, with three
panels over ``z``: the penalty ``φ(z)``, its derivative ``φ′(z)`` (the pull of a point at distance
``z``) and the weight ``φ′(z)/z`` (its influence relative to the quadratic: 1 for the mean, → 0 for a
point treated as an outlier), for several thresholds ``c``; for ``general`` for several shapes ``α``
at ``c = 1``. The values come from the library's own ``Penalty`` objects.

Run from the repository root: ``python docs/scripts/plot_penalties.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ddnlib.nodes import PENALTIES  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "img"
THRESHOLDS = (0.5, 1.0, 2.0)
SHAPES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)
Z = torch.linspace(-4, 4, 801, dtype=torch.float64)


def curves(name: str, c: float, alpha: float) -> tuple[torch.Tensor, ...]:
    """``φ``, ``φ′`` and ``φ′/z`` of penalty ``name`` on the grid ``Z``."""
    penalty = PENALTIES[name]
    c_t, a_t = torch.tensor(c, dtype=Z.dtype), torch.tensor(alpha, dtype=Z.dtype)
    phi = penalty.value(Z, c_t, a_t)
    d1, d2 = penalty.derivatives(Z, c_t, a_t)
    weight = torch.where(Z != 0, d1 / Z.where(Z != 0, torch.ones_like(Z)), d2)  # φ″(0) at z = 0
    return phi, d1, weight


def plot(name: str) -> Path:
    penalty = PENALTIES[name]
    if penalty.uses_alpha:
        settings = [(1.0, a, f"α = {a:g}") for a in SHAPES]
    elif penalty.uses_c:
        settings = [(c, 1.0, f"c = {c:g}") for c in THRESHOLDS]
    else:
        settings = [(1.0, 1.0, "")]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), constrained_layout=True)
    for c, alpha, label in settings:
        for ax, values in zip(axes, curves(name, c, alpha)):
            ax.plot(Z, values, label=label or None)
    titles = ("penalty φ(z)", "derivative φ′(z)", "weight φ′(z) / z")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("z = u − xᵢ")
        ax.axhline(0, color="0.8", lw=0.8, zorder=0)
        ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    axes[0].set_ylim(-0.1, 4)
    axes[2].set_ylim(-0.05, 1.6 if penalty.uses_alpha else 1.1)
    if settings[0][2]:
        axes[2].legend(fontsize="small", loc="upper right")
    fig.suptitle(name + ("  (c = 1)" if penalty.uses_alpha else ""))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"penalty_{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    for name in PENALTIES:
        print(plot(name))


if __name__ == "__main__":
    main()
