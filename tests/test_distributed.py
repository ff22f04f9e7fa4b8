"""Training on two processes (torchrun, gloo): the ranks agree exactly after every step, and the run ends where one
process training the same global batches ends."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compemb import distributed
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import Trainer
from tests.distributed_worker import config

WORKER = Path(__file__).parent / "distributed_worker.py"
METHODS = ["hash", "cafe", "cafe-ml", "cce", "cce-hybrid", "cce-hybrid:importance=gradient", "offline"]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 4000, "val": 1000}, scale=1e-4, seed=7), progress=False)
    return str(out)  # 4,000 rows in batches of 256: the last batch (160 rows) splits 80 / 80


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    done = torchrun(str(WORKER), data, str(out), *METHODS)
    assert done.returncode == 0, done.stderr[-3000:]  # the worker fails if the ranks differ after any step
    return out


def slots_in_key_order(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each HotSketch bucket's slots sorted by (empty last, id): what a bucket means, without where its ids sit.

    Why slot order is not compared: two processes compute each sample's gradient in batches of another shape, so
    gradient scores differ from one process's in their last bits (weights agree to ~1e-6). When two slots of a bucket
    hold scores within that rounding and a new id takes over the lowest, either may be taken; Space-Saving then gives
    the same ids the same scores (within rounding) in swapped slots (seen: ``[560, 519, 510, 807]`` vs
    ``[560, 510, 519, 807]``, scores equal to 1e-7). Lookups and promotions read an id's slot by key, never by place.
    What a bucket holds (ids, hot rows, occupancy) is still compared exactly, and its scores to the float tolerance.
    """
    out = dict(state)
    for name in [key for key in state if key.endswith("sketch.keys")]:
        prefix = name.removesuffix("keys")
        keys, occupied = state[name], state[prefix + "occupied"]
        # empty slots' keys are meaningless: rank them after every occupied slot, in place order
        rank = torch.where(occupied, keys, torch.iinfo(torch.int64).max)
        order = torch.sort(rank, dim=1, stable=True).indices
        for field in ("keys", "scores", "hot_rows", "occupied"):
            out[prefix + field] = torch.gather(state[prefix + field], 1, order)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_end_where_one_process_ends(data, two_ranks, tmp_path, method):
    one = Trainer(config(data, str(tmp_path / "one"), method))
    one.fit()
    single = slots_in_key_order(load_file(tmp_path / "one" / "checkpoints" / "last.safetensors"))
    both = slots_in_key_order(load_file(two_ranks / method / "checkpoints" / "last.safetensors"))
    assert single.keys() == both.keys()
    compared = 0
    for key, value in single.items():
        if not key.startswith("model."):
            continue
        other = both[key]
        if value.is_floating_point():
            torch.testing.assert_close(other, value, rtol=1e-5, atol=1e-5, msg=key)
        else:  # sketch keys, hot rows, owners, pointers, holders: exactly
            assert torch.equal(other, value), key
        compared += 1
    assert compared > 0
    if method.startswith("cafe"):  # the sketch did something: some ids own hot rows
        assert any(bool(v.any()) for k, v in single.items() if k.endswith(".owned"))
    if method.startswith("cce"):
        assert any(int(v[1]) >= 2 for k, v in single.items() if k.endswith(".cluster_state"))  # clustered twice+
    metrics = [json.loads(line) for line in (two_ranks / method / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bce"] == pytest.approx(one.best["bce"], abs=1e-6)  # sharded evaluation, all logits


def test_compemb_train_nproc_launches_torchrun_and_resumes(data, tmp_path):
    command = [
        sys.executable,
        "-m",
        "compemb",
        "train",
        "--data",
        data,
        "--out",
        str(tmp_path / "run"),
        "--method",
        "cafe",
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
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--nproc",
        "2",
        "--json",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # printed once, by rank 0
    assert result["step"] == 8 and np.isfinite(result["bce"])
    # the progress line's loss is over both ranks, as the summary's train loss is
    last_line = [line for line in done.stderr.splitlines() if line.startswith("train cafe: step 8/8")]
    assert len(last_line) == 1 and f"loss {result['train_loss']:.4f}," in last_line[0]
    again = subprocess.run([*command, "--resume", "--override", "epochs=2"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["step"] == 16  # every rank resumed from rank 0's checkpoint of step 8


def test_shard_splits_rows_contiguously_in_rank_order(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    parts = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        parts.append(distributed.shard(10, 21))
    assert parts == [(10, 13), (13, 17), (17, 21)]


def test_one_process_collectives_are_the_identity():
    ids, scores = torch.tensor([3, 1]), torch.tensor([0.5, 2.0])
    assert distributed.gather_scored(ids, scores) == (ids, scores)
    assert distributed.gather_rows(ids) is ids and distributed.shard(0, 7) == (0, 7)


@pytest.mark.parametrize("threshold", [1 << 23, 0], ids=["one-dense-all-reduce", "sparse-all-reduce"])
def test_average_gradients_keeps_sparse_rows_touched_on_any_rank(tmp_path, threshold):
    import socket

    import torch.multiprocessing

    from tests.distributed_worker import average_gradients_worker

    with socket.socket() as probe:  # a free port for the two ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    torch.multiprocessing.spawn(
        average_gradients_worker, args=(2, address, threshold, str(tmp_path / "g.pt")), nprocs=2
    )
    got = torch.load(tmp_path / "g.pt")
    assert got["rows"].tolist() == [0, 2, 5]  # the union, row 5 kept though its gradient is zero
    # rank 0: row 0 += 1, row 2 += 2; rank 1: row 2 += 4; the mean over 2 ranks
    torch.testing.assert_close(got["values"], torch.tensor([[0.5] * 3, [3.0] * 3, [0.0] * 3]))
    torch.testing.assert_close(got["vector"], torch.full((4,), 1.5))


def test_the_distributed_guides_commands_train_on_two_processes_as_written(tmp_path):
    from tests.pages import DOCS, bash_blocks

    commands = bash_blocks(DOCS / "guides" / "distributed.md")[0]
    assert "--nproc 2" in commands
    env = {
        **__import__("os").environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs/two/cafe/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 2 * 20  # 20,000 rows in batches of 1,024 (the last one partial), two epochs
    assert metrics[-1]["bce"] < metrics[0]["bce"]
