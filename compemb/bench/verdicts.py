"""A sweep's verdicts: every method against a baseline at each ratio asked, with intervals and p-values.

Every verdict sentence in ``benchmarks/results/`` comes from this table: the difference of the mean test BCE (and
AUC) over seeds, its 95% confidence interval, the two-sided p-value of the test (:mod:`compemb.bench.stats`), the
seeds on each side, and "no difference shown" where the interval covers 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from compemb.bench.stats import Comparison, compare, holm

# rows are compemb.bench.quality.SweepRow (method, ratio_asked, seed, test_bce, test_auc); not imported: quality
# imports this module
SweepRow = Any


def _by_seed(rows: Sequence[SweepRow], method: str, ratio: float, metric: str) -> dict[int, float]:
    return {
        r.seed: getattr(r, metric)
        for r in rows
        if r.method == method and r.ratio_asked == ratio and getattr(r, metric) is not None
    }


def comparisons(
    rows: Sequence[SweepRow], baseline: str, metric: str = "test_bce", test: str = "welch"
) -> list[tuple[str, float, Comparison]]:
    """``(method, ratio asked, comparison of method - baseline)`` for every other method at a ratio the baseline ran."""
    found = []
    seen: list[tuple[str, float]] = []
    for row in rows:
        key = (row.method, row.ratio_asked)
        if row.method == baseline or key in seen:
            continue
        seen.append(key)
        reference = _by_seed(rows, baseline, row.ratio_asked, metric)
        values = _by_seed(rows, row.method, row.ratio_asked, metric)
        if reference and values:
            found.append((row.method, row.ratio_asked, compare(values, reference, test)))
    return found


def verdict(comparison: Comparison, baseline: str, lower_is_better: bool = True, metric: str = "BCE") -> str:
    """ "lower BCE than hash", "higher ...", "no difference shown", or why no test could be made."""
    if comparison.low is None:
        return f"too few seeds to test ({comparison.n_a} and {comparison.n_b}; 2 or more each)"
    if not comparison.shown:
        return "no difference shown"
    better = (comparison.difference < 0) == lower_is_better
    direction = "lower" if comparison.difference < 0 else "higher"
    return f"{direction} {metric} than {baseline} ({'better' if better else 'worse'})"


def _interval(comparison: Comparison, spec: str) -> str:
    if math.isnan(comparison.difference):
        return "—"
    text = format(comparison.difference, spec)
    if comparison.low is None:
        return text
    return f"{text} [{format(comparison.low, spec)}, {format(comparison.high, spec)}]"


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def comparison_table(rows: Sequence[SweepRow], baseline: str, test: str = "welch") -> str:
    """The markdown table of every method against ``baseline``, test BCE and AUC, with the verdict on test BCE."""
    bce = comparisons(rows, baseline, "test_bce", test)
    auc = {(m, r): c for m, r, c in comparisons(rows, baseline, "test_auc", test)}
    if not bce:
        return f"(no method ran at a ratio where {baseline} ran: nothing to compare)"
    adjusted = holm([c.p for _, _, c in bce])
    kind = "Welch's t-test" if test == "welch" else "paired t-test over the seeds both ran"
    lines = [
        f"Each method against `{baseline}` at the same ratio asked: difference of the means over seeds "
        f"(method - {baseline}), its 95% confidence interval, and the two-sided p-value ({kind}; p Holm: adjusted "
        f"over this table's rows). Seeds vary initialisation, hashes and batch order, not the data.",
        "",
        f"| method | ratio asked | seeds (method / {baseline}) | test BCE difference [95% CI] | p | p Holm | "
        f"test AUC difference [95% CI] | p | verdict on test BCE |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (method, ratio, c), p_holm in zip(bce, adjusted):
        a = auc.get((method, ratio))
        lines.append(
            f"| {method} | {ratio:g} | {c.n_a} / {c.n_b} | {_interval(c, '+.4f')} | {_p(c.p)} | {_p(p_holm)} | "
            f"{_interval(a, '+.4f') if a else '—'} | {_p(a.p) if a else '—'} | {verdict(c, baseline)} |"
        )
    return "\n".join(lines)


def default_baseline(methods: Sequence[str]) -> str:
    """The baseline a sweep compares against when none is named: ``hash`` if it ran, else the first method."""
    return "hash" if "hash" in methods else methods[0]
