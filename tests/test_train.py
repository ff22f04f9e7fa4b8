"""The trainer: it learns, logs, keeps the best checkpoint, and a resumed run ends where an uninterrupted one does."""

import json

import numpy as np
import pytest
import torch

from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import EvaluationSteps, TrainConfig, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "synth"
    config = SyntheticConfig(rows={"train": 4096, "val": 1024}, scale=1e-4, seed=5)
    generate_synthetic(out, config, progress=False)
    return str(out)


def _config(data, out, **overrides):
    settings = dict(
        data=data,
        out=str(out),
        method="hash",
        compression=4,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        optimizer="adagrad",
        lr=0.05,
        table_optimizer=None,
        table_lr=None,
        batch_size=256,
        epochs=2,
        eval_every=8,
        seed=2,
    )  # one optimizer for MLPs and tables unless a test says otherwise
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "adam_dense", "adam+rowwise_adagrad", "adam+adagrad"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_metrics(data, tmp_path, optimizer):
    dense, _, tables = optimizer.partition("+")  # MLPs + tables: their own optimizers, combined
    options = dict(optimizer=dense, table_optimizer=tables or None, table_lr=0.1 if tables else None)
    straight = Trainer(_config(data, tmp_path / "a", **options)).fit()
    Trainer(_config(data, tmp_path / "b", **options)).fit(stop_at=13)  # last checkpoint: step 8
    resumed_trainer = Trainer(_config(data, tmp_path / "b", **options), resume=True)
    assert resumed_trainer.step == 8
    resumed = resumed_trainer.fit()
    assert resumed["step"] == straight["step"] == 32
    assert resumed["bce"] == straight["bce"] and resumed["auc"] == straight["auc"]


def test_training_learns_logs_every_evaluation_and_keeps_the_best(data, tmp_path):
    trainer = Trainer(_config(data, tmp_path / "run", method="full", compression=None, epochs=3, lr=0.01))
    before = trainer.evaluate("val")
    after = trainer.fit()
    assert after["bce"] < before["bce"] and after["auc"] > 0.6
    assert after["gap_to_bayes"] == pytest.approx(after["bce"] / after["bayes_bce"] - 1)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 16, 24, 32, 40, 48]
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    assert best["best"]["bce"] == min(r["bce"] for r in records)
    assert best["config"]["method"] == "full"


def test_sparse_table_gradients_for_every_optimizer_but_adam_dense(data, tmp_path):
    from compemb.optim import RowAdam

    for optimizer, sparse in [("sgd", True), ("adagrad", True), ("adam", True), ("adam_dense", False)]:
        trainer = Trainer(_config(data, tmp_path / optimizer, optimizer=optimizer))
        tables = list(trainer.model.embeddings.embeddings.values())
        assert all(table.sparse == sparse for table in tables if table.compresses)
        assert isinstance(trainer.optimizer, RowAdam) == (optimizer == "adam")


def test_tables_and_mlps_take_their_own_optimizers_and_learning_rates(data, tmp_path):
    from compemb.embeddings.base import CompressedEmbedding
    from compemb.optim import CombinedOptimizer, RowAdam, RowwiseAdagrad

    trainer = Trainer(
        _config(data, tmp_path / "split", optimizer="adam", lr=1e-3, table_optimizer="rowwise_adagrad", table_lr=0.2)
    )
    mlps, tables = trainer.optimizer.optimizers
    assert isinstance(trainer.optimizer, CombinedOptimizer)
    assert isinstance(mlps, RowAdam) and isinstance(tables, RowwiseAdagrad)
    table_ids = {id(p) for m in trainer.model.modules() if isinstance(m, CompressedEmbedding) for p in m.parameters()}
    assert {id(p) for g in tables.param_groups for p in g["params"]} == table_ids
    assert {id(p) for g in mlps.param_groups for p in g["params"]} == {
        id(p) for p in trainer.model.parameters()
    } - table_ids
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 0.2]
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.fit(stop_at=4)
    moved = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert any("embeddings" in name for name in moved) and any("bottom" in name for name in moved)
    # the same optimizer and lr named twice is the one optimizer of before
    same = Trainer(_config(data, tmp_path / "same", optimizer="adam", table_optimizer="adam", table_lr=0.05, lr=0.05))
    assert isinstance(same.optimizer, RowAdam)
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        _config(data, tmp_path / "bad", table_optimizer="lamb")
    with pytest.raises(ValueError, match="table_lr must be a positive"):
        _config(data, tmp_path / "bad", table_lr=-1.0)


