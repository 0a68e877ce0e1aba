"""Checks for user-written declarative nodes — the ones ddnlib runs on its own nodes.

- :func:`check_gradients`: the node's gradients for every input and learnable parameter against
  central finite differences, in float64 (a float64 copy of the node; the node is not modified);
- :func:`check_optimality`: stationarity / KKT residual, feasibility, multiplier signs, a
  perturbation test, and for a node with its own ``solve`` a comparison with the default solver;
- :func:`check_vjp`: an overridden ``vjp`` against the generic engine ``DeclarativeNode.vjp``;
- :func:`check_node`: all three; ``assert_*``: the same, raising ``AssertionError`` with a readable
  table (for use inside pytest tests);
- :mod:`ddnlib.testing.strategies`: hypothesis strategies for batched inputs (also reachable here,
  e.g. ``ddnlib.testing.node_inputs``, once ``hypothesis`` is installed).

Every check returns a :class:`CheckResult`: rows of (check, argument, worst error, tolerance,
pass/fail/skip, detail). The command line ``python -m ddnlib gradcheck`` prints the same table.
"""

from .checks import assert_gradients, assert_node, assert_optimal, assert_vjp, check_node
from .gradients import check_gradients
from .optimality import check_optimality
from .report import CheckResult, CheckRow
from .separability import check_separability
from .vjp import check_vjp

__all__ = [
    "check_gradients",
    "check_optimality",
    "check_separability",
    "check_vjp",
    "check_node",
    "assert_gradients",
    "assert_optimal",
    "assert_vjp",
    "assert_node",
    "CheckResult",
    "CheckRow",
    "node_inputs",
    "batched",
    "scales",
    "shapes",
]

_STRATEGIES = ("node_inputs", "batched", "scales", "shapes")


def __getattr__(name: str):
    if name in _STRATEGIES:
        try:
            from . import strategies
        except ImportError as error:  # hypothesis is an optional dependency
            raise ImportError(f"ddnlib.testing.{name} needs hypothesis: pip install "
                              "'ddnlib[testing]'") from error
        return getattr(strategies, name)
    raise AttributeError(f"module 'ddnlib.testing' has no attribute {name!r}")
