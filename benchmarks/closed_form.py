"""The generic engine against the hand-derived closed-form ``vjp`` of the bundled nodes.

For every bundled node that overrides ``vjp`` and where the generic engine applies (robust pooling
with each penalty, as the row-wise ``RobustPooling`` node with per-row ``c``; the L2 projections): the same solved batch, the same incoming gradient, timed
``node.vjp(x, y=y, v=v, ctx=ctx)`` (closed form) against ``DeclarativeNode.vjp(node, ...)`` (the
generic engine, what ``super().vjp`` returns), under ``torch.no_grad()`` as in a backward pass,
for ``x`` and the learnable parameters. Target: generic ≤ 2x the closed form.
"""

from __future__ import annotations

import torch

from ddnlib import DeclarativeNode

from .bundled import PENALTIES, node_class
from .harness import Report, Settings, Skip, interleaved

CASE = "closed_form"
CLOSED, GENERIC = "closed-form vjp", "generic engine"


def _compare(report: Report, settings: Settings, node, xs: tuple, label: str) -> None:
    """Time both vjps of ``node`` at ``xs`` (those requiring grad get gradients)."""
    if type(node).vjp is DeclarativeNode.vjp:
        report.note(CASE, f"{label}: no closed-form vjp override, nothing to compare")
        return
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        out = node.solve(*xs)
    y, ctx = out if isinstance(out, tuple) else (out, None)
    v = torch.randn(y.shape, generator=gen, dtype=y.dtype)

    def closed():
        with torch.no_grad():
            return node.vjp(*xs, y=y, v=v, ctx=ctx)

    def generic():
        with torch.no_grad():
            return DeclarativeNode.vjp(node, *xs, y=y, v=v, ctx=ctx)

    (gc, pc), (gg, pg) = closed(), generic()
    pairs = [(a, b) for a, b in zip(gc, gg) if a is not None] + [(pc[k], pg[k]) for k in pc]
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in pairs)
    if not worst < 1e-3:
        report.note(CASE, f"{label}: closed form and generic engine differ (relative {worst:.2g})")
    times = interleaved({CLOSED: closed, GENERIC: generic}, settings)
    report.add(CASE, label, times, baseline=CLOSED)
    ratio = times[GENERIC] / times[CLOSED]
    report.target(CASE, f"generic / closed-form backward, {label}", ratio, "≤ 2x", ratio <= 2)


def run(report: Report, settings: Settings) -> None:
    ran = False
    gen = torch.Generator().manual_seed(0)
    try:
        pool = node_class("RobustPooling")
    except Skip as reason:
        report.skip(CASE, str(reason))
    else:
        rows, n = (16, 16) if settings.quick else (16 * 128, 512)
        x = torch.randn(rows, n, generator=gen).requires_grad_()
        c = torch.ones(rows).requires_grad_()
        for penalty in ("pseudo_huber", "welsch") if settings.quick else PENALTIES:
            alpha = torch.ones(rows).requires_grad_(penalty == "general")
            _compare(report, settings, pool(penalty), (x, c, alpha),
                     f"RobustPooling {penalty}, x ({rows}, {n}) float32, grads for x, c"
                     + (", α" if penalty == "general" else ""))
        ran = True
    for name in ("L2Sphere", "L2Ball"):
        try:
            cls = node_class(name)
        except Skip as reason:
            report.skip(CASE, str(reason))
            continue
        shape = (4, 16) if settings.quick else (64, 128)
        x = torch.randn(shape, generator=gen).requires_grad_()
        _compare(report, settings, cls(learn_radius=True), (x,),
                 f"{name}, x {tuple(shape)} float32, grads for x, r")
        ran = True
    if not ran:
        raise Skip("none of the bundled nodes exists (yet)")
