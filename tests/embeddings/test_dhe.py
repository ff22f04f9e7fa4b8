"""DHE: the hash encoding's distributions, the init scale, open vocabularies, and that the MLP learns."""

import math

import pytest
import torch

from compemb import make_embedding
from compemb.embeddings.dhe import dhe_sizes


def test_the_encodings_have_the_distributions_they_name():
    ids = torch.arange(20_000)
    uniform = make_embedding("dhe", None, 8, num_params=40_000, seed=1).encode(ids)
    assert uniform.min() >= -1 and uniform.max() <= 1
    assert abs(float(uniform.mean())) < 0.01 and float(uniform.std()) == pytest.approx(1 / math.sqrt(3), rel=0.02)
    gaussian = make_embedding("dhe", None, 8, num_params=40_000, seed=1, encoding="gaussian").encode(ids)
    assert abs(float(gaussian.mean())) < 0.01 and float(gaussian.std()) == pytest.approx(1, rel=0.02)
    assert abs(float((gaussian.abs() > 1.96).float().mean()) - 0.05) < 0.005  # Gaussian tails, not uniform ones


def test_untrained_vectors_have_the_full_tables_scale_and_any_id_reads_one():
    emb = make_embedding("dhe", 1_000_000, 16, compression=100, seed=3)
    vectors = emb(torch.randint(0, 1_000_000, (5000,), generator=torch.Generator().manual_seed(0)))
    assert float(vectors.detach().std()) == pytest.approx(math.sqrt(1 / 1_000_000) / math.sqrt(3), rel=0.1)
    open_vocabulary = make_embedding("dhe", None, 16, num_params=50_000, seed=3)
    assert open_vocabulary(torch.tensor([-(2**62), 2**62])).shape == (2, 16)


@pytest.mark.parametrize("budget", [1_000, 54_020 * 4, 6_400_000])
def test_sizes_meet_the_budget_within_one_percent(budget):
    k, h = dhe_sizes(budget, 16)
    stored = 4 * (k * h + h + h * 16 + 16) + 16 * k
    assert abs(stored - budget) <= 0.01 * budget and 2 <= k <= 1024


def test_the_mlp_learns_a_mapping_from_ids():
    generator = torch.Generator().manual_seed(0)
    ids, target = torch.arange(300), torch.randn(300, 4, generator=generator)
    emb = make_embedding("dhe", 300, 4, num_params=20_000, seed=0, init="uniform_dim")
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.01)
    first = None
    for _ in range(300):
        loss = (emb(ids) - target).square().mean()
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.3 * first
