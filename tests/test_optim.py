"""RowAdam: torch's Adam where every row is touched, untouched rows left alone, a reset row starts afresh."""

import copy

import pytest
import torch

from compemb.embeddings.adaptive import reset_optimizer_rows
from compemb.optim import RowAdam


def _pair(rows=50, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(rows, dim, generator=generator)
    dense = torch.nn.Parameter(start.clone())
    lazy = torch.nn.Parameter(start.clone())
    return dense, lazy, generator


def test_rows_touched_every_step_move_exactly_as_torch_adam_moves_them():
    dense, lazy, generator = _pair()
    mlp_torch, mlp_mine = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3, 3))
    reference = torch.optim.Adam([dense, mlp_torch], lr=0.01)
    mine = RowAdam([lazy, mlp_mine], lr=0.01)
    for _ in range(30):
        grad = torch.randn(50, 4, generator=generator)
        mlp_grad = torch.randn(3, 3, generator=generator)
        dense.grad, mlp_torch.grad = grad.clone(), mlp_grad.clone()
        # the same gradient as a sparse one naming every row (some twice: their halves are summed)
        index = torch.cat([torch.arange(50), torch.tensor([7, 7])])
        values = torch.cat([grad, torch.zeros(2, 4)])
        values[7] = grad[7] / 2
        values[50], values[51] = grad[7] / 4, grad[7] / 4
        lazy.grad = torch.sparse_coo_tensor(index.unsqueeze(0), values, (50, 4))
        mlp_mine.grad = mlp_grad.clone()
        reference.step()
        mine.step()
    torch.testing.assert_close(lazy.detach(), dense.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp_mine.detach(), mlp_torch.detach(), rtol=1e-5, atol=1e-6)


