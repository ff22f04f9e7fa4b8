"""HotSketch: exact agreement with a plain-Python reference, top-k recall, exact counts, hot slots, state, inputs."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compemb.budget import MemoryReport
from compemb.hashing import coefficient_bytes, hash_ids, reference_hash
from compemb.sketch import HotSketch

EDGE_IDS = [0, 1, -1, 2**31 - 1, 2**32, 2**32 + 1, 2**62, 2**63 - 1, -(2**63), -123456789]


class ReferenceSketch:
    """The HotSketch definition in plain loops: float32 scores through numpy.float32, float64 mass."""

    def __init__(self, sketch: HotSketch) -> None:
        self.w, self.c = sketch.num_buckets, sketch.slots
        self.a, self.b = sketch.coefficients[0].tolist()
        self.period, self.factor = sketch.decay_period, sketch.decay_factor
        self.skip_hot = sketch.skip_hot
        self.buckets = [[None] * self.c for _ in range(self.w)]  # a slot: [id, np.float32 score, row] or None
        self.mass = 0.0

    def _slot(self, x):
        for slot in self.buckets[reference_hash(x, self.a, self.b, self.w)]:
            if slot is not None and slot[0] == x:
                return slot
        return None

    def insert(self, ids, scores=None):
        scores = [np.float32(1.0)] * len(ids) if scores is None else [np.float32(s) for s in scores]
        summed = {}  # dicts keep insertion order: the order of first occurrence
        for x, s in zip(ids, scores):
            summed[x] = np.float32(summed[x] + s) if x in summed else s
        for x, s in summed.items():
            bucket = self.buckets[reference_hash(x, self.a, self.b, self.w)]
            slot = self._slot(x)
            if slot is not None:
                slot[1] = np.float32(slot[1] + s)
            elif None in bucket:
                bucket[bucket.index(None)] = [x, s, -1]
            else:
                # the first of equal lowest scores (skip_hot: among the slots holding no hot id)
                takeable = [j for j in range(self.c) if not (self.skip_hot and bucket[j][2] >= 0)]
                lowest = min(takeable, key=lambda j: bucket[j][1]) if takeable else None
                if lowest is not None and bucket[lowest][2] < 0:
                    bucket[lowest][0] = x
                    bucket[lowest][1] = np.float32(bucket[lowest][1] + s)
        for s in scores:
            self.mass += float(s)
        if self.mass > self.period:  # at most one decay a call, then the count starts afresh
            self.mass = 0.0
            if self.factor < 1:
                self._scale(self.factor)

    def _scale(self, scale):
        for bucket in self.buckets:
            for slot in bucket:
                if slot is not None:
                    slot[1] = np.float32(float(slot[1]) * scale)

    def set_hot(self, ids, rows):
        for x, row in zip(ids, rows):
            self._slot(x)[2] = row

    def clear_hot(self, ids):
        released = []
        for x in ids:
            slot = self._slot(x)
            released.append(-1 if slot is None else slot[2])
            if slot is not None:
                slot[2] = -1
        return released

    def query(self, x):
        slot = self._slot(x)
        return (np.float32(0), -1) if slot is None else (slot[1], slot[2])

    def hot_ids(self):
        return [slot[0] for bucket in self.buckets for slot in bucket if slot is not None and slot[2] >= 0]


@pytest.fixture(scope="module", params=["auto", "torch"])
def backend(request) -> str:
    """Both implementations: the compiled CPU kernels and the torch ops an accelerator runs."""
    return request.param


def assert_same(sketch: HotSketch, reference: ReferenceSketch) -> None:
    """Every slot identical: occupancy, ID, score bit for bit, hot row; and the decay mass."""
    occupied = sketch.occupied.tolist()
    keys, scores, rows = sketch.keys.tolist(), sketch.scores.numpy(), sketch.hot_rows.tolist()
    for i, bucket in enumerate(reference.buckets):
        for j, slot in enumerate(bucket):
            assert occupied[i][j] == (slot is not None), (i, j)
            if slot is not None:
                assert keys[i][j] == slot[0], (i, j)
                assert scores[i, j].tobytes() == np.float32(slot[1]).tobytes(), (i, j, scores[i, j], slot[1])
                assert rows[i][j] == slot[2], (i, j)
    assert sketch.mass.item() == reference.mass


def _random_stream(seed, sketch, reference, batches=40, frequency=False, id_dtype=torch.int64):
    rng = np.random.default_rng(seed)
    next_row = 0
    decays = 0
    for step in range(batches):
        size = int(rng.integers(0, 60))
        high = 2**40 if step % 3 == 0 and id_dtype is torch.int64 else 1  # high bits too, and negatives
        ids = rng.integers(-150, 150, size=size) * high
        scores = None
        if not frequency:
            scores = rng.exponential(1.0, size=size).astype(np.float32)
            scores[rng.random(size) < 0.1] = 0.0
        before = sketch.mass.item()
        hot_before = set(reference.hot_ids())
        sketch.insert(torch.from_numpy(ids).to(id_dtype), None if scores is None else torch.from_numpy(scores))
        reference.insert(ids.tolist(), None if scores is None else scores.tolist())
        decays += sketch.mass.item() < before + (size if frequency else float(scores.sum())) - 1e-9
        assert hot_before <= set(reference.hot_ids())  # no hot ID was displaced
        # now and then make some present IDs hot, or take rows back
        if step % 4 == 1 and size:
            present = [x for x in dict.fromkeys(ids.tolist()) if reference.query(x)[1] == -1 and reference._slot(x)]
            chosen = present[: int(rng.integers(1, 4))]
            if chosen:
                rows = list(range(next_row, next_row + len(chosen)))
                next_row += len(chosen)
                sketch.set_hot(torch.tensor(chosen), torch.tensor(rows))
                reference.set_hot(chosen, rows)
        if step % 9 == 8:
            hot = reference.hot_ids()[:2]
            released = sketch.clear_hot(torch.tensor(hot + [123456789], dtype=torch.int64))
            assert released.tolist() == reference.clear_hot(hot + [123456789])
        assert_same(sketch, reference)
    return decays


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("slots", [1, 4])
@pytest.mark.parametrize("skip_hot", [False, True])
def test_batched_inserts_equal_the_reference_exactly(seed, slots, skip_hot, backend):
    sketch = HotSketch(
        13, slots, threshold=0.05 * (seed + 1), decay_factor=0.9, seed=seed, backend=backend, skip_hot=skip_hot
    )
    reference = ReferenceSketch(sketch)
    decays = _random_stream(seed, sketch, reference)
    assert decays > 0  # the decay rule was exercised
    probe = torch.arange(-200, 200)
    scores, rows = sketch.query(probe)
    expected = [reference.query(x) for x in probe.tolist()]
    assert scores.numpy().tobytes() == np.array([e[0] for e in expected], dtype=np.float32).tobytes()
    assert rows.tolist() == [e[1] for e in expected]


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_frequency_mode_and_int32_ids_equal_the_reference(id_dtype, backend):
    sketch = HotSketch(7, 3, threshold=0.5, seed=3, backend=backend)
    reference = ReferenceSketch(sketch)
    assert _random_stream(11, sketch, reference, frequency=True, id_dtype=id_dtype) > 0


@settings(max_examples=40, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(-20, 20), st.sampled_from([0.0, 0.5, 1.0, 3.25, 1e-3])), max_size=30), max_size=8
    ),
    seed=st.integers(0, 3),
    skip_hot=st.booleans(),
)
def test_any_small_stream_equals_the_reference(batches, seed, skip_hot, backend):
    sketch = HotSketch(3, 2, threshold=0.2, decay_factor=0.5, seed=seed, backend=backend, skip_hot=skip_hot)
    reference = ReferenceSketch(sketch)
    for batch in batches:
        ids = [x for x, _ in batch]
        scores = [s for _, s in batch]
        sketch.insert(torch.tensor(ids, dtype=torch.int64), torch.tensor(scores, dtype=torch.float64))
        reference.insert(ids, scores)
        if ids and reference._slot(ids[0]) and reference.query(ids[0])[1] < 0:
            sketch.set_hot(torch.tensor([ids[0]]), torch.tensor([7]))
            reference.set_hot([ids[0]], [7])
    assert_same(sketch, reference)


def test_duplicates_are_summed_then_applied_in_order_of_first_occurrence(backend):
    # one bucket of two slots: 5 takes the empty slot, 6 the other; 7 then finds 6 lowest and takes it over
    sketch = HotSketch(1, 2, threshold=1e6, backend=backend)
    sketch.insert(torch.tensor([5, 6, 5, 7, 6]), torch.tensor([1.0, 2.0, 4.0, 0.5, 1.0]))
    assert sketch.keys.tolist() == [[5, 7]]
    assert sketch.scores.tolist() == [[5.0, 3.5]]


def _top_k_recall(ids: np.ndarray, top: int) -> tuple[float, float]:
    """Share of the true top IDs among the sketch's top IDs by score, and among all IDs it holds."""
    sketch = HotSketch(1000, 4)  # frequency scores, default decay
    for batch in torch.from_numpy(ids).split(4096):
        sketch.insert(batch)
    values, counts = np.unique(ids, return_counts=True)
    truth = set(values[np.argsort(-counts, kind="stable")[:top]].tolist())
    keys, scores, _ = sketch.items()
    found = set(keys[torch.topk(scores, top).indices].tolist())
    return len(found & truth) / top, len(set(keys.tolist()) & truth) / top


