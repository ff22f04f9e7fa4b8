"""tt: lookups equal the contracted tensor train, budgets are met, the init has the full table's scale, and it learns."""

import pytest
import torch

from compemb import BudgetError, make_embedding
from compemb.embeddings.tt import BROADCAST_LIMIT, PAIRS_PER_ID, dim_factors, tt_sizes


def _contracted_table(emb):
    """The slow reference: the whole n1 n2 n3 x d table from the three cores, by one einsum over explicit indices."""
    (n1, n2, n3), (d1, d2, d3), (r1, r2) = emb.row_factors, emb.dim_factors, emb.ranks
    g1 = emb.core1.detach().view(n1, d1, r1)
    g2 = emb.core2.detach().view(n2, r1, d2, r2)
    g3 = emb.core3.detach().view(n3, r2, d3)
    table = torch.einsum("iap,jpbq,kqc->ijkabc", g1.double(), g2.double(), g3.double())
    return table.reshape(n1 * n2 * n3, d1 * d2 * d3)


@pytest.mark.parametrize("n, d, compression", [(1000, 8, 3), (4096, 16, 20), (777, 12, 5), (4096, 64, 4)])
def test_lookup_equals_the_contracted_train_for_every_id(n, d, compression):
    emb = make_embedding("tt", n, d, compression=compression, seed=3)
    n1, n2, n3 = emb.row_factors
    (d1, d2, d3), (r1, _) = emb.dim_factors, emb.ranks
    if d == 64:  # ranks large enough for G1's product to run as bmm rather than a broadcast
        assert d1 * r1 * d2 * d3 > BROADCAST_LIMIT
    assert n1 * n2 * n3 >= n and min(emb.ranks) >= 1
    ids = torch.arange(n)
    table = _contracted_table(emb)
    torch.testing.assert_close(emb(ids).double(), table[:n], rtol=1e-5, atol=1e-7)  # G2 G3 for all pairs
    few = torch.tensor([0, n - 1, n // 2])  # few ids: the per-id products
    assert n2 * n3 > PAIRS_PER_ID * len(few)
    torch.testing.assert_close(emb(few).double(), table[few], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("d", [1, 2, 7, 12, 16, 32, 64])
def test_dim_factors_multiply_to_the_dim_with_the_smallest_in_the_middle(d):
    d1, d2, d3 = dim_factors(d)
    assert d1 * d2 * d3 == d and d2 == min(d1, d2, d3)


@pytest.mark.parametrize(
    "n, d, compression",
    [(1_000_000, 16, 100), (100_000, 16, 2), (33_800_000, 16, 10_000), (33_800_000, 16, 10), (50_000, 32, 50)],
)
def test_budgets_are_met_within_one_percent_with_ranks_the_unfoldings_can_use(n, d, compression):
    emb = make_embedding("tt", n, d, compression=compression, device="meta")
    budget = n * d * 4 / compression
    assert abs(emb.memory().total - budget) <= 0.01 * budget
    (n1, n2, n3), (d1, d2, d3), (r1, r2) = emb.row_factors, emb.dim_factors, emb.ranks
    assert emb.memory().float_bytes == 4 * (n1 * d1 * r1 + r1 * n2 * d2 * r2 + r2 * n3 * d3)
    assert r1 <= n1 * d1 and r2 <= n3 * d3
    assert max(n1, n2, n3) <= 1.2 * min(n1, n2, n3)  # balanced factors near the cube root


def test_budget_under_the_rank_one_train_names_the_smallest_it_can_meet():
    (n1, n2, n3), _ = tt_sizes(1_000_000, 16, 1.0)
    smallest = n1 * 4 + n2 * 2 + n3 * 2
    with pytest.raises(BudgetError, match=f"the smallest budget it can meet is {smallest:,} params"):
        make_embedding("tt", 1_000_000, 16, num_params=smallest // 2)


def test_untrained_vectors_have_the_full_tables_variance():
    n = 100_000
    emb = make_embedding("tt", n, 16, compression=50, seed=1)
    vectors = emb(torch.randint(0, n, (20_000,), generator=torch.Generator().manual_seed(0)))
    expected = (n**-0.5) ** 2 / 3  # U(-b, b) with DLRM's b = sqrt(1/n)
    assert vectors.var().item() == pytest.approx(expected, rel=0.15)


def test_it_learns_a_planted_tensor_train_far_better_than_hashing_at_the_same_bytes():
    generator = torch.Generator().manual_seed(0)
    n, d = 4096, 8
    learner = make_embedding("tt", n, d, compression=8, seed=1)  # 4,096 floats
    (n1, n2, n3), (d1, d2, d3) = learner.row_factors, learner.dim_factors
    # the target: a rank-2 train over the learner's own digits (ids read the same way), unit-variance coordinates
    g1, g2, g3 = (torch.randn(*shape, generator=generator) for shape in ((n1, d1, 2), (n2, 2, d2, 2), (n3, 2, d3)))
    target = torch.einsum("iap,jpbq,kqc->ijkabc", g1, g2, g3).reshape(-1, d)[:n] / 2
    losses = {}
    for method in ("tt", "hash"):
        emb = learner if method == "tt" else make_embedding(method, n, d, compression=8, seed=1)
        optimizer = torch.optim.Adam(emb.parameters(), lr=0.02)
        ids = torch.arange(n)
        for _ in range(600):
            loss = (emb(ids) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[method] = loss.item()
    assert losses["tt"] < 0.05 * target.square().mean().item()
    assert losses["tt"] < 0.2 * losses["hash"]  # 512 hashed rows for 4,096 distinct vectors cannot
