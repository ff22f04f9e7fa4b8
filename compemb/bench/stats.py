"""Verdicts from a sweep's seeds: the difference of two methods' means, its confidence interval and a p-value.

A sweep's seeds change a run's initialisation, hashes and batch order, not the data set (one draw of the data):
the interval says how sure the difference is over those, not over other data. Two tests:

- ``welch`` (default): the two methods' seeds as independent samples, Welch's unequal-variance t-test;
- ``paired``: differences seed by seed (seed s of both methods shares its batch order), a one-sample t-test on
  them; only the seeds both methods finished count.

The verdict is read off the interval: "no difference shown" when it covers 0. Each p-value is for its own
comparison; ``p_holm`` adjusts a table's p-values together (Holm's step-down), for a reader who takes the table as
one family of tests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats

TESTS = ("welch", "paired")


@dataclass(frozen=True)
class Comparison:
    """``mean(a) - mean(b)`` with its confidence interval and two-sided p-value (None where too few seeds)."""

    difference: float
    low: float | None
    high: float | None
    p: float | None
    n_a: int
    n_b: int
    test: str
    level: float = 0.95

    @property
    def shown(self) -> bool:
        """Whether the interval excludes 0 (a difference is shown at this level)."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Comparison:
    """Welch's t-test and interval for ``mean(a) - mean(b)``, the samples independent, variances unequal.

    Example::

        >>> c = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
        >>> c.difference, round(c.p, 4), round(c.low, 3), round(c.high, 3)
        (-3.0, 0.0213, -5.267, -0.733)
    """
    _check_level(level)
    n_a, n_b = len(a), len(b)
    difference = statistics.fmean(a) - statistics.fmean(b) if n_a and n_b else math.nan
    if n_a < 2 or n_b < 2:
        return Comparison(difference, None, None, None, n_a, n_b, "welch", level)
    var_a, var_b = statistics.variance(a) / n_a, statistics.variance(b) / n_b
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0:  # both sides constant: the difference is exact
        return Comparison(difference, difference, difference, 1.0 if difference == 0 else 0.0, n_a, n_b, "welch", level)
    # Welch-Satterthwaite degrees of freedom
    df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
    return _t_interval(difference, standard_error, df, n_a, n_b, "welch", level)


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Comparison:
    """The paired t-test and interval for the mean of ``a[s] - b[s]`` over the seeds ``s`` both have.

    Example::

        >>> c = paired({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.5, 1: 1.0, 2: 2.0})
        >>> round(c.difference, 4), round(c.p, 4)
        (1.0, 0.0742)
    """
    _check_level(level)
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    n = len(differences)
    if n < 2:
        mean = differences[0] if differences else math.nan
        return Comparison(mean, None, None, None, n, n, "paired", level)
    mean = statistics.fmean(differences)
    standard_error = statistics.stdev(differences) / math.sqrt(n)
    if standard_error == 0:
        return Comparison(mean, mean, mean, 1.0 if mean == 0 else 0.0, n, n, "paired", level)
    return _t_interval(mean, standard_error, n - 1, n, n, "paired", level)


def compare(a: dict[int, float], b: dict[int, float], test: str = "welch", level: float = 0.95) -> Comparison:
    """``a`` against ``b`` (values by seed) by ``test`` (one of :data:`TESTS`)."""
    if test == "welch":
        return welch(list(a.values()), list(b.values()), level)
    if test == "paired":
        return paired(a, b, level)
    raise ValueError(f"test must be one of {TESTS}, got {test!r}")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None stays None and does not count).

    Example::

        >>> holm([0.01, 0.04, None, 0.03])
        [0.03, 0.06, None, 0.06]
    """
    present = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running, m = 0.0, len(present)
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = round(running, 12)
    return adjusted


def _t_interval(
    difference: float, standard_error: float, df: float, n_a: int, n_b: int, test: str, level: float
) -> Comparison:
    quantile = float(scipy_stats.t.ppf(0.5 + level / 2, df))
    p = float(2 * scipy_stats.t.sf(abs(difference) / standard_error, df))
    return Comparison(
        difference,
        difference - quantile * standard_error,
        difference + quantile * standard_error,
        p,
        n_a,
        n_b,
        test,
        level,
    )


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