@pytest.fixture(scope="module")
def zipf_stream() -> np.ndarray:
    """1M events of Zipf(1.1) over 100k IDs: ID k has probability proportional to (k + 1)^-1.1."""
    rng = np.random.default_rng(0)
    weights = np.arange(1, 100_001, dtype=np.float64) ** -1.1
    return rng.choice(100_000, size=1_000_000, p=weights / weights.sum())


def test_top_k_recall_on_a_zipf_stream(zipf_stream):
    recall, held = _top_k_recall(zipf_stream, 500)
    assert recall >= 0.9 and held >= 0.95, (recall, held)


def test_top_k_recall_when_frequent_ids_are_scattered(zipf_stream):
    # The same stream with IDs relabelled at random, as when a feature's IDs are indexed in any order.
    # Above, the frequent IDs are consecutive integers, which multiply-add-shift spreads over the buckets
    # more evenly than chance; here buckets fill as by chance, and the slot a bucket's stream of rare IDs
    # keeps taking over inherits their whole count (Space-Saving), which can rank above true top-500 IDs
    # (about 300 events per bucket against 149 for the 500th ID). Measured: 0.83-0.88 over seeds, the same
    # as a plain per-event Space-Saving with random buckets; the true top IDs are still held (>= 0.97).
    relabel = np.random.default_rng(1).permutation(100_000)
    recall, held = _top_k_recall(relabel[zipf_stream], 500)
    assert recall >= 0.8 and held >= 0.95, (recall, held)


