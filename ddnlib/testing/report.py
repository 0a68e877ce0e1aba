"""Results of the node checks: one row per (check, argument) with the numbers, and a table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["CheckRow", "CheckResult"]

_STATUSES = ("pass", "fail", "skip")


@dataclass(frozen=True)
class CheckRow:
    """One line of a check report.

    Attributes:
        check: which check (``"gradient"``, ``"optimality"``, ``"vjp"``, ``"warnings"``, ...).
        argument: what was checked (``"input 0"``, ``"param c"``, ``"stationarity"``, ...).
        error: the worst error found (``nan`` when nothing was measured).
        tolerance: the bound ``error`` is held to, as text (e.g. ``"atol 1e-05 + rtol 0.001·|ref|"``).
        status: ``"pass"``, ``"fail"`` or ``"skip"`` (not applicable; never a failure).
        detail: further numbers or the reason for a skip or failure.
    """

    check: str
    argument: str
    error: float
    tolerance: str
    status: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"status={self.status!r}: expected one of {_STATUSES}")

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass
class CheckResult:
    """The rows of one or more checks of a node; ``passed`` when no row failed."""

    node: str
    rows: list[CheckRow] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(row.failed for row in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [row for row in self.rows if row.failed]

    def extend(self, rows: Iterable[CheckRow]) -> "CheckResult":
        self.rows.extend(rows)
        return self

    def table(self) -> str:
        """The rows as an aligned text table (check, argument, worst error, tolerance, result)."""
        header = ("check", "argument", "worst error", "tolerance", "result", "detail")
        lines = [(r.check, r.argument, _number(r.error), r.tolerance, r.status.upper(), r.detail)
                 for r in self.rows]
        return _align(header, lines)

    def legend(self) -> str:
        """What the signed "worst error" of the rows present means (sign conventions)."""
        present = {row.argument for row in self.rows} | {row.check for row in self.rows}
        return "\n".join(f"  {key}: {text}" for key, text in _LEGEND.items() if key in present)

    def summary(self) -> str:
        failed = len(self.failures)
        verdict = "PASSED" if self.passed else f"FAILED ({failed} of {len(self.rows)} rows)"
        return f"{self.node}: {verdict}"

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.table()}"

    def assert_passed(self) -> None:
        """Raise ``AssertionError`` carrying the table when any row failed."""
        if not self.passed:
            raise AssertionError(str(self))


_LEGEND = {
    "perturbation": "worst (f(y) - f(y')) / (1 + |f(y)|) over random feasible points y' near y; "
                    "negative when every one is higher, as at a minimum; fails above the "
                    "tolerance (a lower objective nearby)",
    "multiplier sign": "largest max(-mu_j, 0) / (1 + |grad f|) over tight g_j <= 0, for the "
                       "Lagrangian L = f + lambda'h + mu'g (so mu >= 0 at a minimum); 0 when no "
                       "multiplier has the wrong sign",
    "vs default solver": "worst (f(y) - f(y_default)) / (1 + |f(y)|); negative or 0 when the "
                         "node's solve is at least as low as the default solver",
    "separability": "largest relative change in the other samples when one sample's inputs "
                    "(and y) are perturbed; 0 (rounding) for a problem separable across the batch",
}


def _number(value: float) -> str:
    return "-" if value != value else f"{value + 0.0:.3g}"  # + 0.0: no "-0"


def _align(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *map(fmt, lines)])
