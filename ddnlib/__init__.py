"""ddnlib: deep declarative networks in PyTorch.

Layers defined as argmin problems, ``y(x; θ) ∈ argmin_y f(x, y; θ)`` subject to ``h = 0``,
``g ≤ 0``, solved in the forward pass and differentiated by the implicit function theorem.
"""

from .engine import implicit_vjp
from .errors import (
    DDNError,
    DDNWarning,
    NonConvergenceError,
    NonConvergenceWarning,
    OptimalityError,
    OptimalityWarning,
    SingularSystemError,
    SingularSystemWarning,
)
from .node import DeclarativeNode
from .options import Options

__version__ = "0.1.0"

__all__ = [
    "DeclarativeNode",
    "Options",
    "implicit_vjp",
    "DDNWarning",
    "NonConvergenceWarning",
    "SingularSystemWarning",
    "OptimalityWarning",
    "DDNError",
    "NonConvergenceError",
    "SingularSystemError",
    "OptimalityError",
]