def test_frequency_counts_are_exact_below_capacity(backend):
    sketch = HotSketch(200, 4, decay_factor=1.0, backend=backend)
    rng = np.random.default_rng(1)
    candidates = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64))
    buckets = hash_ids(candidates, sketch.coefficients, sketch.num_buckets).squeeze(-1).tolist()
    per_bucket: dict[int, int] = {}
    chosen = []
    for x, bucket in zip(candidates.tolist(), buckets):
        if per_bucket.get(bucket, 0) < sketch.slots:
            per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
            chosen.append(x)
    chosen_ids = torch.tensor(chosen)
    stream = chosen_ids[torch.from_numpy(rng.integers(0, len(chosen), 50_000))]
    for batch in stream.split(1000):
        sketch.insert(batch)
    counts = {x: 0 for x in chosen}
    for x in stream.tolist():
        counts[x] += 1
    scores, rows = sketch.query(chosen_ids)
    assert scores.tolist() == [float(counts[x]) for x in chosen]
    assert rows.tolist() == [-1] * len(chosen)


def test_a_hot_slot_is_never_taken_over(backend):
    sketch = HotSketch(1, 4, threshold=1e9, backend=backend)
    sketch.insert(torch.tensor([1, 2, 3, 4]), torch.tensor([5.0, 1.0, 7.0, 9.0]))
    sketch.set_hot(torch.tensor([2]), torch.tensor([0]))  # the lowest slot
    for x in range(100, 200):
        sketch.insert(torch.tensor([x]), torch.tensor([100.0]))
    scores, rows = sketch.query(torch.tensor([2]))
    assert (scores.item(), rows.item()) == (1.0, 0)
    assert sketch.keys.tolist() == [[1, 2, 3, 4]]  # the lowest slot was hot every time: every newcomer dropped
    # once its row is taken back, the lowest slot is taken over and inherits its count
    assert sketch.clear_hot(torch.tensor([2, 99])).tolist() == [0, -1]
    sketch.insert(torch.tensor([500]), torch.tensor([2.0]))
    assert sketch.query(torch.tensor([500, 2]))[0].tolist() == [3.0, 0.0]


def test_with_skip_hot_a_newcomer_takes_the_lowest_slot_that_is_not_hot(backend):
    sketch = HotSketch(1, 4, threshold=1e9, backend=backend, skip_hot=True)
    sketch.insert(torch.tensor([1, 2, 3, 4]), torch.tensor([5.0, 1.0, 7.0, 9.0]))
    sketch.set_hot(torch.tensor([2]), torch.tensor([0]))  # the lowest slot is hot: 1 (score 5) is the lowest free
    sketch.insert(torch.tensor([100]), torch.tensor([0.5]))
    assert sketch.keys.tolist() == [[100, 2, 3, 4]]
    assert sketch.query(torch.tensor([100, 2]))[0].tolist() == [5.5, 1.0]  # inherits 5, the hot id keeps its slot
    sketch.set_hot(torch.tensor([100, 3, 4]), torch.tensor([1, 2, 3]))  # every slot hot: a newcomer is dropped
    sketch.insert(torch.tensor([200]), torch.tensor([50.0]))
    assert sketch.keys.tolist() == [[100, 2, 3, 4]] and sketch.hot_count() == 4