def test_bad_settings_are_named(data, tmp_path):
    with pytest.raises(ValueError, match="optimizer"):
        _config(data, tmp_path, optimizer="rmsprop")
    with pytest.raises(ValueError, match="model"):
        _config(data, tmp_path, model="widedeep")


def test_id_counts_read_in_chunks_equal_one_bincount(data):
    from compemb.data.dataset import open_dataset
    from compemb.train import id_counts

    manifest, splits = open_dataset(data)
    counts = id_counts(splits["train"], manifest["cardinalities"], chunk_rows=1000)
    sparse = np.asarray(splits["train"].sparse)
    for column, n in enumerate(manifest["cardinalities"]):
        assert np.array_equal(counts[column], np.bincount(sparse[:, column], minlength=n))


def test_offline_gets_the_train_split_counts_and_cafe_trains_with_its_hooks(data, tmp_path):
    offline = Trainer(_config(data, tmp_path / "off", method="offline", epochs=1))
    tables = offline.model.embeddings.embeddings
    compressed = [column for column, table in enumerate(tables.values()) if table.compresses]
    assert compressed
    for column in compressed:  # each feature's most frequent train ids own its rows
        table = tables[f"C{column + 1}"]
        counts = np.bincount(offline.splits["train"].sparse[:, column], minlength=table.num_embeddings)
        top = np.argsort(-counts, kind="stable")[: table.hot_rows]
        assert set(table.hot_ids.tolist()) == set(top.tolist())
    result = Trainer(_config(data, tmp_path / "cafe", method="cafe", epochs=1, optimizer="adam")).fit()
    assert np.isfinite(result["bce"])


def test_a_resumed_cafe_run_ends_where_the_uninterrupted_one_does(data, tmp_path):
    # the sketch, the hot rows' owners and the optimizer state reset on promotion all survive the checkpoint
    config = dict(method="cafe", optimizer="adam", method_options={"threshold": 2.0})
    straight = Trainer(_config(data, tmp_path / "a", **config)).fit()
    Trainer(_config(data, tmp_path / "b", **config)).fit(stop_at=13)
    resumed = Trainer(_config(data, tmp_path / "b", **config), resume=True).fit()
    assert resumed["bce"] == straight["bce"] and resumed["auc"] == straight["auc"]


def test_shuffled_training_is_seeded_covers_every_row_and_resumes_exactly(data, tmp_path):
    trainer = Trainer(_config(data, tmp_path / "s", shuffle=True))
    epoch0 = [trainer._train_batch(step)[2] for step in range(trainer.steps_per_epoch)]
    epoch1 = trainer._train_batch(trainer.steps_per_epoch)[2]
    in_order = Trainer(_config(data, tmp_path / "o"))._train_batch(0)[2]
    labels = np.asarray(trainer.splits["train"].labels, dtype=np.float32)
    # every row once per epoch: the label total is the file's; the first batches differ from file order and by epoch
    assert sum(float(b.sum()) for b in epoch0) == pytest.approx(float(labels.sum()))
    assert sum(len(b) for b in epoch0) == len(labels)
    rows0 = trainer.batches.order  # the permutation of the epoch read last
    assert not np.array_equal(np.sort(rows0[1][:256]), np.arange(256))
    assert epoch0[0].shape == epoch1.shape == in_order.shape
    straight = Trainer(_config(data, tmp_path / "a", shuffle=True)).fit()
    Trainer(_config(data, tmp_path / "b", shuffle=True)).fit(stop_at=21)  # last checkpoint: step 16, epoch 1
    resumed = Trainer(_config(data, tmp_path / "b", shuffle=True), resume=True).fit()
    assert resumed["bce"] == straight["bce"]
    unshuffled = Trainer(_config(data, tmp_path / "u")).fit()
    assert unshuffled["bce"] != straight["bce"]


