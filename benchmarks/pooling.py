"""Robust global pooling, forward and backward, per penalty, against mean pooling.

``RobustGlobalPool1d`` on a PointNet-sized input ``(B, C, N) = (32, 1024, 1024)`` float32 with a
learnable ``c`` (and ``α`` for ``general``); forward ``node(x)`` and backward (gradients for ``x``
and the learnable parameters, graph retained) each timed interleaved with the same step of mean
pooling ``x.mean(-1)``. The fused path (if the node offers one) is timed the same way, its
compile time (first call minus a steady call) reported separately. Then pseudo-Huber forward +
backward against mean pooling for ``N ∈ {64, 256, 1024, 4096}`` at ``(8, 256, N)``.

Targets (issue 6): pseudo-Huber forward ≤ 150x mean, backward ≤ 3x mean's backward; fused
forward ≤ 15x.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from .bundled import PENALTIES, accepts, learnable_params, node_class
from .harness import Report, Settings, interleaved

CASE = "pooling"


def _make(cls, penalty: str, **extra):
    kwargs = {"penalty": penalty, "learn_c": True, **extra}
    if penalty == "general":
        kwargs["learn_alpha"] = True
    return cls(**kwargs)


def _steps(node, x, v):
    """(forward, backward) callables of ``node`` at ``x``; the backward reuses one graph."""
    params = [x, *learnable_params(node)]
    y = node(x)
    return (lambda: node(x)), (lambda: torch.autograd.grad(y, params, v, retain_graph=True))


def run(report: Report, settings: Settings) -> None:
    cls = node_class("RobustGlobalPool1d")
    shape = (4, 32, 64) if settings.quick else (32, 1024, 1024)
    heavy = dataclasses.replace(settings, repeats=min(settings.repeats, 3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    v = torch.randn(shape[:2], generator=gen)
    mean = lambda: x.mean(-1)  # noqa: E731
    y_mean = mean()
    mean_bwd = lambda: torch.autograd.grad(y_mean, x, v, retain_graph=True)  # noqa: E731
    fused = accepts(cls, "fused")
    penalties = ("pseudo_huber", "welsch") if settings.quick else PENALTIES
    setting = "x (" + ", ".join(map(str, shape)) + ") float32"
    for penalty in penalties:
        forward, backward = _steps(_make(cls, penalty), x, v)
        variants_f = {"mean pooling": mean, f"{penalty} eager": forward}
        variants_b = {"mean pooling": mean_bwd, f"{penalty} eager": backward}
        if fused:
            node = _make(cls, penalty, fused=True)
            start = time.perf_counter()
            node(x)
            first = time.perf_counter() - start
            forward_fused, backward_fused = _steps(node, x, v)
            variants_f[f"{penalty} fused"] = forward_fused
            variants_b[f"{penalty} fused"] = backward_fused
        tf = interleaved(variants_f, heavy)
        tb = interleaved(variants_b, heavy)
        report.add(CASE, f"{setting}, {penalty}: forward", tf, baseline="mean pooling")
        report.add(CASE, f"{setting}, {penalty}: backward", tb, baseline="mean pooling")
        if fused:
            report.note(CASE, f"{penalty} fused: compile time ≈ "
                        f"{first - tf[f'{penalty} fused']:.2f} s (first call minus a steady call)")
        if penalty == "pseudo_huber":
            ratio_f = tf["pseudo_huber eager"] / tf["mean pooling"]
            ratio_b = tb["pseudo_huber eager"] / tb["mean pooling"]
            report.target(CASE, f"pseudo_huber forward / mean forward, {setting}", ratio_f,
                          "≤ 150x", ratio_f <= 150)
            report.target(CASE, f"pseudo_huber backward / mean backward, {setting}", ratio_b,
                          "≤ 3x", ratio_b <= 3)
            if fused:
                ratio = tf["pseudo_huber fused"] / tf["mean pooling"]
                report.target(CASE, f"pseudo_huber fused forward / mean forward, {setting}",
                              ratio, "≤ 15x", ratio <= 15)
    if not fused:
        report.note(CASE, "RobustGlobalPool1d has no `fused` option: no fused path timed")

    sizes = (16, 64) if settings.quick else (64, 256, 1024, 4096)
    for n in sizes:
        xs = torch.randn(8, 256 if not settings.quick else 16, n, generator=gen).requires_grad_()
        vs = torch.randn(xs.shape[:2], generator=gen)
        node = _make(cls, "pseudo_huber")
        params = [xs, *learnable_params(node)]

        def robust(node=node, xs=xs, vs=vs, params=params):
            return torch.autograd.grad(node(xs), params, vs)

        def mean_pool(xs=xs, vs=vs):
            return torch.autograd.grad(xs.mean(-1), xs, vs)

        times = interleaved({"mean pooling": mean_pool, "pseudo_huber eager": robust}, settings)
        report.add(CASE, f"scaling x (8, {xs.shape[1]}, N={n}): forward + backward", times,
                   baseline="mean pooling")
