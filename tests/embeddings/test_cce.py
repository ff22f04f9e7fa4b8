"""CCE: clustering moves ids to their centroids, pointers are stored honestly, and the trainer drives the schedule."""

import json
import subprocess
import sys

import pytest
import torch

import compemb.embeddings.cce.clustering as clustering_module
from compemb import BudgetError, CCEmbedding, ClusterSchedule, make_embedding
from compemb.embeddings.cce.plan import pointer_dtype
from compemb.hashing import hash_ids
from compemb.sketch.hotsketch import SLOT_BYTES


def _all_ids(n=2000, dim=8, **options):
    """Every id holds stored pointers (the paper's setting), uniform sample."""
    settings = dict(compression=2, pointers=n, sample="uniform", seed=3)
    settings.update(options)
    return make_embedding("cce", n, dim, **settings)


def _zipf_ids(n, size, seed=0):
    """Ids with Zipf-like frequencies: small ids are frequent."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.multinomial(1.0 / torch.arange(1, n + 1), size, replacement=True, generator=generator)
    return (ranks * 7919) % n  # scatter the frequent ids over the range


def _train_a_little(module, steps=5, n=None, batch=512):
    """A few SGD steps on Zipf ids (a fixed random linear loss) so tables, sketch and bitmap move."""
    n = n or module.num_embeddings
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    direction = torch.randn(module.embedding_dim, generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        ids = _zipf_ids(n, batch, seed=step)
        (module(ids) @ direction).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        module.on_step_end(step, optimizer)


def _column(module, ids, j):
    return module._column(ids, j).detach()


def test_clustered_ids_move_to_their_nearest_centroid_by_the_inertia(monkeypatch):
    import compemb.cluster

    fits = []
    kmeans = compemb.cluster.kmeans
    monkeypatch.setattr(compemb.cluster, "kmeans", lambda *a, **kw: fits.append(kmeans(*a, **kw)) or fits[-1])
    module = _all_ids()
    _train_a_little(module)
    c, k, ids = module.columns, module.rows, torch.arange(module.num_embeddings)
    before = [_column(module, ids, j) for j in range(c)]
    report = module.cluster()
    assert len(fits) == c and all(fit.centroids.shape == (k, 2) for fit in fits)
    assert report.round == 1 and module.rounds == 1 and report.num_pointers == module.num_embeddings
    sample = report.sample_ids
    assert torch.equal(sample, ids)  # 2,000 ids < 256 x k: all of them
    for j in range(c):
        centroids = module.weight[j * k : (j + 1) * k].detach()
        assert bool((module.weight[(c + j) * k : (c + j + 1) * k] == 0).all())  # T1 reset to zeros
        after = _column(module, sample, j)
        nearest = torch.cdist(before[j][sample].double(), centroids.double()).argmin(1)
        torch.testing.assert_close(after, centroids[nearest])  # each id now reads its centroid
        assert torch.equal(module.pointer_table[sample, j].long(), nearest)
        change = (after - before[j][sample]).double().square().sum(1)
        assert change.mean().item() == pytest.approx(report.inertia[j] / sample.numel(), rel=1e-5)
        # k-means' own inertia (mean over its points, labels from its graph search: >99% nearest) is no smaller
        assert report.inertia[j] / sample.numel() <= fits[j].inertia * (1 + 1e-5)
        assert report.inertia[j] / sample.numel() == pytest.approx(fits[j].inertia, rel=0.02)


def test_clustering_keeps_every_size():
    module = make_embedding("cce", 5000, 16, compression=10, seed=1)
    _train_a_little(module)
    shapes = {name: (t.shape, t.dtype) for name, t in module.state_dict().items()}
    count, memory = sum(p.numel() for p in module.parameters()), module.memory()
    module.cluster()
    module.cluster()
    assert module.rounds == 2
    assert sum(p.numel() for p in module.parameters()) == count and module.memory() == memory
    assert {name: (t.shape, t.dtype) for name, t in module.state_dict().items()} == shapes


def _clustered_state():
    module = make_embedding("cce", 3000, 8, compression=4, seed=7)
    _train_a_little(module, steps=4)
    module.cluster()
    ids = torch.arange(0, 3000, 11)
    return {
        "pointers": module.pointer_table.tolist(),
        "held": module.pointer_ids().tolist(),
        "weight": module.weight.detach().tolist(),
        "out": module(ids).detach().tolist(),
    }


def test_the_same_seed_gives_the_same_pointers_and_tables_in_a_fresh_process():
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); from embeddings.test_cce import _clustered_state;"
        "print(json.dumps(_clustered_state()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == _clustered_state()


@pytest.mark.parametrize("residual", ["zeros", "mean"])
def test_more_rows_than_ids_gives_no_nan(residual):
    module = make_embedding("cce", 10, 8, num_params=4000, pointers=10, sample="uniform", residual=residual)
    assert module.rows > 10
    _train_a_little(module, n=10, batch=32)
    module.cluster()
    out = module(torch.arange(10))
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(module.weight).all())


def test_pointers_use_the_smallest_dtype_that_holds_k():
    assert [pointer_dtype(k) for k in (1, 256, 257, 32_768, 32_769)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
    ]
    for compression, dtype in ((15, torch.uint8), (4, torch.int16)):  # every id's pointers, k rows
        module = make_embedding("cce", 100_000, 16, compression=compression, device="meta")
        assert module.all_ids and module.pointer_table.dtype == dtype == pointer_dtype(module.rows)
    big = make_embedding("cce-hybrid", 10_000_000, 16, compression=100, device="meta")
    # pointers index the holders' rows only: one centroid per 39 ids k-means samples (2 sketch slots per holder)
    assert big.holder_rows == big.pointer_table.shape[0] * 2 // 39 < big.rows // 10
    assert big.pointer_table.dtype == torch.int16 == pointer_dtype(big.holder_rows)
    every = make_embedding("cce", 10_000_000, 16, compression=100, accounting="paper", device="meta")
    assert every.all_ids and every.holder_rows == every.rows > 32_768 and every.pointer_table.dtype == torch.int32


def test_assignment_in_small_batches_equals_one_batch(monkeypatch):
    results = []
    for batch in (1 << 20, 97):
        monkeypatch.setattr(clustering_module, "ASSIGN_BATCH", batch)
        module = _all_ids(residual="mean")
        _train_a_little(module)
        module.cluster()
        results.append((module.pointer_table.clone(), module.weight.detach().clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_top_m_ids_by_sketch_score_hold_the_stored_pointers_within_budget():
    n, m = 20_000, 300
    module = make_embedding("cce-hybrid", n, 16, compression=20, pointers=m, seed=2)
    budget = n * 16 * 4 / 20
    assert abs(module.memory().total - budget) <= 0.01 * budget
    assert module.pointer_table.shape == (m, 4) and module.memory().sketch_bytes > 0
    _train_a_little(module, steps=6, batch=2048)
    module._flush()
    ids, scores, _ = module.sketch.items()
    ranked = sorted(zip((-scores).tolist(), ids.tolist()))[:m]
    module.cluster()
    held = module.pointer_ids()
    assert held.numel() == m and set(held.tolist()) == {i for _, i in ranked}
    # a holder reads its stored pointer, any other id its hashed one
    k, rows = module.rows, module._route(torch.arange(n))[:, :, 0]
    stored = torch.zeros(n, dtype=torch.bool)
    stored[held] = True
    assert torch.equal(rows[held] - torch.arange(4) * k, module.pointer_table[: held.numel()].long())
    # any other id reads the hashed region, which starts after the holders' rows
    assert module.cold_offset == module.holder_rows
    assert torch.equal(rows[~stored] - torch.arange(4) * k, module.h0(torch.arange(n)[~stored]) + module.cold_offset)
    assert abs(module.memory().total - budget) <= 0.01 * budget


def test_honest_budget_chooses_how_many_ids_hold_pointers():
    small = make_embedding("cce-hybrid", 2000, 16, compression=2)  # 2,000 x 4 bytes fit in a quarter of 64 KB
    assert small.all_ids and small.pointer_table.shape == (2000, 4)
    large = make_embedding("cce-hybrid", 1_000_000, 16, compression=100, device="meta")
    report, budget = large.memory(), 1_000_000 * 16 * 4 / 100
    assert not large.all_ids and 0 < large.pointer_table.shape[0] < 1_000_000
    assert abs(report.total - budget) <= 0.01 * budget
    # the share, plus three hashes and the cluster state, and a sketch bucket of rounding
    assert report.index_bytes + report.sketch_bytes <= 0.25 * budget + 208 + 4 * SLOT_BYTES
    with pytest.raises(BudgetError, match="smallest budget it can meet"):
        make_embedding("cce-hybrid", 1_000_000, 16, compression=100, pointers=200_000, device="meta")


def test_paper_accounting_sizes_the_floats_to_the_budget_and_still_reports_the_pointers():
    n, budget = 100_000, 100_000 * 16 * 4 / 50
    paper = make_embedding("cce", n, 16, compression=50, accounting="paper", device="meta")
    honest = make_embedding("cce-hybrid", n, 16, compression=50, device="meta")
    assert abs(paper.memory().float_bytes - budget) <= 0.01 * budget
    assert paper.all_ids and paper.memory().index_bytes >= n * 4 * paper.pointer_table.element_size()
    assert paper.memory().total > 2 * budget
    assert abs(honest.memory().total - budget) <= 0.01 * budget
    assert honest.memory().float_bytes < paper.memory().float_bytes


def test_mean_residual_fills_each_new_bucket_with_its_mean():
    module = _all_ids(residual="mean")
    _train_a_little(module)
    c, k, ids = module.columns, module.rows, torch.arange(module.num_embeddings)
    before = [_column(module, ids, j) for j in range(c)]
    module.cluster()
    assert bool(torch.isfinite(module.weight).all())
    buckets = module.h1(ids)  # the re-seeded h1
    for j in range(c):
        centroids = module.weight[j * k : (j + 1) * k].detach()
        residual = (before[j] - centroids[module.pointer_table[:, j].long()]).double()
        sums = torch.zeros(k, residual.shape[1], dtype=torch.float64).index_add_(0, buckets[:, j], residual)
        counts = torch.bincount(buckets[:, j], minlength=k).double().unsqueeze(-1)
        expected = torch.where(counts > 0, sums / counts.clamp_min(1), 0).float()
        torch.testing.assert_close(module.weight[(c + j) * k : (c + j + 1) * k].detach(), expected)


def test_h1_is_redrawn_each_round_and_saved_with_the_round():
    module = _all_ids()
    first = module.h1.coefficients.clone()
    module.cluster()
    second = module.h1.coefficients.clone()
    assert not torch.equal(first, second) and module.cluster_state.tolist() == [3, 1]
    module.reset_parameters()
    assert torch.equal(module.h1.coefficients, first) and module.rounds == 0


@pytest.mark.parametrize("options", [dict(), dict(pointers=2000, sample="uniform"), dict(sample="seen")])
def test_save_and_load_after_clustering_reproduce_the_outputs(options):
    source = make_embedding("cce", 2000, 8, compression=2, seed=1, **options)
    _train_a_little(source)
    source.cluster()
    _train_a_little(source, steps=2)
    target = make_embedding("cce", 2000, 8, compression=2, seed=9, **options)
    target.load_state_dict(source.state_dict())
    ids = torch.arange(2000)
    assert target.rounds == 1 and torch.equal(source(ids), target(ids))
    source.cluster(), target.cluster()  # the next round too: the seed and round came with the state
    assert torch.equal(source(ids), target(ids))


@pytest.mark.parametrize("method, options", [("cce", dict(sample="uniform")), ("cce-hybrid", dict(pointers=50))])
def test_compiled_routing_equals_the_torch_ops(method, options):
    module = make_embedding(method, 2000, 8, compression=2, **options)
    ids = torch.arange(2000)
    for _ in range(2):  # hashed, then clustered
        assert torch.equal(
            module._route(ids), module._route_torch(ids, 0 if module.rounds == 0 else 1 if module.all_ids else 2)
        )
        _train_a_little(module)
        module.cluster()


@pytest.mark.parametrize("importance", ["frequency", "gradient"])
def test_training_with_the_torch_sketch_equals_the_compiled_one_exactly(importance):
    """The sketch's device path (torch ops) run on CPU: the same scores, holders, pointers and tables."""
    compiled, torch_ops = (
        make_embedding("cce-hybrid", 20_000, 8, compression=10, importance=importance, seed=4) for _ in range(2)
    )
    torch_ops.sketch.backend = "torch"
    for module in (compiled, torch_ops):
        for _ in range(2):
            _train_a_little(module, steps=6, batch=1024)
            module.cluster()
    assert compiled.rounds == 2 and not compiled.all_ids
    for (key, a), b in zip(compiled.state_dict().items(), torch_ops.state_dict().values()):
        assert torch.equal(a, b), key


