"""Multi-hot features: a bag of one id equals the one-hot path, jagged arrays round-trip through the on-disk format,
the synthetic generator plants bags the teacher reads, and a mixed one-hot + multi-hot DLRM trains end to end."""

import json

import numpy as np
import pytest
import torch

from compemb.collection import Bags, EmbeddingCollection, Feature
from compemb.data.dataset import DatasetError, DatasetWriter, open_dataset
from compemb.data.synthetic import SyntheticConfig, Teacher, generate_synthetic
from compemb.train import TrainConfig, Trainer, bag_rows

SIZES = [4000, 300, 900]


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
@pytest.mark.parametrize("method", ["full", "hash", "qr", "cce", "cafe", "offline"])
def test_a_bag_of_one_id_equals_the_one_hot_path(method, sharing):
    counts = {f"f{i}": torch.arange(n, 0, -1) for i, n in enumerate(SIZES)}
    # cce's pointers (4 bytes an id at d=8) leave it 4.5x-7.6x with at least 16 rows a table: 6x
    budget = {} if method == "full" else {"compression": 6 if method == "cce" else 4}
    bagged = EmbeddingCollection(
        [Feature("f0", SIZES[0]), Feature("f1", SIZES[1], "sum"), Feature("f2", SIZES[2], "mean")],
        8,
        method,
        seed=2,
        sharing=sharing,
        frequencies=counts,
        **budget,
    )
    one_hot = EmbeddingCollection(
        [Feature(f"f{i}", n) for i, n in enumerate(SIZES)],
        8,
        method,
        seed=2,
        sharing=sharing,
        frequencies=counts,
        **budget,
    )
    ids = torch.stack(
        [torch.randint(0, n, (50,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(SIZES)], dim=1
    )
    rows = torch.arange(51)
    got = bagged(ids[:, :1], {"f1": Bags(ids[:, 1], rows), "f2": Bags(ids[:, 2], rows)})
    torch.testing.assert_close(got, one_hot(ids), rtol=0, atol=0)


def test_bags_pool_by_sum_mean_and_weights_as_a_loop_does():
    collection = EmbeddingCollection(
        [Feature("a", 500, "sum"), Feature("b", 500, "mean"), Feature("c", 10)], 4, "hash", compression=2, seed=0
    )
    values, offsets = torch.tensor([3, 9, 9, 1, 7]), torch.tensor([0, 2, 2, 5])  # rows [3, 9], [], [9, 1, 7]
    weights = torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0])
    out = collection(torch.tensor([[1], [2], [3]]), {"a": Bags(values, offsets, weights), "b": Bags(values, offsets)})
    for name, column, weighted in (("a", 0, True), ("b", 1, False)):
        table = collection.embeddings[name]
        for row in range(3):
            ids = values[offsets[row] : offsets[row + 1]]
            vectors = table(ids)
            if weighted:
                expected = (vectors * weights[offsets[row] : offsets[row + 1], None]).sum(0)
            else:
                expected = vectors.mean(0) if len(ids) else torch.zeros(4)
            torch.testing.assert_close(out[row, column], expected)
    torch.testing.assert_close(out[:, 2], collection.embeddings["c"](torch.tensor([1, 2, 3])))


@pytest.mark.parametrize("method", ["full", "hash", "cafe"])
def test_embedding_bag_style_offsets_make_the_same_bags_in_a_collection_whose_tables_take_either(method):
    features = [Feature("a", 500, "sum"), Feature("c", 10)]
    values, ids = torch.tensor([3, 9, 9, 1, 7]), torch.tensor([[1], [2], [3]])
    bags = Bags(values, torch.tensor([0, 2, 2, 5]))
    assert torch.equal(Bags.from_offsets(values, torch.tensor([0, 2, 2])).offsets, bags.offsets)
    assert torch.equal(Bags.from_offsets(values, bags.offsets, include_last_offset=True).offsets, bags.offsets)
    with pytest.raises(ValueError, match="offsets\\[-1\\] must be len\\(values\\) = 5, got 2"):
        Bags.from_offsets(values, torch.tensor([0, 2, 2]), include_last_offset=True)  # B given, B + 1 declared
    outputs = []
    for last in (False, True):  # tables built either way pool the collection's B + 1 offsets alike
        collection = EmbeddingCollection(
            features, 4, method, compression=None if method == "full" else 2, seed=0, include_last_offset=last
        )
        assert collection.embeddings["a"].include_last_offset == last
        outputs.append(collection(ids, {"a": bags}))
    torch.testing.assert_close(outputs[0], outputs[1])
    assert outputs[0].shape == (3, 2, 4)


