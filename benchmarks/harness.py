"""Measurement primitives shared by the benchmark cases.

* :func:`interleaved` times several variants of one computation in rotating order, so that machine
  noise (other processes, frequency scaling) hits every variant alike, and returns per-call medians.
* :func:`saved_bytes` counts the bytes autograd keeps for the backward pass of a computation
  (unique storages packed through ``torch.autograd.graph.saved_tensors_hooks``).
* :class:`Report` collects the rows (absolute value + ratio against a baseline measured in the same
  run), the checked targets and the skipped cases of one run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Skip", "Row", "Target", "Report", "Settings", "interleaved", "saved_bytes"]


class Skip(Exception):
    """Raised by a case (or a part of one) that cannot run here; the message says why."""


@dataclass(frozen=True)
class Settings:
    """How hard one run measures: ``quick`` shrinks every case to a CI smoke test."""

    quick: bool = False
    repeats: int = 7
    min_block_s: float = 0.02  # calls are grouped so that one timed block lasts at least this


@dataclass
class Row:
    """One measured value and its ratio to the baseline variant of the same setting."""

    case: str
    setting: str
    variant: str
    value: float
    unit: str  # "s" (median seconds per call) or "B" (bytes saved for backward)
    baseline: str
    ratio: float  # value / baseline value
    params: dict[str, Any] = field(default_factory=dict)  # e.g. {"m": 256}, for plots


@dataclass
class Target:
    """A claim (``target``, e.g. ``"≥ 20x"``) checked against a measured number."""

    case: str
    what: str
    measured: float
    target: str
    met: bool


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[dict[str, str]] = field(default_factory=list)

    def add(self, case: str, setting: str, values: Mapping[str, float], baseline: str,
            unit: str = "s", **params: Any) -> None:
        """Rows for ``values`` (variant -> value), with ratios against ``values[baseline]``."""
        base = values[baseline]
        print(f"  {setting}: " + ", ".join(f"{k} {v / base:.3g}x" for k, v in values.items()),
              flush=True)
        for variant, value in values.items():
            ratio = value / base if base > 0 else math.nan
            self.rows.append(Row(case, setting, variant, float(value), unit, baseline, ratio,
                                 dict(params)))

    def target(self, case: str, what: str, measured: float, target: str, met: bool) -> None:
        self.targets.append(Target(case, what, float(measured), target, bool(met)))

    def skip(self, case: str, reason: str) -> None:
        self.skipped.append({"case": case, "reason": reason})

    def note(self, case: str, text: str) -> None:
        self.notes.append({"case": case, "text": text})

    def as_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows],
                "targets": [asdict(t) for t in self.targets],
                "skipped": self.skipped, "notes": self.notes}


def _calls_per_block(fn: Callable[[], Any], min_block_s: float) -> int:
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, math.ceil(min_block_s / max(once, 1e-9)))


def interleaved(variants: Mapping[str, Callable[[], Any]], settings: Settings) -> dict[str, float]:
    """Median seconds per call of each variant, timed in rotating order.

    Each variant is first called once (warm-up, which also sizes the block of calls timed
    together); then ``settings.repeats`` rounds time one block of every variant, the order rotated
    by one each round.
    """
    names = list(variants)
    number = {name: _calls_per_block(variants[name], settings.min_block_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(settings.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn, n = variants[name], number[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Bytes of the unique storages autograd saves for backward while running ``fn``.

    Storages of ``exclude`` (the leaf inputs and parameters, which exist anyway) are not counted.
    Returns ``(bytes, fn())``; keep the result alive only as long as its graph is needed.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
