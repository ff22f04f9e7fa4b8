"""Post-training quantization: error bounds, stored bytes, PQ budgets, every method and model, spec round trips."""

import itertools
import json
import math

import pytest
import torch

from compemb import BudgetError, FullEmbedding, QuantizedEmbedding, quantize
from compemb.cluster import assign
from compemb.collection import EmbeddingCollection, Feature
from compemb.models import DLRM

from .embeddings.conftest import ALL_METHODS, build, reference_bags

LEVELS = {"int8": 255, "int4": 15}
EPS32 = torch.finfo(torch.float32).eps


def _state_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _ids(n, count=300, seed=1):
    return torch.randint(0, n, (count,), generator=torch.Generator().manual_seed(seed))


def _relative_error(quantized, original):
    return float((quantized - original).detach().norm() / original.norm())


def _trained_full(n=600, d=16, seed=0):
    """A full table after a few SGD steps, its rows then scaled 0.01x-10x (so per-row scales matter), one constant."""
    emb = FullEmbedding(n, d, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randn(n, d, generator=generator)
    optimizer = torch.optim.SGD(emb.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        ((emb(torch.arange(n)) - targets) ** 2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        emb.weight.mul_(torch.logspace(-2, 1, n)[torch.randperm(n, generator=generator)].unsqueeze(1))
        emb.weight[3] = 0.25  # a constant row, exactly an fp16: scale 0, read back exactly (with a row per scale)
    return emb


# --- row-wise error bounds --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("d", [16, 3, 1])
def test_every_coordinate_is_within_half_its_rows_step(scheme, d):
    n = 601  # not a multiple of the 3 or 8 rows that narrow tables group under one scale
    emb = _trained_full(n, d)
    q = quantize(emb, scheme)
    r = q.spec()["tables"]["weight"]["group_rows"]
    assert r == math.ceil(8 / d)
    codes = d * r if scheme == "int8" else math.ceil(d * r / 2)
    assert q.memory().total == math.ceil(n / r) * (codes + 4)
    table = q.tables["weight"]
    group = torch.arange(n) // r
    scale, bias = table.scale.float()[group], table.bias.float()[group]
    weight = emb.weight.detach()
    error = (q(torch.arange(n)) - weight).abs()
    # fp32 slack of computing (x - bias) / scale and code * scale + bias
    slack = 4 * EPS32 * (bias.abs() + LEVELS[scheme] * scale + weight.abs().amax(1))
    assert bool((error <= (scale / 2 + slack).unsqueeze(1)).all())
    if r == 1:
        assert float(scale[3]) == 0 and bool((q(torch.tensor([3])) == 0.25).all())
    # the stored step is the group's own: (max - min) / levels, up to fp16 rounding (relative 2^-10, plus the bias's)
    inf = torch.full((math.ceil(n / r),), math.inf)
    low = inf.scatter_reduce(0, group, weight.amin(1), "amin", include_self=False)[group]
    high = (-inf).scatter_reduce(0, group, weight.amax(1), "amax", include_self=False)[group]
    tight = ((high - low) + low.abs() * 2**-10 + 2**-24) / LEVELS[scheme] * (1 + 2**-10) + 2**-24
    assert bool((scale <= tight * (1 + 1e-6)).all())
    assert bool((bias <= low).all())  # rounded down: no value lies below the range


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bags_agree_with_a_slow_reference_on_the_dequantized_table(scheme, mode):
    emb = FullEmbedding(200, 16, mode=mode, seed=2)
    q = quantize(emb, scheme)
    table = q.dequantize()["weight"]
    ids = _ids(200, 40)
    offsets = torch.tensor([0, 3, 3, 10, 25, 39])  # an empty bag and a one-id bag
    weights = torch.rand(40, generator=torch.Generator().manual_seed(3)) if mode == "sum" else None
    bounds = offsets.tolist() + [len(ids)]
    expected = []
    for start, end in itertools.pairwise(bounds):
        rows = [table[ids[i]].double() * (1.0 if weights is None else float(weights[i])) for i in range(start, end)]
        total = torch.stack(rows).sum(0) if rows else torch.zeros(16, dtype=torch.float64)
        expected.append(total / max(1, end - start) if mode == "mean" else total)
    got = q(ids, offsets, per_sample_weights=weights)
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    # single lookups read the same dequantized rows
    torch.testing.assert_close(q(ids), table[ids])


# --- stored bytes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 64, 15])
def test_rowwise_bytes_are_codes_plus_four_bytes_per_row(d):
    n = 1000
    emb = FullEmbedding(n, d)
    int8, int4 = quantize(emb, "int8"), quantize(emb, "int4")
    assert int8.memory().total == n * d + 4 * n
    assert int4.memory().total == n * math.ceil(d / 2) + 4 * n
    # int8 stores (d + 4) / (4d) of the fp32 table: 0.3125 at d=16, 0.265625 at d=64
    assert int8.memory().total / emb.memory().total == pytest.approx((d + 4) / (4 * d))
    assert int8.memory().float_bytes == 4 * n  # scales and biases are the floats, codes the index bytes


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("scheme", ["int8", "int4", "pq"])
def test_memory_is_the_state_dict_bytes_for_every_method(name, scheme):
    module = build(name)
    q = quantize(module, scheme)
    assert q.memory().total == _state_bytes(q)
    assert q.memory().sketch_bytes == module.memory().sketch_bytes
    assert q.memory().total < module.memory().total


# --- every method, and models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_METHODS)
def test_int8_of_every_method_stays_close_and_leaves_the_original_alone(name):
    module = build(name).eval()
    ids = _ids(1000)
    before, state = module(ids).detach(), {k: v.clone() for k, v in module.state_dict().items()}
    q = quantize(module, "int8")
    assert isinstance(q, QuantizedEmbedding) and q.method_name == f"{name}+int8" and not q.training
    assert q.spec()["tables"], "every method has a table to quantize"
    assert not any(p.requires_grad for p in q.parameters())
    # int8 noise is ~1/255 of a row's spread per table; products of up to three tables (TT) stay well under 2%
    assert _relative_error(q(ids), before) < 0.02
    offsets = torch.tensor([0, 5, 5, 40, 299])
    torch.testing.assert_close(q(ids, offsets).double(), reference_bags(q, ids, offsets), rtol=1e-4, atol=1e-6)
    assert torch.equal(module(ids), before)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters()) and module.memory().total > 0
    repr(q)


def test_a_table_too_small_to_gain_stays_fp32_and_valid():
    for emb in (FullEmbedding(3, 1), FullEmbedding(1, 8)):  # int8 would store 12 bytes for 12; one row is no table
        q = quantize(emb, "int8")
        assert q.spec()["tables"] == {}
        assert q.memory().total == emb.memory().total == _state_bytes(q)
        ids = torch.arange(emb.num_embeddings)
        assert torch.equal(q(ids), emb(ids).detach())
        weights = torch.rand(len(ids))
        torch.testing.assert_close(q(ids, torch.tensor([0]), weights), emb(ids, torch.tensor([0]), weights))


FEATURES = [Feature("big", 3000), Feature("mid", 700), Feature("small", 60), Feature("tiny", 4)]


def _sparse(batch=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.num_embeddings, (batch,), generator=generator) for f in FEATURES], 1)


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
def test_a_collection_has_every_table_replaced_and_stays_close(sharing):
    collection = EmbeddingCollection(FEATURES, 8, "hash", compression=4, sharing=sharing).eval()
    sparse = _sparse()
    before = collection(sparse).detach()
    q = quantize(collection, "int8")
    assert type(q) is EmbeddingCollection and not q.training
    assert q.embeddings.keys() == collection.embeddings.keys()
    assert all(isinstance(table, QuantizedEmbedding) for table in q.embeddings.values())
    assert not any(isinstance(table, QuantizedEmbedding) for table in collection.embeddings.values())
    assert _relative_error(q(sparse), before) < 0.02
    assert torch.equal(collection(sparse), before)
    assert q.memory().total < collection.memory().total


