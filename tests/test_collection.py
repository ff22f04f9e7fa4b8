"""EmbeddingCollection: the shared budget, its split, and lookups."""

import pytest
import torch

from compemb import METHODS, BudgetError
from compemb.collection import EmbeddingCollection, Feature

FEATURES = [Feature("big", 200_000), Feature("mid", 20_000), Feature("small", 2_000), Feature("tiny", 4)]
FULL_BYTES = sum(f.num_embeddings for f in FEATURES) * 16 * 4


def _budgeted(collection):
    """The bytes counted against the budget: everything stored, but only the floats under paper accounting."""
    budgeted = sum(table.budgeted_bytes() for table in collection.embeddings.values())
    if all(getattr(table, "accounting", "honest") == "honest" for table in collection.embeddings.values()):
        assert budgeted == collection.memory().total
    return budgeted


@pytest.mark.parametrize("name", sorted(m for m in METHODS if METHODS[m].compresses))
@pytest.mark.parametrize("compression", [10, 100, 1000])
def test_total_memory_meets_the_overall_budget(name, compression):
    # methods built from per-id counts get each feature's (any counts do: the budget alone sets the sizes)
    counts = {f.name: torch.arange(f.num_embeddings) % 7 for f in FEATURES} if METHODS[name].needs_frequencies else None
    # QR of 200,000 ids needs 2 * sqrt(n) * d > the whole budget; AdaEmbed's per-id scores alone can exceed it
    per_id = METHODS[name].per_id_bytes * sum(f.num_embeddings for f in FEATURES)
    # cce at 10x of d=16: int16 pointers (8 bytes an id) are over 6.4 bytes an id, uint8 ones (k <= 256) under it
    if (
        (name == "qr" and compression == 1000)
        or per_id >= FULL_BYTES / compression
        or (name, compression) == ("cce", 10)
    ):
        with pytest.raises(BudgetError):
            EmbeddingCollection(FEATURES, 16, name, compression=compression, device="meta", frequencies=counts)
        return
    collection = EmbeddingCollection(FEATURES, 16, name, compression=compression, device="meta", frequencies=counts)
    total = _budgeted(collection)
    assert abs(total - FULL_BYTES / compression) <= 0.01 * FULL_BYTES / compression
    per_feature = collection.memory().per_feature
    assert set(per_feature) == {f.name for f in FEATURES}


def test_shares_follow_full_sizes_and_small_features_stay_full_when_that_is_smaller():
    collection = EmbeddingCollection(FEATURES, 16, "qr", compression=10)
    per_feature = collection.memory().per_feature
    assert type(collection.embeddings["tiny"]).__name__ == "FullEmbedding"
    assert per_feature["tiny"].total == 4 * 16 * 4
    # the big feature gets about 10x the mid one's share, as their full sizes
    assert per_feature["big"].total / per_feature["mid"].total == pytest.approx(10, rel=0.15)


