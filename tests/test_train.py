"""The trainer: it learns, logs, keeps the best checkpoint, and a resumed run ends where an uninterrupted one does."""

import json

import numpy as np
import pytest

from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "synth"
    config = SyntheticConfig(rows={"train": 4096, "val": 1024}, scale=1e-4, seed=5)
    generate_synthetic(out, config, progress=False)
    return str(out)


def _config(data, out, **overrides):
    settings = dict(data=data, out=str(out), method="hash", compression=4, embedding_dim=8, bottom=(16,),
                    top=(16,), optimizer="adagrad", lr=0.05, batch_size=256, epochs=2, eval_every=8, seed=2)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_metrics(data, tmp_path, optimizer):
    straight = Trainer(_config(data, tmp_path / "a", optimizer=optimizer)).fit()
    Trainer(_config(data, tmp_path / "b", optimizer=optimizer)).fit(stop_at=13)  # last checkpoint: step 8
    resumed_trainer = Trainer(_config(data, tmp_path / "b", optimizer=optimizer), resume=True)
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


def test_sparse_gradients_for_sgd_and_adagrad_dense_for_adam(data, tmp_path):
    for optimizer, sparse in [("sgd", True), ("adagrad", True), ("adam", False)]:
        trainer = Trainer(_config(data, tmp_path / optimizer, optimizer=optimizer))
        tables = list(trainer.model.embeddings.embeddings.values())
        assert all(table.sparse == sparse for table in tables if table.compresses)


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