def test_a_dlrm_stays_close_and_its_dense_layers_still_train():
    model = DLRM(EmbeddingCollection(FEATURES, 8, "full"), bottom=(16,), top=(16,)).eval()
    dense, sparse = torch.rand(64, 13, generator=torch.Generator().manual_seed(4)), _sparse()
    before = model(dense, sparse).detach()
    q = quantize(model, "int8")
    assert type(q) is DLRM
    assert all(isinstance(table, QuantizedEmbedding) for table in q.embeddings.embeddings.values())
    assert _relative_error(q(dense, sparse), before) < 0.02
    assert torch.equal(model(dense, sparse), before)
    q.train()
    q(dense, sparse).sum().backward()
    assert all(p.grad is not None for p in q.top.parameters())
    assert not any(table.inner.training for table in q.embeddings.embeddings.values())


def test_nothing_to_quantize_and_quantizing_twice_are_refused():
    with pytest.raises(ValueError, match="Linear holds no CompressedEmbedding"):
        quantize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="quantized already"):
        quantize(quantize(FullEmbedding(10, 8)))


# --- product quantization -------------------------------------------------------------------------------------------


def test_pq_with_256_centroids_meets_compression_budgets():
    n, d = 500_000, 16  # big enough that the codebook (256 x 16 fp32) is under 1% of a 16x budget
    emb = FullEmbedding(n, d)
    full = n * d * 4
    for ratio in (8, 16):
        q = quantize(emb, "pq", compression=ratio)
        table = q.spec()["tables"]["weight"]
        assert table["centroids"] == 256 and table["scheme"] == "pq"
        assert q.memory().total == n * table["subspaces"] + 256 * d * 4 == _state_bytes(q)
        assert abs(q.memory().total - full / ratio) <= 0.01 * full / ratio
    with pytest.raises(BudgetError, match=r"reaches from 3\.99x \(subspaces=16\) to 61\.97x \(subspaces=1\)"):
        quantize(emb, "pq", compression=100)  # one subspace: n bytes + the codebook, 62x at most


