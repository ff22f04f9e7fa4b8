"""mde: the power rule sets the dims, the budget is met, blocks route ids to their own tables, collections use it."""

import math

import pytest
import torch

from compemb import BudgetError, make_embedding
from compemb.collection import EmbeddingCollection, Feature
from compemb.embeddings.mixed_dim import power_rule_dims


def _stored_floats(sizes, dims, d):
    return sum(n * r + (r * d if r < d else 0) for n, r in zip(sizes, dims))


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.3, 0.5])
def test_power_rule_dims_follow_the_size_ratio_and_fill_the_budget(alpha):
    sizes, d, budget = [300, 20_000, 1_000_000, 50_000], 16, 3_000_000
    dims = power_rule_dims(sizes, d, budget, alpha)
    assert _stored_floats(sizes, dims, d) == pytest.approx(budget, rel=1e-6)
    free = [b for b, r in enumerate(dims) if 1 < r < d]  # not clipped: r_b / r_c = (n_c / n_b)^alpha
    for b in free:
        for c in free:
            assert dims[b] / dims[c] == pytest.approx((sizes[c] / sizes[b]) ** alpha, rel=1e-6)
    # larger blocks never get more coordinates per id
    by_size = sorted(range(len(sizes)), key=lambda b: sizes[b])
    assert all(dims[a] >= dims[b] - 1e-9 for a, b in zip(by_size, by_size[1:]))


@pytest.mark.parametrize("compression", [1.5, 4, 8, 15])
def test_budgets_from_one_coordinate_per_id_to_the_full_table_are_met(compression):
    sizes = [40, 3_000, 70_000, 200_000]
    n = sum(sizes)
    emb = make_embedding("mde", n, 16, compression=compression, blocks=sizes, device="meta")
    budget = n * 16 * 4 / compression
    assert abs(emb.memory().total - budget) <= 0.01 * budget
    # a fractional dim r stores n * r coordinates and a ceil(r) x d projection
    expected = sum(n * r + (math.ceil(r) * 16 if r < 16 else 0) for n, r in zip(sizes, emb.dims))
    assert emb.memory().float_bytes == pytest.approx(4 * expected, abs=4)
    whole = [r for b, r in enumerate(emb.dims) if sizes[b] != max(sizes)]
    assert all(float(r).is_integer() for r in whole)  # only the largest block's dim is fractional


def test_a_budget_under_one_coordinate_per_id_names_the_smallest_it_can_meet():
    sizes = [1_000, 99_000]
    with pytest.raises(BudgetError, match=f"the smallest budget it can meet is {100_000 + 2 * 16:,} params"):
        make_embedding("mde", 100_000, 16, compression=20, blocks=sizes)


def test_blocks_must_cover_the_vocabulary():
    with pytest.raises(ValueError, match="blocks must be positive sizes summing to num_embeddings 1,000"):
        make_embedding("mde", 1000, 8, compression=2, blocks=[500, 400])
    with pytest.raises(ValueError, match="alpha"):
        make_embedding("mde", 1000, 8, compression=2, alpha=-1.0)


def test_each_block_reads_its_own_table_and_projection():
    sizes = [10, 300, 5_000]
    emb = make_embedding("mde", sum(sizes), 8, compression=3, blocks=sizes, seed=4)
    starts = [0, 10, 310]
    ids = torch.tensor([5309, 0, 9, 10, 309, 310, 4, 2000, 309])  # every block, out of order, one repeated
    out = emb(ids)
    for position, x in enumerate(ids.tolist()):  # the slow reference: find the block by hand
        b = max(i for i, start in enumerate(starts) if x >= start)
        expected = emb.tables[b](torch.tensor([x - starts[b]]))[0]
        torch.testing.assert_close(out[position], expected)
    assert emb.dims[0] == 8 and emb.dims[2] < emb.dims[1] < 8  # small block full, larger ones fewer dims


def test_untrained_vectors_start_at_the_modules_full_table_scale():
    sizes = [1_000, 200_000]
    emb = make_embedding("mde", sum(sizes), 16, compression=4, blocks=sizes, seed=2)
    bound = sum(sizes) ** -0.5
    for start, size in ((0, 1_000), (1_000, 200_000)):
        vectors = emb(torch.arange(start, start + size)[:1_000])
        assert vectors.var().item() == pytest.approx(bound**2 / 3, rel=0.2)


def test_shared_collection_gives_each_feature_a_block_and_per_feature_splits_by_the_power_rule():
    features = [Feature("small", 200), Feature("mid", 20_000), Feature("big", 400_000)]
    shared = EmbeddingCollection(features, 16, "mde", compression=6, sharing="shared")
    table = shared.embeddings["shared"]
    assert table.block_sizes == [200, 20_000, 400_000]
    per_feature = EmbeddingCollection(features, 16, "mde", compression=6)
    total = sum(report.total for report in per_feature.memory().per_feature.values())
    budget = 420_200 * 16 * 4 / 6
    assert abs(total - budget) <= 0.01 * budget
    dims = {name: getattr(t, "dims", [16])[0] for name, t in per_feature.embeddings.items()}
    assert dims["small"] == 16 and dims["big"] < dims["mid"]
    # the same rule in both: the big feature's dim agrees within the rounding the largest block absorbs
    assert math.isclose(dims["big"], table.dims[2], abs_tol=0.2)
    ids = torch.tensor([[3, 7, 9], [199, 19_999, 399_999]])
    assert shared(ids).shape == per_feature(ids).shape == (2, 3, 16)


def test_it_learns_blocks_of_different_difficulty_better_than_one_dim_for_all():
    # a small block of 64 rich (full-rank) vectors and a large block of 4,096 vectors of rank 1: the power rule
    # gives the small block more coordinates than one dim for all (alpha 0) does
    generator = torch.Generator().manual_seed(0)
    small, large, d = 64, 4096, 8
    target = torch.cat(
        [
            torch.randn(small, d, generator=generator),
            torch.randn(large, 1, generator=generator) @ torch.randn(1, d, generator=generator),
        ]
    )
    losses = {}
    for alpha in (0.0, 0.5):
        emb = make_embedding("mde", small + large, d, compression=6, blocks=[small, large], alpha=alpha, seed=1)
        optimizer = torch.optim.Adam(emb.parameters(), lr=0.05)
        ids = torch.arange(small + large)
        for _ in range(300):
            loss = (emb(ids) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[alpha] = loss.item()
    assert losses[0.5] < 0.5 * losses[0.0]