def test_seen_sample_clusters_only_ids_seen_in_training():
    module = make_embedding("cce", 5000, 8, compression=2, sample="seen")
    assert module.memory().sketch_bytes >= 5000 // 8
    ids = torch.tensor([4, 9, 4, 4999, 1024])
    module(ids).sum().backward()
    module.eval()
    module(torch.tensor([7]))  # evaluation does not count as seen
    report = module.cluster()
    assert report.sample_ids.tolist() == [4, 9, 1024, 4999]


def test_clustering_resets_the_optimizer_state_of_the_tables():
    module = _all_ids()
    optimizer = torch.optim.Adagrad(module.parameters(), lr=0.1, initial_accumulator_value=0.5)
    module(torch.arange(100)).sum().backward()
    optimizer.step()
    assert bool((optimizer.state[module.weight]["sum"] > 0.5).any())
    module.schedule = ClusterSchedule(every=1)
    module.on_step_end(0, optimizer)
    assert module.rounds == 1 and bool((optimizer.state[module.weight]["sum"] == 0.5).all())


def test_schedule_clusters_every_n_steps_until_the_fraction():
    schedule = ClusterSchedule(every=3, until=0.5)
    assert [s for s in range(20) if schedule.due(s, 20)] == [2, 5, 8]
    assert [s for s in range(10) if schedule.due(s)] == [2, 5, 8]  # no total: no end
    assert not any(ClusterSchedule(every=0).due(s, 20) for s in range(20))  # 0: never
    with pytest.raises(ValueError, match="cluster_every"):
        ClusterSchedule(every=-1)
    with pytest.raises(ValueError, match="cluster_until"):
        ClusterSchedule(every=2, until=0)


