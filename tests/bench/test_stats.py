"""Verdict statistics: Welch and paired t against hand-worked values and independent references, Holm, the table."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from compemb.bench.quality import SweepRow
from compemb.bench.stats import compare, holm, paired, welch
from compemb.bench.verdicts import comparison_table, comparisons


def _two_sided_p_by_integration(t: float, df: float) -> float:
    """P(|T| >= |t|) = 1 - the Student t density's integral over [-|t|, |t|], by the trapezoid rule (a slow
    reference, no scipy)."""
    grid = np.linspace(-abs(t), abs(t), 400_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    return 1.0 - float(np.trapezoid(density, grid))


def test_welch_matches_the_hand_worked_example():
    # means 2 and 5, variances 1 and 1, n = 3 each: se = sqrt(2/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4
    c = welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    se = math.sqrt(2 / 3)
    assert c.difference == -3.0
    # t(0.975, 4) = 2.776445 from any printed table
    assert c.low == pytest.approx(-3 - 2.776445 * se, abs=1e-5)
    assert c.high == pytest.approx(-3 + 2.776445 * se, abs=1e-5)
    assert c.p == pytest.approx(_two_sided_p_by_integration(-3 / se, 4), rel=1e-6)
    assert c.shown


def test_welch_with_unequal_variances_and_sizes_matches_an_independent_implementation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.48, 0.002, 5), rng.normal(0.481, 0.006, 7)
    c = welch(list(a), list(b))
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert c.p == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (c.low, c.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_paired_uses_only_the_seeds_both_ran_and_matches_the_one_sample_test():
    a = {0: 0.50, 1: 0.52, 2: 0.49, 3: 0.51, 9: 0.1}
    b = {0: 0.49, 1: 0.50, 2: 0.49, 3: 0.48}
    c = paired(a, b)
    differences = [0.01, 0.02, 0.0, 0.03]
    reference = scipy_stats.ttest_1samp(differences, 0.0)
    assert c.n_a == c.n_b == 4 and c.difference == pytest.approx(0.015)
    assert c.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert compare(a, b, "paired") == c and compare(a, b, "welch").test == "welch"
    with pytest.raises(ValueError, match="test must be one of"):
        compare(a, b, "mann-whitney")


def test_interval_covers_zero_exactly_when_p_is_above_the_level():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = list(rng.normal(0, 1, rng.integers(2, 8))), list(rng.normal(0.5, 2, rng.integers(2, 8)))
        c = welch(a, b)
        assert c.shown == (c.p < 0.05)


def test_too_few_seeds_and_constant_samples():
    assert welch([0.4], [0.5, 0.6]).p is None and not welch([0.4], [0.5, 0.6]).shown
    exact = welch([0.4, 0.4], [0.5, 0.5])
    assert exact.p == 0.0 and exact.low == exact.high == pytest.approx(-0.1)
    assert welch([0.4, 0.4], [0.4, 0.4]).p == 1.0 and not welch([0.4, 0.4], [0.4, 0.4]).shown


def test_holm_is_monotone_and_bounded():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 0.04)
    assert holm([0.04, 0.01, 0.03]) == [0.06, 0.03, 0.06]
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def _rows(method, ratio, values, auc=0.7):
    return [SweepRow(method, ratio, seed, test_bce=v, test_auc=auc + seed * 1e-3) for seed, v in enumerate(values)]


def test_the_comparison_table_states_differences_intervals_and_verdicts():
    rows = [
        *_rows("hash", 100, [0.480, 0.481, 0.482, 0.479, 0.480]),
        *_rows("cafe", 100, [0.470, 0.471, 0.469, 0.470, 0.472]),  # clearly lower
        *_rows("ce", 100, [0.478, 0.484, 0.480, 0.476, 0.483]),  # within the noise
        *_rows("robe", 1000, [0.5, 0.51]),
    ]  # no hash at 1000x: not compared
    found = {method: c for method, _, c in comparisons(rows, "hash")}
    assert set(found) == {"cafe", "ce"}
    assert found["cafe"].difference == pytest.approx(-0.0100) and found["cafe"].high < 0
    assert found["ce"].low < 0 < found["ce"].high
    table = comparison_table(rows, "hash")
    cafe = next(line for line in table.splitlines() if line.startswith("| cafe |"))
    ce = next(line for line in table.splitlines() if line.startswith("| ce |"))
    assert "| 5 / 5 |" in cafe and "-0.0100 [" in cafe and "lower BCE than hash (better)" in cafe
    assert "no difference shown" in ce
    assert "robe" not in table