def test_bad_bags_say_what_is_wrong():
    collection = EmbeddingCollection([Feature("a", 50), Feature("b", 50, "mean")], 4, "full", seed=0)
    ids = torch.tensor([[1], [2]])
    with pytest.raises(ValueError, match="bags must be given for the multi-hot features"):
        collection(ids)
    with pytest.raises(ValueError, match="batch \\+ 1 = 3 entries"):
        collection(ids, {"b": Bags(torch.tensor([1, 2]), torch.tensor([0, 2]))})
    with pytest.raises(ValueError, match="offsets\\[-1\\] = 1 is not the number of values 2"):
        collection(ids, {"b": Bags(torch.tensor([1, 2]), torch.tensor([0, 1, 1]))})
    with pytest.raises(ValueError, match="per-id weights need sum pooling"):
        collection(ids, {"b": Bags(torch.tensor([1, 2]), torch.tensor([0, 1, 2]), torch.ones(2))})
    with pytest.raises(ValueError, match="id 50 is outside"):
        collection(ids, {"b": Bags(torch.tensor([1, 50]), torch.tensor([0, 1, 2]))})
    with pytest.raises(ValueError, match="pooling must be None or one of"):
        Feature("x", 5, "max")


def test_bag_rows_of_a_slice_and_of_indices_equal_a_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 4, 40)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 100, offsets[-1])
    for rows in (slice(5, 17), np.sort(rng.choice(40, 11, replace=False)), slice(39, 40), np.array([], dtype=int)):
        picked, picked_offsets = bag_rows(values, offsets, rows)
        indices = np.arange(40)[rows]
        expected = [values[offsets[r] : offsets[r + 1]] for r in indices]
        assert picked_offsets.tolist() == np.concatenate([[0], np.cumsum([len(e) for e in expected])]).tolist()
        assert picked.tolist() == (np.concatenate(expected).tolist() if expected else [])


def test_jagged_features_round_trip_through_the_format(tmp_path):
    bags = [{"name": "B1", "cardinality": 30, "pooling": "sum"}]
    with DatasetWriter(tmp_path / "d", {"train": 3}, num_dense=1, cardinalities=[5], bags=bags) as writer:
        writer.write(
            "train",
            np.zeros((2, 1), np.float32),
            np.array([[1], [4]]),
            np.array([0, 1]),
            {"B1": (np.array([7, 8, 29]), np.array([2, 1]))},
        )
        writer.write(
            "train",
            np.zeros((1, 1), np.float32),
            np.array([[0]]),
            np.array([1]),
            {"B1": (np.array([], dtype=np.int64), np.array([0]))},
        )
    manifest, splits = open_dataset(tmp_path / "d")
    assert manifest["bags"] == bags
    values, offsets = splits["train"].bags["B1"]
    assert values.tolist() == [7, 8, 29] and offsets.tolist() == [0, 2, 3, 3]
    assert isinstance(values, np.memmap) and isinstance(offsets, np.memmap)
    with pytest.raises(ValueError, match="an id is outside \\[0, 30\\)"):
        with DatasetWriter(tmp_path / "e", {"train": 1}, num_dense=1, cardinalities=[5], bags=bags) as writer:
            writer.write(
                "train",
                np.zeros((1, 1), np.float32),
                np.array([[1]]),
                np.array([0]),
                {"B1": (np.array([30]), np.array([1]))},
            )
    with pytest.raises(ValueError, match="bags given for \\[\\]"):
        with DatasetWriter(tmp_path / "e", {"train": 1}, num_dense=1, cardinalities=[5], bags=bags) as writer:
            writer.write("train", np.zeros((1, 1), np.float32), np.array([[1]]), np.array([0]))
    # offsets that do not end at the number of values are refused when the set is opened
    np.save(tmp_path / "d" / "train" / "bags" / "B1.offsets.npy", np.array([0, 2, 3, 4]))
    with pytest.raises(DatasetError, match="B1.offsets.npy: offsets run from 0 to 4"):
        open_dataset(tmp_path / "d")


