"""The TorchRec adapter: the same vectors as compemb's own collection and as TorchRec's EmbeddingBagCollection
(for the full table), a torchrec DLRM that trains with it, and DistributedModelParallel on 2 gloo ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torchrec = pytest.importorskip("torchrec", reason="the torchrec extra is not installed (make torchrec)")

from torchrec.models.dlrm import DLRM  # noqa: E402
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from compemb.collection import Bags, EmbeddingCollection, Feature  # noqa: E402
from compemb.integrations.torchrec import CompressedEmbeddingBagCollection  # noqa: E402

WORKER = Path(__file__).parent / "torchrec_worker.py"
SIZES = [5000, 700, 40]


def configs(pooling=PoolingType.SUM, dim=8):
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"], pooling=pooling)
        for i, n in enumerate(SIZES)
    ]


def one_hot_kjt(ids: torch.Tensor, keys=None) -> KeyedJaggedTensor:
    """A KJT of one id per row per feature, from a (batch, features) matrix."""
    keys = keys or [f"f{i}" for i in range(ids.shape[1])]
    return KeyedJaggedTensor.from_lengths_sync(keys, ids.t().reshape(-1), torch.ones(ids.numel(), dtype=torch.int64))


def jagged_kjt(seed: int, batch: int = 6, weighted: bool = False) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(SIZES), batch), generator=generator)
    values = torch.cat(
        [torch.randint(0, n, (int(lengths[i].sum()),), generator=generator) for i, n in enumerate(SIZES)]
    )
    weights = torch.rand(values.shape, generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        [f"f{i}" for i in range(len(SIZES))], values, lengths.reshape(-1), weights=weights
    )


def ids_matrix(batch=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=generator) for n in SIZES], dim=1)


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
@pytest.mark.parametrize("method", ["hash", "qr", "cce-hybrid", "cafe"])  # (cce's pointers alone are 8x at d=8)
def test_one_hot_vectors_equal_compemb_collection(method, sharing):
    adapter = CompressedEmbeddingBagCollection(configs(), method=method, compression=8, sharing=sharing, seed=3)
    own = EmbeddingCollection(
        [Feature(f"t{i}", n) for i, n in enumerate(SIZES)], 8, method, compression=8, sharing=sharing, seed=3
    )
    ids = ids_matrix()
    pooled = adapter(one_hot_kjt(ids))
    assert pooled.keys() == ["f0", "f1", "f2"]
    torch.testing.assert_close(pooled.values(), own(ids).flatten(1), rtol=0, atol=0)
    # the KJT's features in another order: matched by name, not position
    reordered = adapter(one_hot_kjt(ids[:, [2, 0, 1]], keys=["f2", "f0", "f1"]))
    torch.testing.assert_close(reordered.values(), pooled.values(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hash", "cce-hybrid", "cafe"])
def test_jagged_bags_equal_compemb_collection_with_multi_hot_features(method):
    adapter = CompressedEmbeddingBagCollection(configs(PoolingType.MEAN), method=method, compression=8, seed=1)
    own = EmbeddingCollection(
        [Feature(f"t{i}", n, "mean") for i, n in enumerate(SIZES)], 8, method, compression=8, seed=1
    )
    kjt = jagged_kjt(4)
    lookup = kjt.to_dict()
    bags = {f"t{i}": Bags(lookup[f"f{i}"].values(), lookup[f"f{i}"].offsets()) for i in range(len(SIZES))}
    torch.testing.assert_close(adapter(kjt).values(), own(None, bags).flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize(
    "pooling, weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False), (PoolingType.SUM, True)]
)
def test_full_table_equals_torchrec_embedding_bag_collection(pooling, weighted):
    """An independent reference: TorchRec's own EBC holding the same rows pools jagged (and weighted) bags alike."""
    adapter = CompressedEmbeddingBagCollection(configs(pooling), method="full", is_weighted=weighted, seed=2)
    reference = EmbeddingBagCollection(configs(pooling), is_weighted=weighted)
    with torch.no_grad():
        for i in range(len(SIZES)):
            reference.embedding_bags[f"t{i}"].weight.copy_(adapter.collection.embeddings[f"t{i}"].weight)
    for seed in range(3):
        kjt = jagged_kjt(seed, weighted=weighted)
        torch.testing.assert_close(adapter(kjt).values(), reference(kjt).values(), rtol=1e-6, atol=1e-7)
    ones = one_hot_kjt(ids_matrix(seed=9))  # the batched one-id-per-row path
    if weighted:
        ones = KeyedJaggedTensor.from_lengths_sync(
            ones.keys(), ones.values(), ones.lengths(), weights=torch.rand(ones.values().shape)
        )
    torch.testing.assert_close(adapter(ones).values(), reference(ones).values(), rtol=1e-6, atol=1e-7)