def test_bad_options_are_named():
    for options, match in [
        (dict(accounting="free"), "accounting"),
        (dict(sample="all"), "sample"),
        (dict(residual="median"), "residual"),
        (dict(pointers=0), "pointers"),
        (dict(columns=3), "columns"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_embedding("cce", 1000, 8, compression=2, **options)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from compemb.data.synthetic import SyntheticConfig, generate_synthetic

    out = tmp_path_factory.mktemp("cce") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 2048, "val": 256}, scale=1e-4, seed=5), progress=False)
    return out


def test_the_trainer_clusters_on_schedule_and_stops_after_until(data, tmp_path, monkeypatch):
    from compemb.cli import build_parser
    from compemb.cli.training import train_config
    from compemb.train import Trainer

    args = build_parser().parse_args(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--method",
            "cce",
            "--compression",
            "4",
            "--dim",
            "8",
            "--bottom",
            "8",
            "--top",
            "8",
            "--batch-size",
            "256",
            "--epochs",
            "2",
            "--cluster-every",
            "3",
        ]
    )
    config = train_config(args, str(tmp_path / "run"))
    assert config.method_options == {"cluster_every": 3}
    calls = []
    original = CCEmbedding.cluster
    monkeypatch.setattr(
        CCEmbedding, "cluster", lambda self, optimizer=None: calls.append(self.name) or original(self, optimizer)
    )
    trainer = Trainer(config)
    tables = [t for t in trainer.model.embeddings.embeddings.values() if isinstance(t, CCEmbedding)]
    assert tables and trainer.total_steps == 16
    result = trainer.fit()
    # 16 steps, until 0.75: after steps 3, 6, 9 and 12 (12 <= 12), not 15
    assert all(t.rounds == 4 for t in tables) and len(calls) == 4 * len(tables)
    assert not any(t._records for t in tables)  # no clustering left: the sketch stopped counting
    assert result["step"] == 16 and torch.isfinite(torch.tensor(result["bce"]))
    # a method that does not cluster ignores the option (a sweep gives it to every method)
    from dataclasses import replace

    Trainer(replace(config, method="hash", out=str(tmp_path / "hash"))).fit(stop_at=1)