def test_hot_management(backend):
    sketch = HotSketch(64, 4, threshold=2.0, backend=backend)
    sketch.insert(torch.tensor([10, 20, 30]), torch.tensor([1.0, 3.0, 5.0]))
    sketch.set_hot(torch.tensor([[10, 20], [30, 30]]), torch.tensor([[4, 5], [6, 7]]))  # a repeat keeps its last row
    assert sketch.hot_count() == 3
    assert sketch.query(torch.tensor([[30], [20]]))[1].tolist() == [[7], [5]]
    ids, rows = sketch.hot_below()
    assert (ids.tolist(), rows.tolist(), ids.dtype, rows.dtype) == ([10], [4], torch.int64, torch.int32)
    ids, rows = sketch.hot_below(4.0)
    assert dict(zip(ids.tolist(), rows.tolist())) == {10: 4, 20: 5}
    assert sketch.clear_hot(torch.tensor([10])).tolist() == [4]
    assert sketch.hot_count() == 2
    with pytest.raises(ValueError, match="id 99 is not in the sketch"):
        sketch.set_hot(torch.tensor([20, 99]), torch.tensor([1, 2]))
    assert sketch.query(torch.tensor([20]))[1].tolist() == [5]  # a refused call changes nothing
    with pytest.raises(ValueError, match="rows must be in"):
        sketch.set_hot(torch.tensor([20]), torch.tensor([-1]))
    with pytest.raises(ValueError, match="shape of ids"):
        sketch.set_hot(torch.tensor([20]), torch.tensor([1, 2]))


def test_decay_rule_and_decay_call(backend):
    # a period of 10 * 0.1 * 10 = 10
    sketch = HotSketch(10, 4, threshold=0.1, decay_factor=0.5, backend=backend)
    assert sketch.insert(torch.tensor([1]), torch.tensor([10.0])) == 0  # exactly one period: not exceeded yet
    assert sketch.query(torch.tensor([1]))[0].item() == 10.0
    # 25 inserted, two periods' worth: one decay all the same (at most one a call, as the authors'), counted afresh
    assert sketch.insert(torch.tensor([2]), torch.tensor([15.0])) == 1
    assert sketch.query(torch.tensor([1, 2]))[0].tolist() == [5.0, 7.5]
    assert sketch.mass.item() == 0.0
    sketch.decay()
    assert sketch.query(torch.tensor([1, 2]))[0].tolist() == [2.5, 3.75]
    assert sketch.mass.item() == 0.0


def test_a_given_mass_drives_the_decay_instead_of_the_score_sum(backend):
    sketch = HotSketch(10, 4, threshold=0.1, decay_factor=0.5, backend=backend)  # a period of 10
    # scores that sum to 10.000001 by rounding: counted as the 10 occurrences they stand for, no decay yet
    scores = torch.full((10,), 1.0000001)
    assert sketch.insert(torch.arange(10), scores, mass=10.0) == 0 and sketch.mass.item() == 10.0
    assert sketch.insert(torch.tensor([3]), torch.tensor([0.5]), mass=1.0) == 1  # 11 counted: past one period
    assert sketch.mass.item() == 0.0
    assert sketch.query(torch.tensor([3]))[0].item() == pytest.approx(0.75)  # (1 + 0.5) * 0.5
    with pytest.raises(ValueError, match="mass must be finite"):
        sketch.insert(torch.tensor([1]), torch.tensor([1.0]), mass=-1.0)


def test_query_shapes_dtypes_and_absent_ids(backend):
    sketch = HotSketch(16, backend=backend)
    sketch.insert(torch.tensor([[3, 4], [3, 5]], dtype=torch.int32), torch.ones(2, 2, dtype=torch.float16))
    scores, rows = sketch.query(torch.tensor([[3, 4, 6]]))
    assert scores.shape == rows.shape == (1, 3)
    assert (scores.dtype, rows.dtype) == (torch.float32, torch.int32)
    assert scores.tolist() == [[2.0, 1.0, 0.0]] and rows.tolist() == [[-1, -1, -1]]
    assert sketch.query(torch.tensor(3))[0].shape == ()
    assert sketch.query(torch.tensor([], dtype=torch.int64))[0].shape == (0,)
    sketch.insert(torch.tensor([], dtype=torch.int64), torch.tensor([]))
    sketch.insert(torch.tensor([9]), torch.tensor([2.0], requires_grad=True))  # gradient norms may need grad
    assert sketch.query(torch.tensor([9]))[0].item() == 2.0


def test_bucket_hash_equals_compemb_hashing(backend):
    rng = np.random.default_rng(2)
    ids = torch.cat([torch.tensor(EDGE_IDS), torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64))])
    for buckets, slots in [(1_000_003, 4), (7, 400), (1, 400)]:
        sketch = HotSketch(buckets, slots, seed=buckets, backend=backend)
        sketch.insert(ids)
        expected = hash_ids(ids, sketch.coefficients, buckets).squeeze(-1)
        a, b = sketch.coefficients[0].tolist()
        assert expected.tolist() == [reference_hash(x, a, b, buckets) for x in ids.tolist()]
        for x, bucket in zip(ids.tolist(), expected.tolist()):
            assert x in sketch.keys[bucket][sketch.occupied[bucket]].tolist()
        assert int(sketch.occupied.sum()) == len(ids)


