"""A method per feature: the spec, the collection's budget rule, training from the CLI, and the TorchRec adapter."""

import json
import re

import pytest
import torch

from compemb.budget import BudgetError, full_table_bytes
from compemb.cli import main
from compemb.collection import EmbeddingCollection, Feature
from compemb.feature_methods import assign_methods, format_feature_methods, is_per_feature, parse_feature_methods

FEATURES = [
    Feature("C1", 100),
    Feature("C2", 5_000),
    Feature("C3", 200_000),
    Feature("C4", 50_000),
    Feature("C5", 80_000),
]
FULL = {f.name: full_table_bytes(f.num_embeddings, 16) for f in FEATURES}


def test_a_spec_reads_as_a_mapping_and_back():
    spec = "C1,C2=full;C3=cce-hybrid:cluster_every=50;*=hash"
    mapping = parse_feature_methods(spec)
    assert mapping == {"C1": "full", "C2": "full", "C3": "cce-hybrid:cluster_every=50", "*": "hash"}
    assert parse_feature_methods(format_feature_methods(mapping)) == mapping
    assert is_per_feature(spec) and is_per_feature({"C1": "full"}) and not is_per_feature("cce:cluster_every=5")
    assert assign_methods(spec, ["C1", "C2", "C3", "C9"]) == {
        "C1": ("full", {}),
        "C2": ("full", {}),
        "C3": ("cce-hybrid", {"cluster_every": 50}),
        "C9": ("hash", {}),
    }
    assert assign_methods("hash", ["C1", "C2"]) == {"C1": ("hash", {}), "C2": ("hash", {})}


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("C1=full;C1=hash", "feature 'C1' is given two methods"),
        ("C1;*=hash", "method part 'C1' of 'C1;*=hash' is not FEATURES=METHOD"),
        ("C1=hsh;*=hash", "unknown method 'hsh'; did you mean 'hash'?"),
        ("C1=cce:nope=1;*=hash", "cce has no option 'nope'"),
        ("C9=full;*=hash", "the methods name 'C9', not a feature here"),
        ("C1=full", "no method for 'C2', 'C3', 'C4', 'C5'"),
    ],
)
def test_a_bad_spec_is_refused_naming_what_is_wrong(spec, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        EmbeddingCollection(FEATURES, 16, spec, compression=10)


def test_full_features_take_their_size_first_and_the_rest_share_in_proportion():
    spec = "C1,C2=full;C3=cce-hybrid;*=hash"
    collection = EmbeddingCollection(FEATURES, 16, spec, compression=10)
    memory = collection.memory()
    kinds = {name: type(table).__name__ for name, table in collection.embeddings.items()}
    assert kinds == {
        "C1": "FullEmbedding",
        "C2": "FullEmbedding",
        "C3": "HybridCCEmbedding",
        "C4": "HashingTrickEmbedding",
        "C5": "HashingTrickEmbedding",
    }
    assert collection.methods == {"C1": "full", "C2": "full", "C3": "cce-hybrid", "C4": "hash", "C5": "hash"}
    budget = sum(FULL.values()) / 10
    assert memory.total == pytest.approx(budget, rel=0.01)  # one budget for every table, honest bytes
    assert memory.total == sum(report.total for report in memory.per_feature.values())
    assert memory.per_feature["C2"].total == FULL["C2"]  # kept whole
    # what the full ones leave, split by the compressed features' full sizes: each near the same ratio
    left = budget - FULL["C1"] - FULL["C2"]
    for name in ("C3", "C4", "C5"):
        share = left * FULL[name] / (FULL["C3"] + FULL["C4"] + FULL["C5"])
        assert memory.per_feature[name].total == pytest.approx(share, rel=0.02)


def test_one_method_everywhere_builds_what_it_built_before():
    spec = EmbeddingCollection(FEATURES, 16, "*=qr", compression=10, seed=3)
    plain = EmbeddingCollection(FEATURES, 16, "qr", compression=10, seed=3)
    assert spec.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(spec.state_dict().values(), plain.state_dict().values()))


def test_full_features_over_the_budget_and_shared_tables_are_refused():
    with pytest.raises(
        BudgetError,
        match=r"the features kept full \('C3'\) store 12,800,000 bytes: more than the "
        r"budget",
    ):
        EmbeddingCollection(FEATURES, 16, "C3=full;*=hash", compression=100)
    with pytest.raises(ValueError, match="a method per feature needs sharing='per_feature'"):
        EmbeddingCollection(FEATURES, 16, "C3=full;*=hash", compression=10, sharing="shared")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("per_feature") / "synth"
    assert main(["synth", "--out", str(out), "--train-rows", "4096", "--eval-rows", "512", "--scale", "1e-3"]) == 0
    return str(out)


def test_train_resume_export_and_methods_take_a_method_per_feature(data, tmp_path, capsys):
    from compemb.export import export_run, load_model

    run = tmp_path / "run"
    spec = "C1,C2=full;C3=cce-hybrid;*=hash"
    common = ["--dim", "8", "--bottom", "8", "--top", "8", "--batch-size", "512", "--quiet", "--json"]
    capsys.readouterr()
    assert main(["train", "--data", data, "--out", str(run), "--method", spec, "--compression", "10", *common]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["method"] == spec and trained["ratio"] == pytest.approx(10, rel=0.01)
    assert main(["train", "--out", str(run), "--resume", "--override", "epochs=2", *common]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 16
    export_run(run, tmp_path / "model.compemb")
    served = load_model(tmp_path / "model.compemb")
    assert type(served.model.embeddings.embeddings["C3"]).__name__ == "HybridCCEmbedding"
    assert main(["methods", "--data", data, "--method", spec, "--compression", "10", "--dim", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{spec} over {data} at dim 8, per_feature: tables ") and "10.0x smaller" in lines[0]
    rows = {line.split()[0]: line for line in lines[4:]}
    assert len(rows) == 26 and " cce-hybrid " in rows["C3"] and " full " in rows["C1"]
    assert all(
        " hash " in rows[name] or " full (kept; hash asked) " in rows[name]
        for name in rows
        if name not in ("C1", "C2", "C3")
    )
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--out",
                str(tmp_path / "x"),
                "--method",
                spec,
                "--compression",
                "10",
                "--sharing",
                "shared",
            ]
        )
        == 2
    )
    assert "a method per feature needs sharing 'per_feature'" in capsys.readouterr().err


def test_the_torchrec_adapter_takes_a_method_per_table():
    pytest.importorskip("torchrec")
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from compemb.integrations.torchrec import CompressedEmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=100, feature_names=["u"]),
        EmbeddingBagConfig(name="item", embedding_dim=8, num_embeddings=50_000, feature_names=["i"]),
        EmbeddingBagConfig(name="page", embedding_dim=4, num_embeddings=20_000, feature_names=["p"]),
    ]
    adapter = CompressedEmbeddingBagCollection(tables, method={"user": "full", "*": "hash"}, compression=10)
    kinds = {name: type(table).__name__ for name, table in adapter.embedding_bags.items()}
    assert kinds == {"user": "FullEmbedding", "item": "HashingTrickEmbedding", "page": "HashingTrickEmbedding"}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["u", "i", "p"], torch.tensor([1, 2, 3, 4, 5]), torch.tensor([1, 1, 2, 0, 1, 0])
    )
    assert adapter(kjt).values().shape == (2, 8 + 8 + 4)
    with pytest.raises(ValueError, match="the methods name 'usr', not a table here"):
        CompressedEmbeddingBagCollection(tables, method={"usr": "full", "*": "hash"}, compression=10)