def test_test_metrics_come_from_the_best_validation_checkpoint(data, tmp_path):
    # a high learning rate overshoots after its best evaluation, so the last model is not the best one
    trainer = Trainer(
        _config(
            data,
            tmp_path / "run",
            method="full",
            compression=None,
            epochs=3,
            optimizer="adam",
            lr=0.05,
            eval_every=0,
            evals_per_epoch=4,
        )
    )
    assert list(trainer.evaluation_steps) == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48]
    trainer.fit()
    best_step = trainer.best["step"]
    best_val = trainer.best["bce"]
    reloaded = Trainer(
        _config(
            data,
            tmp_path / "run",
            method="full",
            compression=None,
            epochs=3,
            optimizer="adam",
            lr=0.05,
            eval_every=0,
            evals_per_epoch=4,
        )
    )
    test = reloaded.test_of_best("val")  # on val it must give back the best evaluation exactly
    assert test["step"] == best_step and test["bce"] == pytest.approx(best_val, rel=1e-6)


def test_prefetching_batches_on_a_thread_trains_the_same_weights(data, tmp_path):
    """The reader thread (on by default on accelerators) gives the batches a loop without it reads, in order."""
    states = []
    for prefetch in (False, True):
        config = TrainConfig(
            data=str(data),
            out=str(tmp_path / str(prefetch)),
            method="hash",
            compression=4,
            embedding_dim=8,
            bottom=(8,),
            top=(8,),
            optimizer="adam",
            lr=0.01,
            batch_size=128,
            shuffle=True,
            epochs=2,
            checkpoint_minutes=0,
            checkpoint_epochs=False,
        )
        trainer = Trainer(config)
        trainer.prefetch = prefetch
        trainer.fit(stop_at=5)
        trainer.fit(stop_at=trainer.steps_per_epoch + 3)  # past an epoch's end: a new permutation
        states.append(trainer.model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_a_fresh_trainer_refuses_a_directory_holding_a_run_and_an_evaluating_one_writes_nothing(data, tmp_path):
    from compemb.train import RunExistsError

    run = tmp_path / "run"
    Trainer(_config(data, run, epochs=1)).fit()
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    with pytest.raises(RunExistsError, match="holds a run"):
        Trainer(_config(data, run, epochs=1, method="full", compression=None)).fit()
    evaluating = Trainer(_config(data, run, epochs=1))  # built to load a checkpoint: allowed, writes nothing
    evaluating.load(run / "checkpoints" / "best")
    evaluating.evaluate("val")
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files
    replaced = Trainer(_config(data, run, epochs=1, method="full", compression=None), overwrite=True).fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bce"] == replaced["bce"] and len(records) == 2  # the new run's two evaluations only


def test_resume_or_start_without_a_checkpoint_starts_afresh_over_what_a_run_left(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 8, "bce": 0.7}\n')  # a run killed before its first checkpoint
    result = Trainer(_config(data, run, epochs=1), resume=True, start_if_missing=True).fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [8, 16] and records[-1]["bce"] == result["bce"]


def test_a_second_trainer_into_a_locked_run_directory_is_refused_at_once(data, tmp_path):
    from compemb.run_lock import RunLock, RunLockedError

    run = tmp_path / "run"
    holder = RunLock(run)  # as another trainer holds it (a lock of another open file: flock refuses it)
    holder.acquire()
    try:
        with pytest.raises(RunLockedError, match=f"pid {__import__('os').getpid()}"):
            Trainer(_config(data, run, epochs=1)).fit()
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        holder.release()
    result = Trainer(_config(data, run, epochs=1)).fit()  # released: the run goes ahead, and gives it back
    assert result["step"] == 16
    RunLock(run).acquire()


def test_a_checkpoint_is_written_and_read_back_without_a_serialized_copy_of_the_tables(tmp_path):
    """A full table's checkpoint once cost a second table (the safetensors bytes built in memory, then the file read
    whole to load): written now from the tensors' memory and hashed in chunks; read tensor by tensor."""
    import tracemalloc

    from compemb.train import read_checkpoint

    out = tmp_path / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 512, "val": 256}, scale=5e-2, seed=1), progress=False)
    trainer = Trainer(_config(str(out), tmp_path / "run", method="full", compression=None, optimizer="sgd"))
    table_bytes = trainer.model.embeddings.memory().total
    assert table_bytes > 50e6
    tracemalloc.start()
    trainer.save(tmp_path / "ckpt")
    written_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    tensors, meta = read_checkpoint(tmp_path / "ckpt")
    read_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # what is left: the hash's two 4 MiB chunks (a serialized copy was the whole table)
    assert written_peak < 0.25 * table_bytes and read_peak < 0.25 * table_bytes, (written_peak, read_peak)
    state = trainer.model.state_dict()
    assert all(torch.equal(tensors[f"model.{name}"], value) for name, value in state.items())
    import hashlib

    assert meta["sha256"] == hashlib.sha256((tmp_path / "ckpt.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 15, 23, 64])
def test_evals_per_epoch_means_exactly_n_an_epoch_evenly_the_last_at_its_end(steps):
    for count in range(1, steps + 1):
        evaluated = list(EvaluationSteps(steps, 3, count))
        for epoch in range(3):
            mine = [step - epoch * steps for step in evaluated if epoch * steps < step <= (epoch + 1) * steps]
            assert len(mine) == count and mine[-1] == steps  # N of them, the last at the epoch's end
            gaps = np.diff([0, *mine])
            assert gaps.min() >= 1 and gaps.max() - gaps.min() <= 1  # evenly: no two gaps differ by more than a step
    assert list(EvaluationSteps(steps, 2, 0)) == [2 * steps]  # 0: only at the end of the run
    assert list(EvaluationSteps(steps, 2, 1, eval_every=4)) == [*range(4, 2 * steps, 4), 2 * steps]


def test_more_evaluations_than_an_epoch_has_steps_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match="evals_per_epoch 17 is more than the 16 steps of an epoch"):
        Trainer(_config(data, tmp_path / "r", eval_every=0, evals_per_epoch=17))
    with pytest.raises(ValueError, match=r"give eval_every \(8\) or evals_per_epoch \(2\), not both"):
        _config(data, tmp_path / "r", evals_per_epoch=2)


def test_by_default_a_run_evaluates_at_each_epochs_end_and_keeps_the_best(data, tmp_path):
    # lr 0.05 Adam on the full table overfits in its third epoch: the best checkpoint is an earlier epoch's
    config = TrainConfig(
        data=data,
        out=str(tmp_path / "r"),
        method="full",
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        optimizer="adam",
        lr=0.05,
        batch_size=256,
        epochs=3,
        seed=2,
    )
    trainer = Trainer(config)
    last = trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [16, 32, 48]  # one an epoch, at its end
    best = min(logged, key=lambda entry: entry["bce"])
    assert trainer.best["step"] == best["step"] and last["step"] == 48
    best_meta = json.loads((tmp_path / "r" / "checkpoints" / "best.json").read_text())
    assert best_meta["step"] == best["step"]


def test_tensorboard_gets_every_evaluation_as_metrics_jsonl_has_it(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(_config(data, tmp_path / "r", eval_every=0, evals_per_epoch=2), tensorboard=tmp_path / "tb")
    trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for key in ("bce", "auc", "gap_to_bayes"):
        scalars = events.Scalars(f"val/{key}")
        assert [s.step for s in scalars] == [entry["step"] for entry in logged] == [8, 16, 24, 32]
        assert [s.value for s in scalars] == pytest.approx([entry[key] for entry in logged], rel=1e-6)


def test_tensorboard_without_its_package_is_refused_with_the_install_line(data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        Trainer(_config(data, tmp_path / "r"), tensorboard=tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_the_default_recipe_is_the_recorded_sweeps_most_robust_one():
    """TrainConfig's optimizers are the recipe of benchmarks/results/default_recipe.csv nearest the best on every
    set and method in the confirmation on fresh seeds (the smallest largest distance): a default changed without a
    sweep, or a sweep whose winner was not taken, fails here."""
    import csv
    from pathlib import Path

    rows = [
        row
        for row in csv.DictReader(
            open(Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "default_recipe.csv")
        )
        if row["stage"] == "confirm"
    ]
    groups = {(row["data"], row["method"]) for row in rows}
    assert len(groups) == 6
    complete = [
        recipe
        for recipe in {row["recipe"] for row in rows}
        if sum(row["recipe"] == recipe for row in rows) == len(groups)
    ]  # the finalists ran everywhere
    worst = {recipe: max(float(row["from_best"]) for row in rows if row["recipe"] == recipe) for recipe in complete}
    config = TrainConfig(data="d", out="r")
    assert (
        min(worst, key=worst.get) == f"{config.optimizer} {config.lr:g} / {config.table_optimizer} "
        f"{config.table_lr:g}" == "adam 0.002 / adagrad 0.05"
    )
