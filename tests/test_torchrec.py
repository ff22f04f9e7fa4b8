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
    return [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"],
                               pooling=pooling) for i, n in enumerate(SIZES)]


def one_hot_kjt(ids: torch.Tensor, keys=None) -> KeyedJaggedTensor:
    """A KJT of one id per row per feature, from a (batch, features) matrix."""
    keys = keys or [f"f{i}" for i in range(ids.shape[1])]
    return KeyedJaggedTensor.from_lengths_sync(keys, ids.t().reshape(-1), torch.ones(ids.numel(), dtype=torch.int64))


def jagged_kjt(seed: int, batch: int = 6, weighted: bool = False) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(SIZES), batch), generator=generator)
    values = torch.cat([torch.randint(0, n, (int(lengths[i].sum()),), generator=generator)
                        for i, n in enumerate(SIZES)])
    weights = torch.rand(values.shape, generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync([f"f{i}" for i in range(len(SIZES))], values, lengths.reshape(-1),
                                               weights=weights)


def ids_matrix(batch=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=generator) for n in SIZES], dim=1)


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
@pytest.mark.parametrize("method", ["hash", "qr", "cce-hybrid", "cafe"])  # (cce's pointers alone are 8x at d=8)
def test_one_hot_vectors_equal_compemb_collection(method, sharing):
    adapter = CompressedEmbeddingBagCollection(configs(), method, compression=8, sharing=sharing, seed=3)
    own = EmbeddingCollection([Feature(f"t{i}", n) for i, n in enumerate(SIZES)], 8, method, compression=8,
                              sharing=sharing, seed=3)
    ids = ids_matrix()
    pooled = adapter(one_hot_kjt(ids))
    assert pooled.keys() == ["f0", "f1", "f2"]
    torch.testing.assert_close(pooled.values(), own(ids).flatten(1), rtol=0, atol=0)
    # the KJT's features in another order: matched by name, not position
    reordered = adapter(one_hot_kjt(ids[:, [2, 0, 1]], keys=["f2", "f0", "f1"]))
    torch.testing.assert_close(reordered.values(), pooled.values(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["hash", "cce-hybrid", "cafe"])
def test_jagged_bags_equal_compemb_collection_with_multi_hot_features(method):
    adapter = CompressedEmbeddingBagCollection(configs(PoolingType.MEAN), method, compression=8, seed=1)
    own = EmbeddingCollection([Feature(f"t{i}", n, "mean") for i, n in enumerate(SIZES)], 8, method, compression=8,
                              seed=1)
    kjt = jagged_kjt(4)
    lookup = kjt.to_dict()
    bags = {f"t{i}": Bags(lookup[f"f{i}"].values(), lookup[f"f{i}"].offsets()) for i in range(len(SIZES))}
    torch.testing.assert_close(adapter(kjt).values(), own(None, bags).flatten(1), rtol=0, atol=0)


@pytest.mark.parametrize("pooling, weighted", [(PoolingType.SUM, False), (PoolingType.MEAN, False),
                                               (PoolingType.SUM, True)])
def test_full_table_equals_torchrec_embedding_bag_collection(pooling, weighted):
    """An independent reference: TorchRec's own EBC holding the same rows pools jagged (and weighted) bags alike."""
    adapter = CompressedEmbeddingBagCollection(configs(pooling), "full", is_weighted=weighted, seed=2)
    reference = EmbeddingBagCollection(configs(pooling), is_weighted=weighted)
    with torch.no_grad():
        for i in range(len(SIZES)):
            reference.embedding_bags[f"t{i}"].weight.copy_(adapter.collection.embeddings[f"t{i}"].weight)
    for seed in range(3):
        kjt = jagged_kjt(seed, weighted=weighted)
        torch.testing.assert_close(adapter(kjt).values(), reference(kjt).values(), rtol=1e-6, atol=1e-7)
    ones = one_hot_kjt(ids_matrix(seed=9))  # the batched one-id-per-row path
    if weighted:
        ones = KeyedJaggedTensor.from_lengths_sync(ones.keys(), ones.values(), ones.lengths(),
                                                   weights=torch.rand(ones.values().shape))
    torch.testing.assert_close(adapter(ones).values(), reference(ones).values(), rtol=1e-6, atol=1e-7)


def test_bad_configs_and_inputs_say_what_is_wrong():
    mixed = configs()
    mixed[1] = EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=700, feature_names=["f1"])
    with pytest.raises(ValueError, match="one shared table serves one embedding_dim"):
        CompressedEmbeddingBagCollection(mixed, "hash", compression=4, sharing="shared")
    two_dims = CompressedEmbeddingBagCollection(mixed, "hash", compression=4)
    assert list(two_dims.collections) == ["dim8", "dim4"]
    with pytest.raises(AttributeError):  # one collection per dim: see .collections
        two_dims.collection
    with pytest.raises(ValueError, match="weighted KJTs need SUM"):
        CompressedEmbeddingBagCollection(configs(PoolingType.MEAN), "hash", compression=4, is_weighted=True)
    adapter = CompressedEmbeddingBagCollection(configs(), "hash", compression=4)
    with pytest.raises(KeyError, match="no feature 'f2'"):
        adapter(one_hot_kjt(ids_matrix()[:, :2]))
    too_big = ids_matrix()
    too_big[0, 1] = 700  # hashing takes any id (an open vocabulary); a closed one says which id is outside
    full = CompressedEmbeddingBagCollection(configs(), "full")
    with pytest.raises(ValueError, match="id 700 is outside"):
        full(one_hot_kjt(too_big))
    with pytest.raises(ValueError, match="id 700 is outside"):
        full(KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2"], torch.tensor([1, 700, 2, 3]),
                                                 torch.tensor([1, 2, 1])))


