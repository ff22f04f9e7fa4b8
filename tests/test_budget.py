"""Budget resolution and the budget error."""

import pytest

from compemb.budget import Budget, BudgetError, MemoryReport, check_budget, resolve_budget


def test_compression_and_num_params_resolve_to_bytes():
    assert resolve_budget(10_000_000, 16, compression=100).num_bytes == 6_400_000
    assert resolve_budget(10_000_000, 16, compression=100).num_params == 1_600_000
    assert resolve_budget(None, 16, num_params=1000).num_bytes == 4000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"compression": 10, "num_params": 10}, "exactly one"),
        ({"compression": 0}, "positive"),
        ({"compression": float("inf")}, "positive"),
        ({"num_params": -5}, "positive"),
        ({"num_params": 2.5}, "positive int"),
    ],
)
def test_bad_budgets_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_budget(1000, 16, **kwargs)


def test_compression_needs_a_vocabulary():
    with pytest.raises(ValueError, match="num_embeddings"):
        resolve_budget(None, 16, compression=10)


def test_memory_report_total_and_compression():
    report = MemoryReport(float_bytes=1000, index_bytes=200, sketch_bytes=40)
    assert report.total == 1240
    assert report.compression(100, 31) == pytest.approx(100 * 31 * 4 / 1240)
    assert (report + report).total == 2480


def test_check_budget_names_the_smallest_budget():
    check_budget("m", MemoryReport(4040), Budget(4000), smallest_params=10)  # 1% off: accepted
    with pytest.raises(BudgetError, match="smallest budget it can meet is 500 params"):
        check_budget("m", MemoryReport(2000), Budget(400), smallest_params=500)
    with pytest.raises(BudgetError, match="within 1%"):
        check_budget("m", MemoryReport(4100), Budget(4000), smallest_params=10)
