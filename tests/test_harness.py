"""The harness can reach the best possible loss, and it can see compression.

On a small planted-teacher set (four features of 50 ids, a 4-dim teacher), DLRM with the full table gets its
validation BCE within 2% of the Bayes BCE; on a set with more ids, the hashing trick at compression 100 ends
strictly worse than the full table.
"""

import pytest

from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig, Trainer


def _train(data, out, **overrides):
    settings = dict(
        data=str(data),
        out=str(out),
        method="full",
        embedding_dim=8,
        bottom=(32,),
        top=(32,),
        optimizer="adam",
        lr=0.003,
        table_optimizer=None,
        table_lr=None,
        batch_size=1024,
        epochs=10,
        seed=0,
    )  # one Adam for the MLPs and the tables
    settings.update(overrides)
    return Trainer(TrainConfig(**settings)).fit()


def test_full_table_dlrm_gets_within_two_percent_of_the_bayes_bce(tmp_path):
    config = SyntheticConfig(
        rows={"train": 600_000, "val": 50_000}, cardinalities_override=(50, 50, 50, 50), teacher_dim=4, seed=1
    )
    facts = generate_synthetic(tmp_path / "data", config, progress=False)
    result = _train(tmp_path / "data", tmp_path / "full")
    assert result["bayes_bce"] == pytest.approx(facts["bayes"]["val"]["bce"])
    assert result["bce"] >= result["bayes_bce"]  # nothing beats the truth (a sanity check of the Bayes figure)
    assert result["gap_to_bayes"] < 0.02


def test_hashing_at_compression_100_ends_strictly_worse_than_the_full_table(tmp_path):
    config = SyntheticConfig(
        rows={"train": 100_000, "val": 20_000}, cardinalities_override=(2000, 2000, 500), teacher_dim=4, seed=2
    )
    generate_synthetic(tmp_path / "data", config, progress=False)
    full = _train(tmp_path / "data", tmp_path / "full", epochs=2)
    hashed = _train(tmp_path / "data", tmp_path / "hash", epochs=2, method="hash", compression=100)
    assert hashed["bce"] > full["bce"] and hashed["auc"] < full["auc"]
