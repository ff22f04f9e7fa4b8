"""The device code path waits for nothing: every method's training step, run on CPU with kernels="torch", asks the
host for no value a CUDA device would have to hand back (compemb.bench.syncs), and device-side asserts never
carry a message CUDA refuses."""

import pytest
import torch

from compemb import METHODS
from compemb.bench.syncs import SyncCounter, count_step_syncs, format_syncs
from compemb.checks import MAX_DEVICE_MESSAGE, device_assert_message
from compemb.collection import Bags, EmbeddingCollection, Feature
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.kernels import device_path, use_kernels
from compemb.train import TrainConfig

NO_WAIT = [
    "full",
    "hash",
    "qr",
    "ce",
    "bloom",
    "robe",
    "hashednets",
    "hemb",
    "tt",
    "lowrank",
    "mde",
    "dhe",
    "hash-fields",
]
# the issue allows these one wait per step outside clustering steps; they take none
ADAPTIVE = ["cce", "cce-paper", "cce-hybrid", "cafe", "cafe-ml", "offline", "adaembed"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syncs") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 6144, "val": 512}, scale=1e-4, seed=4), progress=False)
    return str(out)


# TorchRec's own module, not held to compemb's rule: its remap indexes with boolean masks and its eviction counts
# ids with unique (host waits on a device)
THIRD_PARTY = ["mch"]


def test_every_method_is_listed():
    assert sorted(NO_WAIT + ADAPTIVE + THIRD_PARTY) == sorted(METHODS)


def _config(data, method, sharing):
    compresses = METHODS[method].compresses
    return TrainConfig(
        data=data,
        out="unused",
        method=method,
        compression=4 if compresses else None,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        optimizer="adam",
        lr=0.01,
        batch_size=256,
        sharing=sharing,
        method_options={"cluster_every": 4} if method.startswith("cce") else {},
    )


@pytest.mark.parametrize("sharing", ["per_feature", "shared"])
@pytest.mark.parametrize("method", NO_WAIT + ADAPTIVE)
def test_a_training_step_waits_for_the_host_no_more_than_its_method_must(data, method, sharing):
    result = count_step_syncs(_config(data, method, sharing), warmup=2, steps=9)
    # a shared MDE table reads back how many ids each feature's block holds: its blocks' tables differ in width
    allowed = 1 if method == "mde" and sharing == "shared" else 0
    assert result["steps"] >= 5, result  # clustering steps are left out, the others counted
    assert result["most"] <= allowed, format_syncs([result])
    if method.startswith("cce"):
        assert result["excluded"] >= 1  # it clustered (every 4 steps) and the steps after read the new pointers


def test_the_counter_sees_each_kind_of_wait():
    x = torch.arange(10)
    expected = {
        "item": lambda: int(x.max()),
        "nonzero": lambda: (x > 3).nonzero(),
        "unique": lambda: torch.unique(x),
        "bincount": lambda: torch.bincount(x),
        "masked_select": lambda: torch.masked_select(x, x > 3),
        "boolean mask index": lambda: x[x > 3],
        "repeat_interleave": lambda: torch.repeat_interleave(x, x),
        "equal": lambda: torch.equal(x, x),
        "tensor from host data": lambda: torch.tensor([1, 2]),
        "tolist": lambda: x.tolist(),
        "numpy": lambda: x.numpy(),
    }
    for kind, run in expected.items():
        with SyncCounter() as counter:
            run()
        assert counter.kinds[kind] >= 1, (kind, dict(counter.kinds))
    quiet = [
        lambda: torch.repeat_interleave(x, x, output_size=45),
        lambda: x.sort(),
        lambda: x[x.clamp(0, 3)],
        lambda: torch.where(x > 3, x, 0).sum(),
        lambda: torch.searchsorted(x, x),
    ]
    for run in quiet:
        with SyncCounter() as counter:
            run()
        assert counter.total == 0, dict(counter.places)


def test_kernels_choose_the_device_path_only_when_asked_or_off_the_cpu():
    x = torch.zeros(2)
    assert not device_path(x)
    with use_kernels("torch"):
        assert device_path(x)
    assert not device_path(x)
    with pytest.raises(ValueError, match="kernels must be one of"):
        with use_kernels("numba"):
            pass


def test_device_assert_messages_fit_cudas_limit_whatever_the_features(monkeypatch):
    """CUDA refuses a device-side assert message of 255 characters or more: 26 tables' names made every run crash."""
    messages = []

    def record(condition, message):
        messages.append(message)
        assert len(message) <= MAX_DEVICE_MESSAGE

    monkeypatch.setattr(torch, "_assert_async", record)
    long_name = "feature_with_a_rather_long_descriptive_name_"
    for count in (1, 26, 300):
        features = [Feature(f"{long_name}{i}", 400) for i in range(count)]
        ids = torch.zeros(4, count, dtype=torch.int64)
        with use_kernels("torch"):  # qr: a closed vocabulary, checked per table, per table batch, per shared table
            for sharing in ("per_feature", "shared"):
                EmbeddingCollection(features, 4, "qr", compression=2, sharing=sharing)(ids)
            name = long_name + "x" * 300
            bags = Bags(torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3]))
            for sharing in ("per_feature", "shared"):
                collection = EmbeddingCollection([Feature(name, 400, "sum")], 4, "qr", compression=2, sharing=sharing)
                collection.pool(name, bags)
    assert len(messages) >= 6 and max(map(len, messages)) <= MAX_DEVICE_MESSAGE
    assert any(message.endswith("...") for message in messages)  # the long ones were cut, not dropped
    assert device_assert_message("short") == "short"
    cut = device_assert_message("x" * 1000)
    assert len(cut) == MAX_DEVICE_MESSAGE and cut.endswith("...")


