"""lowrank: a fractional rank meets the budget, lookups equal the factorised product, and a low-rank table is learnt."""

import pytest
import torch

from compemb import BudgetError, make_embedding


def test_lookup_is_the_product_of_the_stored_coordinates_and_the_projection():
    emb = make_embedding("lowrank", 1000, 8, compression=3, seed=2)
    assert 0 < emb.extended_ids < 1000 and emb.low_rank == 2
    ids = torch.tensor([0, 5, emb.extended_ids - 1, emb.extended_ids, 999, 5])
    for position, x in enumerate(ids.tolist()):  # the slow reference, one id at a time
        coordinates = emb.low.detach()[x].tolist() + (
            [float(emb.extra.detach()[x, 0])] if x < emb.extended_ids else [0.0]
        )
        expected = torch.tensor(coordinates) @ emb.projection.detach()
        torch.testing.assert_close(emb(ids)[position], expected)


@pytest.mark.parametrize("compression", [1.1, 2, 3.3, 7, 15])
def test_every_budget_from_one_coordinate_per_id_is_met_within_one_percent(compression):
    emb = make_embedding("lowrank", 50_000, 16, compression=compression, device="meta")
    budget = 50_000 * 16 * 4 / compression
    assert abs(emb.memory().total - budget) <= 0.01 * budget
    assert emb.rank == pytest.approx((budget / 4 - emb.projection.numel()) / 50_000, abs=1e-3)


def test_a_budget_under_one_coordinate_per_id_names_the_smallest_it_can_meet():
    with pytest.raises(BudgetError, match="the smallest budget it can meet is 50,016 params"):
        make_embedding("lowrank", 50_000, 16, compression=20)


def test_it_learns_a_planted_low_rank_table_far_better_than_hashing_at_the_same_bytes():
    generator = torch.Generator().manual_seed(0)
    n, d = 2000, 8
    target = torch.randn(n, 2, generator=generator) @ torch.randn(2, d, generator=generator)  # rank 2
    losses = {}
    for method in ("lowrank", "hash"):
        emb = make_embedding(method, n, d, compression=3.5, seed=1)
        optimizer = torch.optim.Adam(emb.parameters(), lr=0.05)
        ids = torch.arange(n)
        for _ in range(400):
            loss = (emb(ids) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses[method] = float(loss)
    assert losses["lowrank"] < 0.05 * float(target.square().mean())  # rank >= 2 holds the planted table
    assert losses["lowrank"] < 0.2 * losses["hash"]  # 571 hashed rows for 2,000 distinct vectors cannot
