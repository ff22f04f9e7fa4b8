"""The contract every registered method keeps; a newly registered method is tested here at once."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compemb import METHODS, BudgetError, make_embedding

from .conftest import ALL_METHODS, build, make, reference_bags

COMPRESSED = [name for name in ALL_METHODS if METHODS[name].compresses]
CLOSED = [name for name in ALL_METHODS if not METHODS[name].open_vocabulary]
OPEN = [name for name in ALL_METHODS if METHODS[name].open_vocabulary]


@pytest.mark.parametrize("name", ALL_METHODS)
def test_shapes_like_embedding_and_embedding_bag(name):
    module = build(name)
    ids = torch.randint(0, 1000, (6, 5))
    assert module(ids[0]).shape == (5, 8)
    assert module(ids).shape == (6, 5, 8)
    assert module(torch.tensor(3)).shape == (8,)
    assert module(torch.zeros(0, dtype=torch.long)).shape == (0, 8)
    assert module(ids.reshape(-1), torch.tensor([0, 4, 4, 20])).shape == (4, 8)
    assert module(ids.int()).dtype == torch.float32  # int32 ids are accepted


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bags_equal_reduced_members_and_empty_bags_are_zero(name, mode):
    module = build(name, mode=mode)
    ids = torch.randint(0, 1000, (12,))
    offsets = torch.tensor([0, 0, 3, 3, 7, 12])  # bags 0, 2 and the last are empty
    out = module(ids, offsets)
    torch.testing.assert_close(out.double(), reference_bags(module, ids, offsets, mode=mode), rtol=1e-5, atol=1e-6)
    assert bool((out[[0, 2, 5]] == 0).all())


@pytest.mark.parametrize("name", ALL_METHODS)
def test_include_last_offset_takes_batch_plus_one_offsets_as_embedding_bag_does(name):
    last = build(name, include_last_offset=True)
    ids = torch.randint(0, 1000, (12,))
    offsets = torch.tensor([0, 0, 3, 7, 12])  # four bags, the last offset closing the last one
    expected = reference_bags(last, ids, offsets[:-1])
    torch.testing.assert_close(last(ids, offsets).double(), expected, rtol=1e-5, atol=1e-6)
    assert last(ids, offsets).shape == (4, 8)
    with pytest.raises(ValueError, match=r"offsets\[-1\] must be the number of ids 12, got 7"):
        last(ids, offsets[:-1])  # B offsets given where B + 1 were declared: an error, not a bag too few
    with pytest.raises(ValueError, match="batch \\+ 1 >= 1"):
        last(ids, torch.zeros(0, dtype=torch.long))


def test_include_last_offset_agrees_with_torch_embedding_bag():
    reference = torch.nn.EmbeddingBag(50, 4, mode="sum", include_last_offset=True)
    table = build("full", num_embeddings=50, embedding_dim=4, include_last_offset=True)
    with torch.no_grad():
        table.weight.copy_(reference.weight)
    ids, offsets = torch.randint(0, 50, (9,)), torch.tensor([0, 2, 2, 9])
    torch.testing.assert_close(table(ids, offsets), reference(ids, offsets))


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_method_looks_up_trains_and_pools_in_half_precision(name, dtype):
    module = build(name, dtype=dtype)
    assert all(p.dtype == dtype for p in module.parameters())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for step in range(3):  # training steps, the methods' own hooks included
        out = module(torch.randint(0, 1000, (32,)))
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
        optimizer.zero_grad()
        out.float().pow(2).sum().backward()
        optimizer.step()
        module.on_step_end(step, optimizer)
    pooled = module(torch.tensor([1, 2, 3]), torch.tensor([0, 1]), torch.ones(3, dtype=dtype))
    assert pooled.dtype == dtype and pooled.shape == (2, 8)
    full = build(name)  # the same seed in float32: half precision stores fewer bytes
    assert module.memory().float_bytes == full.memory().float_bytes // 2


@pytest.mark.parametrize("name", ALL_METHODS)
def test_a_padding_id_reads_zeros_is_left_out_of_bags_and_trains_nothing(name):
    module = build(name, padding_idx=7, mode="mean")
    plain = build(name, mode="mean")  # the same seed: the same tables
    ids = torch.tensor([7, 3, 7, 5, 9])
    out = module(ids)
    assert out[0].abs().sum() == 0 and out[2].abs().sum() == 0 and torch.equal(out[1], plain(ids)[1])
    bags = module(ids, torch.tensor([0, 2, 3]))  # [7, 3], [7], [5, 9]: the mean of [3], an empty bag, both
    torch.testing.assert_close(bags[0], plain(ids[1:2])[0])
    assert bags[1].abs().sum() == 0
    torch.testing.assert_close(bags[2], plain(ids[3:]).mean(0))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    optimizer.zero_grad()
    (module(torch.tensor([7, 7])) + 1).pow(2).sum().backward()  # a loss that would move any row the id reads
    optimizer.step()
    module.on_step_end(0, optimizer)
    after = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        build(name, padding_idx=1000)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_max_pooled_bags_take_each_coordinates_largest_member(name):
    module = build(name, mode="max")
    ids, offsets = torch.randint(0, 1000, (10,)), torch.tensor([0, 4, 4, 9])
    out = module(ids, offsets)
    singles = module(ids)
    expected = torch.stack(
        [singles[0:4].max(0).values, torch.zeros(8), singles[4:9].max(0).values, singles[9:].max(0).values]
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="per_sample_weights needs mode 'sum'"):
        module(ids, offsets, torch.ones(10))


def test_a_full_table_from_pretrained_weights_reads_them():
    from compemb.embeddings.full import FullEmbedding

    weights = torch.randn(20, 4)
    table = FullEmbedding.from_pretrained(weights, freeze=False, padding_idx=3)
    ids = torch.tensor([1, 3, 19])
    assert torch.equal(table(ids)[0], weights[1]) and table(ids)[1].abs().sum() == 0
    assert table.weight.requires_grad and table.memory().total == weights.numel() * 4
    reference = torch.nn.EmbeddingBag.from_pretrained(weights, mode="sum", padding_idx=3)
    torch.testing.assert_close(table(ids, torch.tensor([0, 2])), reference(ids, torch.tensor([0, 2])))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_per_sample_weights_scale_members(name):
    module = build(name)
    ids = torch.randint(0, 1000, (9,))
    offsets = torch.tensor([0, 2, 2, 6])
    weights = torch.rand(9)
    expected = reference_bags(module, ids, offsets, weights)
    torch.testing.assert_close(module(ids, offsets, weights).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_METHODS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_one_id_per_bag_equals_the_general_bag_path(name, mode):
    module = build(name, mode=mode)
    ids = torch.randint(0, 1000, (7,))
    one_each = torch.arange(7)
    weights = torch.rand(7) if mode == "sum" else None
    expected = reference_bags(module, ids, one_each, weights, mode=mode)
    torch.testing.assert_close(module(ids, one_each, weights).double(), expected, rtol=1e-5, atol=1e-6)
    # the same ids with one empty bag in front take the general path and agree on the rest
    general = module(ids, torch.cat([torch.zeros(1, dtype=torch.long), one_each]), weights)
    torch.testing.assert_close(general[1:].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL_METHODS)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_bags_match_reference(name, data):
    module = build(name, mode=data.draw(st.sampled_from(["sum", "mean"])))
    ids = torch.tensor(data.draw(st.lists(st.integers(0, 999), max_size=20)), dtype=torch.long)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=6)))
    offsets = torch.tensor([0, *cuts], dtype=torch.long)
    expected = reference_bags(module, ids, offsets, mode=module.mode)
    torch.testing.assert_close(module(ids, offsets).double(), expected, rtol=1e-5, atol=1e-6)


def _gradcheck(module, *inputs):
    module = module.double()
    names = [name for name, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())

    def outputs(*tensors):
        return torch.func.functional_call(module, dict(zip(names, tensors)), inputs)

    # finite differences: every parameter the ids use gets its true gradient, every other one exactly zero
    assert torch.autograd.gradcheck(outputs, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_gradients_match_finite_differences(name):
    # 200 ids x 4 at 1.25x: 640 params, a budget every method meets (mch moves in steps of a row and its slot)
    module = build(name, num_embeddings=200, embedding_dim=4, compression=1.25)
    _gradcheck(module, torch.tensor([0, 3, 3, 99, 17]))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_bag_gradients_match_finite_differences(name):
    module = build(name, num_embeddings=200, embedding_dim=4, compression=1.25)
    ids = torch.tensor([1, 2, 2, 98, 5, 9])
    _gradcheck(module, ids, torch.tensor([0, 2, 2, 5]), torch.rand(6, dtype=torch.float64))


def _reachable(name, compression, dim):
    """``compression``, or less where per-id bookkeeping (AdaEmbed's scores, cce's pointers) would leave under a fifth
    of the budget (cce at d=8 reaches 5.66x-7.77x with uint8 pointers and at least 16 rows: 6.4x)."""
    per_id = METHODS[name].per_id_bytes
    return compression if not per_id else min(compression, dim * 4 / (1.25 * per_id))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_untouched_parameters_get_no_gradient(name):
    module = build(name, num_embeddings=10_000, embedding_dim=8, compression=_reachable(name, 10, 8))
    module(torch.tensor([5, 77])).square().sum().backward()
    for param in module.parameters():
        touched = int((param.grad != 0).sum())
        if not METHODS[name].stores_rows:  # no table (DHE): every parameter serves every id
            assert touched > 0, param.shape
            continue
        assert 0 < touched < param.numel() or param.numel() <= 16, (param.shape, touched)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_sparse_gradients_equal_dense_ones(name):
    ids, offsets = torch.randint(0, 1000, (40,)), torch.tensor([0, 10, 25])
    if not METHODS[name].sparse_gradients:  # no table rows (an MLP, cores): sparse=True is refused, not ignored
        with pytest.raises(ValueError, match="has no table rows to give sparse gradients"):
            build(name, sparse=True)
        return
    grads = []
    for sparse in (False, True):
        module = build(name, sparse=sparse, seed=4)
        projection = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        (module(ids, offsets) * projection).sum().backward()
        grads.append([p.grad.to_dense() for p in module.parameters()])
    for dense, sparse in zip(*grads):
        torch.testing.assert_close(dense, sparse)


@pytest.mark.parametrize("name", COMPRESSED)
@pytest.mark.parametrize(
    "num_embeddings, dim, compression", [(100_000, 16, 2), (100_000, 16, 10), (1_000_000, 16, 100), (50_000, 32, 50)]
)
def test_memory_within_one_percent_of_budget(name, num_embeddings, dim, compression):
    budget = num_embeddings * dim * 4 / compression
    if budget < num_embeddings * METHODS[name].per_id_bytes:  # per-id bookkeeping alone exceeds it: refused
        with pytest.raises(BudgetError, match="smallest budget it can meet"):
            build(name, num_embeddings=num_embeddings, embedding_dim=dim, compression=compression, device="meta")
        return
    try:
        module = build(name, num_embeddings=num_embeddings, embedding_dim=dim, compression=compression, device="meta")
    except BudgetError as error:  # per-id state whose width moves in steps (cce's uint8/int16 pointers) has gaps
        assert METHODS[name].per_id_bytes and "the highest ratio it can reach" in str(error)
        return
    # what counts against the budget: everything stored, except under paper accounting (cce-paper: the floats)
    assert abs(module.budgeted_bytes() - budget) <= 0.01 * budget
    if getattr(module, "accounting", "honest") == "honest":
        assert module.budgeted_bytes() == module.memory().total
    by_params = make(name, num_embeddings, dim, num_params=round(budget / 4), device="meta")
    assert abs(by_params.budgeted_bytes() - budget) <= 0.01 * budget


@pytest.mark.parametrize("name", COMPRESSED)
def test_memory_counts_floats_and_index_arrays_apart(name):
    module = build(name, num_embeddings=10_000, compression=_reachable(name, 10, 8))
    report = module.memory()
    assert report.float_bytes == sum(p.numel() * 4 for p in module.parameters())
    if METHODS[name].open_vocabulary:
        assert report.index_bytes > 0  # hash coefficients are index bytes
    # every stored tensor counts once: parameters as floats, buffers (hashes, maps, sketches) as index or sketch
    stored = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert report.total == report.float_bytes + report.index_bytes + report.sketch_bytes == stored


@pytest.mark.parametrize("name", ALL_METHODS)
def test_impossible_budget_names_the_smallest(name):
    with pytest.raises(ValueError, match="smallest budget it can meet is [0-9,]+ params") as error:
        make(name, 10_000, 16, num_params=3)
    if name != "full":
        assert isinstance(error.value, BudgetError)


def test_full_refuses_to_compress():
    with pytest.raises(ValueError, match="smallest budget it can meet is 160,000 params"):
        make("full", 10_000, 16, compression=10)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_float_ids_raise_type_error(name):
    with pytest.raises(TypeError, match="integer"):
        build(name)(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("name", CLOSED)
@pytest.mark.parametrize("bad", [-1, 1000, 10**12])
def test_closed_vocabulary_rejects_ids_out_of_range(name, bad):
    module = build(name, name="C7")
    with pytest.raises(ValueError, match=rf"'C7': id {bad} is outside \[0, 1000\)"):
        module(torch.tensor([3, bad, 4]))


@pytest.mark.parametrize("name", CLOSED)
def test_closed_vocabulary_needs_num_embeddings(name):
    with pytest.raises(ValueError, match="closed vocabulary"):
        make(name, None, 8, num_params=1000)


@pytest.mark.parametrize("name", OPEN)
def test_open_vocabulary_accepts_any_int64(name):
    module = make(name, None, 8, num_params=2000)
    ids = torch.tensor([-(2**63), -1, 0, 2**40, 2**63 - 1])
    out = module(ids)
    assert out.shape == (5, 8) and bool(torch.isfinite(out).all())
    assert not torch.equal(out[1], out[2])


@pytest.mark.parametrize(
    "offsets, weights, match",
    [
        (torch.tensor([1, 3]), None, r"offsets\[0\] must be 0"),
        (torch.tensor([0, 4, 2]), None, "non-decreasing"),
        (torch.tensor([0, 9]), None, "beyond the 6 ids"),
        (torch.tensor([0.0, 2.0]), None, "integer"),
        (torch.tensor([0, 2]), torch.rand(5), "per_sample_weights"),
    ],
)
def test_bad_bags_are_named(offsets, weights, match):
    module = build("hash")
    with pytest.raises((ValueError, TypeError), match=match):
        module(torch.arange(6), offsets, weights)


def test_bags_need_one_dimensional_ids_and_sum_mode_for_weights():
    with pytest.raises(ValueError, match="1-D"):
        build("hash")(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="mode 'sum'"):
        build("hash", mode="mean")(torch.arange(3), torch.tensor([0]), torch.rand(3))
    with pytest.raises(ValueError, match="needs offsets"):
        build("hash")(torch.arange(3), per_sample_weights=torch.rand(3))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_state_dict_round_trip_reproduces_outputs(name):
    source, target = build(name, seed=1), build(name, seed=2)
    ids = torch.arange(0, 1000, 7)
    assert not torch.equal(source(ids), target(ids))
    target.load_state_dict(source.state_dict())
    assert torch.equal(source(ids), target(ids))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_reset_parameters_restores_the_seeded_tables_and_hashes(name):
    module = build(name, seed=5)
    ids = torch.arange(50)
    before = module(ids).detach().clone()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)
        for buffer in module.buffers():
            buffer.logical_not_() if buffer.dtype == torch.bool else buffer.add_(12345)
    module.reset_parameters()
    assert torch.equal(module(ids), before)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_built_on_meta_then_materialised_equals_a_direct_build(name):
    direct = build(name, seed=6)
    planned = build(name, seed=6, device="meta")
    assert all(t.is_meta for t in [*planned.parameters(), *planned.buffers()])
    assert planned.memory() == direct.memory()
    planned.to_empty(device="cpu")
    planned.reset_parameters()
    ids = torch.arange(0, 1000, 3)
    assert torch.equal(planned(ids), direct(ids))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_weights_of_another_float_dtype_give_the_tables_dtype_on_every_path(name):
    module = build(name)
    ids = torch.randint(0, 1000, (6,))
    weights = torch.rand(6, dtype=torch.float64)
    for offsets in (torch.arange(6), torch.tensor([0, 2, 2])):
        assert module(ids, offsets, weights).dtype == torch.float32


@pytest.mark.parametrize("name", ALL_METHODS)
def test_uint64_ids_are_refused(name):
    with pytest.raises(TypeError, match="uint64"):
        build(name)(torch.tensor([1, 2], dtype=torch.uint64))


@pytest.mark.parametrize("name", ALL_METHODS)
def test_numpy_integer_sizes_are_accepted(name):
    import numpy as np

    budget = {"compression": np.float32(1)} if name == "full" else {"num_params": np.int64(2000)}
    module = make(name, np.int64(1000), np.int32(8), **budget)
    assert module.num_embeddings == 1000 and type(module.embedding_dim) is int


def _outputs_by_method():
    ids = torch.tensor([0, 1, 2, 500, 999])
    return {name: build(name, seed=3)(ids).tolist() for name in ALL_METHODS}


def test_same_seed_gives_same_outputs_in_a_fresh_process():
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); from embeddings.test_contract import _outputs_by_method;"
        "print(json.dumps(_outputs_by_method()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == _outputs_by_method()


@pytest.mark.parametrize("name", ["hash", "qr"])
@settings(max_examples=50, deadline=None)
@given(offsets=st.lists(st.integers(-3, 30), min_size=1, max_size=12), num_ids=st.integers(0, 30))
def test_any_bad_offsets_are_refused_and_good_ones_accepted(name, offsets, num_ids):
    module = build(name)
    ids, tensor = torch.zeros(num_ids, dtype=torch.long), torch.tensor(offsets)
    valid = offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:])) and offsets[-1] <= num_ids
    if valid:
        assert module(ids, tensor).shape == (len(offsets), 8)
    else:
        with pytest.raises(ValueError, match="offsets"):
            module(ids, tensor)


def test_the_full_tables_padding_row_is_zeros_in_its_weight_as_nn_embeddings():
    reference = torch.nn.Embedding(50, 8, padding_idx=7)
    table = make_embedding("full", 50, 8, padding_idx=7)
    assert torch.equal(table.weight[7], reference.weight[7]) and table.weight[7].abs().sum() == 0
    assert table.weight[6].abs().sum() > 0  # the other rows keep their init
    negative = make_embedding("full", 50, 8, padding_idx=-1)
    assert negative.weight[49].abs().sum() == 0 and negative.padding_idx == 49
