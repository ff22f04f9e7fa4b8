"""CAFE, CAFE-ML, the offline-frequency baseline and AdaEmbed: what is specific to hot rows and importance."""

import copy

import pytest
import torch

from compemb import BudgetError, make_embedding
from compemb.embeddings.adaptive import reset_optimizer_rows
from compemb.embeddings.cafe.hot_rows import hot_candidates_torch
from compemb.embeddings.cafe.kernels import hot_candidates
from compemb.embeddings.cafe.plan import MIN_HOT_ROWS
from compemb.embeddings.cafe.settings import (
    PER_FIELD_SMALL_BUDGET_SETTINGS,
    SMALL_BUDGET_ROWS,
    SMALL_BUDGET_SETTINGS,
    default_settings,
    paper_defaults,
)
from compemb.embeddings.id_map import search_rows, search_rows_torch

N = 100_000


def zipf_batches(steps, batch, n=N, exponent=1.2, seed=0, shift=0):
    """Batches of a Zipf stream whose heavy ids are scattered over [0, n) (rank r -> a permuted id)."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** exponent
    ids = torch.randperm(n, generator=generator).roll(shift)
    return [ids[torch.multinomial(weights, batch, replacement=True, generator=generator)] for _ in range(steps)]


def train(module, batches, optimizer=None, call_step_end=True):
    """A plain loop: forward, a loss whose gradient reaches every occurrence, backward, step, (on_step_end)."""
    optimizer = optimizer or torch.optim.SGD(module.parameters(), lr=0.05)
    head = torch.linspace(-1, 1, module.embedding_dim, device=module.weight.device)
    for step, ids in enumerate(batches):
        loss = (module(ids) @ head - 1).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if call_step_end:
            module.on_step_end(step, optimizer)
    return optimizer


def true_counts(batches, n=N):
    return torch.bincount(torch.cat(batches), minlength=n)


def hot_map(module):
    """{id: row} from the table's owner map, checked against the sketch's map (they must agree)."""
    owners, rows = module.hot_ids()
    table = dict(zip(owners.tolist(), rows.tolist()))
    assert len(table) == owners.numel()  # no id holds two rows
    ids, _, sketch_rows = module.sketch.items()
    hot = sketch_rows >= 0
    assert dict(zip(ids[hot].tolist(), sketch_rows[hot].tolist())) == table
    return table


# --- sizes and defaults ----------------------------------------------------------------------------------


def test_paper_defaults_follow_the_ratio_asked_or_computed():
    assert paper_defaults(2) == (0.7, 10) and paper_defaults(20) == (0.5, 30) and paper_defaults(999) == (0.2, 500)
    assert paper_defaults(2000) == paper_defaults(10**6) == (0.1, 500)
    by_ratio = make_embedding("cafe", 1_000_000, 16, compression=100, tuning="paper", device="meta")
    by_params = make_embedding("cafe", 1_000_000, 16, num_params=160_000, tuning="paper", device="meta")
    assert (by_ratio.hash_rate, by_ratio.threshold) == (by_params.hash_rate, by_params.threshold) == (0.3, 100)
    open_vocabulary = make_embedding("cafe", None, 16, num_params=160_000, tuning="paper", device="meta")
    assert open_vocabulary.threshold == 20  # no ratio: 10x


def test_an_unknown_hot_policy_names_itself():
    with pytest.raises(ValueError, match="hot_policy must be one of threshold, top, got 'best'"):
        make_embedding("cafe", N, 8, compression=10, hot_policy="best")


def test_tunings_pick_their_tables_and_an_unknown_one_names_itself():
    for ratio in (3, 10, 100, 1000, 2000, 10_000):  # 1M x 16: 1,000 rows of 16 floats at 1000x, 100 at 10,000x
        ours = make_embedding("cafe", 1_000_000, 16, compression=ratio, device="meta")
        paper = make_embedding("cafe", 1_000_000, 16, compression=ratio, tuning="paper", device="meta")
        assert (paper.hash_rate, paper.threshold) == paper_defaults(ratio)
        small = 1_000_000 / ratio < SMALL_BUDGET_ROWS
        rate, threshold = SMALL_BUDGET_SETTINGS if small else paper_defaults(ratio)
        assert ours.threshold == threshold  # the rate, unless it would leave under MIN_HOT_ROWS hot rows
        assert ours.hash_rate == rate or (ours.hot_rows <= MIN_HOT_ROWS and ours.hash_rate < rate)
    # budgets are whole bytes: 337,712 x 16 asked at 100x computes as 99.9999x, at 2000x as 1999.96x
    assert make_embedding("cafe", 337_712, 16, compression=100, tuning="paper").threshold == 100
    assert make_embedding("cafe", 337_712, 16, compression=2000, tuning="paper").hash_rate == 0.1
    with pytest.raises(ValueError, match="cafe: tuning must be one of"):
        make_embedding("cafe", 1_000, 16, compression=10, tuning="papr")


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_the_threshold_counts_occurrences_at_the_batchs_mean_importance(name):
    # every occurrence's output gradient is the same vector, so each scores 1 (its norm over the batch's mean):
    # an id seen once per step reaches a threshold of 5 at its 5th step, not before; ids seen once never do
    module = make_embedding(name, 1_000_000, 8, compression=10, threshold=5, hash_rate=0.5, seed=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(4)
    head = torch.ones(8)
    for step in range(6):
        others = torch.randint(1_000, 1_000_000, (63,), generator=generator)
        loss = (module(torch.cat([torch.tensor([7]), others])) @ head).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.on_step_end(step, optimizer)
        score, hot = module.sketch.query(torch.tensor([7]))
        assert float(score) == pytest.approx(step + 1)
        assert (int(hot) >= 0) == (step + 1 >= 5)
    assert set(hot_map(module)) == {7}


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
@pytest.mark.parametrize("compression", [2, 5, 10, 50, 100, 1000, 5000])
def test_memory_meets_the_budget_with_the_sketch_counted(name, compression):
    module = make_embedding(name, 1_000_000, 16, compression=compression, device="meta")
    report, budget = module.memory(), 1_000_000 * 16 * 4 / compression
    assert abs(report.total - budget) <= 0.01 * budget
    assert report.sketch_bytes == module.sketch.memory().sketch_bytes > 0
    assert module.sketch.num_buckets * module.sketch.slots == 4 * module.hot_rows  # 4 sketch slots per hot row
    hashed_floats = sum(module.hashed_rows) * 16 * 4
    assert hashed_floats == pytest.approx(module.hash_rate * budget, rel=0.02, abs=64)  # hash_rate of the budget
    # the settings' hash_rate, unless it would leave fewer than MIN_HOT_ROWS hot rows (then that many, and the
    # hashed rows take what they leave)
    settings_rate = default_settings(compression, rows=budget / 64)[0]
    assert module.hash_rate == settings_rate or (module.hot_rows <= MIN_HOT_ROWS and module.hash_rate < settings_rate)
    merged = make_embedding(name, 1_000_000, 16, compression=compression, merge_on_demote=True, device="meta")
    assert abs(merged.memory().total - budget) <= 0.01 * budget
    assert merged.memory().float_bytes == merged.weight.numel() * 4 + merged.start.numel() * 4


# --- hot rows under a stream -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_heavy_ids_become_hot_and_light_ones_do_not_by_frequency(name):
    # the paper's threshold at 20x (30) is high enough for this stream that free rows never run out
    module = make_embedding(name, N, 8, compression=20, importance="frequency", seed=1, tuning="paper")
    batches = zipf_batches(50, 1024)
    train(module, batches)
    counts, threshold, hot = true_counts(batches), module.threshold, hot_map(module)
    heavy = (counts >= 2 * threshold).nonzero().squeeze(-1).tolist()
    light = ((counts > 0) & (counts <= threshold / 3)).nonzero().squeeze(-1).tolist()
    assert len(heavy) > 50 and len(hot) < module.hot_rows  # rows were never short
    assert set(heavy) <= set(hot)
    assert not set(light) & set(hot)


def test_heavy_ids_become_hot_by_gradient_in_a_plain_loop():
    # gradient importance, the default; at 1/sqrt(d) the ids' outputs differ from the start, so their gradient norms
    # follow frequency throughout (from DLRM's tiny init the converged heavy ids' norms fall and light ids' rise)
    # (the paper's threshold at 20x, 30, as in the frequency test above: free rows never run out)
    module = make_embedding("cafe", N, 8, compression=20, seed=2, init="uniform_dim", tuning="paper")
    batches = zipf_batches(50, 1024, seed=3)
    train(module, batches, call_step_end=False)  # updates apply at each next forward
    module(batches[0])  # ... and the last step's at this one
    counts, threshold, hot = true_counts(batches), module.threshold, hot_map(module)
    heavy = (counts >= 3 * threshold).nonzero().squeeze(-1).tolist()
    light = ((counts > 0) & (counts <= threshold / 5)).nonzero().squeeze(-1).tolist()
    assert len(heavy) > 30
    assert set(heavy) <= set(hot)
    assert not set(light) & set(hot)


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_promotion_keeps_the_output_and_the_row_starts_from_what_the_id_read(name):
    module = make_embedding(name, None, 8, num_params=4000, threshold=10, importance="frequency", seed=4)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    ids = torch.tensor([2**40 + 7] * 5 + [3, 4])
    train(module, [ids], optimizer)  # 5 < 10: not hot yet (for cafe-ml: medium, as 5 >= 0.2 x 10)
    assert not hot_map(module)
    module(ids).sum().backward()  # 5 more: 10 reaches the threshold
    optimizer.step()
    before = copy.deepcopy(module)
    before._pending = []  # the state just before the update applies
    module.on_step_end(1, optimizer)
    assert list(hot_map(module)) == [2**40 + 7]
    probe = torch.tensor([2**40 + 7, 999])  # (3 and 4 turn medium in cafe-ml now: a move of their own)
    torch.testing.assert_close(module(probe), before(probe), rtol=0, atol=1e-7)


def test_cafe_ml_medium_ids_read_two_rows_and_cold_ids_one():
    module = make_embedding("cafe-ml", N, 8, compression=10, threshold=20, importance="frequency", seed=5)
    train(module, [torch.tensor([11] * 6 + [12])])  # 11 scores 6 >= 0.2 x 20: medium; 12 scores 1: cold
    first = module.hashes[0](torch.tensor([11, 12])).squeeze(-1) + module.hot_rows
    second = module.hashes[1](torch.tensor([11, 12])).squeeze(-1) + module.hot_rows + module.hashed_rows[0]
    out = module(torch.tensor([11, 12]))
    torch.testing.assert_close(out[0], module.weight[first[0]] + module.weight[second[0]])
    torch.testing.assert_close(out[1], module.weight[first[1]])


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_demoted_ids_free_their_rows_and_no_row_is_shared(name):
    # a fast decay and a short hot table make rows change owners many times
    # (the paper's threshold at 50x, 50: ids far above it are few enough for the rows, as the asserts need)
    module = make_embedding(name, N, 8, compression=50, decay=0.5, importance="frequency", seed=6, tuning="paper")
    first, later = zipf_batches(40, 2048, seed=7), zipf_batches(80, 2048, seed=7, shift=5000)
    train(module, first)
    early = set(hot_map(module))
    train(module, later)
    late = hot_map(module)
    assert len(set(late.values())) == len(late)  # each row has one owner
    heavy_now = (true_counts(later[-20:]) >= 3 * module.threshold).nonzero().squeeze(-1).tolist()
    assert set(heavy_now) <= set(late) and early - set(late)  # the new heavy ids took rows, old ones left


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_with_the_top_policy_better_candidates_displace_the_lowest_owners(name, kernels):
    """Early ids fill every hot row and never decay (decay 1); ids scoring 20 times as much arrive later. The
    paper's policy keeps the early owners; "top" gives the newcomers rows taken from the lowest early owners,
    each row with one owner."""
    from compemb.kernels import use_kernels

    held = {}
    for policy in ("threshold", "top"):
        module = make_embedding(
            name, N, 8, compression=200, threshold=5, importance="frequency", decay=1.0, seed=3, hot_policy=policy
        )
        rows = module.hot_rows
        early, heavy = torch.arange(rows), torch.arange(50_000, 50_000 + rows // 2)
        generator = torch.Generator().manual_seed(4)
        # early ids score 8, one of them 9 (the top policy displaces the lowest owners: the 9 stays)
        batches = [torch.cat([early.repeat(8), early[:1]])]
        batches += [torch.cat([heavy.repeat(20), torch.randint(0, N, (30,), generator=generator)]) for _ in range(5)]
        with use_kernels(kernels):
            train(module, batches)
        held[policy] = hot_map(module)  # one owner per row, agreeing with the sketch (asserted inside)
        assert module.owned.sum() == rows
    assert set(held["threshold"]) == set(early.tolist())
    assert set(heavy.tolist()) <= set(held["top"]) and 0 in held["top"]


def test_merge_on_demote_folds_what_the_id_learned_into_its_hashed_row():
    module = make_embedding(
        "cafe", None, 4, num_params=3000, threshold=4, importance="frequency", merge_on_demote=True, seed=8
    )
    train(module, [torch.tensor([9] * 4)])
    (row,) = hot_map(module).values()
    hashed = int(module.hashes[0](torch.tensor([9]))) + module.hot_rows
    with torch.no_grad():
        module.weight[row] += 1.0  # what it learned while hot
    shared = module.weight[hashed].detach().clone()
    module.sketch.decay_factor = 0.01
    module.sketch.decay()  # its score falls far below the threshold
    train(module, [torch.tensor([123456])], torch.optim.SGD(module.parameters(), lr=0.0))
    assert not hot_map(module)
    torch.testing.assert_close(module.weight[hashed], shared + 1.0)


# --- state, bags, devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cafe", "cafe-ml", "adaembed"])
def test_save_and_load_reproduce_outputs_and_later_training_exactly(name):
    options = dict(interval=5) if name == "adaembed" else {}
    source = make_embedding(name, N, 8, compression=4 if name == "adaembed" else 20, seed=9, **options)
    target = make_embedding(name, N, 8, compression=4 if name == "adaembed" else 20, seed=10, **options)
    batches = zipf_batches(30, 512, seed=11)
    optimizer = train(source, batches[:12], torch.optim.Adam(source.parameters(), lr=0.01), call_step_end=False)
    target.load_state_dict(source.state_dict())  # taken with the last step's update pending: it is applied first
    target_optimizer = torch.optim.Adam(target.parameters(), lr=0.01)
    target_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # load_state_dict would share tensors
    probe = torch.cat([batches[0][:200], torch.tensor([N - 1, 5])]) if name != "adaembed" else batches[0][:200]
    assert torch.equal(source(probe), target(probe))
    train(source, batches[12:], optimizer)
    train(target, batches[12:], target_optimizer)
    assert torch.equal(source(probe), target(probe))
    for (key, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_bags_and_large_int64_ids_with_hot_rows(name):
    module = make_embedding(name, None, 8, num_params=20_000, threshold=3, importance="frequency", seed=12)
    big = 2**40 + torch.tensor([1, 2, 3, 1, 1, 2, 2, 1, 9])
    train(module, [big, big])
    assert {2**40 + 1, 2**40 + 2} <= set(hot_map(module))
    offsets, weights = torch.tensor([0, 2, 2, 5]), torch.rand(9)
    out = module(big, offsets, weights)
    singles = module(big)
    expected = torch.stack([(singles[a:b] * weights[a:b, None]).sum(0) for a, b in [(0, 2), (2, 2), (2, 5), (5, 9)]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_the_torch_route_equals_the_compiled_one(name):
    module = make_embedding(name, N, 8, compression=20, importance="frequency", seed=13)
    batches = zipf_batches(30, 1024, seed=14)
    train(module, batches)
    ids = torch.cat([batches[-1], torch.tensor([-(2**63), 2**63 - 1])])
    rows, weights = module._route(ids)
    torch_rows, torch_weights = module._route_torch(ids)
    assert torch.equal(rows, torch_rows) and (weights is None or torch.equal(weights, torch_weights))
    assert bool((rows[:, 0] < module.hot_rows).any())  # hot rows are among them


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_training_with_the_torch_sketch_equals_the_compiled_one_exactly(name):
    """The device path (torch ops for routing, inserts, candidates, promotions) run on CPU: the same training."""
    compiled = make_embedding(name, N, 8, compression=20, seed=18)
    torch_ops = make_embedding(name, N, 8, compression=20, seed=18)
    torch_ops.sketch.backend = "torch"
    assert compiled.sketch._compiled and not torch_ops.sketch._compiled
    batches = zipf_batches(25, 1024, seed=19)
    train(compiled, batches, torch.optim.Adam(compiled.parameters(), lr=0.01))
    train(torch_ops, batches, torch.optim.Adam(torch_ops.parameters(), lr=0.01))
    assert len(hot_map(compiled)) > 0 and hot_map(compiled) == hot_map(torch_ops)
    for (key, a), b in zip(compiled.state_dict().items(), torch_ops.state_dict().values()):
        assert torch.equal(a, b), key


def test_torch_hot_candidates_equal_the_compiled_ones():
    generator = torch.Generator().manual_seed(20)
    for trial in range(30):
        n = int(torch.randint(1, 400, (), generator=generator))
        ids = torch.randint(0, 50, (n,), generator=generator) * (2**40 if trial % 3 == 0 else 1)
        scores = torch.randint(0, 8, (n,), generator=generator).float()  # many ties
        scores = scores[torch.searchsorted(ids.unique(), ids)] if trial % 2 else scores  # an id's score, or not
        hot = torch.where(torch.rand(n, generator=generator) < 0.2, 1, -1).int()
        for limit in (0, 1, 5, n):
            expected = torch.from_numpy(hot_candidates(ids.numpy(), scores.numpy(), hot.numpy(), 3.0, limit))
            assert torch.equal(hot_candidates_torch(ids, scores, hot, 3.0, limit), expected), (trial, limit)


def test_search_rows_compiled_equals_torch():
    hash_module = make_embedding("hash", None, 4, num_params=400).hash
    sorted_ids = torch.tensor([-5, 3, 8, 2**40, 2**62])
    ids = torch.tensor([-(2**63), -5, -4, 3, 8, 9, 2**40, 2**62, 2**63 - 1])
    for rows in (None, torch.tensor([4, 0, 3, 1, 2], dtype=torch.int32)):
        compiled = search_rows(ids, sorted_ids, rows, hash_module, 5)
        assert torch.equal(compiled, search_rows_torch(ids, sorted_ids, rows, hash_module, 5))
        found = compiled < 5
        assert found.tolist() == [False, True, False, True, True, False, True, True, False]
        assert torch.equal(compiled[~found], hash_module(ids[~found]).squeeze(-1) + 5)


def test_optimizer_state_of_rows_that_change_owner_is_reset():
    module = make_embedding("cafe", None, 4, num_params=3000, threshold=4, importance="frequency", seed=15)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    train(module, [torch.tensor([1, 2, 3])], optimizer)
    state = optimizer.state[module.weight]
    state["exp_avg"].fill_(1.0)
    state["exp_avg_sq"].fill_(1.0)
    train(module, [torch.tensor([5] * 4)], optimizer)  # 5 takes a hot row
    (row,) = hot_map(module).values()
    assert state["exp_avg"][row].abs().sum() == 0 and state["exp_avg_sq"][row].abs().sum() == 0
    others = torch.arange(module.weight.shape[0]) != row
    assert bool((state["exp_avg_sq"][others] > 0).all())  # every other row kept its state


@pytest.mark.parametrize("optimizer, sparse", [("row-adam", True), ("row-adam", False), ("adam", False)])
def test_a_promoted_row_takes_a_first_step_of_lr_after_a_long_run(optimizer, sparse):
    """The issue's repro: 3,000 steps of other ids, then id 5 is promoted; its row's first update is Adam's first
    (|m / sqrt(v)| = 1 per coordinate: lr), not the 3.08 x lr a zeroed row at a late shared step took."""
    from compemb.optim import RowAdam
    from compemb.train import one_optimizer

    module = make_embedding(
        "cafe", 1000, 4, num_params=3000, threshold=4, importance="frequency", seed=15, sparse=sparse
    )
    holder = torch.nn.Module()
    holder.table = module
    adam = (
        RowAdam(module.parameters(), lr=0.01)
        if optimizer == "row-adam"
        else one_optimizer("adam_dense", list(holder.parameters()), 0.01)
    )
    train(module, [torch.tensor([1, 2, 3])] * 3000, adam)
    train(module, [torch.tensor([5] * 4)], adam)  # 5 reaches the threshold and takes a hot row
    assert 5 in hot_map(module)
    before = module(torch.tensor([5])).detach()
    train(module, [torch.tensor([5] * 4)], adam)
    moved = (module(torch.tensor([5])).detach() - before).abs().max()
    assert moved <= 0.01 * (1 + 1e-4), float(moved)


def test_reset_optimizer_rows_handles_adagrad_and_sparse_state():
    weight = torch.nn.Parameter(torch.zeros(5, 2))
    adagrad = torch.optim.Adagrad([weight], lr=0.1, initial_accumulator_value=0.5)
    weight.grad = torch.ones(5, 2)
    adagrad.step()
    reset_optimizer_rows(adagrad, weight, torch.tensor([1, 3]))
    assert adagrad.state[weight]["sum"][:, 0].tolist() == [1.5, 0.5, 1.5, 0.5, 1.5]
    sgd = torch.optim.SGD([weight], lr=0.1)
    sgd.state[weight]["buffer"] = torch.ones(5, 2).to_sparse()
    reset_optimizer_rows(sgd, weight, torch.tensor([0, 4]))
    assert sgd.state[weight]["buffer"].to_dense()[:, 0].tolist() == [0, 1, 1, 1, 0]
    reset_optimizer_rows(None, weight, torch.tensor([0]))  # no optimizer: nothing to do


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cafe", "cafe-ml", "adaembed", "offline"])
def test_cuda_training_matches_cpu(name):
    options = dict(frequencies=torch.arange(N) % 13) if name == "offline" else {}
    options.update(interval=5) if name == "adaembed" else None
    compression = 4 if name == "adaembed" else 20
    cpu = make_embedding(name, N, 8, compression=compression, seed=16, **options)
    gpu = make_embedding(name, N, 8, compression=compression, seed=16, **options).cuda()
    batches = zipf_batches(20, 1024, seed=17)
    train(cpu, batches)
    train(gpu, [b.cuda() for b in batches])
    probe = batches[0][:300]
    torch.testing.assert_close(gpu(probe.cuda()).cpu(), cpu(probe), rtol=1e-4, atol=1e-5)
    if name.startswith("cafe"):
        assert hot_map(gpu) == hot_map(cpu)


# --- offline ------------------------------------------------------------------------------------------


def test_offline_gives_the_most_frequent_ids_their_own_rows():
    counts = torch.zeros(10_000, dtype=torch.int64)
    counts[torch.randperm(10_000, generator=torch.Generator().manual_seed(0))[:2000]] = torch.arange(2000, 0, -1)
    module = make_embedding("offline", 10_000, 8, compression=10, frequencies=counts, seed=18)
    top = torch.sort(counts, descending=True, stable=True).indices[: module.hot_rows]
    assert set(module.hot_ids.tolist()) == set(top.tolist()) and 100 < module.hot_rows < 2000
    few = make_embedding("offline", 10_000, 8, compression=10, frequencies=(counts > 1990).long())
    assert few.hot_rows == 10 and abs(few.memory().total - 32_000) <= 320  # uncounted ids get no row
    out = module(top)
    rows = torch.searchsorted(module.hot_ids, top)
    assert torch.equal(out, module.weight[rows]) and rows.unique().numel() == top.numel()
    cold = torch.tensor([c for c in range(10_000) if counts[c] == 0][:3])  # never counted: hashed
    torch.testing.assert_close(module(cold), module.weight[module.hash(cold).squeeze(-1) + module.hot_rows])
    with pytest.raises(ValueError, match="id 10000 is outside \\[0, 10000\\)"):  # built with a vocabulary: closed
        module(torch.tensor([1, 10_000]))
    assert module.memory().index_bytes == 8 * module.hot_rows + 16  # the sorted ids, and the hash


def test_offline_stores_a_dense_map_when_that_is_smaller():
    counts = torch.arange(1000) % 17
    module = make_embedding("offline", 1000, 8, compression=1.2, hash_rate=0.1, frequencies=counts)
    assert module.dense_map and module.memory().index_bytes == 4 * 1000 + 16
    assert abs(module.memory().total - 1000 * 8 * 4 / 1.2) <= 0.01 * 1000 * 8 * 4 / 1.2
    top = torch.sort(counts, descending=True, stable=True).indices[: module.hot_rows]
    assert torch.equal(module(top), module.weight[: module.hot_rows])  # rank r owns row r
    cold = torch.tensor([c for c in range(1000) if counts[c] == 0][:3])  # never counted: hashed
    torch.testing.assert_close(module(cold), module.weight[module.hash(cold).squeeze(-1) + module.hot_rows])
    for outside in (-1, 1000, 2**40):  # built with a vocabulary: ids outside it are refused
        with pytest.raises(ValueError, match=f"id {outside} is outside \\[0, 1000\\)"):
            module(torch.tensor([outside]))


def test_offline_refuses_to_build_without_frequencies():
    with pytest.raises(ValueError, match="needs frequencies="):
        make_embedding("offline", 1000, 8, compression=4)
    with pytest.raises(ValueError, match="999 counts for 1000 ids"):
        make_embedding("offline", 1000, 8, compression=4, frequencies=torch.ones(999))


# --- AdaEmbed ----------------------------------------------------------------------------------------


def test_adaembed_rows_follow_importance():
    module = make_embedding("adaembed", N, 8, compression=4, importance="frequency", interval=10, seed=19)
    first = zipf_batches(30, 1024, seed=20)
    train(module, first)
    owners = set(module.owners()[0].tolist())
    assert set(torch.topk(true_counts(first), 100).indices.tolist()) <= owners
    later = zipf_batches(300, 1024, seed=20, shift=7)  # other ids are heavy now
    train(module, later)
    now = set(module.owners()[0].tolist())
    assert set(torch.topk(true_counts(later[-50:]), 100).indices.tolist()) <= now
    assert len(owners - now) > 50


def test_adaembed_newcomers_start_from_their_fallback_vector_and_state_resets():
    module = make_embedding("adaembed", 1000, 8, compression=2, importance="frequency", interval=2, seed=21)
    optimizer = torch.optim.Adagrad(module.parameters(), lr=0.1)
    ids = torch.tensor([3, 3, 4])
    train(module, [ids], optimizer)
    before = module(ids).detach()
    optimizer.state[module.weight]["sum"].fill_(7.0)
    module(ids).sum().backward()
    optimizer.zero_grad()  # a step that changes nothing, so only the reallocation could move the output
    module.on_step_end(1, optimizer)
    owned, rows = module.owners()
    assert owned.tolist() == [3, 4]
    torch.testing.assert_close(module(ids), before)
    assert optimizer.state[module.weight]["sum"][rows].abs().sum() == 0


def test_adaembed_memory_counts_its_bookkeeping_and_refuses_budgets_below_it():
    module = make_embedding("adaembed", N, 16, compression=8, device="meta")
    report, budget = module.memory(), N * 16 * 4 / 8
    assert abs(report.total - budget) <= 0.01 * budget
    assert report.sketch_bytes == 4 * N + 8  # a float32 score per id, and the decay scale
    assert report.index_bytes == 12 * module.rows + 16 + 8  # the owners' ids and rows, the hash, the step count
    with pytest.raises(BudgetError, match="smallest budget it can meet is"):
        make_embedding("adaembed", N, 16, compression=20)  # 3.2 bytes per id < its 4


# --- the authors' layout across fields (sharing="shared") ------------------------------------------------------


def _shared_cafe(name="cafe", compression=100, **options):
    from compemb.collection import EmbeddingCollection, Feature

    features = [Feature("big", 100_000), Feature("mid", 20_000), Feature("tiny", 15), Feature("small", 3_000)]
    collection = EmbeddingCollection(features, 16, name, compression=compression, sharing="shared", seed=2, **options)
    return collection, collection.embeddings["shared"], features


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_shared_cafe_keeps_a_hashed_table_per_field_and_small_fields_full(name):
    collection, table, features = _shared_cafe(name)
    sizes = [f.num_embeddings for f in features]
    assert table.blocks == sizes
    # the authors' rule: a field of n <= 400 / (1 + log2(100)) = 52 ids (here the 15-id field) keeps rows of its own
    assert table.field_direct.tolist() == [False, False, True, False]
    budget = sum(sizes) * 16 * 4 / 100
    assert abs(collection.memory().total - budget) <= 0.01 * budget
    starts = [0, 100_000, 120_000, 120_015]
    regions = []
    for level in range(table.levels):
        rows, _ = table._route(torch.arange(sum(sizes)))  # nothing is hot yet: every id reads its field's rows
        for f, (start, n) in enumerate(zip(starts, sizes)):
            got = rows[start : start + n, level]
            low, count = int(table.field_offsets[level, f]), int(table.field_rows[level, f])
            assert bool(((got >= low) & (got < low + count)).all())  # inside the field's own region
            if f == 2:  # the full field: one row per id
                assert sorted(got.tolist()) == list(range(low, low + n))
            elif level == 0 or not table.field_direct[f]:
                regions.append(range(low, low + count))
    # no two fields' hashed regions overlap, and they follow the hot rows
    ends = sorted((r.start, r.stop) for r in regions)
    assert ends[0][0] >= table.hot_rows and all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    # each compressed field's hashed rows: one, and the rest in proportion to its ids (largest remainders, +-1)
    level0 = [int(table.field_rows[0, f]) for f in (0, 1, 3)]
    assert sum(level0) == table.hashed_rows[0]
    for rows, n in zip(level0, (100_000, 20_000, 3_000)):
        assert abs(rows - 1 - (sum(level0) - 3) * n / 123_000) <= 1


def test_shared_cafe_meets_10000x_of_kaggle_with_its_small_fields_full():
    """The Kaggle-shape set's 26 fields at 10,000x: 5,402 params; the authors' rule keeps the fields of at most
    400 / (1 + log2(10,000)) = 28.0 ids full (the 8 of 3-11 ids here), every other field gets a hashed row at least."""
    from compemb.data.synthetic import SyntheticConfig

    sizes = SyntheticConfig(scale=0.1).cardinalities()
    for name in ("cafe", "cafe-ml"):
        table = make_embedding(name, sum(sizes), 16, num_params=5_402, blocks=sizes)
        assert abs(table.memory().total - 5_402 * 4) <= 0.01 * 5_402 * 4
        assert table.field_direct.tolist() == [n <= 28 for n in sizes] and sum(n <= 28 for n in sizes) == 8
        assert bool((table.field_rows >= 1).all())
        hashed = ~table.field_direct
        assert [int(table.field_rows[level][hashed].sum()) for level in range(table.levels)] == list(table.hashed_rows)


def test_shared_cafe_defaults_follow_the_per_field_rule_and_leave_every_field_a_row():
    """Below SMALL_BUDGET_ROWS the authors' layout takes its own settings, one hashed table the other rule; a budget
    too small for the per-field rate still gives every field a hashed row per level and meets the budget."""
    from compemb.data.synthetic import SyntheticConfig

    sizes = SyntheticConfig(scale=0.1).cardinalities()
    total = sum(sizes)
    per_field = make_embedding("cafe", total, 16, compression=10_000, blocks=sizes)  # 337 rows
    assert (per_field.hash_rate, per_field.threshold) == PER_FIELD_SMALL_BUDGET_SETTINGS
    one_table = make_embedding("cafe", total, 16, compression=10_000, blocks=sizes, field_tables=False)
    assert one_table.threshold == SMALL_BUDGET_SETTINGS[1]  # the rate, less what MIN_HOT_ROWS hot rows take
    assert one_table.hot_rows == MIN_HOT_ROWS and 0.85 < one_table.hash_rate < SMALL_BUDGET_SETTINGS[0]
    large = make_embedding("cafe", total, 16, compression=1_000, blocks=sizes)  # 3,376 rows: the paper's entry
    assert (large.hash_rate, large.threshold) == paper_defaults(1_000)
    # 169 or 112 rows: 0.1 of them is fewer rows than fields (cafe-ml: on two levels)
    for name, compression in (("cafe", 20_000), ("cafe", 30_000), ("cafe-ml", 20_000)):
        table = make_embedding(name, total, 16, compression=compression, blocks=sizes)
        budget = total * 16 * 4 / compression
        assert abs(table.memory().total - budget) <= 0.01 * budget
        assert bool((table.field_rows >= 1).all()) and table.hash_rate > PER_FIELD_SMALL_BUDGET_SETTINGS[0]
        hashed = ~table.field_direct  # (the smallest fields stay full while they take at most half the budget)
        assert [int(table.field_rows[level][hashed].sum()) for level in range(table.levels)] == list(table.hashed_rows)


def test_shared_cafe_normalises_importance_per_field_and_never_scores_a_full_field():
    collection, table, features = _shared_cafe(importance="gradient", threshold=1e9)  # nothing becomes hot
    ids = torch.tensor([[7, 11, 3, 5]] * 8)  # one id per field, 8 rows
    weights = torch.tensor([100.0, 1.0, 1.0, 0.5]).view(1, 4, 1)  # gradients 100x larger for the first field
    (collection(ids) * weights).sum().backward()
    table.on_step_end(0)
    offsets = [0, 100_000, 120_000, 120_015]
    scores = table.sketch.query(torch.tensor([7 + offsets[0], 11 + offsets[1], 3 + offsets[2], 5 + offsets[3]]))[0]
    # each field's occurrences score their norm over that field's mean: 1 each, 8 occurrences -> 8 (the full
    # field's id is never inserted); over the whole batch they would have scored ~15.7, ~0.16, -, ~0.08 x 8
    torch.testing.assert_close(scores, torch.tensor([8.0, 8.0, 0.0, 8.0]))


def test_shared_cafe_routes_the_same_with_the_compiled_kernel_and_torch_ops():
    for name in ("cafe", "cafe-ml"):
        collection, table, features = _shared_cafe(name, importance="frequency", threshold=2)
        ids = torch.stack(
            [
                torch.randint(f.num_embeddings, (512,), generator=torch.Generator().manual_seed(i))
                % max(1, f.num_embeddings // 50)
                for i, f in enumerate(features)
            ],
            1,
        )
        for step in range(3):
            collection(ids).sum().backward()
            table.on_step_end(step)
        assert bool(table.owned.any())  # some ids own hot rows, from more than one field
        every = torch.arange(sum(f.num_embeddings for f in features))
        compiled, torch_ops = table._route(every), table._route_torch(every)
        assert torch.equal(compiled[0], torch_ops[0])
        assert compiled[1] is None or torch.equal(compiled[1], torch_ops[1])


def test_a_small_per_feature_cafe_keeps_a_sketch():
    """At 100x a 4,278-id feature's budget buys 42 rows: the tuning alone left it one hot row and one bucket."""
    table = make_embedding("cafe", 4_278, 16, compression=100)
    per_row = 16 * 4 + 9 + 4 * 17  # a hot row, its owner and its 4 sketch slots
    assert table.hot_rows == min(MIN_HOT_ROWS, int(4_278 * 64 / 100 / 4 // per_row)) > 1
    assert table.sketch.num_buckets == table.hot_rows


@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_shared_cafe_with_one_hashed_table_for_every_field(name):
    collection, table, features = _shared_cafe(name, field_tables=False)
    sizes = [f.num_embeddings for f in features]
    assert not bool(table.field_direct.any())  # no field kept full
    for level in range(table.levels):  # every field reads the one table of its level
        assert table.field_offsets[level].unique().numel() == 1
        assert table.field_rows[level].tolist() == [table.hashed_rows[level]] * len(sizes)
    budget = sum(sizes) * 16 * 4 / 100
    assert abs(collection.memory().total - budget) <= 0.01 * budget
    rows, _ = table._route(torch.arange(sum(sizes)))
    low = int(table.field_offsets[0, 0])
    assert int(rows[:, 0].min()) >= low and int(rows[:, 0].max()) < low + table.hashed_rows[0]
    assert torch.equal(table._route(torch.arange(sum(sizes)))[0], table._route_torch(torch.arange(sum(sizes)))[0])


# --- the device code path: the merged sketch, fixed-shape promotions and demotions ---------------------------


@pytest.mark.parametrize("hot_policy", ["threshold", "top"])
@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_the_device_code_path_promotes_the_ids_the_host_path_promotes(name, hot_policy):
    """kernels="torch" (what a GPU runs: the merged sketch, promotions and demotions in fixed shapes, nothing read
    back) on a Zipf stream: the same hot ids in the same rows as the compiled path; for cafe the same weights bit
    for bit (cafe-ml's medium ids read the merged sketch's scores, which may differ where a bucket overflowed)."""
    from compemb.kernels import use_kernels

    host = make_embedding(name, N, 8, compression=20, seed=18, hot_policy=hot_policy)
    device = make_embedding(name, N, 8, compression=20, seed=18, hot_policy=hot_policy)
    batches = zipf_batches(25, 1024, seed=19)
    train(host, batches, torch.optim.Adam(host.parameters(), lr=0.01))
    with use_kernels("torch"):
        assert device.sketch._merges
        train(device, batches, torch.optim.Adam(device.parameters(), lr=0.01))
    assert len(hot_map(host)) > 20 and hot_map(host) == hot_map(device)
    if name == "cafe":
        assert torch.equal(host.weight, device.weight)


@pytest.mark.parametrize("hot_policy", ["threshold", "top"])
@pytest.mark.parametrize("name", ["cafe", "cafe-ml"])
def test_the_device_code_path_demotes_and_never_shares_a_row(name, hot_policy):
    from compemb.kernels import use_kernels

    module = make_embedding(
        name, N, 8, compression=50, decay=0.5, importance="frequency", seed=6, tuning="paper", hot_policy=hot_policy
    )
    first, later = zipf_batches(40, 2048, seed=7), zipf_batches(80, 2048, seed=7, shift=5000)
    with use_kernels("torch"):
        train(module, first)
        early = set(hot_map(module))
        train(module, later)
    late = hot_map(module)  # the owner map and the sketch agree (asserted inside)
    assert len(set(late.values())) == len(late) and module.owned.sum() == len(late)
    heavy_now = (true_counts(later[-20:]) >= 3 * module.threshold).nonzero().squeeze(-1).tolist()
    assert set(heavy_now) <= set(late) and early - set(late)
