"""The training-speed benchmark: every method trains in alternation and is compared with the baseline."""

import pytest

from compemb.bench.train_speed import measure_training_speed, speed_table
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import TrainConfig, Trainer


def test_methods_train_in_alternation_and_the_baseline_ratio_is_one(tmp_path):
    generate_synthetic(
        tmp_path / "data", SyntheticConfig(rows={"train": 4096, "val": 512}, scale=1e-4, seed=1), progress=False
    )
    base = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "runs"),
        compression=4,
        embedding_dim=8,
        bottom=(8,),
        top=(8,),
        optimizer="adagrad",
        lr=0.05,
        batch_size=128,
    )
    evaluations = []
    real_evaluate = Trainer.evaluate
    with pytest.MonkeyPatch.context() as patch:  # the blocks time steps alone: no evaluation falls in them
        patch.setattr(Trainer, "evaluate", lambda self, split: evaluations.append(split) or real_evaluate(self, split))
        rows = measure_training_speed(base, ["full", "ce"], "hash", rounds=2, steps=3, targets={"ce": 0.5})
    assert evaluations == []
    assert [row.method for row in rows] == ["hash", "full", "ce"]
    assert rows[0].ratio == 1.0 and all(row.samples_per_s > 0 and row.ratio > 0 for row in rows)
    assert "| ce |" in speed_table(rows, "hash") and ">= 0.5" in speed_table(rows, "hash")


def test_the_minimal_loop_trains_the_trainers_model_on_its_batches_to_the_same_weights(tmp_path):
    import torch

    from compemb.bench.trainer import MinimalLoop, measure_trainer_overhead, write_overhead

    generate_synthetic(
        tmp_path / "data", SyntheticConfig(rows={"train": 2048, "val": 256}, scale=1e-4, seed=1), progress=False
    )
    bagged = SyntheticConfig(rows={"train": 2048, "val": 256}, scale=1e-4, seed=1, bag_features=1, bag_cardinality=50)
    generate_synthetic(tmp_path / "bagged", bagged, progress=False)
    # cafe: its on_step_end hook runs in both; hash on a set with a multi-hot feature: its bags read in both
    # offline: its ids counted in the train split by both
    runs = (
        ("full", "adam", "data"),
        ("cafe", "adagrad", "data"),
        ("hash", "adam", "bagged"),
        ("offline", "adam", "data"),
    )
    for method, optimizer, data in runs:
        config = TrainConfig(
            data=str(tmp_path / data),
            out=str(tmp_path / method),
            method=method,
            compression=None if method == "full" else 4,
            embedding_dim=8,
            bottom=(8,),
            top=(8,),
            optimizer=optimizer,
            lr=0.01,
            batch_size=128,
            checkpoint_minutes=0,
            checkpoint_epochs=False,
            epochs=2,
        )
        trainer = Trainer(config)
        minimal = MinimalLoop(trainer)
        trainer.fit(stop_at=20)  # past the first epoch's end: the batches wrap as the trainer's do
        minimal.run(20)
        for (name, mine), theirs in zip(minimal.model.state_dict().items(), trainer.model.state_dict().values()):
            torch.testing.assert_close(mine, theirs, msg=f"{method}: {name}")
    evaluations = []
    real_evaluate = Trainer.evaluate
    with pytest.MonkeyPatch.context() as patch:  # the blocks time steps alone: no evaluation falls in them
        patch.setattr(Trainer, "evaluate", lambda self, split: evaluations.append(split) or real_evaluate(self, split))
        result = measure_trainer_overhead(config, rounds=2, steps=2)
    assert evaluations == []
    assert result["ratio"] > 0 and result["trainer_samples_per_s"] > 0 and result["minimal_samples_per_s"] > 0
    assert "Trainer / minimal" in write_overhead(result, str(tmp_path / "trainer"))
