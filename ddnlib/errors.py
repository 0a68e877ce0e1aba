"""Warnings and exceptions raised by ddnlib.

Numerical trouble (a solver that did not converge, a singular linear system, a forward solution that
fails the optimality check) is reported as a :class:`DDNWarning` subclass carrying the numbers; with
``Options(strict=True)`` the matching :class:`DDNError` subclass is raised instead.
"""

from __future__ import annotations

import warnings

from torch import Tensor

__all__ = [
    "DDNWarning",
    "NonConvergenceWarning",
    "SingularSystemWarning",
    "OptimalityWarning",
    "DDNError",
    "NonConvergenceError",
    "SingularSystemError",
    "OptimalityError",
    "report",
    "describe_samples",
]


class DDNWarning(UserWarning):
    """Base class of every warning ddnlib emits."""


class NonConvergenceWarning(DDNWarning):
    """A forward solver or an iterative linear solver stopped before reaching its tolerance."""


class SingularSystemWarning(DDNWarning):
    """A Hessian or KKT matrix is singular, indefinite or rank deficient."""


class OptimalityWarning(DDNWarning):
    """The forward solution fails the optimality (stationarity / feasibility) check."""


class DDNError(RuntimeError):
    """Base class of every error ddnlib raises in strict mode."""


class NonConvergenceError(DDNError):
    """Strict-mode counterpart of :class:`NonConvergenceWarning`."""


class SingularSystemError(DDNError):
    """Strict-mode counterpart of :class:`SingularSystemWarning`."""


class OptimalityError(DDNError):
    """Strict-mode counterpart of :class:`OptimalityWarning`."""


_ERROR_FOR = {
    NonConvergenceWarning: NonConvergenceError,
    SingularSystemWarning: SingularSystemError,
    OptimalityWarning: OptimalityError,
}


def report(category: type[DDNWarning], message: str, strict: bool) -> None:
    """Warn with ``category``, or raise its error counterpart when ``strict``.

    The one way ddnlib reports numerical trouble; nodes outside ``ddnlib`` (``ddnlib.nodes``, user
    nodes) use it too, so that ``Options(strict=True)`` applies to them.
    """
    if strict:
        raise _ERROR_FOR[category](message)
    warnings.warn(message, category, stacklevel=3)


def describe_samples(mask: Tensor, limit: int = 8) -> str:
    """``"[i, j, …] (n of b)"``: the samples where the ``(b,)`` boolean ``mask`` holds, for messages."""
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(map(str, idx[:limit]))
    return f"[{shown}{', …' if len(idx) > limit else ''}] ({len(idx)} of {mask.numel()})"
