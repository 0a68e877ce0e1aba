"""Robust global pooling, forward and backward, per penalty, against mean pooling.

``RobustGlobalPool1d`` with a learnable ``c`` (and ``α`` for ``general``); forward ``node(x)`` and
backward (gradients for ``x`` and the learnable parameters, graph retained) each timed interleaved
with the same step of mean pooling ``x.mean(-1)``: pseudo-Huber on the PointNet-sized input
``(B, C, N) = (32, 1024, 1024)`` and on the small ``(32, 64, 256)`` float32 (per-call overhead),
every penalty on ``(4, 128, 1024)``. "eager" is ``fused=False`` (the automatic default compiles
from the fourth call at ``(32, 1024, 1024)``); the fused path (``fused=True``) of pseudo-Huber is
timed the same way, its compile time (first call minus a steady call) reported separately. Then pseudo-Huber
forward + backward against mean pooling for ``N ∈ {64, 256, 1024, 4096}`` at ``(8, 256, N)``.
Welsch and Barron's loss against pseudo-Huber and the original library: ``nonconvex_pooling``.

Targets (issue 18): pseudo-Huber forward ≤ 100x mean (eager, both shapes), fused forward ≤ 15x
at ``(32, 1024, 1024)``; backward ≤ 1.5x mean's backward for every penalty.
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


def _penalty(report: Report, settings: Settings, cls, penalty: str, shape: tuple,
             gen: torch.Generator, targets: bool) -> None:
    x = torch.randn(shape, generator=gen).requires_grad_()
    v = torch.randn(shape[:2], generator=gen)
    y_mean = x.mean(-1)
    eager = {"fused": False} if accepts(cls, "fused") else {}  # (None may compile after 3 calls)
    forward, backward = _steps(_make(cls, penalty, **eager), x, v)
    variants_f = {"mean pooling": lambda: x.mean(-1), f"{penalty} eager": forward}
    variants_b = {"mean pooling": lambda: torch.autograd.grad(y_mean, x, v, retain_graph=True),
                  f"{penalty} eager": backward}
    fused = targets and accepts(cls, "fused")
    if fused:
        node = _make(cls, penalty, fused=True)
        start = time.perf_counter()
        node(x)
        first = time.perf_counter() - start
        variants_f[f"{penalty} fused"], variants_b[f"{penalty} fused"] = _steps(node, x, v)
    tf = interleaved(variants_f, settings)
    tb = interleaved(variants_b, settings)
    setting = "x (" + ", ".join(map(str, shape)) + f") float32, {penalty}"
    report.add(CASE, f"{setting}: forward", tf, baseline="mean pooling")
    report.add(CASE, f"{setting}: backward", tb, baseline="mean pooling")
    if fused:
        report.note(CASE, f"{setting} fused: compile time ≈ "
                    f"{first - tf[f'{penalty} fused']:.2f} s (first call minus a steady call)")
    ratio_b = tb[f"{penalty} eager"] / tb["mean pooling"]
    report.target(CASE, f"backward / mean backward, {setting}", ratio_b, "≤ 1.5x", ratio_b <= 1.5)
    if targets:
        ratio_f = tf[f"{penalty} eager"] / tf["mean pooling"]
        report.target(CASE, f"forward / mean forward, {setting}", ratio_f, "≤ 100x",
                      ratio_f <= 100)
        if fused and shape[-1] >= 1024:
            ratio = tf[f"{penalty} fused"] / tf["mean pooling"]
            report.target(CASE, f"fused forward / mean forward, {setting}", ratio, "≤ 15x",
                          ratio <= 15)


def run(report: Report, settings: Settings) -> None:
    cls = node_class("RobustGlobalPool1d")
    heavy = dataclasses.replace(settings, repeats=min(settings.repeats, 3))
    gen = torch.Generator().manual_seed(0)
    for shape in [(4, 32, 64)] if settings.quick else [(32, 64, 256), (32, 1024, 1024)]:
        _penalty(report, heavy, cls, "pseudo_huber", shape, gen, targets=True)
    for penalty in ("welsch",) if settings.quick else PENALTIES:
        _penalty(report, heavy, cls, penalty, (2, 16, 64) if settings.quick else (4, 128, 1024),
                 gen, targets=False)
    if not accepts(cls, "fused"):
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

        times = interleaved({"mean pooling": mean_pool, "pseudo_huber eager": robust}, heavy)
        report.add(CASE, f"scaling x (8, {xs.shape[1]}, N={n}): forward + backward", times,
                   baseline="mean pooling")