def test_bad_configs_and_inputs_say_what_is_wrong():
    mixed = configs()
    mixed[1] = EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=700, feature_names=["f1"])
    with pytest.raises(ValueError, match="one shared table serves one embedding_dim"):
        CompressedEmbeddingBagCollection(mixed, method="hash", compression=4, sharing="shared")
    two_dims = CompressedEmbeddingBagCollection(mixed, method="hash", compression=4)
    assert list(two_dims.collections) == ["dim8", "dim4"]
    with pytest.raises(AttributeError):  # one collection per dim: see .collections
        _ = two_dims.collection
    with pytest.raises(ValueError, match="weighted KJTs need SUM"):
        CompressedEmbeddingBagCollection(configs(PoolingType.MEAN), method="hash", compression=4, is_weighted=True)
    adapter = CompressedEmbeddingBagCollection(configs(), method="hash", compression=4)
    with pytest.raises(KeyError, match="no feature 'f2'"):
        adapter(one_hot_kjt(ids_matrix()[:, :2]))
    too_big = ids_matrix()
    too_big[0, 1] = 700  # hashing takes any id (an open vocabulary); a closed one says which id is outside
    full = CompressedEmbeddingBagCollection(configs(), method="full")
    with pytest.raises(ValueError, match="id 700 is outside"):
        full(one_hot_kjt(too_big))
    with pytest.raises(ValueError, match="id 700 is outside"):
        full(
            KeyedJaggedTensor.from_lengths_sync(
                ["f0", "f1", "f2"], torch.tensor([1, 700, 2, 3]), torch.tensor([1, 2, 1])
            )
        )


def test_a_torchrec_dlrm_trains_with_it():
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate([300, 50])
    ]
    adapter = CompressedEmbeddingBagCollection(tables, method="cce", compression=2, seed=0)  # (pointers: <= ~4x here)
    model = DLRM(
        embedding_bag_collection=adapter,
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    before = [p.detach().clone() for p in adapter.parameters()]
    adapter.on_train_begin(100)
    losses = []
    for step in range(100):
        ids = torch.stack(
            [torch.randint(0, 300, (128,), generator=generator), torch.randint(0, 50, (128,), generator=generator)],
            dim=1,
        )
        labels = (ids[:, 0] % 2).float()  # learnable only through the first table's vectors
        logits = model(torch.randn(128, 3, generator=generator), one_hot_kjt(ids)).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adapter.on_step_end(step, optimizer)
        losses.append(float(loss.detach()))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, adapter.parameters()))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.1, losses


def test_distributed_model_parallel_on_two_gloo_ranks_trains_it(tmp_path):
    methods = ["hash", "cafe", "cce"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(WORKER),
            str(tmp_path),
            *methods,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # the worker fails if the ranks differ after any step
    for method in methods:
        losses = torch.load(tmp_path / f"{method}.pt")["losses"]
        assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.05, (method, losses)


def test_the_torchrec_guides_example_runs():
    """Every python block of the README and the docs marked as needing torchrec (the guide's example among them)."""
    from tests.pages import DOCS, PAGES, name, python_blocks

    assert python_blocks(DOCS / "guides" / "torchrec.md", torchrec=True), "the TorchRec guide has no example"
    for page in PAGES:
        for block in python_blocks(page, torchrec=True):
            exec(compile(block, name(page), "exec"), {})


def _drop_in_configs(data_type=DataType.FP32, t1_pooling=PoolingType.SUM):
    """Tables of two dims, interleaved, one of two features: what an EmbeddingBagCollection takes."""
    return [
        EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=5000, feature_names=["f0"], data_type=data_type),
        EmbeddingBagConfig(
            name="t1",
            embedding_dim=4,
            num_embeddings=700,
            feature_names=["f1", "f3"],
            data_type=data_type,
            pooling=t1_pooling,
        ),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=40, feature_names=["f2"], data_type=data_type),
    ]