def test_a_resumed_run_clusters_and_ends_as_the_uninterrupted_one(data, tmp_path):
    # pointers, sketch, round, h1 and the optimizer state reset at clustering all survive the checkpoint
    from compemb.train import TrainConfig, Trainer

    def config(out):
        return TrainConfig(
            data=str(data),
            out=str(out),
            method="cce",
            compression=4,
            embedding_dim=8,
            bottom=(8,),
            top=(8,),
            optimizer="adagrad",
            lr=0.05,
            batch_size=256,
            epochs=2,
            eval_every=4,
            method_options={"cluster_every": 3},
        )

    straight = Trainer(config(tmp_path / "a")).fit()
    Trainer(config(tmp_path / "b")).fit(stop_at=6)  # last checkpoint: step 4, between clusterings at 3 and 6
    resumed = Trainer(config(tmp_path / "b"), resume=True)
    assert resumed.step == 4
    result = resumed.fit()
    assert result["bce"] == straight["bce"] and result["auc"] == straight["auc"]


@pytest.mark.parametrize("stride", [1, 4])
def test_the_sketch_counts_training_occurrences_strided(stride):
    module = make_embedding("cce-hybrid", 100_000, 8, compression=10, sketch_stride=stride)
    assert not module.all_ids  # the sketch chooses who holds pointers
    ids = torch.tensor([5, 7, 5, 5, 9, 5, 7, 5] * 64)
    module(ids).sum().backward()
    module.eval()
    module(torch.tensor([11]))  # evaluation is not counted
    scores = module.sketch.query(torch.tensor([5, 7, 9, 11]))[0]
    if stride == 1:
        assert scores.tolist() == [320.0, 128.0, 64.0, 0.0]
    else:  # every 4th occurrence from a start the sketch's mass gives, weighted 4: 5 and one of 7/9 (0 or 4 mod 4)
        assert scores.sum().item() == ids.numel() and scores[0].item() in (256.0, 384.0, 512.0)