def test_bad_inputs_raise_and_leave_the_sketch_unchanged(backend):
    sketch = HotSketch(8, backend=backend)
    sketch.insert(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    before = copy.deepcopy(sketch.state_dict())
    for scores, message in [
        (torch.tensor([1.0, -0.5, 1.0]), "finite and >= 0, got -0.5 at flat index 1"),
        (torch.tensor([1.0, 1.0, float("nan")]), "got nan"),
        (torch.tensor([float("inf"), 1.0, 1.0]), "got inf"),
        (torch.tensor([1.0, 1.0]), "shape of ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            sketch.insert(torch.tensor([3, 4, 5]), scores)
    with pytest.raises(TypeError, match="integer tensor"):
        sketch.insert(torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        sketch.insert(torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sketch.query([1, 2])
    with pytest.raises(TypeError, match="rows must be a torch.Tensor"):
        sketch.set_hot(torch.tensor([1]), [0])
    for name, value in sketch.state_dict().items():
        assert torch.equal(value, before[name]), name
    for kwargs in [
        dict(num_buckets=0),
        dict(num_buckets=2**31 + 1),
        dict(num_buckets=4, slots=0),
        dict(num_buckets=4, threshold=0.0),
        dict(num_buckets=4, decay_factor=1.5),
        dict(num_buckets=4, decay_factor=0.0),
    ]:
        with pytest.raises(ValueError):
            HotSketch(**kwargs)


def test_state_dict_round_trip_and_copies(backend):
    sketch = HotSketch(32, 4, threshold=0.3, seed=5, backend=backend)
    rng = np.random.default_rng(4)
    for _ in range(10):
        sketch.insert(torch.from_numpy(rng.integers(0, 400, 100)), torch.from_numpy(rng.random(100)))
    sketch.set_hot(sketch.items()[0][:5], torch.arange(5))
    state = sketch.state_dict()
    assert set(state) == {"keys", "scores", "hot_rows", "occupied", "mass", "coefficients"}
    # another seed: the coefficients come from the state
    restored = HotSketch(32, 4, threshold=0.3, seed=99, backend=backend)
    restored.load_state_dict(state)
    assigned = HotSketch(32, 4, threshold=0.3, backend=backend)
    assigned.load_state_dict(copy.deepcopy(state), assign=True)
    twin = copy.deepcopy(sketch)
    batch, scores = torch.from_numpy(rng.integers(0, 400, 300)), torch.from_numpy(rng.random(300))
    for other in (sketch, restored, assigned, twin):
        other.insert(batch, scores)
    for other in (restored, assigned, twin):
        for name, value in sketch.state_dict().items():
            assert torch.equal(other.state_dict()[name], value), name
    twin.insert(torch.tensor([7]), torch.tensor([1e3]))
    assert sketch.query(torch.tensor([7]))[0].item() != twin.query(torch.tensor([7]))[0].item()


def test_buffers_keep_their_dtypes_when_the_parent_is_cast():
    parent = torch.nn.Module()
    parent.sketch = HotSketch(8)
    parent.weight = torch.nn.Parameter(torch.zeros(3))
    dtypes = {name: t.dtype for name, t in parent.sketch.state_dict().items()}
    parent.half()
    parent.double()
    parent.to(torch.bfloat16)
    assert parent.weight.dtype == torch.bfloat16
    assert {name: t.dtype for name, t in parent.sketch.state_dict().items()} == dtypes
    assert all(t.device.type == "cpu" for t in parent.sketch.buffers())
    parent.sketch.insert(torch.tensor([1]), torch.tensor([0.25], dtype=torch.bfloat16))
    assert parent.sketch.query(torch.tensor([1]))[0].item() == 0.25


def test_torch_ops_equal_the_compiled_kernels_on_a_long_stream():
    # batches of 4,096 Zipf ids into 300 buckets: up to ~30 distinct ids per bucket per batch, so many rounds,
    # takeovers, decays (scores are gradient-norm-like floats) and hot slots on the way
    rng = np.random.default_rng(7)
    weights = np.arange(1, 50_001, dtype=np.float64) ** -1.1
    compiled = HotSketch(300, 4, threshold=0.5, decay_factor=0.9, seed=2)
    ops = HotSketch(300, 4, threshold=0.5, decay_factor=0.9, seed=2, backend="torch")
    decays = 0
    for step in range(30):
        ids = torch.from_numpy(rng.permutation(50_000)[rng.choice(50_000, 4096, p=weights / weights.sum())])
        scores = torch.from_numpy(rng.exponential(1.0, 4096).astype(np.float32))
        frequency = step % 5 == 4
        applied = compiled.insert(ids, None if frequency else scores)
        assert ops.insert(ids, None if frequency else scores) == applied
        decays += applied
        if step % 3 == 0:  # promote the best not-hot ids, as CAFE does
            held, held_scores, held_rows = compiled.items()
            best = held[(held_rows < 0)][torch.argsort(held_scores[held_rows < 0], descending=True)[:20]]
            rows = torch.arange(step * 20, step * 20 + best.numel())
            compiled.set_hot(best, rows)
            ops.set_hot(best, rows)
        if step % 7 == 6:
            gone, _ = compiled.hot_below(50.0)
            assert torch.equal(compiled.clear_hot(gone), ops.clear_hot(gone))
        for name, value in compiled.state_dict().items():
            assert torch.equal(ops.state_dict()[name], value), (step, name)
    assert decays > 0 and compiled.hot_count() == ops.hot_count() > 0
    probe = torch.arange(-10, 60_000)
    for a, b in zip(compiled.query(probe), ops.query(probe)):
        assert torch.equal(a, b)
    for a, b in zip(compiled.hot_below(100.0), ops.hot_below(100.0)):
        assert torch.equal(a, b)


def test_a_sketch_moved_with_its_parent_runs_where_it_lives():
    parent = torch.nn.Module()
    parent.sketch = HotSketch(8)
    parent.to_empty(device="cpu")  # to_empty keeps the device: the state is uninitialised until reset
    parent.sketch.reset()
    assert parent.sketch._compiled
    planned = HotSketch(8, device="meta")
    assert planned.keys.is_meta
    planned.to_empty(device="cpu")
    planned.reset()
    planned.insert(torch.tensor([3, 3]))
    assert planned.query(torch.tensor([3]))[0].tolist() == [2.0] and planned.mass_since_decay() == 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_sketch_lives_there_and_equals_the_cpu_one():
    cpu = HotSketch(64, 4, threshold=0.2)
    sketch = torch.nn.Sequential(HotSketch(64, 4, threshold=0.2)).cuda()[0]
    assert sketch.keys.device.type == "cuda" and not sketch._compiled
    rng = np.random.default_rng(3)
    for _ in range(20):
        ids = torch.from_numpy(rng.integers(0, 1000, 512))
        scores = torch.from_numpy((rng.integers(1, 64, 512) / 8).astype(np.float32))  # sums are exact: any order
        assert sketch.insert(ids.cuda(), scores.cuda()) == cpu.insert(ids, scores)
    for name, value in cpu.state_dict().items():
        assert torch.equal(sketch.state_dict()[name].cpu(), value), name
    scores, rows = sketch.query(torch.tensor([1, 2, 1], device="cuda"))
    assert scores.device.type == rows.device.type == "cuda"
    assert sketch.query(torch.tensor([1, 2]))[0].device.type == "cpu"  # results on the ids' device


def test_memory_counts_every_stored_byte():
    sketch = HotSketch(1000, 4)
    stored = sum(t.numel() * t.element_size() for t in sketch.buffers())
    assert sketch.memory() == MemoryReport(float_bytes=0, sketch_bytes=stored)
    assert stored == 1000 * 4 * (8 + 4 + 4 + 1) + coefficient_bytes(1) + 8
    assert HotSketch.bytes_for(1000, 4) == stored
    assert HotSketch.buckets_for(stored, 4) == 1000
    assert HotSketch.buckets_for(stored + 67, 4) == 1000
    assert HotSketch(3, 2).memory().total == HotSketch.bytes_for(3, 2)
    with pytest.raises(ValueError, match="at least"):
        HotSketch.buckets_for(30, 4)


# --- the vectorised merge (the device code path's insert) ----------------------------------------------------


def reference_merge(sketch: HotSketch, ids: list[int], scores: list[float]) -> list[list[tuple]]:
    """merge_insert's rule in plain loops: each bucket's slots afterwards as (id, np.float32 score, row) of the
    occupied ones, best first where newcomers arrived. Scores are summed per id in batch order."""
    a, b = sketch.coefficients[0].tolist()
    summed: dict[int, np.float32] = {}
    for x, s in zip(ids, scores):
        summed[x] = np.float32(summed[x] + np.float32(s)) if x in summed else np.float32(s)
    keys, table = sketch.keys.tolist(), sketch.scores.numpy().copy()
    rows, used = sketch.hot_rows.tolist(), sketch.occupied.tolist()
    result = []
    for w in range(sketch.num_buckets):
        residents = [[keys[w][j], table[w][j], rows[w][j], used[w][j]] for j in range(sketch.slots)]
        newcomers = []
        for x in sorted(summed):
            if reference_hash(x, a, b, sketch.num_buckets) != w:
                continue
            slot = next((r for r in residents if r[3] and r[0] == x), None)
            if slot is not None:
                slot[1] = np.float32(slot[1] + summed[x])
            else:
                newcomers.append((x, summed[x]))
        if not newcomers:  # a bucket no newcomer reaches keeps its slots where they are
            result.append([(r[0], r[1], r[2]) for r in residents if r[3]])
            continue
        newcomers = sorted(newcomers, key=lambda item: -item[1])[: sketch.slots]  # stable: ties in id order
        full = all(r[3] for r in residents)
        occupied_scores = [r[1] for r in residents if r[3]]
        if sketch.skip_hot:  # the minimum over the slots a newcomer may take; none: closed
            takeable = [r[1] for r in residents if r[3] and r[2] < 0]
            closed = full and not takeable
            base = (min(takeable) if takeable else np.float32(0)) if full else np.float32(0)
        else:
            lowest = min(range(sketch.slots), key=lambda j: residents[j][1] if residents[j][3] else np.inf)
            closed = full and residents[lowest][2] >= 0
            base = min(occupied_scores) if full else np.float32(0)
        entries = [
            ((np.inf if r[2] >= 0 else r[1]) if r[3] else -np.inf, (r[0], r[1], r[2]) if r[3] else None)
            for r in residents
        ]
        if not closed:
            entries += [(np.float32(base + s), (x, np.float32(base + s), -1)) for x, s in newcomers]
        kept = sorted(entries, key=lambda entry: -entry[0])[: sketch.slots]  # stable: residents win ties
        result.append([slot for _, slot in kept if slot is not None])
    return result


def merged_buckets(sketch: HotSketch) -> list[list[tuple]]:
    keys, table, rows, used = (
        sketch.keys.tolist(),
        sketch.scores.numpy(),
        sketch.hot_rows.tolist(),
        sketch.occupied.tolist(),
    )
    return [
        [(keys[w][j], table[w][j], rows[w][j]) for j in range(sketch.slots) if used[w][j]]
        for w in range(sketch.num_buckets)
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 40), st.floats(0, 8, width=32)), min_size=1, max_size=30),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 3),
    st.booleans(),
)
def test_the_merge_follows_its_rule_in_plain_loops(batches, seed, skip_hot):
    """Every batch, every bucket, slot by slot: ids, float32 scores bit for bit, hot rows (some made hot)."""
    sketch = HotSketch(3, 2, threshold=1e9, decay_factor=1.0, seed=seed, backend="merge", skip_hot=skip_hot)
    for index, batch in enumerate(batches):
        ids, scores = [x for x, _ in batch], [s for _, s in batch]
        expected = reference_merge(sketch, ids, scores)
        sketch.insert(torch.tensor(ids), torch.tensor(scores, dtype=torch.float32))
        assert merged_buckets(sketch) == expected
        if index == 1:  # make the best id of the sketch hot: it must never leave
            best = sketch.keys.view(-1)[torch.where(sketch.occupied.view(-1), sketch.scores.view(-1), -1).argmax()]
            sketch.set_hot(best.view(1), torch.tensor([7]))


def test_the_merge_equals_the_sequential_sketch_where_no_bucket_overflows():
    """With room in every bucket the order of entry cannot matter: the same ids and scores per bucket."""
    generator = torch.Generator().manual_seed(0)
    exact, merged = HotSketch(4096, decay_factor=1.0), HotSketch(4096, decay_factor=1.0, backend="merge")
    for _ in range(5):
        ids = torch.randint(0, 2000, (300,), generator=generator)
        scores = torch.rand(300, generator=generator)
        exact.insert(ids, scores)
        merged.insert(ids, scores)
    assert [sorted(b) for b in merged_buckets(exact)] == [sorted(b) for b in merged_buckets(merged)]
    assert float(exact.mass) == float(merged.mass)


@pytest.mark.parametrize("exponent", [1.1, 1.3])
@pytest.mark.parametrize("num_buckets", [1, 8, 64, 512])
def test_the_merge_finds_the_top_ids_as_well_as_the_exact_sketch(num_buckets, exponent):
    """Recall of the true top ids on Zipf streams (as many ids as buckets): at least the exact sequential
    sketch's minus 0.05 (measured: equal or better in every case here)."""
    rng = np.random.default_rng(int(num_buckets * 10 + exponent * 10))
    universe = 50_000
    permutation = rng.permutation(universe)
    counts = np.zeros(universe)
    exact = HotSketch(num_buckets, threshold=1e9, decay_factor=1.0)
    merged = HotSketch(num_buckets, threshold=1e9, decay_factor=1.0, backend="merge")
    for _ in range(150):
        draws = rng.zipf(exponent, 1024)
        ids = permutation[draws[draws <= universe] - 1]
        np.add.at(counts, ids, 1)
        exact.insert(torch.from_numpy(ids))
        merged.insert(torch.from_numpy(ids))
    top = set(np.argsort(-counts, kind="stable")[:num_buckets].tolist())

    def recall(sketch):
        return len(top & set(sketch.keys[sketch.occupied].tolist())) / len(top)

    assert recall(merged) >= recall(exact) - 0.05


def test_the_merge_leaves_out_unkept_entries_and_fails_bad_scores_on_the_device():
    sketch = HotSketch(16, backend="merge")
    ids = torch.tensor([1, 2, 3, 2])
    sketch.insert(ids, torch.ones(4), keep=torch.tensor([True, False, True, False]))
    assert sorted(sketch.keys[sketch.occupied].tolist()) == [1, 3]
    assert sketch.mass_since_decay() == 2.0
    with pytest.raises(RuntimeError, match="negative, NaN or infinite"):
        sketch.insert(torch.tensor([5]), torch.tensor([float("nan")]))


def test_the_device_decay_matches_the_host_rule():
    """A mass that stays on the device (a count of kept occurrences) decays the scores as the host rule would."""
    host, device = (
        HotSketch(2, threshold=1.0, decay_factor=0.5, backend="merge"),
        HotSketch(2, threshold=1.0, decay_factor=0.5, backend="merge"),
    )
    ids = torch.arange(6)
    for mass in (7.0, 30.0, 0.5, 45.0):
        assert host.insert(ids, torch.ones(6), mass=mass) >= 0
        assert device.insert(ids, torch.ones(6), mass=torch.tensor(mass, dtype=torch.float64)) == -1
        torch.testing.assert_close(device.scores, host.scores)
        assert float(device.mass) == pytest.approx(host.mass_since_decay())


def test_a_batch_without_newcomers_leaves_every_slot_where_it_was():
    """Found by hypothesis: with no newcomer anywhere, the merge's padding rows must not reorder bucket 0."""
    sketch = HotSketch(3, 2, threshold=1e9, decay_factor=1.0, seed=3, backend="merge")
    sketch.insert(torch.tensor([1, 11]), torch.tensor([0.0, 1.0]))
    before = merged_buckets(sketch)
    sketch.insert(torch.tensor([1]), torch.tensor([2.0]))
    after = merged_buckets(sketch)
    assert [[slot[0] for slot in bucket] for bucket in after] == [[slot[0] for slot in bucket] for bucket in before]


def test_sketches_laid_end_to_end_merge_in_one_pass_exactly_as_each_alone():
    """Flat buckets with per-table offsets (the layout of one sketch for many tables): one merge of every table's
    batch gives each table's slots bit for bit as its own merge, the same id in two tables kept apart."""
    from compemb.sketch import torch_ops

    generator = torch.Generator().manual_seed(5)
    alone = [
        HotSketch(w, 3, threshold=1e9, decay_factor=1.0, seed=seed, backend="merge")
        for w, seed in ((5, 1), (1, 2), (9, 3))
    ]
    starts = [0, 5, 6]
    flat = {
        name: torch.cat([getattr(s, name) for s in alone]).clone()
        for name in ("keys", "scores", "hot_rows", "occupied")
    }
    for step in range(8):
        batches = [torch.randint(0, 30, (40,), generator=generator) for _ in alone]  # ids shared by the tables
        scores = [torch.rand(40, generator=generator) for _ in alone]
        buckets = torch.cat(
            [
                torch_ops.buckets_of(ids, s.coefficients, s.num_buckets) + start
                for ids, s, start in zip(batches, alone, starts)
            ]
        )
        torch_ops.merge_insert(
            torch.cat(batches),
            torch.cat(scores),
            None,
            flat["keys"],
            flat["scores"],
            flat["hot_rows"],
            flat["occupied"],
            None,
            buckets=buckets,
        )
        for sketch, ids, score in zip(alone, batches, scores):
            sketch.insert(ids, score)
        if step == 3:  # a hot id in the middle table, in both layouts
            key = alone[1].keys[0, 0].view(1)
            alone[1].set_hot(key, torch.tensor([2]))
            flat["hot_rows"][5, 0] = 2
        for name in flat:
            assert torch.equal(flat[name], torch.cat([getattr(s, name) for s in alone])), (step, name)


@pytest.mark.parametrize("skip_hot", [False, True])
def test_packed_sketches_take_every_tables_batch_in_one_merge_as_each_would_alone(skip_hot):
    """PackedSketches: the same slots bit for bit, the same decays, each sketch still answers for itself and
    follows a move to another buffer (packed again)."""
    from compemb.sketch import PackedSketches

    def build():
        return [
            HotSketch(w, 4, threshold=0.3, decay_factor=0.5, seed=seed, backend="merge", skip_hot=skip_hot)
            for w, seed in ((6, 1), (1, 2), (11, 3))
        ]

    alone, packed_sketches = build(), build()
    packed = PackedSketches(packed_sketches)
    generator = torch.Generator().manual_seed(8)
    for step in range(10):
        ids = torch.randint(0, 40, (32, 3), generator=generator)
        scores = torch.rand(32, 3, generator=generator)
        decays = packed.insert(ids, scores, masses=[32.0] * 3)
        assert decays == [
            s.insert(ids[:, t].contiguous(), scores[:, t].contiguous(), mass=32.0) for t, s in enumerate(alone)
        ]
        if step == 4:
            present = alone[2].keys[alone[2].occupied][:1]
            alone[2].set_hot(present, torch.tensor([3]))
            packed_sketches[2].set_hot(present, torch.tensor([3]))
        if step == 6:  # a state_dict round trip keeps the views; a fresh buffer is noticed and packed again
            packed_sketches[0].load_state_dict(alone[0].state_dict())
            packed_sketches[1].keys = packed_sketches[1].keys.clone()
        for a, b in zip(alone, packed_sketches):
            for name in ("keys", "scores", "hot_rows", "occupied", "mass"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
    assert sum(decays) >= 0 and any(float(s.mass) < s.decay_period for s in alone)
    assert packed.is_packed()