def _drop_in_kjt(seed, one_per_row=False, weighted=False):
    generator = torch.Generator().manual_seed(seed)
    sizes = [5000, 700, 40, 700]
    lengths = torch.ones(4, 6, dtype=torch.int64) if one_per_row else torch.randint(0, 4, (4, 6), generator=generator)
    values = torch.cat(
        [torch.randint(0, n, (int(lengths[i].sum()),), generator=generator) for i, n in enumerate(sizes)]
    )
    weights = torch.rand(values.shape, generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2", "f3"], values, lengths.reshape(-1), weights=weights)


@pytest.mark.parametrize("data_type", [DataType.FP32, DataType.FP16, DataType.BF16])
def test_an_embedding_bag_collections_checkpoint_loads_and_pools_alike_whatever_dims_and_dtypes(data_type):
    reference = EmbeddingBagCollection(_drop_in_configs(data_type))
    with torch.no_grad():
        for bag in reference.embedding_bags.values():
            bag.weight.copy_(torch.randn(bag.weight.shape))
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(data_type), method="full")
    state = reference.state_dict()
    assert list(adapter.state_dict()) == list(state)  # EmbeddingBagCollection's keys
    adapter.load_state_dict(state)  # strict: every key matched
    dtype = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}[data_type]
    assert all(p.dtype == dtype for p in adapter.parameters())
    for kjt in (_drop_in_kjt(0), _drop_in_kjt(1), _drop_in_kjt(2, one_per_row=True)):
        got, expected = adapter(kjt), reference(kjt)
        assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
        assert got.values().dtype == expected.values().dtype == torch.float32
        torch.testing.assert_close(
            got.values(),
            expected.values(),
            rtol=1e-2 if dtype != torch.float32 else 1e-6,
            atol=1e-2 if dtype != torch.float32 else 1e-6,
        )


def test_compressed_tables_of_two_dims_share_one_budget():
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(), method="hash", num_params=2_000)
    stored = sum(c.memory().total for c in adapter.collections.values())
    assert abs(stored / 4 - 2_000) <= 0.02 * 2_000
    out = adapter(_drop_in_kjt(3))
    assert out.values().shape == (6, 8 + 4 + 8 + 4) and out.keys() == ["f0", "f1", "f3", "f2"]


# --- TorchRec as its users write it: EmbeddingBagCollection's attribute, names, constructor, fx trace, script ---

# methods and budgets that build at dims 8 and 4 (cce's pointers alone are ~4x there)
METHODS = {
    "full": {},
    "hash": {"compression": 4},
    "cce": {"compression": 2},
    "cafe": {"compression": 4},
    "qr": {"compression": 4},
}


def _trained(adapter, steps=3, seed=0):
    """``adapter`` after a few Adagrad steps (and its tables' on_step_end): state no fresh module has."""
    optimizer = torch.optim.Adagrad(adapter.parameters(), lr=0.5)
    adapter.on_train_begin(steps)
    for step in range(steps):
        kjt = _drop_in_kjt(seed + step, one_per_row=step % 2 == 1, weighted=adapter.is_weighted())
        loss = adapter(kjt).values().pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        adapter.on_step_end(step, optimizer)
    return adapter


@pytest.mark.parametrize("method", list(METHODS))
def test_embedding_bags_are_the_modules_that_hold_the_tables_as_in_an_embedding_bag_collection(method):
    reference = EmbeddingBagCollection(_drop_in_configs())
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(), method=method, **METHODS[method])
    assert isinstance(adapter.embedding_bags, torch.nn.ModuleDict)
    assert list(adapter.embedding_bags) == list(reference.embedding_bags) == ["t0", "t1", "t2"]
    for name, dim in (("t0", 8), ("t1", 4), ("t2", 8)):
        assert adapter.embedding_bags[name] is adapter.collections[f"dim{dim}"].embeddings[name]
    # every parameter lives in a table, and every table's parameters are the module's
    in_tables = {id(p) for table in adapter.embedding_bags.values() for p in table.parameters()}
    assert in_tables == {id(p) for p in adapter.parameters()}
    shared = CompressedEmbeddingBagCollection(configs(), method="hash", compression=4, sharing="shared")
    assert list(shared.embedding_bags) == ["shared"]
    assert shared.embedding_bags["shared"] is shared.collection.embeddings["shared"]