def test_gradient_importance_scores_from_the_output_gradient():
    module = make_embedding("cce-hybrid", 20_000, 8, compression=10, importance="gradient", sketch_stride=1)
    ids = torch.tensor([1, 2, 3])
    weights = torch.tensor([[1.0] * 8, [3.0] * 8, [0.0] * 8])
    (module(ids) * weights).sum().backward()
    module.on_step_end(0)
    scores = module.sketch.query(ids)[0]
    torch.testing.assert_close(scores, torch.tensor([0.75, 2.25, 0.0]))  # norms, normalised to mean 1


# --- ids without stored pointers keep their vectors; holders follow the stream ------------------------------


def _stream(n, size, generator, permutation):
    """Zipf(1.1) ids whose popularity order is ``permutation``."""
    weights = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1
    return permutation[torch.multinomial(weights, size, replacement=True, generator=generator)]


def test_clustering_leaves_ids_without_pointers_no_worse_off():
    """On a seeded skewed stream, the traffic-weighted loss of the ids that hold no pointer is kept by cluster()."""
    n, d = 20_000, 16
    generator = torch.Generator().manual_seed(0)
    permutation = torch.randperm(n, generator=generator)
    targets = torch.randn(n, d, generator=generator)
    traffic = torch.bincount(_stream(n, 200_000, torch.Generator().manual_seed(9), permutation), minlength=n)
    module = make_embedding("cce-hybrid", n, d, compression=20, pointers=300, seed=1)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    step = 0
    for round_ in range(1, 3):
        for _ in range(200):
            ids = _stream(n, 2048, generator, permutation)
            loss = (module(ids) - targets[ids]).square().sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            module.on_step_end(step, optimizer)
            step += 1
        held_before = torch.zeros(n, dtype=torch.bool)
        held_before[module.pointer_ids()] = True
        with torch.no_grad():
            before = (module(torch.arange(n)) - targets).square().sum(1).double()
        module.cluster(optimizer)
        assert module.rounds == round_
        held = torch.zeros(n, dtype=torch.bool)
        held[module.pointer_ids()] = True
        with torch.no_grad():
            after = (module(torch.arange(n)) - targets).square().sum(1).double()
        weight = traffic * ~(held | held_before)  # never held a pointer around this clustering
        assert weight.sum() > 0.2 * traffic.sum()  # a real share of the traffic
        loss_before = float((before * weight).sum() / weight.sum())
        loss_after = float((after * weight).sum() / weight.sum())
        assert loss_after <= loss_before * (1 + 1e-6), (round_, loss_before, loss_after)
        assert not torch.allclose(before[held], after[held])  # while the holders moved to their centroids


