"""Table-batched lookups (compemb.table_batch): the same vectors and gradients as one lookup per table."""

import copy

import pytest
import torch

from compemb.collection import EmbeddingCollection, Feature
from compemb.embeddings.full import FullEmbedding
from compemb.optim import RowAdagrad, RowAdam
from compemb.quantize import quantize
from compemb.table_batch import PackedWeights
from compemb.table_groups import batch_groups

FEATURES = [Feature("C1", 100_000), Feature("C2", 5_000), Feature("C3", 3), Feature("C4", 50_000), Feature("C5", 20)]
BATCHED = [
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
    "offline",
]


def _collections(method: str, sparse: bool, features=FEATURES, **options):
    # cce's pointer per id per column: 10x of d=16 lies between its int16 (8x) and uint8 (14.8x) reach
    budget = {} if method == "full" else {"compression": 4 if method == "cce" else 10}
    if method == "offline":  # its hot ids from per-id counts (Zipf-like: the small ids most frequent)
        options = {
            **options,
            "frequencies": {f.name: (f.num_embeddings / (1 + torch.arange(f.num_embeddings))).long() for f in features},
        }
    batched = EmbeddingCollection(features, 16, method, seed=3, sparse=sparse, **budget, **options)
    one_at_a_time = copy.deepcopy(batched)
    one_at_a_time.batch_tables = False
    return batched, one_at_a_time


def _ids(batch: int = 96, seed: int = 0, features=FEATURES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, f.num_embeddings, (batch,), generator=generator) for f in features], 1)


def _dense(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_dense() if grad.is_sparse else grad


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(
    "method,options",
    [(m, {}) for m in BATCHED]
    + [
        ("qr", {"operation": "concat"}),
        ("qr", {"operation": "add"}),
        ("bloom", {"num_hashes": 3}),
        ("robe", {"signed": False}),
        ("hemb", {"num_hashes": 3}),
    ],
)
def test_batched_lookup_equals_per_table_lookups(method, options, sparse):
    batched, one_at_a_time = _collections(method, sparse, **options)
    groups = batch_groups(list(batched.embeddings.values()))
    assert any(batch is not None for _, batch in groups), "the method should batch its tables"
    ids = _ids()
    upstream = torch.randn(ids.shape[0], len(FEATURES), 16, generator=torch.Generator().manual_seed(1))
    out_batched, out_single = batched(ids), one_at_a_time(ids)
    assert out_batched.is_contiguous()
    # bloom's and hemb's sums of 3 rows may run in another order: within rounding; the rest bit for bit
    if method in ("bloom", "hemb"):
        torch.testing.assert_close(out_batched, out_single, rtol=1e-6, atol=1e-7)
    else:
        assert torch.equal(out_batched, out_single)
    (out_batched * upstream).sum().backward()
    (out_single * upstream).sum().backward()
    single = dict(one_at_a_time.named_parameters())
    for name, param in batched.named_parameters():
        assert param.grad is not None and param.grad.is_sparse == sparse, name
        torch.testing.assert_close(_dense(param.grad), _dense(single[name].grad), rtol=1e-6, atol=1e-7)


def test_state_dict_and_parameters_are_those_of_the_tables():
    batched, one_at_a_time = _collections("ce", sparse=True)
    batched(_ids())  # packs
    assert list(batched.state_dict()) == list(one_at_a_time.state_dict())
    assert [n for n, _ in batched.named_parameters()] == [n for n, _ in one_at_a_time.named_parameters()]
    for name, value in batched.state_dict().items():
        assert torch.equal(value, one_at_a_time.state_dict()[name]), name


@pytest.mark.parametrize("optimizer_class", [RowAdam, RowAdagrad])
def test_training_steps_match_one_lookup_per_table(optimizer_class):
    """RowAdam and RowAdagrad on the batched collection (its tables updated together) take exactly the per-table
    collection's steps."""
    batched, one_at_a_time = _collections("hash", sparse=True)
    optimizers = [optimizer_class(c.parameters(), lr=0.05) for c in (batched, one_at_a_time)]
    for step in range(5):
        ids = _ids(seed=step)
        for collection, optimizer in zip((batched, one_at_a_time), optimizers):
            optimizer.zero_grad(set_to_none=True)
            collection(ids).pow(2).sum().backward()
            optimizer.step()
    for (name, a), (_, b) in zip(batched.named_parameters(), one_at_a_time.named_parameters()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, b) for a, b in zip(batched.parameters(), _collections("hash", True)[0].parameters()))


