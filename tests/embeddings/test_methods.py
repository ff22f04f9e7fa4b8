"""Each method against a slow, literal reading of its paper's formula."""

import math

import pytest
import torch

from compemb import make_embedding
from compemb.hashing import reference_hash

IDS = [0, 1, 5, 999, -7, 2**40]


def _h(module_hash, x, function=0):
    a, b = module_hash.coefficients[function].tolist()
    return reference_hash(x, a, b, module_hash.num_buckets)


def _sign(coefficients, x, function):
    a, b = coefficients[function].tolist()
    mixed = (a * x + b) & (2**64 - 1)
    return -1.0 if mixed >= 2**63 else 1.0


def test_hashing_trick_reads_one_hashed_row():
    emb = make_embedding("hash", None, 8, num_params=4000, seed=1)
    out = emb(torch.tensor(IDS))
    for row, x in zip(out, IDS):
        assert torch.equal(row, emb.weight[_h(emb.hash, x)])


def test_ce_concatenates_one_row_per_column_table():
    emb = make_embedding("ce", None, 8, num_params=4000, columns=4, seed=2)
    out = emb(torch.tensor(IDS))
    for row, x in zip(out, IDS):
        expected = torch.cat([emb.weight[j * emb.rows + _h(emb.hash, x, j)] for j in range(4)])
        assert torch.equal(row, expected)


def test_bloom_averages_its_hashed_rows():
    emb = make_embedding("bloom", None, 8, num_params=4000, num_hashes=3, seed=3)
    out = emb(torch.tensor(IDS))
    for row, x in zip(out, IDS):
        expected = torch.stack([emb.weight[_h(emb.hash, x, j)] for j in range(3)]).mean(0)
        torch.testing.assert_close(row, expected)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_qr_combines_quotient_and_remainder_rows(operation):
    emb = make_embedding("qr", 10_000, 8, compression=10, operation=operation, seed=4)
    with torch.no_grad():
        emb.quotient.normal_()  # mult starts at ones; make the quotient rows matter
    m = emb.modulus
    ids = [0, 1, m - 1, m, 9_999]
    out = emb(torch.tensor(ids))
    for row, x in zip(out, ids):
        quotient, remainder = emb.quotient[x // m], emb.remainder[x % m]
        expected = {"mult": quotient * remainder, "add": quotient + remainder}.get(operation)
        if expected is None:
            expected = torch.cat([quotient, remainder])
        torch.testing.assert_close(row, expected)


def test_qr_sizes_fill_the_budget_and_keep_ids_apart():
    emb = make_embedding("qr", 1_000_000, 16, compression=100, operation="mult")
    m, rows = emb.modulus, emb.quotient.shape[0]
    assert rows == math.ceil(1_000_000 / m) and m > rows  # the remainder table is the large one
    assert m * rows >= 1_000_000  # (x // m, x % m) is unique for every id
    assert abs((m + rows) * 16 - 160_000) <= 1_600


def test_qr_concat_splits_dims_and_below_two_sqrt_n_fails():
    emb = make_embedding("qr", 10_000, 9, compression=5, operation="concat")
    assert emb.quotient.shape[1] == 4 and emb.remainder.shape[1] == 5
    with pytest.raises(ValueError, match="smallest budget it can meet is"):
        make_embedding("qr", 10_000, 16, num_params=2 * 100 * 16 - 100)


def test_hash_embeddings_mix_components_by_importance():
    emb = make_embedding("hemb", None, 8, num_params=6000, num_hashes=3, seed=5)
    out = emb(torch.tensor(IDS))
    for row, x in zip(out, IDS):
        weights = emb.importance[_h(emb.importance_hash, x)]
        components = [emb.pool[_h(emb.component_hash, x, i)] for i in range(3)]
        expected = sum(w * c for w, c in zip(weights, components))
        torch.testing.assert_close(row, expected)


def test_hash_embeddings_split_the_budget_by_share():
    emb = make_embedding("hemb", 1_000_000, 16, compression=100, importance_share=0.25)
    assert emb.importance.numel() == pytest.approx(0.25 * 160_000, rel=0.01)


def test_robe_reads_signed_contiguous_chunks_of_a_circular_array():
    emb = make_embedding("robe", None, 8, num_params=500, chunks=2, seed=6)
    array, size, z = emb.weight[:, 0].detach(), emb.size, emb.chunk_size
    starts = {x: [_h(emb.hash, x, j) for j in range(2)] for x in range(2000)}
    wrapping = next(x for x, s in starts.items() if any(start > size - z for start in s))
    ids = [*IDS, wrapping]
    out = emb(torch.tensor(ids))
    for row, x in zip(out, ids):
        expected = []
        for j in range(2):
            start = _h(emb.hash, x, j)
            sign = _sign(emb.sign_hash.coefficients, x, j)
            expected += [sign * float(array[(start + t) % size].detach()) for t in range(z)]
        torch.testing.assert_close(row, torch.tensor(expected))


def test_hashednets_hash_every_coordinate_with_a_sign():
    emb = make_embedding("hashednets", None, 8, num_params=500, seed=7)
    array = emb.weight[:, 0].detach()
    out = emb(torch.tensor(IDS))
    for row, x in zip(out, IDS):
        expected = [_sign(emb.sign_hash.coefficients, x, j) * float(array[_h(emb.hash, x, j)]) for j in range(8)]
        torch.testing.assert_close(row, torch.tensor(expected))


@pytest.mark.parametrize("name", ["robe", "hashednets"])
def test_unsigned_flat_arrays_store_no_sign_hash(name):
    signed = make_embedding(name, None, 8, num_params=500)
    unsigned = make_embedding(name, None, 8, num_params=500, signed=False)
    assert unsigned.sign_hash is None
    assert unsigned.size > signed.size  # the sign coefficients' bytes went to floats
    out = unsigned(torch.tensor([3]))[0].detach()
    assert float(out[0]) == float(unsigned.weight[_h(unsigned.hash, 3, 0), 0].detach())


@pytest.mark.parametrize("name, option", [("ce", {"columns": 3}), ("robe", {"chunks": 3})])
def test_columns_must_divide_the_dim(name, option):
    with pytest.raises(ValueError, match="divide embedding_dim=8"):
        make_embedding(name, None, 8, num_params=5000, **option)


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ValueError, match="unknown method 'hsh'; did you mean 'hash'"):
        make_embedding("hsh", 10, 4, compression=2)


@pytest.mark.parametrize("init, bound", [("dlrm", 100_000**-0.5), ("uniform_dim", 16**-0.5)])
def test_outputs_start_at_the_full_tables_scale(init, bound):
    """Every method's untrained vectors spread as the full table's: U(-b, b), b = sqrt(1/n) (DLRM) or 1/sqrt(d)."""
    spreads = {}
    for name in [
        "full",
        "hash",
        "ce",
        "bloom",
        "qr",
        "hemb",
        "robe",
        "hashednets",
        "cce",
        "cce-hybrid",
        "cafe",
        "cafe-ml",
    ]:
        # cce's pointers (4 bytes an id at least) leave 10x of d=16 out of its reach: 4x
        budget = {"compression": 1} if name == "full" else {"compression": 4 if name == "cce" else 10}
        out = make_embedding(name, 100_000, 16, init=init, **budget)(torch.arange(20_000))
        spreads[name] = float(out.detach().std())
    expected = bound / math.sqrt(3)  # the sd of U(-b, b)
    for name, spread in spreads.items():
        assert spread == pytest.approx(expected, rel=0.25), (name, spreads)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of"):
        make_embedding("hash", 100, 4, compression=2, init="normal")
