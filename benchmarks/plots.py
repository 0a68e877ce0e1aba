"""Plots of one run's results (matplotlib, no display needed).

* ``bench_time_vs_m.png``: backward time of the engine (dense, CG) and of the per-dimension loop
  against the output size ``m``, log-log, one panel per test node;
* ``bench_memory_vs_iterations.png``: bytes saved for backward, implicit vs unrolled, against the
  number of solver iterations.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_all"]


def _series(rows: list[dict], case: str, x_key: str, **match) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        p = r.get("params", {})
        if r["case"] != case or x_key not in p or any(p.get(k) != v for k, v in match.items()):
            continue
        xs, ys = out.setdefault(r["variant"], ([], []))
        xs.append(p[x_key])
        ys.append(r["value"])
    return out


def plot_time_vs_m(result: dict, path: Path) -> bool:
    kinds = sorted({r["params"]["kind"] for r in result["rows"]
                    if r["case"] == "engine_vs_loop" and "kind" in r.get("params", {})})
    if not kinds:
        return False
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for variant, (ms, ts) in _series(result["rows"], "engine_vs_loop", "m", kind=kind).items():
            ax.loglog(ms, [t * 1e3 for t in ts], "o-", label=variant)
        ax.set_title(f"{kind}-coupled node, b=16, float64")
        ax.set_xlabel("output size m")
        ax.set_ylabel("backward time [ms] (machine-dependent)")
    return _save(fig, axes[0], path)


def plot_memory_vs_iterations(result: dict, path: Path) -> bool:
    rows = [r for r in result["rows"] if r["unit"] == "B"]
    series = _series(rows, "unrolled", "iterations")
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for variant, (ks, bs) in series.items():
        ax.semilogy(ks, [b / 2**20 for b in bs], "o-", label=variant)
    ax.set_xlabel("solver iterations")
    ax.set_ylabel("saved for backward [MiB]")
    ax.set_title("denoiser b=16, m=256, float64")
    return _save(fig, [ax], path)


def _save(fig, axes, path: Path) -> bool:
    """Grid and legend on every axis, then write ``path`` and close the figure."""
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_all(result: dict, folder: Path) -> list[Path]:
    """Write the plots the results allow into ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("bench_time_vs_m.png", plot_time_vs_m),
                       ("bench_memory_vs_iterations.png", plot_memory_vs_iterations)):
        if plot(result, folder / name):
            written.append(folder / name)
    return written