@pytest.mark.parametrize(
    "method, sharing", [*((m, "per_feature") for m in METHODS), ("hash", "shared"), ("cafe", "shared")]
)
def test_parameter_names_are_the_state_dict_keys(method, sharing):
    tables = _drop_in_configs() if sharing == "per_feature" else configs()
    adapter = CompressedEmbeddingBagCollection(tables, method=method, sharing=sharing, **METHODS[method])
    names = [name for name, _ in adapter.named_parameters()]
    state = adapter.state_dict(keep_vars=True)
    assert names == [key for key, value in state.items() if isinstance(value, torch.nn.Parameter)]
    assert {name for name, _ in adapter.named_buffers()} >= set(state) - set(names)  # the rest: persistent buffers
    assert all(key.startswith("embedding_bags.") for key in state) and len(state) == len(set(state))
    assert all(state[name] is parameter for name, parameter in adapter.named_parameters())
    if method == "full":  # exactly an EmbeddingBagCollection's names
        reference = EmbeddingBagCollection(tables)
        assert names == [name for name, _ in reference.named_parameters()] == list(reference.state_dict())


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("weighted", [False, True])
def test_symbolic_trace_gives_the_modules_outputs_and_holds_its_tables(method, weighted):
    tables = _drop_in_configs(t1_pooling=PoolingType.SUM if weighted else PoolingType.MEAN)  # (weights need SUM)
    adapter = CompressedEmbeddingBagCollection(tables, is_weighted=weighted, method=method, **METHODS[method])
    traced = torchrec.fx.symbolic_trace(adapter)
    # each feature is one call of its table, as in a traced EmbeddingBagCollection
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert calls == ["embedding_bags.t0", "embedding_bags.t1", "embedding_bags.t1", "embedding_bags.t2"]
    for name in ("t0", "t1", "t2"):
        assert traced.get_submodule(f"embedding_bags.{name}") is adapter.embedding_bags[name]
    assert [(n, id(p)) for n, p in traced.named_parameters()] == [(n, id(p)) for n, p in adapter.named_parameters()]
    for kjt in (
        _drop_in_kjt(0, weighted=weighted),
        _drop_in_kjt(1, weighted=weighted),
        _drop_in_kjt(2, one_per_row=True, weighted=weighted),
    ):  # multi-hot, and the one-id-per-row path
        got, expected = traced(kjt), adapter(kjt)
        assert got.keys() == expected.keys() == ["f0", "f1", "f3", "f2"]
        assert got.length_per_key() == expected.length_per_key() == [8, 4, 4, 8]
        torch.testing.assert_close(got.values(), expected.values(), rtol=0, atol=0)
    # it trains: the gradient reaches the tables' parameters through the graph
    traced(_drop_in_kjt(3, weighted=weighted)).values().sum().backward()
    assert all(p.grad is not None for p in adapter.parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["full", "hash", "cafe"])
def test_symbolic_trace_follows_the_tables_own_mode_and_offsets(method):
    """Tables built with nn.EmbeddingBag's mode="mean" and include_last_offset=True under SUM and MEAN pooling."""
    tables = _drop_in_configs(t1_pooling=PoolingType.MEAN)
    adapter = CompressedEmbeddingBagCollection(
        tables, method=method, mode="mean", include_last_offset=True, **METHODS[method]
    )
    assert all(t.mode == "mean" and t.include_last_offset for t in adapter.embedding_bags.values())
    traced = torchrec.fx.symbolic_trace(adapter)
    for kjt in (_drop_in_kjt(10), _drop_in_kjt(11), _drop_in_kjt(12, one_per_row=True)):
        torch.testing.assert_close(traced(kjt).values(), adapter(kjt).values(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["full", "hash", "cafe"])
def test_symbolic_trace_of_a_shared_table_keeps_its_offsets_and_its_id_check(method):
    adapter = CompressedEmbeddingBagCollection(
        configs(PoolingType.MEAN), method=method, sharing="shared", **METHODS[method]
    )
    traced = torchrec.fx.symbolic_trace(adapter)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["embedding_bags.shared"] * 3
    for kjt in (jagged_kjt(0), jagged_kjt(1), one_hot_kjt(ids_matrix(batch=6))):
        torch.testing.assert_close(traced(kjt).values(), adapter(kjt).values(), rtol=0, atol=0)
    # f1's id 700 would read f2's first row of the shared table: both refuse it
    bad = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], torch.tensor([1, 700, 2, 3]), torch.tensor([1, 2, 1]))
    for module in (adapter, traced):
        with pytest.raises(ValueError, match="feature 't1': id 700 is outside"):
            module(bad)


