"""Hashing: exact arithmetic, uniformity, the universal collision rate, determinism across processes."""

import subprocess
import sys

import pytest
import torch

from compemb.hashing import MAX_BUCKETS, UniversalHash, hash_coefficients, hash_ids, hash_signs, reference_hash

EDGE_IDS = [0, 1, -1, 2**31 - 1, 2**32, 2**32 + 1, 2**62, 2**63 - 1, -(2**63), -123456789]


def test_matches_pure_python_reference_on_edge_and_random_ids():
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.tensor(EDGE_IDS), torch.randint(-(2**63), 2**63 - 1, (500,), generator=generator)])
    for seed, buckets in [(0, 1), (1, 7), (2, 1000), (3, MAX_BUCKETS)]:
        coefficients = hash_coefficients(seed, 3)
        hashed = hash_ids(ids, coefficients, buckets)
        assert hashed.shape == (len(ids), 3)
        for function, (a, b) in enumerate(coefficients.tolist()):
            expected = [reference_hash(int(x), a, b, buckets) for x in ids.tolist()]
            assert hashed[:, function].tolist() == expected
        assert int(hashed.min()) >= 0 and int(hashed.max()) < buckets


def test_coefficients_are_odd_multipliers_and_differ_by_seed_and_stream():
    first = hash_coefficients(0, 4)
    assert bool((first[:, 0] % 2 != 0).all())
    assert not torch.equal(first, hash_coefficients(1, 4))
    assert not torch.equal(first, hash_coefficients(0, 4, stream=1))
    assert torch.equal(first, hash_coefficients(0, 4))


@pytest.mark.parametrize("keys", ["sequential", "strided"])
def test_chi_square_uniformity(keys):
    buckets, count = 1000, 200_000
    if keys == "sequential":
        ids = torch.arange(count)
    else:  # ids that differ only in their high bits: a weak hash piles them into few buckets
        ids = torch.arange(count) * (2**32) + 17
    dof = buckets - 1
    for seed in range(3):
        hashed = hash_ids(ids, hash_coefficients(seed, 1), buckets).squeeze(-1)
        observed = torch.bincount(hashed, minlength=buckets).double()
        expected = count / buckets
        chi_square = float(((observed - expected) ** 2 / expected).sum())
        # chi-square with 999 dof: mean 999, sd 44.7; 5 sd is far beyond chance
        assert chi_square < dof + 5 * (2 * dof) ** 0.5, (keys, seed, chi_square)


PAIRS = [(1, 2), (0, 2**32), (-1, 1), (12345, 12345 + 2**31), (7, 7 + 64_000), (2**40, 2**40 + 3)]


def test_pairs_collide_over_seeds_at_the_universal_rate():
    buckets, seeds = 64, 20_000
    coefficients = torch.cat([hash_coefficients(seed, 1) for seed in range(seeds)])
    rates = []
    for x, y in PAIRS:
        hashed = hash_ids(torch.tensor([x, y]), coefficients, buckets)
        rate = float((hashed[0] == hashed[1]).double().mean())
        # multiply-add-shift is 2-approximately universal: at most 2/m for any pair
        assert rate <= 2 / buckets, (x, y, rate)
        rates.append(rate)
    # and about 1/m on average (sd of one rate is ~6% of 1/m here)
    assert abs(sum(rates) / len(rates) * buckets - 1) < 0.15


def test_two_seeds_agree_only_at_chance_rate():
    buckets = 100
    ids = torch.arange(-50_000, 50_000)
    first = hash_ids(ids, hash_coefficients(1, 1), buckets)
    second = hash_ids(ids, hash_coefficients(2, 1), buckets)
    agreement = float((first == second).double().mean())
    assert abs(agreement - 1 / buckets) < 0.002  # sd ~0.0003


def test_signs_are_balanced_and_independent_of_buckets():
    ids = torch.arange(100_000)
    signs = hash_signs(ids, hash_coefficients(5, 1, stream=1)).squeeze(-1)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.mean())) < 0.02
    buckets = hash_ids(ids, hash_coefficients(5, 1), 2).squeeze(-1)
    assert abs(float((signs * (2 * buckets - 1)).mean())) < 0.02


def test_module_keeps_coefficients_in_state_dict_and_moves_with_them():
    module = UniversalHash(1000, num_functions=2, seed=3)
    other = UniversalHash(1000, num_functions=2, seed=4)
    ids = torch.arange(100)
    assert not torch.equal(module(ids), other(ids))
    other.load_state_dict(module.state_dict())
    assert torch.equal(module(ids), other(ids))
    assert module.to("meta").coefficients.is_meta


def test_reset_redraws_from_the_seed_or_a_new_one():
    module = UniversalHash(1000, num_functions=3, seed=8, stream=2)
    assert torch.equal(module.coefficients, hash_coefficients(8, 3, stream=2))
    module.reset(seed=9)
    assert torch.equal(module.coefficients, hash_coefficients(9, 3, stream=2)) and module.seed == 9
    with torch.no_grad():
        module.coefficients.zero_()
    module.reset()
    assert torch.equal(module.coefficients, hash_coefficients(9, 3, stream=2))


@pytest.mark.parametrize("buckets", [0, -1, MAX_BUCKETS + 1])
def test_bad_bucket_counts_are_rejected(buckets):
    with pytest.raises(ValueError, match="num_buckets"):
        UniversalHash(buckets)


def test_identical_in_a_fresh_process():
    code = (
        "import torch; from compemb.hashing import hash_coefficients, hash_ids;"
        "print(hash_ids(torch.tensor([0, -7, 2**40, 99]), hash_coefficients(11, 2), 1000).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = hash_ids(torch.tensor([0, -7, 2**40, 99]), hash_coefficients(11, 2), 1000).tolist()
    assert out.strip() == str(here)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu():
    ids = torch.randint(-(2**63), 2**63 - 1, (10_000,))
    coefficients = hash_coefficients(0, 4)
    assert torch.equal(hash_ids(ids.cuda(), coefficients.cuda(), 12345).cpu(), hash_ids(ids, coefficients, 12345))