@pytest.mark.parametrize("method", ["qr", "hash", "robe", "hemb", "cafe", "dhe"])
def test_a_bad_id_still_fails_on_the_device_path(method):
    collection = EmbeddingCollection([Feature("a", 3000), Feature("b", 3000)], 4, method, compression=2)
    with use_kernels("torch"), pytest.raises(RuntimeError, match="outside its range"):
        collection(torch.tensor([[1, 3000]]))
    with use_kernels("torch"), pytest.raises(RuntimeError, match="outside its range"):
        EmbeddingCollection([Feature("a", 10)], 4, "hash", compression=2, sharing="shared")(torch.tensor([[-1]]))


def test_the_gpu_benchmark_script_runs_its_device_path_on_cpu(data, tmp_path):
    """benchmarks/gpu.py with --device cpu (kernels='torch'): every row and the sketch line are written."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "gpu"
    assert (
        module.main(
            [
                "--data",
                data,
                "--device",
                "cpu",
                "--methods",
                "hash,qr",
                "--batch-size",
                "256",
                "--compression",
                "4",
                "--warmup",
                "2",
                "--steps",
                "3",
                "--sync-steps",
                "2",
                "--quick",
                "--graph-methods",
                "",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    result = json.loads(output.with_suffix(".json").read_text())
    assert [row["method"] for row in result["rows"]] == ["plain loop", "full", "hash", "qr"]
    assert all(row["samples_per_s"] > 0 for row in result["rows"])
    assert all(row["syncs_per_step"] == 0 for row in result["rows"][1:])
    assert set(result["sketch"]) == {"insert", "insert (frequency)", "query"}
    assert "| hash |" in output.with_suffix(".md").read_text()


def test_the_gpu_script_runs_end_to_end_on_cpu_and_writes_every_row(tmp_path):
    """benchmarks/gpu.sh, the one script a lent device runs, at quick sizes on CPU: every method has a row (a
    method that cannot build says why in it), the large-vocabulary rows and the lookup part are written, and the
    targets are printed with their values."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from compemb import METHODS

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    graphs = ["full +graph", "hash +graph", "cafe +graph", "cce-paper +graph"]
    assert [row["method"] for row in result["rows"]] == [
        "plain loop",
        "full",
        "hash",
        *[m for m in METHODS if m not in ("full", "hash")],
        *graphs,
    ]
    for row in result["rows"]:
        assert row["samples_per_s"] > 0 or row["error"], row
    for row in result["rows"][-len(graphs) :]:  # CUDA graphs: refused on CPU, in their rows
        assert "needs a CUDA device" in row["error"], row
    assert [row["method"] for row in result["vocab_rows"]] == ["full", "hash", "cafe", "cce", "cce-hybrid"]
    assert "BudgetError" in next(r for r in result["vocab_rows"] if r["method"] == "cce")["error"]
    clustered = next(r for r in result["rows"] if r["method"] == "cce-paper")
    assert clustered["event_s"] > 0  # one clustering timed apart from the steps
    text = (tmp_path / "gpu.md").read_text()
    assert "full ÷ plain loop:" in text and "slowest adaptive method ÷ hash:" in text
    assert json.loads((tmp_path / "gpu_lookup.json").read_text())
