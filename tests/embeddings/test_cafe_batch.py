"""Per-feature CAFE tables updated together on the device code path: the same tables, values and hot rows as each
table updating itself, in one flat sketch."""

import copy

import numpy as np
import pytest
import torch

from compemb.collection import EmbeddingCollection, Feature
from compemb.embeddings.adaptive import end_step
from compemb.embeddings.cafe.batch import CAFETables
from compemb.kernels import use_kernels
from compemb.optim import RowAdam
from compemb.sketch import HotSketch, PackedSketches
from compemb.table_batch import PackedBuffers

SIZES = [5000, 20000, 300, 80000]  # the 300-id feature is kept full: the CAFE tables are columns 0, 1 and 3


def collection(method, batch_tables, **options):
    features = [Feature(f"C{i}", n) for i, n in enumerate(SIZES)]
    return EmbeddingCollection(features, 8, method=method, compression=20, batch_tables=batch_tables, seed=3, **options)


def batches(steps, rows=512, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(np.stack([rng.zipf(1.2, rows) % n for n in SIZES], 1)).long() for _ in range(steps)]


def run(model, data, step_end=True):
    optimizer = RowAdam(model.parameters(), lr=0.05)
    tables = list(model.embeddings.values())
    for step, ids in enumerate(data):
        out = model(ids)
        loss = (out**2).sum(-1).mean() + out.sum()  # every occurrence gets a gradient of its own size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step_end:
            end_step(tables, step, optimizer, model.table_batches())
    return model


def count_group_updates(monkeypatch):
    calls = []
    original = CAFETables._update
    monkeypatch.setattr(CAFETables, "_update", lambda self, *a: calls.append(1) or original(self, *a))
    return calls


@pytest.mark.parametrize(
    "method,importance,sparse",
    [("cafe", "gradient", False), ("cafe", "frequency", False), ("cafe-ml", "gradient", True)],
)
def test_tables_updated_together_equal_each_table_updating_itself(monkeypatch, method, importance, sparse):
    calls = count_group_updates(monkeypatch)
    data = batches(40)
    with use_kernels("torch"):
        together = run(collection(method, True, importance=importance, sparse=sparse), data)
        alone = run(collection(method, False, importance=importance, sparse=sparse), data)
    assert len(calls) == len(data)  # every step's update went through the flat sketch
    expected, got = alone.state_dict(), together.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    hot = [int(table.owned.sum()) for name, table in together.embeddings.items() if name != "C2"]
    assert min(hot) > 0 and sum(hot) > 50  # rows did change owners (so promotions were compared)


def test_two_level_tables_with_dense_gradients_agree_up_to_the_order_of_float_sums(monkeypatch):
    # nn.EmbeddingBag's dense backward sums a row's gradients in another order than the packed gather's
    calls = count_group_updates(monkeypatch)
    data = batches(30)
    with use_kernels("torch"):
        together, alone = run(collection("cafe-ml", True), data), run(collection("cafe-ml", False), data)
    assert len(calls) == len(data)
    expected, got = alone.state_dict(), together.state_dict()
    for name in expected:
        if name.endswith(".weight"):
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
        else:  # sketches, owners: the same ids hot in the same rows
            assert torch.equal(got[name], expected[name]), name


def test_a_plain_loop_applies_what_was_recorded_at_the_next_lookup():
    data = batches(20, seed=1)
    with use_kernels("torch"):
        together = run(collection("cafe", True), data, step_end=False)
        alone = run(collection("cafe", False), data, step_end=False)
        for model in (together, alone):
            model(data[0])  # the last step's importance is applied by the next training lookup
    for name, value in alone.state_dict().items():
        assert torch.equal(together.state_dict()[name], value), name


def test_the_tables_stay_packed_through_a_checkpoint_and_repack_after_a_move():
    data = batches(12, seed=2)
    with use_kernels("torch"):
        model = run(collection("cafe", True), data[:6])
        state = copy.deepcopy(model.state_dict())
        reference = run(copy.deepcopy(model), data[6:])  # a deep copy packs its own tables afresh
        model.load_state_dict(state)  # in place: the packed storage is kept
        batch = model.table_batches()[0]
        sketch_storage = batch._sketches.buffers["keys"].data_ptr()
        moved = model.embeddings["C1"]
        moved.sketch.keys = moved.sketch.keys.clone()  # a replaced buffer: noticed and packed again
        run(model, data[6:])
        assert batch._sketches.is_packed() and batch._sketches.buffers["keys"].data_ptr() != sketch_storage
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_the_compiled_cpu_path_keeps_each_tables_own_lookup(monkeypatch):
    calls = count_group_updates(monkeypatch)
    model = run(collection("cafe", True), batches(3))  # kernels="auto" on a CPU: the compiled kernels
    assert calls == [] and not model.table_batches()[0].together(torch.zeros(1, dtype=torch.long))


def test_packed_sketches_query_and_locate_as_each_sketch():
    sketches = [HotSketch(n, threshold=2.0, seed=s, backend="merge") for s, n in enumerate((3, 8, 1))]
    packed = PackedSketches(sketches)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        packed.insert(torch.randint(0, 40, (64, 3), generator=generator))
    sketches[1].set_hot(sketches[1].items()[0][:2], torch.tensor([4, 7], dtype=torch.int32))
    ids = torch.randint(0, 40, (100, 3), generator=generator)
    scores, hot = packed.query(ids)
    where = packed.locate(ids)
    for column, sketch in enumerate(sketches):
        expected_scores, expected_hot = sketch.query(ids[:, column])
        assert torch.equal(scores[:, column], expected_scores) and torch.equal(hot[:, column], expected_hot)
        found = where[:, column] >= 0
        assert torch.equal(found, expected_scores > 0)  # every inserted id scored 1 at least, absent ones 0
        flat_keys = packed.buffers["keys"].view(-1)
        assert torch.equal(flat_keys[where[:, column][found]], ids[:, column][found])


def test_packed_buffers_repack_when_a_buffer_is_replaced():
    modules = [torch.nn.Module() for _ in range(3)]
    for size, module in zip((2, 0, 3), modules):
        module.register_buffer("seen", torch.arange(size, dtype=torch.float32))
    packed = PackedBuffers(modules, "seen", padding=1)
    assert packed.flat().tolist() == [0, 1, 0, 1, 2, 0] and packed.is_packed()
    modules[2].seen = torch.tensor([5.0, 6.0, 7.0])
    assert not packed.is_packed()
    packed.flat()[:-1] += 1  # repacked first: the new values, then written through to every module
    assert modules[0].seen.tolist() == [1, 2] and modules[2].seen.tolist() == [6, 7, 8]
    wide = torch.nn.Module()
    wide.register_buffer("seen", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="trailing shape"):
        PackedBuffers([modules[0], wide], "seen")