def test_a_torchrec_dlrm_trains_with_it():
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate([300, 50])]
    adapter = CompressedEmbeddingBagCollection(tables, "cce", compression=2, seed=0)  # (pointers: at most ~4x here)
    model = DLRM(embedding_bag_collection=adapter, dense_in_features=3, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1])
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    before = [p.detach().clone() for p in adapter.parameters()]
    adapter.on_train_begin(100)
    losses = []
    for step in range(100):
        ids = torch.stack([torch.randint(0, 300, (128,), generator=generator),
                           torch.randint(0, 50, (128,), generator=generator)], dim=1)
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
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(WORKER), str(tmp_path), *methods], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # the worker fails if the ranks differ after any step
    for method in methods:
        losses = torch.load(tmp_path / f"{method}.pt")["losses"]
        assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 0.05, (method, losses)


def test_the_readme_torchrec_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = readme.split("```python torchrec\n")[1:]
    assert blocks, "the README has no TorchRec example"
    for block in blocks:
        exec(compile(block.split("```", 1)[0], "README.md", "exec"), {})


def _drop_in_configs(data_type=DataType.FP32):
    """Tables of two dims, interleaved, one of two features: what an EmbeddingBagCollection takes."""
    return [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=5000, feature_names=["f0"],
                               data_type=data_type),
            EmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=700, feature_names=["f1", "f3"],
                               data_type=data_type),
            EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=40, feature_names=["f2"],
                               data_type=data_type)]


def _drop_in_kjt(seed, one_per_row=False):
    generator = torch.Generator().manual_seed(seed)
    sizes = [5000, 700, 40, 700]
    lengths = torch.ones(4, 6, dtype=torch.int64) if one_per_row else torch.randint(0, 4, (4, 6), generator=generator)
    values = torch.cat([torch.randint(0, n, (int(lengths[i].sum()),), generator=generator) for i, n in enumerate(sizes)])
    return KeyedJaggedTensor.from_lengths_sync(["f0", "f1", "f2", "f3"], values, lengths.reshape(-1))


@pytest.mark.parametrize("data_type", [DataType.FP32, DataType.FP16, DataType.BF16])
def test_an_embedding_bag_collections_checkpoint_loads_and_pools_alike_whatever_dims_and_dtypes(data_type):
    reference = EmbeddingBagCollection(_drop_in_configs(data_type))
    with torch.no_grad():
        for bag in reference.embedding_bags.values():
            bag.weight.copy_(torch.randn(bag.weight.shape))
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(data_type), "full")
    state = reference.state_dict()
    assert list(adapter.state_dict()) == list(state)  # EmbeddingBagCollection's keys
    adapter.load_state_dict(state)  # strict: every key matched
    dtype = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}[data_type]
    assert all(p.dtype == dtype for p in adapter.parameters())
    for kjt in (_drop_in_kjt(0), _drop_in_kjt(1), _drop_in_kjt(2, one_per_row=True)):
        got, expected = adapter(kjt), reference(kjt)
        assert got.keys() == expected.keys() and got.length_per_key() == expected.length_per_key()
        assert got.values().dtype == expected.values().dtype == torch.float32
        torch.testing.assert_close(got.values(), expected.values(), rtol=1e-2 if dtype != torch.float32 else 1e-6,
                                   atol=1e-2 if dtype != torch.float32 else 1e-6)


def test_compressed_tables_of_two_dims_share_one_budget():
    adapter = CompressedEmbeddingBagCollection(_drop_in_configs(), "hash", num_params=2_000)
    stored = sum(c.memory().total for c in adapter.collections.values())
    assert abs(stored / 4 - 2_000) <= 0.02 * 2_000
    out = adapter(_drop_in_kjt(3))
    assert out.values().shape == (6, 8 + 4 + 8 + 4) and out.keys() == ["f0", "f1", "f3", "f2"]