def test_holders_follow_a_shifted_stream_as_a_fresh_sketch_would():
    """No stale holders: after the stream's popular ids change, round 2's holders cover its top ids about as well
    as the holders a module that only ever saw the new stream picks."""
    n, m = 20_000, 300
    generator = torch.Generator().manual_seed(3)
    old, new = torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)

    def count(module, permutation, steps):
        for _ in range(steps):
            module.train()
            module(_stream(n, 2048, generator, permutation))  # frequency scores need no backward
        return module

    shifted = count(make_embedding("cce-hybrid", n, 16, compression=20, pointers=m, seed=4), old, 200)
    shifted.cluster()
    count(shifted, new, 200).cluster()
    fresh = count(make_embedding("cce-hybrid", n, 16, compression=20, pointers=m, seed=4), new, 200)
    fresh.cluster()
    top = set(new[:m].tolist())  # the new stream's m most popular ids
    covered = len(top & set(shifted.pointer_ids().tolist())) / m
    covered_fresh = len(top & set(fresh.pointer_ids().tolist())) / m
    assert covered >= 0.9 * covered_fresh and covered_fresh > 0.3, (covered, covered_fresh)


# --- the three variants, and clustering by default ------------------------------------------------------------


def test_cce_refuses_a_budget_below_its_pointers_naming_the_highest_ratio():
    n, d = 100_000, 16
    full = n * d * 4
    # independently: 4 uint8 pointers per id, the hashes and state (2 x 4 columns x 2 coefficients x 8 bytes + 16),
    # and the stated minimum of 16 rows of T0 and T1 in every column (16 x 2 x 16 floats): the smallest cce there is
    smallest = n * 4 + 2 * 4 * 2 * 8 + 16 + 16 * 2 * d * 4
    highest = full / smallest
    with pytest.raises(BudgetError, match=f"the highest ratio it can reach is {highest:.2f}x"):
        make_embedding("cce", n, d, compression=highest * 1.05, device="meta")
    reached = make_embedding("cce", n, d, compression=15, device="meta")
    assert reached.all_ids and reached.pointer_table.dtype == torch.uint8
    assert reached.memory().index_bytes >= n * 4 and reached.budgeted_bytes() == reached.memory().total
    # cce-paper and cce-hybrid reach any ratio: the paper's pointers are not counted, the hybrid's are few
    paper = make_embedding("cce-paper", n, d, compression=100, device="meta")
    assert paper.all_ids and paper.memory().total > 4 * paper.budgeted_bytes()
    hybrid = make_embedding("cce-hybrid", n, d, compression=100, device="meta")
    assert not hybrid.all_ids and hybrid.memory().total == pytest.approx(full / 100, rel=0.01)
    with pytest.raises(ValueError, match="cce-hybrid's option"):
        make_embedding("cce", n, d, compression=4, pointers=100, device="meta")


def test_hybrid_has_at_least_39_sampled_ids_per_centroid():
    for n, compression in ((100_000, 100), (1_000_000, 100), (200_000, 20)):
        module = make_embedding("cce-hybrid", n, 16, compression=compression, device="meta")
        slots = module.sketch.num_buckets * module.sketch.slots  # the ids k-means may sample
        assert 1 <= module.holder_rows <= slots / 39 and module.holder_rows < module.rows


def test_schedule_derived_from_the_run():
    auto = ClusterSchedule()
    # one epoch of 1,200 steps: every 1/3 of it, up to 3/4 -> two clusterings
    assert [s + 1 for s in range(1200) if auto.due(s, 1200, 1200)] == [400, 800]
    # eight epochs of 100 steps: after each epoch, up to 3/4 of the run
    assert [s + 1 for s in range(800) if auto.due(s, 800, 100)] == [100, 200, 300, 400, 500, 600]
    # a loop that never said how long it runs: every 1,000 steps, no end
    assert [s + 1 for s in range(3000) if auto.due(s)] == [1000, 2000, 3000]


