"""Every reader of a checkpoint (eval, resume, export) verifies it the same way: its SHA-256, the step of its two
files, the json's fields and config, and tensors that fit the model; anything else is one line, and export never
turns a damaged checkpoint into a signed model file."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compemb.cli import main
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.export import load_model
from compemb.train import CheckpointError, read_checkpoint
from tests.cli_errors import one_line_error as _one_line_error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    generate_synthetic(
        root / "synth",
        SyntheticConfig(rows={"train": 2048, "val": 512, "test": 512}, scale=1e-4, seed=3),
        progress=False,
    )
    args = [
        "train",
        "--data",
        str(root / "synth"),
        "--out",
        str(root / "run"),
        "--method",
        "hash",
        "--compression",
        "4",
        "--dim",
        "8",
        "--bottom",
        "16",
        "--top",
        "16",
        "--batch-size",
        "256",
        "--evals-per-epoch",
        "2",
        "--epochs",
        "2",
        "--checkpoint-minutes",
        "0",
        "--quiet",
    ]
    assert main(args) == 0
    return root / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _edit_json(stem: Path, edit) -> None:
    meta = json.loads(Path(f"{stem}.json").read_text())
    edit(meta)
    Path(f"{stem}.json").write_text(json.dumps(meta))


def _flip_a_weight(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x7F  # inside the tensor data: it still decodes (to a wild value)
    path.write_bytes(bytes(data))


def test_export_refuses_a_flipped_checkpoint_and_writes_nothing(run, tmp_path, capsys):
    _flip_a_weight(run / "checkpoints" / "best.safetensors")
    line = _one_line_error(capsys, main(["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")]))
    assert "best.safetensors" in line and "SHA-256" in line
    assert not (tmp_path / "m.compemb").exists()
    line = _one_line_error(capsys, main(["eval", "--run", str(run)]))  # as eval already did
    assert "SHA-256" in line


def test_export_refuses_a_pair_of_two_steps_even_when_the_checksum_is_made_to_match(run, tmp_path, capsys):
    directory = run / "checkpoints"
    best_step = json.loads((directory / "best.json").read_text())["step"]
    other_step = json.loads((directory / "previous.json").read_text())["step"]
    assert best_step != other_step
    shutil.copy(directory / "previous.safetensors", directory / "best.safetensors")  # tensors of another step
    line = _one_line_error(capsys, main(["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")]))
    assert "SHA-256" in line
    digest = hashlib.sha256((directory / "best.safetensors").read_bytes()).hexdigest()
    _edit_json(directory / "best", lambda meta: meta.update(sha256=digest))  # re-signed by hand
    line = _one_line_error(capsys, main(["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")]))
    assert f"tensors are of step {other_step} and its json of step {best_step}" in line
    assert not (tmp_path / "m.compemb").exists()


def test_a_header_corrupted_checkpoint_is_one_line_for_export(run, tmp_path, capsys):
    path = run / "checkpoints" / "best.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"{garbage"
    path.write_bytes(bytes(data))
    line = _one_line_error(capsys, main(["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")]))
    assert "best.safetensors is damaged" in line


@pytest.mark.parametrize("command", ["eval", "export", "resume"])
def test_a_checkpoint_without_its_checksum_is_refused_unless_trusted(run, tmp_path, capsys, command):
    for stem in ("best", "last"):
        _flip_a_weight(run / "checkpoints" / f"{stem}.safetensors")
        _edit_json(run / "checkpoints" / stem, lambda meta: meta.pop("sha256"))  # verification switched off?
    args = {
        "eval": ["eval", "--run", str(run)],
        "export": ["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")],
        "resume": ["train", "--out", str(run), "--resume", "--quiet", "--override", "epochs=3"],
    }[command]
    line = _one_line_error(capsys, main(args))
    assert "records no SHA-256" in line and "--trust-unverified" in line
    assert main([*args, "--trust-unverified"]) == 0  # the user's word: taken as it is
    if command == "export":
        assert (
            load_model(tmp_path / "m.compemb").header["step"]
            == json.loads((run / "checkpoints" / "best.json").read_text())["step"]
        )


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda meta: meta.update(shards=4), "fields this compemb does not know (shards): written by a newer compemb"),
        (
            lambda meta: meta["config"].update(quantum_tables=True),
            "settings this compemb does not know (quantum_tables): written by a newer compemb",
        ),
        (lambda meta: meta.pop("config"), "'config' is missing, not dict"),
        (lambda meta: meta.update(config=[1, 2]), "'config' is a list, not dict"),
        (lambda meta: meta.update(step="12"), "'step' is a str, not int"),
        (lambda meta: meta.update(step=True), "'step' is a bool, not int"),
        (lambda meta: meta.update(step=-3), "step -3 is negative"),
        (lambda meta: meta["config"].update(lr=-1), "invalid config: lr must be a positive number"),
        (lambda meta: meta["config"].update(bottom="x"), "invalid config"),
        (lambda meta: meta["config"].update(embedding_dim=16), "tensors do not fit the model its config describes"),
        (
            lambda meta: meta["config"].update(method="full", compression=None),
            "tensors do not fit the model its config describes",
        ),
    ],
)
@pytest.mark.parametrize("command", ["eval", "export"])
def test_an_edited_checkpoint_json_is_one_line_naming_what_is_wrong(run, tmp_path, capsys, edit, expected, command):
    _edit_json(run / "checkpoints" / "best", edit)
    args = {
        "eval": ["eval", "--run", str(run)],
        "export": ["export", "--run", str(run), "--out", str(tmp_path / "m.compemb")],
    }[command]
    line = _one_line_error(capsys, main(args))
    assert expected in line and "best" in line


@pytest.mark.parametrize("text", ["[1, 2]", "{", "[" * 100_000])
def test_a_checkpoint_json_that_is_not_an_object_is_one_line(run, tmp_path, capsys, text):
    (run / "checkpoints" / "best.json").write_text(text)
    line = _one_line_error(capsys, main(["eval", "--run", str(run)]))
    assert "best.json is damaged" in line


def test_read_checkpoint_returns_the_verified_tensors_and_json(run):
    tensors, meta = read_checkpoint(run / "checkpoints" / "last")
    assert meta["step"] == 16 and any(name.startswith("model.") for name in tensors)
    _flip_a_weight(run / "checkpoints" / "last.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_checkpoint(run / "checkpoints" / "last")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="this platform has no FIFOs")
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_fifo_in_place_of_a_checkpoint_is_refused_without_blocking(run, command):
    """Opening a FIFO blocks until a writer comes: a reader that opened it would hang (the subprocess's timeout
    is the hang detector, not a speed limit)."""
    stem = "best" if command == "eval" else "last"
    (run / "checkpoints" / f"{stem}.safetensors").unlink()
    os.mkfifo(run / "checkpoints" / f"{stem}.safetensors")
    args = {
        "eval": ["eval", "--run", str(run)],
        "resume": ["train", "--out", str(run), "--resume", "--quiet", "--override", "epochs=3"],
    }[command]
    done = subprocess.run([sys.executable, "-m", "compemb", *args], capture_output=True, text=True, timeout=300)
    if command == "eval":
        assert done.returncode == 2 and "best.safetensors is damaged (not a regular file)" in done.stderr
    else:  # the newest complete checkpoint is previous: resumed from it, the FIFO left alone
        assert done.returncode == 0, done.stderr
        assert (run / "checkpoints" / "last.safetensors").is_file()