def test_symbolic_trace_of_a_full_table_keeps_the_tables_id_check_and_traces_inside_a_dlrm():
    adapter = CompressedEmbeddingBagCollection(configs(), method="full")
    traced = torch.fx.symbolic_trace(adapter)  # plain torch.fx traces it too
    bad = KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], torch.tensor([1, 700, 2, 3]), torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match="id 700 is outside"):
        traced(bad)
    model = DLRM(
        embedding_bag_collection=CompressedEmbeddingBagCollection(configs(), method="cce", compression=2),
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    traced_model = torchrec.fx.symbolic_trace(model)
    dense, kjt = torch.randn(6, 3), jagged_kjt(5)
    torch.testing.assert_close(traced_model(dense, kjt), model(dense, kjt), rtol=0, atol=0)
    assert {n for n, _ in traced_model.named_parameters()} == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("weighted", [False, True])
def test_torch_jit_script_of_the_full_table_is_the_embedding_bag_collection_of_its_parameters(weighted):
    configs_ = _drop_in_configs()
    assert torch.jit.script(EmbeddingBagCollection(configs_, is_weighted=weighted)) is not None  # what users expect
    adapter = _trained(CompressedEmbeddingBagCollection(configs_, is_weighted=weighted))
    scripted = torch.jit.script(adapter)
    assert scripted.original_name == "EmbeddingBagCollection"
    assert [(n, p.data_ptr()) for n, p in scripted.named_parameters()] == [
        (n, p.data_ptr()) for n, p in adapter.named_parameters()
    ]  # its very parameters: trained, it trains them
    for kjt in (_drop_in_kjt(7, weighted=weighted), _drop_in_kjt(8, one_per_row=True, weighted=weighted)):
        torch.testing.assert_close(scripted(kjt).values(), adapter(kjt).values(), rtol=1e-6, atol=1e-6)
    # inside a model (DLRM: tables of one dim), which torch.jit.script scripts with the adapter's replacement in it
    model = DLRM(
        embedding_bag_collection=CompressedEmbeddingBagCollection(configs(), is_weighted=weighted),
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    dense, kjt = torch.randn(6, 3), jagged_kjt(9, weighted=weighted)
    expected = model(dense, kjt)
    torch.testing.assert_close(torch.jit.script(model)(dense, kjt), expected, rtol=1e-6, atol=1e-6)


def test_torch_jit_script_of_compressed_tables_says_why_not():
    adapter = CompressedEmbeddingBagCollection(configs(), method="hash", compression=4)
    with pytest.raises(TypeError, match=r"cannot script .*method 'hash' looks ids up in Python .*symbolic_trace"):
        torch.jit.script(adapter)
    model = DLRM(
        embedding_bag_collection=adapter,
        dense_in_features=3,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[16, 1],
    )
    with pytest.raises(TypeError, match="method 'hash'"):  # inside a model too, before TorchScript's own errors
        torch.jit.script(model)
    with pytest.raises(TypeError, match="one shared table"):
        torch.jit.script(CompressedEmbeddingBagCollection(configs(), method="full", sharing="shared"))
    with pytest.raises(TypeError, match="padding_idx or mode='max'"):
        torch.jit.script(CompressedEmbeddingBagCollection(configs(), padding_idx=0))
    # a traced graph calls the tables' own forward, which TorchScript cannot compile, the full table's included
    # (documented): this fails in TorchScript, not here
    with pytest.raises(torch.jit.frontend.NotSupportedError):
        torch.jit.script(torchrec.fx.symbolic_trace(CompressedEmbeddingBagCollection(configs())))


def test_the_constructor_takes_an_embedding_bag_collections_arguments():
    import inspect

    ours = list(inspect.signature(CompressedEmbeddingBagCollection).parameters.values())[:3]
    theirs = list(inspect.signature(EmbeddingBagCollection).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours] == [(p.name, p.default, p.kind) for p in theirs]
    adapter = CompressedEmbeddingBagCollection(configs(), True, torch.device("cpu"))  # as EBC(tables, True, device)
    assert adapter.is_weighted() and adapter.device == torch.device("cpu")
    assert all(type(t).__name__ == "FullEmbedding" for t in adapter.embedding_bags.values())  # method="full"
    assert adapter.collection.memory().total == sum(SIZES) * 8 * 4  # uncompressed
    hashed = CompressedEmbeddingBagCollection(configs(), False, "cpu", method="hash", compression=4, seed=1)
    assert not hashed.is_weighted() and type(hashed.embedding_bags["t0"]).__name__ == "HashingTrickEmbedding"
    # a method where is_weighted goes (the old call) is refused, saying where the method goes
    with pytest.raises(
        TypeError, match=r"is_weighted must be a bool, got 'hash' \(the method is a keyword.*method='hash'"
    ):
        CompressedEmbeddingBagCollection(configs(), "hash", compression=4, seed=1)
    with pytest.raises(TypeError, match="is_weighted must be a bool, got 1"):
        CompressedEmbeddingBagCollection(configs(), 1)
    twice = configs() + [EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=9, feature_names=["g"])]
    with pytest.raises(ValueError, match="duplicate table name 't0'"):
        CompressedEmbeddingBagCollection(twice)


@pytest.mark.parametrize("weighted", [False, True])
def test_an_embedding_bag_collections_checkpoint_gives_its_outputs_in_the_full_table_traced_too(weighted):
    reference = EmbeddingBagCollection(_drop_in_configs(), is_weighted=weighted)
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(), is_weighted=weighted)
    kjt = _drop_in_kjt(4, weighted=weighted)
    assert not torch.allclose(adapter(kjt).values(), reference(kjt).values())  # their own initial rows
    result = adapter.load_state_dict(reference.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for name, parameter in reference.named_parameters():
        assert torch.equal(adapter.get_parameter(name), parameter)
    traced = torchrec.fx.symbolic_trace(adapter)
    for kjt in (_drop_in_kjt(5, weighted=weighted), _drop_in_kjt(6, one_per_row=True, weighted=weighted)):
        torch.testing.assert_close(adapter(kjt).values(), reference(kjt).values(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(traced(kjt).values(), reference(kjt).values(), rtol=1e-6, atol=1e-6)
    # and back: the full table's checkpoint loads into an EmbeddingBagCollection
    other = EmbeddingBagCollection(_drop_in_configs(), is_weighted=weighted)
    other.load_state_dict(_trained(adapter).state_dict())
    torch.testing.assert_close(other(kjt).values(), adapter(kjt).values(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "method, sharing",
    [
        ("hash", "per_feature"),
        ("cce", "per_feature"),
        ("cafe", "per_feature"),
        ("qr", "per_feature"),
        ("cafe", "shared"),
    ],
)
def test_a_compressed_checkpoint_loads_into_a_fresh_module_of_its_config(method, sharing, tmp_path):
    def build(seed):
        tables = (
            _drop_in_configs()
            if sharing == "per_feature"
            else [  # shared: one dim
                EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
                for i, n in enumerate([5000, 700, 40, 700])
            ]
        )
        return CompressedEmbeddingBagCollection(tables, method=method, sharing=sharing, seed=seed, **METHODS[method])

    source = _trained(build(1), steps=4)
    torch.save(source.state_dict(), tmp_path / "tables.pt")
    fresh = build(2)  # another seed: other rows, other hashes
    kjts = [_drop_in_kjt(20), _drop_in_kjt(21, one_per_row=True)]
    assert not torch.equal(fresh(kjts[0]).values(), source(kjts[0]).values())
    fresh.load_state_dict(torch.load(tmp_path / "tables.pt"))
    for key, value in source.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    for kjt in kjts:  # (the one-id-per-row KJT goes through compemb's collections, the other through the tables)
        torch.testing.assert_close(fresh(kjt).values(), source(kjt).values(), rtol=0, atol=0)
