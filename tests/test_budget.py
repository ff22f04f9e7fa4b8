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


def test_check_budget_names_what_can_be_met():
    check_budget("m", MemoryReport(4040), Budget(4000), smallest_params=10)  # 1% off: accepted
    with pytest.raises(BudgetError, match="smallest budget it can meet is 500 params"):
        check_budget("m", MemoryReport(2000), Budget(400), smallest_params=500)
    with pytest.raises(BudgetError, match="within 1%.*every budget from 2,000 params up"):
        check_budget("m", MemoryReport(4100), Budget(4000), smallest_params=10, every_budget_from=2000)
    with pytest.raises(BudgetError, match="largest budget it can meet is 900 params"):
        check_budget("m", MemoryReport(3600), Budget(4000), smallest_params=10, largest_params=900)


def test_a_budget_under_one_float_is_refused():
    with pytest.raises(ValueError, match="less than one float"):
        resolve_budget(10, 1, compression=1000)


def test_budget_errors_of_real_methods():
    from compemb import make_embedding

    # a hash table moves in rows of 16 floats: 20 params is one row, 804 and up are always met
    assert make_embedding("hash", None, 16, num_params=20).rows == 1
    with pytest.raises(BudgetError, match="smallest budget it can meet is 20 params; it meets every budget from 804"):
        make_embedding("hash", None, 16, num_params=110)
    with pytest.raises(BudgetError, match="largest budget it can meet is 404 params"):
        make_embedding("qr", 100, 4, num_params=1000)


def test_nearest_size_builds_what_strict_budgets_refuse_and_only_inside_the_block():
    from compemb import make_embedding
    from compemb.budget import nearest_size

    with nearest_size():
        emb = make_embedding("hash", None, 16, num_params=110)
    assert emb.rows == 7  # (440 - 16) / 64 = 6.6 rows, rounded
    with pytest.raises(BudgetError):
        make_embedding("hash", None, 16, num_params=110)