def test_synthetic_bags_are_read_by_the_teacher_and_leave_the_one_hot_rows_alone(tmp_path):
    plain = SyntheticConfig(rows={"train": 3000}, scale=1e-4, seed=4)
    bagged = SyntheticConfig(rows={"train": 3000}, scale=1e-4, seed=4, bag_features=2, bag_size=3, bag_cardinality=700)
    generate_synthetic(tmp_path / "plain", plain, progress=False)
    facts = generate_synthetic(tmp_path / "bagged", bagged, progress=False)
    _, without = open_dataset(tmp_path / "plain")
    manifest, with_bags = open_dataset(tmp_path / "bagged")
    assert [b["name"] for b in manifest["bags"]] == ["B1", "B2"]
    np.testing.assert_array_equal(without["train"].sparse, with_bags["train"].sparse)  # same one-hot draws
    values, offsets = with_bags["train"].bags["B1"]
    lengths = np.diff(offsets)
    assert lengths.min() == 0 and lengths.max() == 3 and values.max() < 700
    # the planted probability moves with the bags: the same rows with other bags get other probabilities
    teacher = Teacher(bagged)
    dense, sparse = teacher.sample_features(np.random.default_rng(1), 500)
    bags = teacher.sample_bags(np.random.default_rng(2), 500)
    other = teacher.sample_bags(np.random.default_rng(3), 500)
    assert (
        np.abs(teacher.probabilities(dense, sparse, bags) - teacher.probabilities(dense, sparse, other)).mean() > 0.01
    )
    assert 0 < facts["bayes"]["train"]["bce"] < 0.6


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_mixed_one_hot_and_multi_hot_dlrm_trains_end_to_end(tmp_path, shuffle):
    # two one-hot features and one bag feature: a third of the planted signal is in the bags
    config = SyntheticConfig(
        rows={"train": 12_000, "val": 3000},
        seed=1,
        bag_features=1,
        bag_size=4,
        bag_cardinality=300,
        cardinalities_override=(40, 20),
        first_order=0.7,
    )
    facts = generate_synthetic(tmp_path / "data", config, progress=False)
    train = TrainConfig(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        method="hash",
        compression=2,
        embedding_dim=8,
        bottom=(32,),
        top=(32,),
        optimizer="adagrad",
        lr=0.05,
        batch_size=512,
        epochs=2,
        shuffle=shuffle,
        eval_every=12,
        seed=0,
    )
    trainer = Trainer(train)
    assert [f.name for f in trainer.model.embeddings.features][-1] == "B1"
    table = trainer.model.embeddings.embeddings["B1"]
    before = table.weight.detach().clone() if hasattr(table, "weight") else None
    result = trainer.fit()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    click_rate = facts["bayes"]["val"]["click_rate"]
    constant = -(click_rate * np.log(click_rate) + (1 - click_rate) * np.log(1 - click_rate))
    assert result["bce"] < constant - 0.08 and result["bce"] <= metrics[0]["bce"]
    # the model reads the bags: the validation rows with their bags emptied score worse
    val = trainer.splits["val"]
    dense = torch.from_numpy(np.array(val.dense, dtype=np.float32))
    sparse = torch.from_numpy(np.array(val.sparse, dtype=np.int64))
    labels = torch.from_numpy(np.array(val.labels, dtype=np.float32))
    values, offsets = (torch.from_numpy(np.array(a, dtype=np.int64)) for a in val.bags["B1"])
    empty = Bags(values[:0], torch.zeros(len(val) + 1, dtype=torch.int64))
    with torch.no_grad():
        losses = [
            torch.nn.functional.binary_cross_entropy_with_logits(trainer.model(dense, sparse, {"B1": b}), labels)
            for b in (Bags(values, offsets), empty)
        ]
    assert float(losses[0]) == pytest.approx(result["bce"], abs=1e-4)  # what the trainer's evaluation measured
    assert float(losses[0]) < float(losses[1]) - 0.01  # measured: 0.431 with the bags, 0.448 without
    if before is not None:  # the bag feature's table learned
        assert not torch.equal(before, table.weight.detach())
    # resumed from a checkpoint, the run goes on with its bags
    again = Trainer(train, resume=True)
    assert again.step == trainer.step


def test_the_cli_makes_and_trains_a_set_with_bag_features_and_export_says_it_cannot_carry_them(tmp_path, capsys):
    from compemb.cli import main

    assert (
        main(
            [
                "synth",
                "--out",
                str(tmp_path / "d"),
                "--train-rows",
                "3000",
                "--eval-rows",
                "1000",
                "--scale",
                "1e-4",
                "--bags",
                "2",
                "--bag-size",
                "3",
            ]
        )
        == 0
    )
    assert "and 2 multi-hot features" in capsys.readouterr().out
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "d"),
                "--out",
                str(tmp_path / "run"),
                "--method",
                "cce",
                "--compression",
                "4",
                "--dim",
                "8",
                "--bottom",
                "16",
                "--top",
                "16",
                "--batch-size",
                "512",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and np.isfinite(result["bce"])
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.compemb")]) == 2
    assert "multi-hot features" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--bags", "-1"], ["--bags", "1", "--bag-size", "0"]])
def test_bad_bag_options_stop_with_one_line(tmp_path, capsys, option):
    from compemb.cli import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--train-rows", "100", "--eval-rows", "10", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compemb: error: bag features need") and err.count("\n") == 1
    assert not (tmp_path / "d").exists()
