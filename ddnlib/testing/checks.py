"""All checks of a node at once, and the pytest-friendly ``assert_*`` entries.

Each ``assert_*`` runs the matching ``check_*`` and raises ``AssertionError`` carrying the report
table when a row fails, so it can be called directly inside a user's own test::

    def test_my_node():
        assert_node(MyNode(), torch.randn(4, 6))
"""

from __future__ import annotations

from torch import Tensor

from ..node import DeclarativeNode
from .gradients import check_gradients
from .optimality import check_optimality
from .report import CheckResult
from .separability import check_separability
from .vjp import check_vjp

__all__ = ["check_node", "assert_node", "assert_gradients", "assert_optimal", "assert_vjp"]


def check_node(node: DeclarativeNode, *xs: Tensor, seed: int = 0, **options) -> CheckResult:
    """Optimality, separability, gradient and ``vjp`` checks of ``node`` at ``xs``, in one result.

    ``options`` are passed on by name: ``tol``, ``ftol``, ``smooth``, ``perturbations``,
    ``radius`` to :func:`check_optimality`; ``eps``, ``atol``, ``rtol``, ``max_elements``,
    ``directions`` to :func:`check_gradients`; ``vjp_samples``, ``vjp_atol``, ``vjp_rtol`` to
    :func:`check_vjp` (as ``samples``, ``atol``, ``rtol``).
    """
    split = {"optimality": {}, "gradient": {}, "vjp": {}}
    owner = {"tol": "optimality", "ftol": "optimality", "smooth": "optimality",
             "perturbations": "optimality", "radius": "optimality", "eps": "gradient",
             "atol": "gradient", "rtol": "gradient", "max_elements": "gradient",
             "directions": "gradient", "vjp_samples": "vjp", "vjp_atol": "vjp", "vjp_rtol": "vjp"}
    for key, value in options.items():
        if key not in owner:
            raise TypeError(f"check_node() got an unexpected option {key!r}: expected one of "
                            f"{sorted(owner)}")
        split[owner[key]][key.removeprefix("vjp_")] = value
    result = check_optimality(node, *xs, seed=seed, **split["optimality"])
    result.extend(check_separability(node, *xs, seed=seed).rows)
    result.extend(check_gradients(node, *xs, seed=seed, **split["gradient"]).rows)
    result.extend(check_vjp(node, *xs, seed=seed, **split["vjp"]).rows)
    return result


def assert_node(node: DeclarativeNode, *xs: Tensor, **options) -> CheckResult:
    """:func:`check_node`, raising ``AssertionError`` with the table on any failure."""
    return _passed(check_node(node, *xs, **options))


def assert_gradients(node: DeclarativeNode, *xs: Tensor, **options) -> CheckResult:
    """:func:`check_gradients`, raising ``AssertionError`` with the table on any failure."""
    return _passed(check_gradients(node, *xs, **options))


def assert_optimal(node: DeclarativeNode, *xs: Tensor, **options) -> CheckResult:
    """:func:`check_optimality`, raising ``AssertionError`` with the table on any failure."""
    return _passed(check_optimality(node, *xs, **options))


def assert_vjp(node: DeclarativeNode, *xs: Tensor, **options) -> CheckResult:
    """:func:`check_vjp`, raising ``AssertionError`` with the table on any failure."""
    return _passed(check_vjp(node, *xs, **options))


def _passed(result: CheckResult) -> CheckResult:
    result.assert_passed()
    return result