def test_weights_moved_out_of_the_buffer_are_packed_again():
    batched, one_at_a_time = _collections("qr", sparse=False)
    ids = _ids()
    batched(ids)
    table = batched.embeddings["C1"]
    with torch.no_grad():  # replace one weight's storage, as .to(device) or a deep copy would
        table.remainder.data = table.remainder.data.clone() + 1.0
        one_at_a_time.embeddings["C1"].remainder.add_(1.0)
    assert torch.equal(batched(ids), one_at_a_time(ids))
    (batch,) = batched.table_batches()  # the live one: it packed the moved weight again
    (pack,) = batch.packs  # type: ignore[attr-defined]
    assert (
        pack.is_packed(pack.weights)
        and table.remainder.untyped_storage().data_ptr() == pack.buffer.untyped_storage().data_ptr()
    )


def test_replaced_parameters_are_the_ones_looked_up():
    """load_state_dict(assign=True) swaps the Parameter objects: the batch reads the new ones."""
    batched, _ = _collections("hash", sparse=True)
    ids = _ids()
    before = batched(ids).detach()
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in batched.state_dict().items()}
    batched.load_state_dict(state, assign=True)
    after = batched(ids)
    assert torch.allclose(after, before + 1.0)
    after.sum().backward()
    assert all(p.grad is not None for p in batched.parameters())


def test_out_of_range_id_names_the_feature():
    batched, _ = _collections("qr", sparse=True)
    ids = _ids()
    ids[5, 2] = 3  # C3 has 3 ids
    with pytest.raises(ValueError, match=r"C3.*id 3 is outside \[0, 3\)"):
        batched(ids)
    ids[5, 2] = -1
    with pytest.raises(ValueError, match=r"C3.*id -1 is outside"):
        batched(ids)


def test_mixed_groups_keep_the_feature_order():
    """A quantized table cannot batch: it is looked up alone and its column stays where it was."""
    batched, one_at_a_time = _collections("hash", sparse=False)
    for collection in (batched, one_at_a_time):
        collection.embeddings["C4"] = quantize(collection.embeddings["C4"], "int8")
    ids = _ids()
    groups = batch_groups(list(batched.embeddings.values()))
    assert [positions for positions, batch in groups if batch is None] == [[3]]
    assert torch.equal(batched(ids), one_at_a_time(ids))


def test_packed_weights_share_one_buffer():
    tables = [FullEmbedding(n, 4, seed=n) for n in (3, 5, 2)]
    before = [t.weight.detach().clone() for t in tables]
    pack = PackedWeights(tables, "weight")
    assert pack.buffer.shape == (10, 4)
    for table, start, old in zip(tables, (0, 3, 8), before):
        assert torch.equal(table.weight, old)  # packing keeps the values
        assert table.weight.data_ptr() == pack.buffer[start].data_ptr()
    with torch.no_grad():
        tables[1].weight[0] = 7.0  # an in-place update lands in the buffer
    assert torch.equal(pack.buffer[3], torch.full((4,), 7.0))
    with pytest.raises(ValueError, match="one row width"):
        PackedWeights([FullEmbedding(3, 4), FullEmbedding(3, 8)], "weight")


