"""compemb.compress: any method fitted to a trained table; least squares where the method is linear."""

import pytest
import torch

from compemb import METHODS, compress


def _table(n=600, d=8, seed=0):
    """Rows that share a few directions (as trained embeddings do), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=generator) @ torch.randn(3, d, generator=generator) + 0.1 * torch.randn(
        n, d, generator=generator
    )


def test_the_hashing_trick_is_fitted_to_each_buckets_mean_row():
    table = _table().double()  # in float64: L-BFGS reaches the solution to ~1e-7
    fitted = compress(table, "hash", compression=4)
    buckets = fitted.hash(torch.arange(600)).squeeze(-1)
    for bucket in buckets.unique().tolist():  # the least-squares solution, bucket by bucket
        torch.testing.assert_close(fitted.weight[bucket], table[buckets == bucket].mean(0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_fits_a_table_better_than_it_starts(name):
    options = {"frequencies": torch.ones(600, dtype=torch.long)} if METHODS[name].needs_frequencies else {}
    fitted = compress(_table(), name, compression=None if name == "full" else 4, steps=40, **options)
    assert fitted.fit_error < 0.9 * fitted.fit_baseline, (fitted.fit_error, fitted.fit_baseline)
    if name == "full":
        assert fitted.fit_error < 1e-8


def test_clustering_fits_shared_directions_far_better_than_hashing_at_one_budget():
    table = _table(seed=1)
    hashed, clustered = compress(table, "hash", compression=4), compress(table, "cce-paper", compression=4)
    assert clustered.fit_error < 0.2 * hashed.fit_error


def test_a_bad_table_is_refused():
    with pytest.raises(ValueError, match="2-D floating-point"):
        compress(torch.arange(10), "hash", compression=2)