@pytest.mark.parametrize("method", ["cce", "cce-hybrid"])
def test_by_default_the_trainer_clusters_logs_clusterings_and_leaves_no_row_idle(data, tmp_path, method):
    from compemb.train import TrainConfig, Trainer

    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        method=method,
        compression=3,
        sharing="shared",
        embedding_dim=8,
        bottom=(8,),
        top=(8,),
        optimizer="adagrad",
        lr=0.05,
        batch_size=128,
        evals_per_epoch=4,
    )
    trainer = Trainer(config)
    (table,) = trainer.model.embeddings.embeddings.values()
    start = table.weight.detach().clone()
    trainer.fit()
    # 16 steps: every ceil(16 / 3) = 6 steps up to 12 -> 2 clusterings
    assert table.rounds == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["clusterings"] for line in lines] == [0, 1, 2, 2]  # evaluations after steps 4, 8, 12 and 16
    changed = (table.weight.detach() != start).any(1)
    if method == "cce":  # every row of both tables of every column was trained or clustered into
        assert bool(changed.all())
    else:  # the holder region (idle until the first clustering) was clustered into, in every block
        k, c, kh = table.rows, table.columns, table.holder_rows
        region = torch.cat([torch.arange(kh) + block * k for block in range(2 * c)])
        assert bool(changed[region].all())


