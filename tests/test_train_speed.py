"""The training-speed benchmark: every method trains in alternation and is compared with the baseline."""

from compemb.bench.train_speed import measure_training_speed, speed_table
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig


def test_methods_train_in_alternation_and_the_baseline_ratio_is_one(tmp_path):
    generate_synthetic(tmp_path / "data", SyntheticConfig(rows={"train": 4096, "val": 512}, scale=1e-4, seed=1),
                       progress=False)
    base = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "runs"), compression=4, embedding_dim=8,
                       bottom=(8,), top=(8,), optimizer="adagrad", lr=0.05, batch_size=128)
    rows = measure_training_speed(base, ["full", "ce"], "hash", rounds=2, steps=3, targets={"ce": 0.5})
    assert [row.method for row in rows] == ["hash", "full", "ce"]
    assert rows[0].ratio == 1.0 and all(row.samples_per_s > 0 and row.ratio > 0 for row in rows)
    assert "| ce |" in speed_table(rows, "hash") and ">= 0.5" in speed_table(rows, "hash")