def test_a_share_past_the_full_size_keeps_the_table_full():
    collection = EmbeddingCollection(FEATURES, 16, "hash", num_params=2 * FULL_BYTES // 4)  # twice the full size
    assert all(type(table).__name__ == "FullEmbedding" for table in collection.embeddings.values())
    with pytest.raises(ValueError, match="compression must be >= 1"):  # a ratio under 1 is refused, not made full
        EmbeddingCollection(FEATURES, 16, "hash", compression=0.5)


def test_a_budget_the_small_tables_use_up_is_refused():
    with pytest.raises(BudgetError):
        EmbeddingCollection(FEATURES, 16, "qr", num_params=50)


def test_forward_stacks_each_feature_in_column_order():
    collection = EmbeddingCollection(FEATURES, 8, "ce", compression=20, seed=3)
    ids = torch.tensor([[1, 2, 3, 0], [199_999, 19_999, 1_999, 3]])
    out = collection(ids)
    assert out.shape == (2, 4, 8)
    for column, feature in enumerate(FEATURES):
        assert torch.equal(out[:, column], collection.embeddings[feature.name](ids[:, column]))


def test_features_get_different_seeds_and_errors_name_the_feature():
    collection = EmbeddingCollection([Feature("a", 1000), Feature("b", 1000)], 8, "qr", compression=4)
    ids = torch.tensor([[5, 5]])
    out = collection(ids)
    assert not torch.equal(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="'b': id 1000 is outside"):
        collection(torch.tensor([[1, 1000]]))
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        collection(torch.tensor([1, 2]))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_an_id_outside_its_features_range_naming_the_feature(name):
    options = (
        {"frequencies": {"a": torch.ones(3000, dtype=torch.long), "b": torch.ones(3000, dtype=torch.long)}}
        if METHODS[name].needs_frequencies
        else {}
    )
    collection = EmbeddingCollection(
        [Feature("a", 3000), Feature("b", 3000)], 8, name, compression=None if name == "full" else 2, **options
    )
    collection(torch.tensor([[0, 2999]]))
    for bad in (3000, -1):
        with pytest.raises(ValueError, match=f"'b': id {bad} is outside \\[0, 3000\\)"):
            collection(torch.tensor([[1, bad]]))
    table = collection.embeddings["a"]  # alone too, with ids of any shape and as bags
    for call in (lambda: table(torch.tensor([[3000]])), lambda: table(torch.tensor([1, 3000]), torch.tensor([0]))):
        with pytest.raises(ValueError, match="'a': id 3000 is outside \\[0, 3000\\)"):
            call()


def test_the_full_method_needs_no_budget():
    collection = EmbeddingCollection(FEATURES, 4, "full")
    assert collection.memory().total == FULL_BYTES // 4


def test_tables_no_bigger_than_an_even_share_stay_full():
    features = [Feature("huge", 100_000), Feature("ten", 10), Feature("hundred", 100)]
    collection = EmbeddingCollection(features, 16, "hash", compression=50)
    # the budget is 32,002 floats, an even share 10,667: the 10- and 100-id tables (160 and 1,600 floats) fit
    assert type(collection.embeddings["ten"]).__name__ == "FullEmbedding"
    assert type(collection.embeddings["hundred"]).__name__ == "FullEmbedding"
    assert type(collection.embeddings["huge"]).__name__ == "HashingTrickEmbedding"
    assert collection.memory().total == pytest.approx(100_110 * 16 * 4 / 50, rel=0.01)


def test_paper_accounting_cce_meets_the_budget_with_floats_while_memory_reports_its_pointers():
    features = [Feature("C1", 20_000), Feature("C2", 5_000), Feature("C3", 300)]
    collection = EmbeddingCollection(features, 16, "cce", compression=20, accounting="paper")
    memory = collection.memory()
    budget = collection.budget.num_bytes
    assert abs(sum(t.budgeted_bytes() for t in collection.embeddings.values()) - budget) <= 0.01 * budget
    assert memory.float_bytes <= 1.01 * budget and memory.index_bytes > 0.05 * budget  # pointers: reported


# --- one shared table over every feature's ids ------------------------------------------------------------


def kaggle_features():
    from compemb.data.synthetic import CRITEO_KAGGLE_CARDINALITIES

    return [Feature(f"C{i + 1}", n) for i, n in enumerate(CRITEO_KAGGLE_CARDINALITIES)]


# QR needs 2 sqrt(n) rows of d, AdaEmbed a score per id and lowrank a coordinate per id: none fits 54k params of a
# 33.8M-id vocabulary
# qr: 2 sqrt(n) rows; cce: 4 pointers per id; the others: one float per id
UNREACHABLE_AT_10000 = {"qr", "adaembed", "lowrank", "mde", "cce"}


@pytest.mark.parametrize("name", sorted(m for m in METHODS if METHODS[m].compresses))
def test_shared_builds_every_method_at_10000x_of_criteo_kaggle(name):
    features = kaggle_features()
    total = sum(f.num_embeddings for f in features)
    budget = total * 16 * 4 / 10_000
    counts = None
    if METHODS[name].needs_frequencies:
        counts = {f.name: torch.ones(f.num_embeddings, dtype=torch.int64) for f in features}
    if name in UNREACHABLE_AT_10000:
        with pytest.raises(BudgetError, match="smallest budget it can meet"):
            EmbeddingCollection(features, 16, name, compression=10_000, sharing="shared", frequencies=counts)
        return
    collection = EmbeddingCollection(features, 16, name, compression=10_000, sharing="shared", frequencies=counts)
    assert list(collection.memory().per_feature) == ["shared"]
    assert abs(_budgeted(collection) - budget) <= 0.01 * budget
    ids = torch.stack([torch.randint(f.num_embeddings, (64,)) for f in features], dim=1)
    assert collection(ids).shape == (64, 26, 16)


def test_shared_reads_each_feature_at_its_offset():
    collection = EmbeddingCollection(FEATURES, 8, "hash", compression=20, sharing="shared", seed=5)
    table = collection.embeddings["shared"]
    assert table.num_embeddings == sum(f.num_embeddings for f in FEATURES)
    ids = torch.tensor([[1, 2, 3, 0], [199_999, 19_999, 1_999, 3]])
    offsets = torch.tensor([0, 200_000, 220_000, 222_000])
    expected = table(ids + offsets)
    assert torch.equal(collection(ids), expected)
    # the same id in two features is two ids of the shared vocabulary
    assert not torch.equal(
        collection(torch.tensor([[7, 7, 7, 1]]))[0, 0], collection(torch.tensor([[7, 7, 7, 1]]))[0, 1]
    )


def test_shared_refuses_an_id_past_its_features_range():
    collection = EmbeddingCollection(FEATURES, 8, "hash", compression=20, sharing="shared")
    with pytest.raises(ValueError, match="feature 'mid': id 20000 is outside \\[0, 20000\\)"):
        collection(torch.tensor([[0, 20_000, 0, 0]]))  # would read feature 'small''s id 0 without the check


def test_a_shared_full_table_holds_the_same_rows_at_the_init_of_one_table():
    features = FEATURES[1:]
    total = sum(f.num_embeddings for f in features)
    shared = EmbeddingCollection(features, 4, "full", sharing="shared")
    per_feature = EmbeddingCollection(features, 4, "full")
    assert list(shared.embeddings) == ["shared"] and shared.embeddings["shared"].num_embeddings == total
    assert shared.memory().total == per_feature.memory().total == total * 4 * 4
    # DLRM's init per table: one bound sqrt(1 / sum n) shared, sqrt(1 / n) per feature
    shared_bound = float(shared.embeddings["shared"].weight.detach().abs().max())
    largest_feature_bound = float(per_feature.embeddings[features[0].name].weight.detach().abs().max())
    assert shared_bound <= (1 / total) ** 0.5 < largest_feature_bound


def test_unknown_sharing_is_refused():
    with pytest.raises(ValueError, match="sharing must be one of"):
        EmbeddingCollection(FEATURES, 8, "hash", compression=20, sharing="pooled")


def test_a_collections_memory_has_a_tables_shape():
    from compemb.budget import MemoryReport

    collection = EmbeddingCollection(FEATURES, 8, "cafe", compression=20)
    memory, table = collection.memory(), collection.embeddings["big"].memory()
    assert isinstance(memory, MemoryReport) and isinstance(memory.total, int) and isinstance(table.total, int)
    assert memory.total == sum(r.total for r in memory.per_feature.values())
    assert memory.sketch_bytes == sum(r.sketch_bytes for r in memory.per_feature.values()) > 0
    assert memory.per_feature["big"] == table


@pytest.mark.parametrize("name", ["hash", "full", "cafe"])
def test_a_padding_id_reads_zeros_through_a_collection_too(name):
    collection = EmbeddingCollection(
        [Feature("a", 3000), Feature("b", 3000)], 8, name, compression=None if name == "full" else 2, padding_idx=0
    )
    out = collection(torch.tensor([[0, 5], [4, 0]]))
    assert out[0, 0].abs().sum() == 0 and out[1, 1].abs().sum() == 0 and out[0, 1].abs().sum() > 0


def test_bags_are_not_pooled_from_tables_that_reduce_by_max():
    from compemb.collection import Bags

    collection = EmbeddingCollection([Feature("clicked", 100, pooling="sum")], 4, "hash", compression=2, mode="max")
    with pytest.raises(ValueError, match="its table reduces bags by max"):
        collection.pool("clicked", Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])))


@pytest.mark.parametrize("name", ["items", "type", "a.b", ""])
def test_a_feature_name_torch_cannot_key_is_refused_in_one_line(name):
    with pytest.raises(ValueError, match=r"cannot name a table .*rename it"):
        EmbeddingCollection([Feature(name, 100), Feature("C2", 50)], 4, "hash", compression=2)
    EmbeddingCollection([Feature(name.replace(".", "_") + "_", 100), Feature("C2", 50)], 4, "hash", compression=2)