def test_row_adam_updates_packed_tables_together_and_resumes():
    """Tables in one buffer share one optimizer state buffer; a state loaded from a checkpoint is packed again with
    its values, and training on from it equals training on without the round trip."""
    batched, _ = _collections("ce", sparse=True)
    optimizer = RowAdam(batched.parameters(), lr=0.05)

    def train(collection, optimizer, steps):
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            collection(_ids(seed=step)).pow(2).sum().backward()
            optimizer.step()

    train(batched, optimizer, range(3))
    hashed = [t.weight for t in batched.embeddings.values() if type(t).__name__ == "CompositionalEmbedding"]
    storages = {optimizer.state[w]["exp_avg"].untyped_storage().data_ptr() for w in hashed}
    assert len(hashed) > 1 and len(storages) == 1
    saved_model = copy.deepcopy(batched.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train(batched, optimizer, range(3, 6))

    resumed = copy.deepcopy(_collections("ce", sparse=True)[0])
    resumed.load_state_dict(saved_model)
    resumed_optimizer = RowAdam(resumed.parameters(), lr=0.05)
    resumed_optimizer.load_state_dict(saved_optimizer)
    train(resumed, resumed_optimizer, range(3, 6))
    for (name, a), b in zip(batched.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# the device path's exact k-means is slow on CPU at 100k ids: smaller vocabularies there
SMALL_FEATURES = [Feature("C1", 6_000), Feature("C2", 900), Feature("C3", 3), Feature("C4", 3_000), Feature("C5", 20)]


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize(
    "method,options",
    [
        ("cce", {"cluster_every": 3}),
        ("cce-hybrid", {"importance": "frequency", "cluster_every": 3}),
        ("cafe", {}),
        ("cce-paper", {"cluster_every": 3}),
        ("cce-paper", {"cluster_every": 3, "importance": "frequency"}),
    ],
)
def test_adaptive_tables_train_batched_as_one_at_a_time(method, options, kernels, monkeypatch):
    """Sketches, hooks, clustering and RowAdam over batched CCE / CAFE tables: the per-table run's state, step by step,
    on the host (compiled kernels) and on the device code path (CCE: routed and read in one pass in modes 0 and 1)."""
    from compemb.embeddings.cce.batch import CCETables
    from compemb.kernels import use_kernels

    passes = []
    routed = CCETables._vectors
    monkeypatch.setattr(
        CCETables, "_vectors", lambda self, ids, mode: (passes.append(mode), routed(self, ids, mode))[1]
    )
    features = FEATURES if kernels == "auto" else SMALL_FEATURES
    with use_kernels(kernels):
        batched = _train_side_by_side(method, options, features)
    clustered = [t for t in batched.embeddings.values() if hasattr(t, "cluster_state")]
    assert not clustered or any(int(t.cluster_state[1]) > 0 for t in clustered), "no clustering ran"
    # mode 0, then mode 1 where every id holds pointers, mode 2 where the top ids do (cce-hybrid)
    if kernels == "torch" and method.startswith("cce"):
        assert set(passes) == ({0, 2} if method == "cce-hybrid" else {0, 1}), set(passes)
    else:
        assert not passes


def _train_side_by_side(method, options, features):
    batched, one_at_a_time = _collections(method, sparse=True, features=features, **options)
    runs = [(c, RowAdam(c.parameters(), lr=0.05)) for c in (batched, one_at_a_time)]
    for collection, _ in runs:
        collection.train()
        for module in collection.modules():
            if hasattr(module, "on_train_begin") and module is not collection:
                module.on_train_begin(12)
    target = torch.randn(96, len(features), 16, generator=torch.Generator().manual_seed(5))
    for step in range(10):
        ids = _ids(seed=step, features=features)
        for collection, optimizer in runs:
            optimizer.zero_grad(set_to_none=True)
            (collection(ids) - target).pow(2).sum().backward()
            optimizer.step()
            for table in collection.embeddings.values():
                table.on_step_end(step, optimizer)
        ahead, behind = batched.state_dict(), one_at_a_time.state_dict()
        for name, value in ahead.items():
            torch.testing.assert_close(value, behind[name], rtol=1e-6, atol=1e-7, msg=f"step {step}: {name}")
    return batched


@pytest.mark.parametrize(
    "method, kind", [("hash", "HashingTrickEmbedding"), ("qr", "QREmbedding"), ("offline", "OfflineFrequencyEmbedding")]
)
def test_compressed_and_full_tables_form_one_batch_and_one_buffer(method, kind):
    """A per-feature collection keeps its small features full: those join the method's batch, so one gather reads
    every feature and, every weight (QR: remainders and quotients too) in one buffer, one optimizer update covers
    every table (issue 37)."""
    batched, _ = _collections(method, sparse=True)
    tables = list(batched.embeddings.values())
    assert {type(t).__name__ for t in tables} == {kind, "FullEmbedding"}
    groups = batch_groups(tables)
    assert len(groups) == 1 and groups[0][0] == list(range(len(FEATURES)))
    batched(_ids())  # packs
    storages = {p.untyped_storage().data_ptr() for t in tables for p in t.parameters()}
    assert len(storages) == 1


@pytest.mark.parametrize("method", ["cce", "cce-paper", "cce-hybrid"])
def test_cce_tables_with_one_pointer_dtype_read_one_packed_pointer_table(method):
    """Every id (cce-hybrid: the sketch's top ids) holding pointers of one dtype: one gather from the packed pointer
    tables (cce-hybrid: one search of every table's holders), the vectors each table's own lookup gives, bit for
    bit, and the same gradients (device code path)."""
    from compemb.kernels import use_kernels

    features = [Feature("C1", 2_000), Feature("C2", 1_800), Feature("C3", 3), Feature("C4", 1_500)]  # all uint8
    with use_kernels("torch"):
        batched, one_at_a_time = _collections(method, sparse=True, features=features)
        for collection in (batched, one_at_a_time):
            for position, table in enumerate(collection.embeddings.values()):
                if hasattr(table, "cluster"):
                    if table.sketch is not None:  # the top ids to give pointers to
                        table._update(_ids(batch=4_000, seed=9, features=features)[:, position], None, None)
                    table.cluster()
        (_, batch), *_ = [g for g in batch_groups(list(batched.embeddings.values())) if g[1] is not None]
        assert batch.pointers is not None  # type: ignore[attr-defined]
        assert batch._mode() == (2 if method == "cce-hybrid" else 1)  # type: ignore[attr-defined]
        ids = _ids(features=features)
        upstream = torch.randn(ids.shape[0], len(features), 16, generator=torch.Generator().manual_seed(1))
        out_batched, out_single = batched(ids), one_at_a_time(ids)
        assert torch.equal(out_batched, out_single)
        (out_batched * upstream).sum().backward()
        (out_single * upstream).sum().backward()
    single = dict(one_at_a_time.named_parameters())
    for name, param in batched.named_parameters():
        torch.testing.assert_close(_dense(param.grad), _dense(single[name].grad), rtol=1e-6, atol=1e-7)


def test_offline_tables_on_the_device_path_find_each_tables_rows_in_one_pass():
    """Offline tables with a sorted hot-id list and with a dense map, and full tables beside them: on the device
    code path every table's rows found together (one search, one map gather, one hash), the vectors and gradients
    of each table's own lookup."""
    from compemb.embeddings.offline import _OfflineTablesBatch
    from compemb.kernels import use_kernels

    features = [Feature("C1", 10_000), Feature("C2", 5_000), Feature("C3", 3), Feature("C4", 8_000), Feature("C5", 20)]
    frequencies = {f.name: (f.num_embeddings / (1 + torch.arange(f.num_embeddings))).long() for f in features}
    frequencies["C4"][3_000:] = 0  # ids never counted: hashed
    batched = EmbeddingCollection(
        features, 16, "offline", seed=3, sparse=True, compression=1.2, frequencies=frequencies, hash_rate=0.1
    )
    one_at_a_time = copy.deepcopy(batched)
    one_at_a_time.batch_tables = False
    assert {getattr(t, "dense_map", None) for t in batched.embeddings.values()} == {True, False, None}
    ids = _ids(batch=512, features=features)
    ids[:64] = ids[:64] % 50  # hot ids too
    upstream = torch.randn(ids.shape[0], len(features), 16, generator=torch.Generator().manual_seed(1))
    with use_kernels("torch"):
        out_batched, out_single = batched(ids), one_at_a_time(ids)
        assert any(isinstance(batch, _OfflineTablesBatch) for batch in batched.table_batches())
    assert torch.equal(out_batched, out_single)
    (out_batched * upstream).sum().backward()
    (out_single * upstream).sum().backward()
    single = dict(one_at_a_time.named_parameters())
    for name, param in batched.named_parameters():
        torch.testing.assert_close(_dense(param.grad), _dense(single[name].grad), rtol=1e-6, atol=1e-7)
