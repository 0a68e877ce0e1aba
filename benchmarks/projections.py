"""Projection nodes, forward + backward, against ``torch.nn.functional.normalize``.

Each of ``L2Sphere``, ``L2Ball``, ``LInfSphere``, ``LInfBall``, ``L1Sphere``, ``L1Ball`` with a
learnable radius on ``x (256, 512)`` float32 (standard normal, so every point lies outside the
unit balls): forward and backward (gradients for ``x`` and ``r``) timed interleaved with
``F.normalize(x, dim=-1)`` forward + backward; then the same for the dimension
``d ∈ {16, 64, 256, 1024, 4096}``.

Targets (issue 7): L2 ≤ 2x, L∞ ≤ 3x, L1 ≤ 6x at ``(256, 512)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bundled import PROJECTIONS, learnable_params, node_class
from .harness import Report, Settings, Skip, interleaved

CASE = "projections"
TARGETS = {"L2": 2.0, "LInf": 3.0, "L1": 6.0}


def _compare(report: Report, settings: Settings, classes: dict, b: int, d: int, label: str,
             targets: bool) -> None:
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(b, d, generator=gen).requires_grad_()
    v = torch.randn(b, d, generator=gen)
    variants = {"F.normalize": lambda: torch.autograd.grad(F.normalize(x, dim=-1), x, v)}
    for name, cls in classes.items():
        node = cls(learn_radius=True)
        params = [x, *learnable_params(node)]
        variants[name] = lambda node=node, params=params: torch.autograd.grad(node(x), params, v)
    times = interleaved(variants, settings)
    report.add(CASE, label, times, baseline="F.normalize")
    if targets:
        for name in classes:
            bound = TARGETS[name.removesuffix("Sphere").removesuffix("Ball")]
            ratio = times[name] / times["F.normalize"]
            report.target(CASE, f"{name} / F.normalize forward + backward, {label}", ratio,
                          f"≤ {bound:g}x", ratio <= bound)


def run(report: Report, settings: Settings) -> None:
    classes = {}
    for name in PROJECTIONS:
        try:
            classes[name] = node_class(name)
        except Skip as reason:
            report.skip(CASE, str(reason))
    if not classes:
        raise Skip("no projection node in ddnlib.nodes (yet)")
    b, d = (16, 32) if settings.quick else (256, 512)
    _compare(report, settings, classes, b, d, f"x ({b}, {d}) float32: forward + backward",
             targets=True)
    for dim in (8, 64) if settings.quick else (16, 64, 256, 1024, 4096):
        _compare(report, settings, classes, b, dim, f"scaling x ({b}, d={dim}): forward + backward",
                 targets=False)
