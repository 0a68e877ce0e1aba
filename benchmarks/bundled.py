"""Access to the bundled nodes of ``ddnlib.nodes`` for the benchmark cases, skipping cleanly
when a node is not there (yet)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .harness import Skip

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic", "general")
PROJECTIONS = ("L2Sphere", "L2Ball", "LInfSphere", "LInfBall", "L1Sphere", "L1Ball")


def node_class(name: str) -> type:
    """``ddnlib.nodes.<name>``, or :class:`~benchmarks.harness.Skip` saying it is missing."""
    nodes = importlib.import_module("ddnlib.nodes")
    cls = getattr(nodes, name, None)
    if cls is None:
        raise Skip(f"ddnlib.nodes.{name} does not exist (yet)")
    return cls


def accepts(cls: type, name: str) -> bool:
    """Whether the constructor of ``cls`` takes a keyword ``name``."""
    return name in inspect.signature(cls).parameters


def learnable_params(node: Any) -> list:
    return [p for p in node.parameters() if p.requires_grad]