def test_pq_error_falls_as_subspaces_grow_and_beats_a_random_codebook():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 4, generator=generator)
    emb = FullEmbedding(6000, 4)
    with torch.no_grad():
        emb.weight.copy_(x)
    spread = ((x - x.mean(0)) ** 2).sum()
    errors = []
    for m in (1, 2, 4):
        q = quantize(emb, "pq", subspaces=m)
        errors.append(float(((q.dequantize()["weight"] - x) ** 2).sum() / spread))
        assert q.memory().total == 6000 * m + 256 * 4 * 4
    assert errors[0] > errors[1] > errors[2]
    # 256 random N(0, 1) centroids per (width 1) subspace, every row at its nearest: Lloyd's is far better
    random_rows = torch.empty_like(x)
    for column in range(4):
        centroids = torch.randn(256, 1, generator=generator)
        random_rows[:, column] = centroids[assign(x[:, column : column + 1], centroids)[0], 0]
    assert errors[2] < 0.5 * float(((random_rows - x) ** 2).sum() / spread)


def test_pq_splits_uneven_widths_and_keeps_small_tables_int8():
    q = quantize(FullEmbedding(1000, 8), "pq", subspaces=3)
    assert q.spec()["tables"]["weight"]["widths"] == [3, 3, 2]
    assert q.memory().total == 1000 * 3 + 256 * 8 * 4
    small = quantize(FullEmbedding(300, 8), "pq")  # under 2 x 256 rows: int8
    assert small.spec()["tables"]["weight"]["scheme"] == "int8"
    assert small.memory().total == 300 * (8 + 4)


# --- spec round trip --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["full", "ce", "dhe"])
@pytest.mark.parametrize("scheme", ["int8", "int4", "pq"])
def test_from_spec_and_load_state_dict_reproduce_the_outputs(name, scheme):
    module = build(name, 2000, 8, 2)
    q = quantize(module, scheme)
    if name == "full":
        assert q.spec()["tables"]["weight"]["scheme"] == scheme
    spec = json.loads(json.dumps(q.spec()))
    fresh = build(name, 2000, 8, 2, seed=7)  # other hashes too: the state dict must bring them
    rebuilt = QuantizedEmbedding.from_spec(fresh, spec)
    ids = _ids(2000)
    rebuilt(ids)  # a lookup of the uninitialised buffers: its fp32 copies must not outlive the load
    rebuilt.load_state_dict(q.state_dict())
    assert torch.equal(rebuilt(ids), q(ids))
    assert rebuilt.memory() == q.memory()
    with pytest.raises(ValueError, match="does not match"):
        QuantizedEmbedding.from_spec(build(name, 500, 8, 2), spec)


# --- argument errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"scheme": "int3"}, ValueError, "unknown scheme 'int3'; did you mean 'int8'"),
        ({"scheme": "int8", "compression": 4}, ValueError, "apply to scheme 'pq' only"),
        ({"scheme": "pq", "compression": 0}, ValueError, "compression must be a positive number, got 0"),
        ({"scheme": "pq", "compression": float("nan")}, ValueError, "compression must be a positive number"),
        ({"scheme": "pq", "compression": 8, "subspaces": 2}, ValueError, "not both"),
        ({"scheme": "pq", "subspaces": 0}, ValueError, "subspaces must be a positive int, got 0"),
        ({"scheme": "pq", "subspaces": 17}, ValueError, r"subspaces=17 is out of range for .*'weight'.*<= 16"),
        ({"scheme": "pq", "centroids": 300}, ValueError, "centroids must be an int from 2 to 256"),
        ({"scheme": "pq", "compression": 2}, BudgetError, r"cannot compress .*'weight'.* by 2x"),
    ],
)
def test_bad_arguments_are_refused_with_clear_text(kwargs, error, message):
    with pytest.raises(error, match=message):
        quantize(FullEmbedding(2000, 16), **kwargs)


def test_values_int8_cannot_hold_are_refused():
    emb = FullEmbedding(10, 8)
    with torch.no_grad():
        emb.weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="'weight'.*not finite"):
        quantize(emb)
    with torch.no_grad():
        emb.weight[2, 3] = 1e6
    with pytest.raises(ValueError, match="beyond 65504"):
        quantize(emb)
