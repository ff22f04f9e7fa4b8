"""kill -9 at points through synth, preprocess, export and predict: the output is absent, the old one, or whole,
never half-written; the next run of the command succeeds and leaves none of the killed run's temporaries."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compemb.data.dataset import open_dataset
from compemb.export import load_model

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo-kaggle-sample" / "train.txt"
FRACTIONS = (0.35, 0.6, 0.85)  # of the command's uninterrupted wall time (its start-up included)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "compemb", *args]


def _timed(args: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(args, check=True, capture_output=True)
    return time.monotonic() - started


def _killed_at(args: list[str], after_s: float) -> int:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=after_s)  # it may finish first
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
    return process.wait()


def _leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def test_synth_killed_anywhere_leaves_the_old_set_or_the_new_one_whole(tmp_path):
    out = tmp_path / "set"
    first = _command("synth", "--out", str(out), "--train-rows", "150000", "--eval-rows", "1000", "--seed", "1")
    duration = _timed(first)
    old = open_dataset(out)[0]
    again = _command(
        "synth", "--out", str(out), "--train-rows", "100000", "--eval-rows", "1000", "--seed", "2", "--overwrite"
    )
    for fraction in FRACTIONS:
        _killed_at(again, fraction * duration)
        manifest = open_dataset(out)[0]  # always a whole set: the old one or the new one
        assert manifest["rows"]["train"] in (old["rows"]["train"], 100_000)
        subprocess.run(again, check=True, capture_output=True)
        assert open_dataset(out)[0]["rows"]["train"] == 100_000
        assert _leftovers(tmp_path) == []  # the killed run's .partial removed by the next writer
        subprocess.run(first[:-1] + ["1", "--overwrite"], check=True, capture_output=True)  # the old set back


@pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared Criteo sample is not at {SAMPLE}")
def test_preprocess_export_and_predict_killed_anywhere_leave_nothing_half_written(tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(SAMPLE.read_bytes() * 12)
    data, run = tmp_path / "data", tmp_path / "run"
    preprocess = _command("preprocess", "criteo", str(big), "--out", str(data))
    duration = _timed(preprocess)
    for fraction in FRACTIONS:
        _killed_at(preprocess + ["--overwrite"], fraction * duration)
        assert open_dataset(data)[0]["rows"]  # the set before, whole
        assert _leftovers(tmp_path) == [] or _leftovers(tmp_path)[0].startswith(".data.")
    subprocess.run(preprocess + ["--overwrite"], check=True, capture_output=True)
    assert _leftovers(tmp_path) == []
    subprocess.run(
        _command(
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--method",
            "hash",
            "--compression",
            "10",
            "--dim",
            "8",
            "--bottom",
            "16",
            "--top",
            "16",
            "--quiet",
        ),
        check=True,
        capture_output=True,
    )
    model = tmp_path / "m.compemb"
    export = _command("export", "--run", str(run), "--out", str(model))
    duration = _timed(export)
    reference = model.read_bytes()
    model.unlink()
    for fraction in FRACTIONS:
        _killed_at(export, fraction * duration)
        assert not model.exists() or model.read_bytes() == reference  # absent or whole
    subprocess.run(export, check=True, capture_output=True)
    assert model.read_bytes() == reference and _leftovers(tmp_path) == []
    scores = tmp_path / "scores.txt"
    predict = _command("predict", "--model", str(model), "--input", str(big), "--out", str(scores), "--overwrite")
    duration = _timed(predict)
    lines = len(big.read_bytes().splitlines())
    for fraction in FRACTIONS:
        _killed_at(predict, fraction * duration)
        assert len(scores.read_text().splitlines()) == lines  # the earlier scores, whole
    subprocess.run(predict, check=True, capture_output=True)
    assert len(scores.read_text().splitlines()) == lines and _leftovers(tmp_path) == []
    load_model(model)
