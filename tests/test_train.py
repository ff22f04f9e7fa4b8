"""The trainer: it learns, logs, keeps the best checkpoint, and a resumed run ends where an uninterrupted one does."""

import json

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
