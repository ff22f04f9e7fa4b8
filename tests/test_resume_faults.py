"""A resume after a kill at an evaluation records each step once, and a damaged metrics.jsonl is named, not a
traceback."""

import json

import pytest

from compemb.cli import main
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import KILL_WHILE_WRITING, CheckpointError, TrainConfig, Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 2048, "val": 512}, scale=1e-4, seed=3), progress=False)
    return out


def _config(data, out):
    return TrainConfig(
        data=str(data),
        out=str(out),
        method="hash",
        compression=4,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        batch_size=128,
        optimizer="adam",
        lr=0.02,
        epochs=2,
        eval_every=10,
        checkpoint_every=3,
        checkpoint_minutes=0,
    )


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_kill_between_an_evaluations_record_and_its_checkpoint_leaves_no_duplicate_step(data, tmp_path):
    import os
    import subprocess
    import sys
    from dataclasses import asdict

    Trainer(_config(data, tmp_path / "a")).fit()
    code = (
        "import json, sys; from compemb.train import TrainConfig, Trainer; "
        "Trainer(TrainConfig(**json.loads(sys.argv[1]))).fit()"
    )
    config = _config(data, tmp_path / "b")
    process = subprocess.run(
        [sys.executable, "-c", code, json.dumps(asdict(config))],
        env={**os.environ, KILL_WHILE_WRITING: "10"},
        capture_output=True,
    )
    assert process.returncode == -9  # killed writing step 10's checkpoint: its evaluation already recorded
    assert _steps(tmp_path / "b") == [10]
    resumed = Trainer(config, resume=True)
    assert resumed.step == 9 and not (tmp_path / "b" / "metrics.jsonl").read_text()  # step 10 is redone
    resumed.fit()
    assert _steps(tmp_path / "b") == _steps(tmp_path / "a") == [10, 20, 30, 32]
    straight = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["bce"] for r in again] == pytest.approx([r["bce"] for r in straight], abs=1e-6)


def test_a_record_cut_by_a_kill_is_dropped_and_an_edited_line_is_named(data, tmp_path, capsys):
    run = tmp_path / "r"
    Trainer(_config(data, run)).fit(stop_at=22)  # last checkpoint at step 21; records 10 and 20
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 30, "bc')  # the append a kill cut
    Trainer(_config(data, run), resume=True).fit()
    assert _steps(run) == [10, 20, 30, 32]
    metrics.write_text(metrics.read_text() + "[1, 2]\n")
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=r"metrics.jsonl:5: not an evaluation record"):
        Trainer(_config(data, run), resume=True)
    assert main(["plot", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:5: not an evaluation record" in err[0]
