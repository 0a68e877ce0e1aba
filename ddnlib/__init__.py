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
from .kkt import KKTPoint, Optimality
from .linear_solvers import CG, Auto, Dense, LinearSolver
from .node import DeclarativeNode
from .options import Options
from .solution import Solution

__version__ = "0.1.0"

__all__ = [
    "DeclarativeNode",
    "Options",
    "Solution",
    "implicit_vjp",
    "KKTPoint",
    "Optimality",
    "LinearSolver",
    "Dense",
    "CG",
    "Auto",
    "DDNWarning",
    "NonConvergenceWarning",
    "SingularSystemWarning",
    "OptimalityWarning",
    "DDNError",
    "NonConvergenceError",
    "SingularSystemError",
    "OptimalityError",
]