def test_cluster_every_zero_never_clusters(data, tmp_path):
    from compemb.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(out),
                "--method",
                "cce",
                "--compression",
                "3",
                "--sharing",
                "shared",
                "--dim",
                "8",
                "--bottom",
                "8",
                "--top",
                "8",
                "--batch-size",
                "256",
                "--cluster-every",
                "0",
            ]
        )
        == 0
    )
    (line,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["clusterings"] == 0


def test_clustering_on_the_device_code_path_runs_in_torch_and_matches_the_host_quality():
    """kernels="torch": CCE's k-means runs where the tables are (torch ops); its inertia is within 10% of the host's."""
    from compemb import make_embedding
    from compemb.kernels import use_kernels

    reports = []
    for kernels in ("auto", "torch"):
        module = make_embedding("cce-paper", 20_000, 16, compression=8, seed=3)
        generator = torch.Generator().manual_seed(4)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        with use_kernels(kernels):
            for _ in range(20):
                ids = torch.randint(0, 20_000, (512,), generator=generator)
                loss = module(ids).sum(1).sub(1).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            reports.append(module.cluster(optimizer))
            assert module.rounds == 1 and torch.isfinite(module(torch.arange(100))).all()
    host, device = reports
    assert sum(device.inertia) <= 1.10 * sum(host.inertia)


def test_honest_cce_never_builds_below_its_minimum_rows_and_names_both_bands():
    from compemb.embeddings.cce.plan import MIN_ROWS

    n, d = 101_393, 16
    full = n * d * 4
    fixed = 2 * 4 * 2 * 8 + 16
    # at the edge of what the pointers leave (16x, 8x) a budget bought k = 1 before; now the minimum or a refusal
    for ratio in (16, 8):
        try:
            module = make_embedding("cce", n, d, compression=ratio, device="meta")
        except BudgetError:
            continue
        assert module.rows >= MIN_ROWS == 16
    # 10x falls between the bands: uint8 pointers (k 16-256) and int16 pointers (k 16 up to a full table's bytes)
    uint8 = (full / (n * 4 + fixed + 256 * 128), full / (n * 4 + fixed + 16 * 128))
    int16 = (full / (n * 8 + fixed + 32_768 * 128), full / (n * 8 + fixed + 16 * 128))  # int16 holds k <= 32,768
    with pytest.raises(BudgetError) as refused:
        make_embedding("cce", n, d, compression=10, device="meta")
    message = str(refused.value)
    assert f"{uint8[0]:.2f}x-{uint8[1]:.2f}x with uint8 pointers (k 16-256)" in message
    assert f"{int16[0]:.2f}x-{int16[1]:.2f}x with int16 pointers (k 16-32,768)" in message
    # on a smaller table int16's band stops where the table would outgrow the full one (1.00x), not below it
    with pytest.raises(BudgetError, match=r"1\.00x-[\d.]+x with int16 pointers"):
        make_embedding("cce", 2_000, d, compression=20, device="meta")
    assert f"the highest ratio it can reach is {uint8[1]:.2f}x" in message


def test_per_feature_cce_gives_the_same_budget_message_naming_the_feature():
    from compemb.collection import EmbeddingCollection, Feature

    features = [Feature("small", 40), Feature("mid", 5_000), Feature("big", 30_000)]
    for ratio in (10, 100):
        with pytest.raises(
            BudgetError,
            match=r"feature '\w+' \([\d,]+ ids\) at the collection's ratio: cce cannot meet"
            r".* with uint8 pointers \(k 16-256\)",
        ):
            EmbeddingCollection(features, 16, "cce", compression=ratio, device="meta")
    built = EmbeddingCollection(features, 16, "cce", compression=4, device="meta")
    assert built.memory().total == pytest.approx(sum(f.num_embeddings for f in features) * 64 / 4, rel=0.01)


def _per_column_clustering_reference(table, sample, holders, h1, seeds, weight, pointers):
    """The device path's clustering as it was before the columns were batched: one kmeans_torch and one search per
    column, column after column."""
    from compemb.cluster import kmeans_torch, nearest_torch
    from compemb.embeddings.cce.clustering import ASSIGN_BATCH

    c, k, kh = table.columns, table.rows, table.holder_rows
    inertia = []
    for j in range(c):
        points = table._column(sample, j).float()
        centroids = kmeans_torch(
            points, kh, niter=table.niter, max_points_per_centroid=table.max_points_per_centroid, seed=seeds[j]
        ).centroids
        inertia.append(float(nearest_torch(points, centroids)[1].double().sum()))
        sums = torch.zeros(kh, centroids.shape[1], dtype=torch.float64)
        counts = torch.zeros(kh, dtype=torch.float64)
        for start in range(0, holders.numel(), ASSIGN_BATCH):
            chunk = holders[start : start + ASSIGN_BATCH]
            vectors = table._column(chunk, j).float()
            labels = nearest_torch(vectors, centroids)[0]
            pointers[start : start + chunk.numel(), j] = labels.to(pointers.dtype)
            if table.residual == "mean":
                bucket = hash_ids(chunk, h1[j : j + 1], kh).squeeze(-1)
                sums.index_add_(0, bucket, (vectors - centroids[labels]).double())
                counts.index_add_(0, bucket, torch.ones(chunk.numel(), dtype=torch.float64))
        weight[j * k : j * k + kh] = centroids
        weight[(c + j) * k : (c + j) * k + kh] = (sums / counts.clamp_min(1).unsqueeze(-1)).float()
    return inertia


@pytest.mark.parametrize("method", ["cce", "cce-paper", "cce-hybrid"])
def test_the_device_clustering_of_all_columns_at_once_is_each_columns_own(method, monkeypatch):
    """Every column clustered in one batched k-means and searched together: the same tables, pointers and inertia,
    bit for bit, as clustering column after column, with fewer host waits."""
    from compemb.bench.syncs import SyncCounter
    from compemb.kernels import use_kernels
    from compemb.registry import make_embedding

    tables, waits, reports = [], [], []
    for batched in (True, False):
        table = make_embedding(method, 3000, 16, compression=2 if method == "cce" else 4, seed=1)
        if not batched:
            monkeypatch.setattr(
                table,
                "_fit_columns_on_device",
                lambda *args, table=table: _per_column_clustering_reference(table, *args),
            )
        with use_kernels("torch"):
            table.train()
            if table.sketch is not None:
                table._update(torch.randint(0, 3000, (5000,), generator=torch.Generator().manual_seed(0)), None, None)
            with SyncCounter() as counter:
                reports.append(table.cluster())
        tables.append(table)
        waits.append(counter.total)
    assert torch.equal(tables[0].weight, tables[1].weight)
    assert torch.equal(tables[0].pointer_table, tables[1].pointer_table)
    assert reports[0].inertia == reports[1].inertia
    assert waits[0] < waits[1], waits
