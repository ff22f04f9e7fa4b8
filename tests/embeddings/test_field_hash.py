"""hash-fields: the CAFE paper's hash baseline (a hashed table per field, small fields full)."""

import pytest
import torch

from compemb import BudgetError, make_embedding
from compemb.collection import EmbeddingCollection, Feature


def test_small_fields_keep_their_ids_and_the_others_hash_within_their_own_rows():
    sizes = [4, 15, 300, 5_000, 20_000]
    module = make_embedding("hash-fields", sum(sizes), 16, compression=100, blocks=sizes)
    # the authors' rule at 100x: n x 100 <= 2,000 stays full (4 and 15 ids), the others hash
    assert module.field_full.tolist() == [True, True, False, False, False]
    rows = module.field_rows.tolist()
    assert rows[:2] == [4, 15]
    # the hashed rows in proportion to the fields' ids (one each, the rest shared out)
    hashed = sum(rows[2:])
    for size, got in zip(sizes[2:], rows[2:]):
        assert abs(got - (1 + (hashed - 3) * size / sum(sizes[2:]))) <= 1
    starts = [0, 4, 19, 319, 5_319, 25_319]
    offsets = [0, 4, 19, 19 + rows[2], 19 + rows[2] + rows[3]]
    for field in range(5):
        ids = torch.arange(starts[field], starts[field + 1])
        read = module.rows_of(ids)
        assert read.min() >= offsets[field] and read.max() < offsets[field] + rows[field]
        if field < 2:  # a full field: every id its own row
            assert torch.equal(read, offsets[field] + ids - starts[field])
    total = module.memory().total
    assert total == pytest.approx(sum(sizes) * 16 * 4 / 100, rel=0.01)


def test_full_fields_take_at_most_half_the_budget_and_never_the_largest():
    # at 5x the authors' rule keeps n <= 400 (100, 200, 300 ids) full; the budget is 2,600 x 64 / 5 = 33,280 bytes:
    # the 100-id field takes 6,400, adding the 200-id field (12,800 more) would pass half of it (16,640)
    sizes = [100, 200, 300, 2_000]
    module = make_embedding("hash-fields", sum(sizes), 16, compression=5, blocks=sizes)
    assert module.field_full.tolist() == [True, False, False, False]
    small = make_embedding("hash-fields", 300, 16, compression=1.5, blocks=[100, 200])
    assert small.field_full.tolist() == [True, False]  # the largest is compressed whatever the rule says


def test_in_a_shared_collection_it_is_the_per_field_layout_and_refuses_what_it_cannot_build():
    features = [Feature("a", 10), Feature("b", 3_000), Feature("c", 30_000)]
    collection = EmbeddingCollection(features, 16, "hash-fields", compression=100, sharing="shared")
    table = collection.embeddings["shared"]
    assert table.field_full.tolist() == [True, False, False]
    ids = torch.tensor([[0, 5, 20_000], [9, 2_999, 0]])
    assert collection(ids).shape == (2, 3, 16)
    # 26 fields need a row each: a budget under that is refused naming the smallest it meets
    many = [Feature(f"f{i}", 1_000) for i in range(26)]
    with pytest.raises(BudgetError, match="smallest budget it can meet"):
        EmbeddingCollection(many, 16, "hash-fields", compression=10_000, sharing="shared")