def test_untouched_rows_and_their_state_stay_as_they_were():
    table = torch.nn.Embedding(100, 4, sparse=True)
    optimizer = RowAdam(table.parameters(), lr=0.1)
    for _ in range(5):
        table(torch.tensor([1, 2, 3])).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = table.weight.detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[table.weight].items()}
    table(torch.tensor([50])).sum().backward()
    optimizer.step()
    moved = (table.weight.detach() != before).any(1)
    assert moved.nonzero().flatten().tolist() == [50]  # dense Adam would move rows 1-3 on their momentum
    after = optimizer.state[table.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(after[key][[1, 2, 3]], state[key][[1, 2, 3]])
    assert after["row_steps"][[1, 50, 60]].tolist() == [5.0, 1.0, 0.0]


def test_a_row_first_seen_late_or_reset_takes_a_first_step_of_lr():
    table = torch.nn.Embedding(10, 2, sparse=True)
    optimizer = RowAdam(table.parameters(), lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        table(torch.tensor([0])).sum().backward()
        optimizer.step()
    for row in (5, 0):  # row 5: never seen; row 0: reset after 200 updates (a new owner)
        if row == 0:
            reset_optimizer_rows(optimizer, table.weight, torch.tensor([0]))
        before = table.weight.detach()[row].clone()
        optimizer.zero_grad()
        table(torch.tensor([row])).sum().backward()
        optimizer.step()
        step = (before - table.weight.detach()[row]).abs()
        torch.testing.assert_close(step, torch.full((2,), 0.01), rtol=1e-4, atol=1e-7)  # |m / sqrt(v)| = 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lr > 0"):
        RowAdam([torch.nn.Parameter(torch.ones(2))], lr=0)


def test_unique_rows_equals_coalesce():
    from compemb.optim import unique_rows

    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 50, (1, 400), generator=generator)  # many repeats
    values = torch.randn(400, 3, generator=generator)
    grad = torch.sparse_coo_tensor(indices, values, (50, 3))
    rows, summed = unique_rows(grad)
    expected = grad.coalesce()
    assert torch.equal(rows, expected.indices()[0])
    torch.testing.assert_close(summed, expected.values())


@pytest.mark.parametrize("sparse", [True, False])
def test_row_adagrad_equals_torch_adagrad(sparse):
    """Sparse and dense gradients, a row named twice, rows left alone: torch's Adagrad's values (to rounding)."""
    from compemb.optim import RowAdagrad

    generator = torch.Generator().manual_seed(0)
    tables = [torch.nn.Embedding(30, 4, sparse=sparse) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    linear = [torch.nn.Linear(4, 1) for _ in range(2)]
    linear[1].load_state_dict(linear[0].state_dict())
    optimizers = [
        RowAdagrad([*tables[0].parameters(), *linear[0].parameters()], lr=0.3, initial_accumulator_value=0.1),
        torch.optim.Adagrad([*tables[1].parameters(), *linear[1].parameters()], lr=0.3, initial_accumulator_value=0.1),
    ]
    for _ in range(6):
        ids = torch.randint(0, 20, (16,), generator=generator)
        for table, layer, optimizer in zip(tables, linear, optimizers):
            optimizer.zero_grad()
            layer(table(ids)).pow(2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(tables[0].weight, tables[1].weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(linear[0].weight, linear[1].weight, rtol=1e-6, atol=1e-7)
    assert torch.equal(tables[0].weight[20:], tables[1].weight[20:])  # never looked up: untouched
    mine, theirs = optimizers[0].state[tables[0].weight], optimizers[1].state[tables[1].weight]
    torch.testing.assert_close(mine["sum"], theirs["sum"])
    assert float(mine["step"]) == float(theirs["step"]) == 6


def test_segment_rows_holds_unique_rows_in_its_first_slots_and_repeats_the_last():
    """The device path's fixed-size rows: the distinct rows and sums of ``unique_rows`` bit for bit, then copies."""
    from compemb.optim import segment_rows, unique_rows

    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 40, (300,), generator=generator)
    values = torch.randn(300, 5, generator=generator)
    grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values, (40, 5))
    rows, summed = unique_rows(grad)
    fixed_rows, fixed_summed = segment_rows(indices, values)
    count = rows.numel()
    assert fixed_rows.shape == (300,) and fixed_summed.shape == (300, 5)
    assert torch.equal(fixed_rows[:count], rows) and torch.equal(fixed_summed[:count], summed)
    assert torch.equal(fixed_rows[count:], rows[-1].expand(300 - count))
    assert torch.equal(fixed_summed[count:], summed[-1].expand(300 - count, 5))


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_the_device_code_path_updates_rows_exactly_as_the_cpu_path(name):
    """kernels="torch" (fixed-size rows, written not added): the same weights and states, bit for bit."""
    from compemb.kernels import use_kernels
    from compemb.optim import RowAdagrad

    make = (lambda params: RowAdam(params, lr=0.05)) if name == "adam" else (lambda params: RowAdagrad(params, lr=0.2))
    results = []
    for kernels in ("auto", "torch"):
        torch.manual_seed(0)
        table, layer = torch.nn.Embedding(30, 4, sparse=True), torch.nn.Linear(4, 1)
        optimizer = make([*table.parameters(), *layer.parameters()])
        generator = torch.Generator().manual_seed(1)
        with use_kernels(kernels):
            for _ in range(8):
                ids = torch.randint(0, 12, (40,), generator=generator)  # many repeats
                optimizer.zero_grad()
                layer(table(ids)).pow(2).sum().backward()
                optimizer.step()
        results.append(
            (
                table.weight.detach().clone(),
                layer.weight.detach().clone(),
                {k: v.clone() for k, v in optimizer.state[table.weight].items()},
            )
        )
    (table_a, layer_a, state_a), (table_b, layer_b, state_b) = results
    assert torch.equal(table_a, table_b) and torch.equal(layer_a, layer_b)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _rowwise_adagrad_reference(weight, grads, lr, eps=1e-10):
    """Row-wise Adagrad in plain Python loops: per row, sum += mean(g^2); row -= lr * g / (sqrt(sum) + eps)."""
    weight, sums = weight.clone().double(), torch.zeros(weight.shape[0], dtype=torch.float64)
    for grad in grads:  # dense (rows, dim) gradients; a row with an all-zero gradient is not updated (sparse rule)
        for row in range(weight.shape[0]):
            g = grad[row].double()
            if torch.count_nonzero(g) == 0:
                continue
            sums[row] += float((g * g).mean())
            weight[row] -= lr * g / (sums[row].sqrt() + eps)
    return weight, sums


@pytest.mark.parametrize("packed", [False, True])
def test_rowwise_adagrad_keeps_one_accumulator_per_row_as_the_reference(packed):
    from compemb.optim import RowwiseAdagrad
    from compemb.table_batch import PackedWeights

    torch.manual_seed(0)
    tables = [torch.nn.Embedding(12, 3, sparse=True), torch.nn.Embedding(7, 3, sparse=True)]
    if packed:  # side by side in one buffer, updated in one pass
        PackedWeights(tables, "weight", sparse=True)
    start = [t.weight.detach().clone() for t in tables]
    optimizer = RowwiseAdagrad([p for t in tables for p in t.parameters()], lr=0.3)
    generator = torch.Generator().manual_seed(1)
    dense_grads: list[list[torch.Tensor]] = [[], []]
    for _ in range(6):
        optimizer.zero_grad()
        loss = 0
        for table in tables:
            ids = torch.randint(0, table.num_embeddings, (9,), generator=generator)
            loss = loss + table(ids).pow(2).sum() + table(ids[:3]).sum()
        loss.backward()
        for table, grads in zip(tables, dense_grads):
            grads.append(table.weight.grad.to_dense().clone())
        optimizer.step()
    for table, begin, grads in zip(tables, start, dense_grads):
        expected_weight, expected_sums = _rowwise_adagrad_reference(begin, grads, lr=0.3)
        torch.testing.assert_close(table.weight.detach().double(), expected_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(optimizer.state[table.weight]["sum"].double(), expected_sums, rtol=1e-5, atol=0)
        assert optimizer.state[table.weight]["sum"].shape == (table.num_embeddings,)  # a float per row


def test_a_reset_row_of_rowwise_adagrad_starts_its_accumulator_again():
    from compemb.optim import CombinedOptimizer, RowwiseAdagrad

    table, layer = torch.nn.Embedding(6, 2, sparse=True), torch.nn.Linear(2, 1)
    optimizer = CombinedOptimizer(
        [
            RowAdam(layer.parameters(), lr=1e-3),
            RowwiseAdagrad(table.parameters(), lr=0.1, initial_accumulator_value=0.5),
        ]
    )
    for _ in range(3):
        optimizer.zero_grad()
        layer(table(torch.tensor([1, 2, 3]))).sum().backward()
        optimizer.step()
    sums = optimizer.state[table.weight]["sum"]
    assert float(sums[2]) > 0.5
    reset_optimizer_rows(optimizer, table.weight, torch.tensor([2]))  # found through the combined optimizer
    assert float(sums[2]) == 0.5 and float(sums[1]) > 0.5 and float(sums[0]) == 0.5


def test_a_combined_optimizers_state_dict_loads_into_a_fresh_one_and_steps_the_same():
    from compemb.optim import CombinedOptimizer, RowwiseAdagrad

    def build(seed):
        torch.manual_seed(seed)
        table, layer = torch.nn.Embedding(8, 3, sparse=True), torch.nn.Linear(3, 1)
        optimizer = CombinedOptimizer(
            [RowAdam(layer.parameters(), lr=1e-2), RowwiseAdagrad(table.parameters(), lr=0.2)]
        )
        return table, layer, optimizer

    def step(table, layer, optimizer, ids):
        optimizer.zero_grad()
        layer(table(ids)).pow(2).sum().backward()
        optimizer.step()

    a = build(0)
    for i in range(3):
        step(*a, torch.tensor([i, i + 1, 5]))
    saved = a[2].state_dict()
    assert [g["lr"] for g in saved["param_groups"]] == [1e-2, 0.2]
    assert sorted(saved["state"]) == [0, 1, 2]  # layer weight, layer bias, then the table: numbered on
    b = build(1)
    b[0].load_state_dict(a[0].state_dict())
    b[1].load_state_dict(a[1].state_dict())
    b[2].load_state_dict(copy.deepcopy(saved))  # (torch's load keeps the given tensors: a's steps would reach them)
    for model in (a, b):
        step(*model, torch.tensor([2, 7]))
    assert torch.equal(a[0].weight, b[0].weight) and torch.equal(a[1].weight, b[1].weight)


def test_hooks_register_on_a_combined_optimizer_as_on_torchs():
    from compemb.optim import CombinedOptimizer

    layer = torch.nn.Linear(2, 1)
    optimizer = CombinedOptimizer([RowAdam(layer.parameters(), lr=1e-3)])
    calls = []
    # torch keeps weak references to the hook dicts (a plain dict cannot have one) and moves a prepended hook first
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("second"))
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("first"), prepend=True)
    optimizer.register_load_state_dict_post_hook(lambda opt: calls.append("loaded"))
    optimizer.register_state_dict_post_hook(lambda opt, state: {**state, "tag": 1})
    state = optimizer.state_dict()
    assert calls == ["first", "second"] and state["tag"] == 1
    optimizer.load_state_dict(state)
    assert calls[-1] == "loaded"
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", float(layer.bias))))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", float(layer.bias))))
    before = float(layer.bias)
    layer(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert calls[-2:] == [("pre", before), ("post", float(layer.bias))] and float(layer.bias) != before
