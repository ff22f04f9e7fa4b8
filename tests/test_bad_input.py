"""What a user gets for each mistake: one line ``compemb: error: ...`` and exit 2, never a traceback; and resumes
that are strict about what they resume."""

import json
import re

import numpy as np
import pytest
import torch

from compemb.cli import main
from compemb.data.dataset import DatasetError, open_dataset
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.train import CheckpointError, TrainConfig, Trainer
from tests.cli_errors import one_line_error as _one_line_error


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "synth"
    generate_synthetic(out, SyntheticConfig(rows={"train": 2048, "val": 512}, scale=1e-4, seed=3), progress=False)
    return out


def _train_args(data, out, *extra):
    return [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
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
        "--optimizer",
        "adagrad",
        "--lr",
        "0.05",
        "--eval-every",
        "4",
        "--checkpoint-minutes",
        "0",
        *extra,
    ]


@pytest.mark.parametrize(
    "flag, value, name",
    [
        ("--batch-size", "0", "batch_size"),
        ("--epochs", "0", "epochs"),
        ("--lr", "-1", "lr"),
        ("--dim", "0", "embedding_dim"),
        ("--bottom", "16,0", "widths"),
        ("--compression", "0", "compression"),
        ("--compression", "0.5", "compression"),
        ("--compression", "1e-300", "compression"),
    ],
)
def test_bad_values_are_one_line_naming_the_setting(data, tmp_path, capsys, flag, value, name):
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", flag, value)))
    assert name in line
    with pytest.raises(ValueError, match=name):  # the library raises the same, from the config itself
        TrainConfig(
            data=str(data),
            out="",
            **(
                {"bottom": (16, 0)}
                if name == "widths"
                else {name: float(value) if name in ("lr", "compression") else int(value)}
            ),
        )


def test_missing_paths_and_runs_that_are_not_runs_are_one_line(tmp_path, capsys):
    assert "no manifest.json" in _one_line_error(capsys, main(_train_args(tmp_path / "nowhere", tmp_path / "r")))
    line = _one_line_error(capsys, main(["eval", "--run", str(tmp_path / "nowhere")]))
    assert "is not a compemb run" in line


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start(data, tmp_path, capsys):
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--resume")))
    assert "no checkpoint to resume from" in line and "--resume-or-start" in line
    assert main(_train_args(data, tmp_path / "r", "--resume-or-start")) == 0
    assert "starting fresh" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())["step"] == 8


def test_resume_with_other_settings_names_each_field_and_override_allows_the_changeable(data, tmp_path, capsys):
    Trainer(
        TrainConfig(
            data=str(data),
            out=str(tmp_path / "r"),
            method="hash",
            compression=4,
            embedding_dim=8,
            bottom=(16,),
            top=(16,),
            batch_size=256,
            optimizer="adagrad",
            lr=0.05,
            table_optimizer=None,
            table_lr=None,
            eval_every=4,
            epochs=2,
            checkpoint_minutes=0,
        )
    ).fit(stop_at=6)  # checkpoint: step 4
    capsys.readouterr()
    line = _one_line_error(
        capsys,
        main(_train_args(data, tmp_path / "r", "--resume", "--epochs", "2", "--batch-size", "128", "--lr", "0.01")),
    )
    assert "batch_size: checkpoint 256, now 128" in line and "lr: checkpoint 0.05, now 0.01" in line
    # lr may change when asked; batch_size may not
    line = _one_line_error(
        capsys,
        main(
            _train_args(
                data, tmp_path / "r", "--resume", "--epochs", "2", "--batch-size", "128", "--override", "lr=0.01"
            )
        ),
    )
    assert "batch_size" in line and "lr:" not in line
    assert main(_train_args(data, tmp_path / "r", "--resume", "--epochs", "2", "--override", "lr=0.01")) == 0
    capsys.readouterr()
    assert "--override" in _one_line_error(capsys, main(_train_args(data, tmp_path / "q", "--override", "seed=3")))
    # the allowed new lr is the one the optimizer steps with, not the checkpoint's
    config = TrainConfig(
        **{**json.loads((tmp_path / "r" / "checkpoints" / "previous.json").read_text())["config"], "lr": 0.003}
    )
    resumed = Trainer(config, resume=True, resume_from="previous", allow_changes=("lr",))
    assert {group["lr"] for group in resumed.optimizer.param_groups} == {0.003}
    with pytest.raises(ValueError, match="cannot change"):
        Trainer(config, resume=True, allow_changes=("batch_size",))


def test_a_damaged_checkpoint_is_named_and_the_previous_one_resumes(data, tmp_path, capsys):
    assert main(_train_args(data, tmp_path / "r")) == 0  # 8 steps, checkpoints at 4 and 8
    last = tmp_path / "r" / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    capsys.readouterr()
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--resume")))
    assert str(last) in line and "damaged" in line and "previous checkpoint (step 4)" in line
    assert main(_train_args(data, tmp_path / "r", "--resume-from", "previous")) == 0
    assert json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())["step"] == 8


def test_checkpoints_every_n_steps_apart_from_evaluation_and_a_mid_epoch_resume_is_exact(data, tmp_path):
    def config(out):
        return TrainConfig(
            data=str(data),
            out=str(out),
            method="cafe",
            compression=4,
            embedding_dim=8,
            bottom=(16,),
            top=(16,),
            batch_size=256,
            optimizer="adam",
            lr=0.01,
            epochs=2,
            checkpoint_every=3,
            checkpoint_minutes=0,
            method_options={"threshold": 2.0},
        )

    straight = Trainer(config(tmp_path / "a")).fit()  # no evaluation until the end (eval_every 0)
    Trainer(config(tmp_path / "b")).fit(stop_at=13)  # checkpoints at 3, 6, 8 (the epoch's end) and 11
    assert json.loads((tmp_path / "b" / "checkpoints" / "last.json").read_text())["step"] == 11
    assert json.loads((tmp_path / "b" / "checkpoints" / "previous.json").read_text())["step"] == 8
    resumed = Trainer(config(tmp_path / "b"), resume=True)
    assert resumed.step == 11  # mid-epoch: the sketch, the optimizer and the batch order pick up from there
    result = resumed.fit()
    assert result["bce"] == straight["bce"] and result["auc"] == straight["auc"]
    assert result["train_loss"] == straight["train_loss"]


def test_a_crash_between_the_renames_resumes_from_the_newest_complete_checkpoint(data, tmp_path):
    from compemb.train import find_checkpoint

    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "r"),
        method="hash",
        compression=4,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        batch_size=256,
        optimizer="adagrad",
        lr=0.05,
        eval_every=4,
        checkpoint_minutes=0,
    )
    Trainer(config).fit()
    folder = tmp_path / "r" / "checkpoints"
    # as if killed after "last" became "previous" and before "next" became "last": only previous is whole
    (folder / "last.json").rename(folder / "next.json")
    (folder / "last.safetensors").unlink()
    assert find_checkpoint(tmp_path / "r") == folder / "previous"
    assert Trainer(config, resume=True).step == 4
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "empty")}), resume=True)


def test_a_truncated_array_names_the_file_and_both_sizes(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    sparse = copy / "train" / "sparse.npy"
    size = sparse.stat().st_size
    sparse.write_bytes(sparse.read_bytes()[: size // 2])
    with pytest.raises(
        DatasetError, match=rf"sparse.npy: truncated: .* \({size:,} bytes\), the file has {size // 2:,}"
    ):
        open_dataset(copy)
    line = _one_line_error(capsys, main(_train_args(copy, tmp_path / "r")))
    assert "sparse.npy: truncated" in line


def test_an_array_of_the_wrong_shape_or_dtype_is_named(data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    labels = np.load(copy / "val" / "labels.npy")
    np.save(copy / "val" / "labels.npy", labels[:-1])
    with pytest.raises(DatasetError, match=r"val/labels.npy: shape \(511,\), the manifest says \(512,\)"):
        open_dataset(copy)
    np.save(copy / "val" / "labels.npy", labels.astype(np.float32))
    with pytest.raises(DatasetError, match="labels.npy: dtype float32, expected uint8"):
        open_dataset(copy)


def _kill_config(data, out, optimizer, method):
    options = {"threshold": 2.0} if method == "cafe" else {"cluster_every": 5} if method == "cce" else {}
    return TrainConfig(
        data=str(data),
        out=str(out),
        method=method,
        compression=4,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        batch_size=128,
        optimizer=optimizer,
        lr=0.02,
        epochs=2,
        eval_every=10,
        checkpoint_every=3,
        checkpoint_minutes=0,
        method_options=options,
    )


def _train_in_a_process(config, env=None):
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; from compemb.train import TrainConfig, Trainer; "
        "Trainer(TrainConfig(**json.loads(sys.argv[1]))).fit()"
    )
    from dataclasses import asdict

    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(asdict(config))],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "optimizer, method", [("sgd", "hash"), ("adagrad", "hash"), ("adam", "hash"), ("adam", "cafe"), ("adagrad", "cce")]
)
def test_killed_with_sigkill_after_a_checkpoint_the_resumed_run_ends_as_the_uninterrupted_one(
    data, tmp_path, optimizer, method
):
    import signal
    import time

    straight = Trainer(_kill_config(data, tmp_path / "a", optimizer, method)).fit()
    config = _kill_config(data, tmp_path / "b", optimizer, method)
    process = _train_in_a_process(config)
    last = tmp_path / "b" / "checkpoints" / "last.json"
    while process.poll() is None and not last.exists():  # killed at whatever step it has reached by then
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = Trainer(config, resume=True)
    assert 0 < resumed.step < 32 or process.returncode == 0  # it was killed mid-run (or had already finished)
    result = resumed.fit()
    assert result["step"] == straight["step"] == 32
    assert result["bce"] == pytest.approx(straight["bce"], abs=1e-6) and result["auc"] == straight["auc"]


def test_killed_while_a_checkpoint_is_written_it_resumes_from_the_one_before(data, tmp_path):
    from compemb.train import KILL_WHILE_WRITING

    straight = Trainer(_kill_config(data, tmp_path / "a", "adam", "cafe")).fit()
    config = _kill_config(data, tmp_path / "b", "adam", "cafe")
    process = _train_in_a_process(config, {KILL_WHILE_WRITING: "9"})
    assert process.wait() == -9  # SIGKILL, with step 9's tensors written (under a temporary name) and its json not
    folder = tmp_path / "b" / "checkpoints"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".next.safetensors.")]
    assert not (folder / "next.safetensors").exists() and not (folder / "next.json").exists()
    resumed = Trainer(config, resume=True)
    assert resumed.step == 6  # the checkpoint before the one being written
    result = resumed.fit()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the killed write's temporary removed
    assert result["bce"] == pytest.approx(straight["bce"], abs=1e-6) and result["auc"] == straight["auc"]


class _FullDisk:
    """Files opened through os.fdopen (compemb's atomic writes) whose writes fail with ENOSPC, as on a full disk."""

    def __init__(self, real_fdopen, spared: int = 0):
        self.real_fdopen, self.spared = real_fdopen, spared  # the first ``spared`` files are written whole

    def __call__(self, *args, **kwargs):
        import errno

        file = self.real_fdopen(*args, **kwargs)
        if self.spared > 0:
            self.spared -= 1
            return file

        def write(data):
            raise OSError(errno.ENOSPC, "No space left on device")

        file.write = write
        return file


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_says_so(data, tmp_path, monkeypatch, capsys):
    import os

    assert main(_train_args(data, tmp_path / "r")) == 0  # 8 steps: checkpoints at 4 and 8
    folder = tmp_path / "r" / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    config = (tmp_path / "r" / "config.toml").read_bytes()
    # the disk is full from the start: the run's config (epochs now 2) cannot be written, nothing else is touched
    monkeypatch.setattr(os, "fdopen", _FullDisk(os.fdopen))
    assert main(_train_args(data, tmp_path / "r", "--resume", "--override", "epochs=2")) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.startswith("compemb: error: could not write the run's settings") and err.count("\n") == 1
    assert "config.toml" in err and "No space left on device" in err
    assert (tmp_path / "r" / "config.toml").read_bytes() == config
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # it fills up after the config was written: the checkpoint of step 12 cannot be
    monkeypatch.setattr(os, "fdopen", _FullDisk(os.fdopen, spared=1))
    code = main(_train_args(data, tmp_path / "r", "--resume", "--override", "epochs=2"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the progress bar of the steps it trained
    assert line.startswith("compemb: error: ")
    assert "could not write the checkpoint of step 12" in line and "No space left on device" in line
    assert "last (step 8) is intact" in line
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing half-written left behind
    assert Trainer(TrainConfig(**json.loads((folder / "last.json").read_text())["config"]), resume=True).step == 8


def test_a_full_disk_while_writing_a_data_set_leaves_the_old_one_and_says_so(tmp_path, monkeypatch, capsys):
    import errno

    from compemb.data.synthetic import SyntheticConfig, generate_synthetic

    out = tmp_path / "data"
    generate_synthetic(out, SyntheticConfig(rows={"train": 512, "val": 128}, scale=1e-4, seed=1), progress=False)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = np.lib.format.open_memmap, []

    def open_memmap(*args, **kwargs):  # the third array finds no room
        calls.append(args)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "open_memmap", open_memmap)
    code = main(
        ["synth", "--out", str(out), "--train-rows", "4096", "--eval-rows", "512", "--scale", "1e-4", "--overwrite"]
    )
    monkeypatch.undo()
    assert "No space left on device" in _one_line_error(capsys, code)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".data.partial*"))  # the half-made copy is removed


def test_a_device_that_is_not_one_or_is_absent_is_one_line(data, tmp_path, capsys):
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--device", "gpu0")))
    assert "device" in line and "'gpu0'" in line
    if not torch.cuda.is_available():
        line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--device", "cuda")))
        assert "no CUDA device" in line


# --- outputs that hold what compemb did not write -----------------------------------------------------------


def _synth_args(out, *extra):
    return ["synth", "--out", str(out), "--train-rows", "300", "--eval-rows", "100", "--scale", "1e-4", *extra]


def test_synth_refuses_an_out_that_holds_a_users_files(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    line = _one_line_error(capsys, main(_synth_args(out)))
    assert str(out) in line and "not a compemb data set" in line
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left beside it


def test_synth_replaces_its_own_data_set_and_fills_an_empty_directory(tmp_path, capsys):
    out = tmp_path / "set"
    out.mkdir()
    assert main(_synth_args(out, "--seed", "1")) == 0
    first = np.load(out / "train" / "sparse.npy")
    capsys.readouterr()  # a compemb data set: replaced only when asked, when the new one is complete
    assert "--overwrite replaces it" in _one_line_error(capsys, main(_synth_args(out, "--seed", "2")))
    assert np.array_equal(np.load(out / "train" / "sparse.npy"), first)
    assert main(_synth_args(out, "--seed", "2", "--overwrite")) == 0
    assert not np.array_equal(np.load(out / "train" / "sparse.npy"), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    (out / "train" / "notes.txt").write_text("mine")  # a user's file inside a split: no longer only a data set
    capsys.readouterr()
    _one_line_error(capsys, main(_synth_args(out, "--overwrite")))
    assert (out / "train" / "notes.txt").exists()


def test_synth_refuses_a_tsv_inside_its_out(tmp_path, capsys):
    line = _one_line_error(capsys, main(_synth_args(tmp_path / "set", "--tsv", str(tmp_path / "set" / "rows.tsv"))))
    assert "would hold the input" in line and not (tmp_path / "set").exists()


def test_preprocess_never_writes_over_its_own_input(tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    source = victim / "train.txt"
    source.write_text("1\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["a1"] * 26) + "\n")
    before = source.read_bytes()
    line = _one_line_error(capsys, main(["preprocess", "criteo", str(source), "--out", str(victim)]))
    assert str(victim) in line
    assert source.read_bytes() == before and sorted(p.name for p in victim.iterdir()) == ["train.txt"]


def test_two_writers_of_one_output_have_temporaries_of_their_own(tmp_path):
    from compemb.data.dataset import DatasetWriter

    first = DatasetWriter(tmp_path / "set", {"train": 1}, num_dense=1, cardinalities=[3])
    second = DatasetWriter(tmp_path / "set", {"train": 1}, num_dense=1, cardinalities=[3])
    assert first.temporary != second.temporary and first.temporary.is_dir() and second.temporary.is_dir()
    for writer, value in ((first, 1), (second, 2)):
        writer.write("train", np.zeros((1, 1), np.float32), np.array([[value]]), np.array([1]))
    first.close()  # the first to publish wins whole; the other fails clearly, leaving the winner's set
    with pytest.raises(ValueError, match="holds a compemb data set"):
        second.__exit__(None)
    assert open_dataset(tmp_path / "set")[1]["train"].sparse.tolist() == [[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_synth_drift_outside_zero_one_is_one_line(tmp_path, capsys):
    line = _one_line_error(capsys, main(_synth_args(tmp_path / "set", "--drift", "1.5")))
    assert "drift must be in [0, 1]" in line and not (tmp_path / "set").exists()


def test_damaged_bytes_inside_a_checkpoints_tensors_are_refused_by_its_checksum(data, tmp_path, capsys):
    assert main(_train_args(data, tmp_path / "r")) == 0
    last = tmp_path / "r" / "checkpoints" / "last.safetensors"
    data_bytes = bytearray(last.read_bytes())
    data_bytes[-64:-32] = b"\xff" * 32  # inside the tensor data: it would decode, to NaN
    last.write_bytes(bytes(data_bytes))
    capsys.readouterr()
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--resume")))
    assert str(last) in line and "SHA-256" in line and "--resume-from previous" in line


def test_best_is_never_left_behind_last_and_a_lagging_best_is_repaired_on_resume(data, tmp_path, monkeypatch):
    config = TrainConfig(
        data=str(data),
        out=str(tmp_path / "r"),
        method="hash",
        compression=4,
        embedding_dim=8,
        bottom=(16,),
        top=(16,),
        batch_size=256,
        optimizer="adagrad",
        lr=0.05,
        table_optimizer=None,
        table_lr=None,
        eval_every=4,
        checkpoint_minutes=0,
        epochs=2,
    )
    checkpoints = tmp_path / "r" / "checkpoints"
    original = Trainer._write_last

    def killed_at_step_8(self):  # the process dies after best is written, before last is
        if self.step == 8:
            raise KeyboardInterrupt
        original(self)

    monkeypatch.setattr(Trainer, "_write_last", killed_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config).fit()
    monkeypatch.setattr(Trainer, "_write_last", original)
    best, last = (json.loads((checkpoints / f"{n}.json").read_text()) for n in ("best", "last"))
    assert last["step"] == 4 and best["step"] >= last["step"]  # best (step 8, or 4 if 8 did not improve)
    # a best lagging behind last, as a kill between the two left it before best was written first: repaired
    Trainer(config, resume=True).fit(stop_at=12)
    for suffix in (".safetensors", ".json"):
        (checkpoints / f"best{suffix}").write_bytes((checkpoints / f"previous{suffix}").read_bytes())
    resumed = Trainer(config, resume=True)
    assert resumed.best["step"] == resumed.step == 12  # (this run improves at every evaluation)
    assert json.loads((checkpoints / "best.json").read_text())["step"] == 12
    from safetensors.torch import load

    best_tensors, last_tensors = (load((checkpoints / f"{n}.safetensors").read_bytes()) for n in ("best", "last"))
    assert all(torch.equal(best_tensors[k], last_tensors[k]) for k in last_tensors if k.startswith("model."))


def test_what_a_killed_checkpoint_write_left_is_removed_when_training_starts(data, tmp_path):
    assert main(_train_args(data, tmp_path / "r")) == 0
    stale = tmp_path / "r" / "checkpoints" / ".next.safetensors.x1y2z3"
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / "r" / "checkpoints" / "notes.txt"
    mine.write_text("kept")
    assert main(_train_args(data, tmp_path / "r", "--resume", "--override", "epochs=2")) == 0
    assert not stale.exists() and mine.read_text() == "kept"


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_a_non_finite_loss_stops_training_at_once_and_saves_nothing_of_it(data, tmp_path, capsys, kernels):
    capsys.readouterr()  # SGD at lr 1e30: the weights overflow after a few steps, the loss follows
    args = _train_args(data, tmp_path / "r", "--kernels", kernels, "--optimizer", "sgd", "--lr", "1e30")
    line = _one_line_error(capsys, main(args))
    assert "the training loss was not finite" in line and "at step " in line
    checkpoints = tmp_path / "r" / "checkpoints"
    if (checkpoints / "last.json").exists():  # whatever was saved was saved before the loss diverged
        tensors = __import__("safetensors.torch", fromlist=["load"]).load(
            (checkpoints / "last.safetensors").read_bytes()
        )
        assert all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())
    else:
        assert "no checkpoint was written before it" in line


@pytest.mark.parametrize(
    "split, file, change, expected",
    [
        ("train", "dense.npy", lambda a: a.__setitem__((1300, 2), np.nan), "train/dense.npy row 1300, column 2: nan"),
        ("val", "sparse.npy", lambda a: a.__setitem__((7, 3), 10**6), "val/sparse.npy row 7, feature C4: id 1000000"),
        ("train", "labels.npy", lambda a: a.__setitem__(5, 2), "train/labels.npy row 5: label 2 is not 0 or 1"),
    ],
)
def test_bad_values_in_any_split_are_found_before_training_naming_split_file_row_and_value(
    tmp_path, capsys, split, file, change, expected
):
    out = tmp_path / "d"
    generate_synthetic(out, SyntheticConfig(rows={"train": 2048, "val": 512}, scale=1e-4, seed=3), progress=False)
    assert Trainer(TrainConfig(data=str(out), out=str(tmp_path / "ok"))).step == 0  # clean: validated, remembered
    assert (out / "validated.json").exists()
    array = np.load(out / split / file, mmap_mode="r+")
    change(array)
    array.flush()
    del array
    capsys.readouterr()
    line = _one_line_error(capsys, main(_train_args(out, tmp_path / "r")))
    assert expected in line
    assert not (tmp_path / "r").exists()  # refused before anything was written
    assert (
        main(["synth", "--out", str(out), "--train-rows", "256", "--eval-rows", "64", "--scale", "1e-4", "--overwrite"])
        == 0
    )  # its record of the clean pass is compemb's own: the set is still replaceable


def test_synth_scale_zero_and_a_finished_runs_resume_say_what_they_are(data, tmp_path, capsys):
    assert "scale must be in (0, 1]" in _one_line_error(capsys, main(_synth_args(tmp_path / "s", "--scale", "0")))
    assert main(_train_args(data, tmp_path / "r", "--json")) == 0
    finished = json.loads(capsys.readouterr().out)
    assert main(_train_args(data, tmp_path / "r", "--resume", "--json")) == 0  # nothing left to train
    assert json.loads(capsys.readouterr().out) == finished  # its last evaluation, not {}


def test_a_manifest_with_strings_for_numbers_or_no_train_split_is_one_line(tmp_path, capsys):
    out = tmp_path / "d"
    generate_synthetic(out, SyntheticConfig(rows={"train": 512, "val": 128}, scale=1e-4, seed=3), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(
        json.dumps({**manifest, "cardinalities": ["100", *manifest["cardinalities"][1:]]})
    )
    assert "cardinalities[0] = '100'" in _one_line_error(capsys, main(_train_args(out, tmp_path / "r")))
    manifest["rows"] = {"val": manifest["rows"]["val"]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert "has no split 'train'" in _one_line_error(capsys, main(_train_args(out, tmp_path / "r")))


def test_a_device_without_data_and_a_model_larger_than_memory_are_refused_at_once(data, tmp_path, capsys):
    assert "holds no data" in _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--device", "meta")))
    assert "not a torch device" in _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--device", "gpu")))
    line = _one_line_error(capsys, main(_train_args(data, tmp_path / "r", "--dim", "1000000000", "--compression", "1")))
    assert "GB" in line and "this machine has" in line and not (tmp_path / "r").exists()


def test_a_garbage_array_header_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "d"
    generate_synthetic(out, SyntheticConfig(rows={"train": 512, "val": 128}, scale=1e-4, seed=3), progress=False)
    array = out / "val" / "dense.npy"
    array.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': ???}   " + array.read_bytes()[64:])
    line = _one_line_error(capsys, main(_train_args(out, tmp_path / "r")))
    assert str(array) in line and "not a readable .npy file" in line


def test_a_sweep_baseline_outside_its_methods_and_an_unknown_protocol_are_one_line(tmp_path, capsys):
    line = _one_line_error(
        capsys,
        main(
            [
                "bench",
                "quality",
                "--data",
                str(tmp_path / "d"),
                "--out",
                str(tmp_path / "o"),
                "--methods",
                "hash,ce",
                "--baseline",
                "robe",
            ]
        ),
    )
    assert "--baseline 'robe' is not among --methods (hash,ce)" in line and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--protocol", "cafe"])
    assert stopped.value.code == 2
    assert "invalid choice: 'cafe' (choose from 'dlrm', 'cafe-paper', 'cce-paper')" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["dhe", "tt"])
def test_sparse_gradients_asked_of_a_method_without_rows_are_refused(method):
    from compemb import make_embedding

    with pytest.raises(ValueError, match=f"{method} has no table rows to give sparse gradients"):
        make_embedding(method, 5000, 8, compression=10, sparse=True)
    table = make_embedding(method, 5000, 8, compression=10)
    table(torch.arange(64)).sum().backward()
    assert all(p.grad is not None and not p.grad.is_sparse for p in table.parameters())


def test_a_collection_asked_for_sparse_gradients_gives_them_where_there_are_rows():
    from compemb.collection import EmbeddingCollection, Feature

    collection = EmbeddingCollection(
        [Feature("small", 10), Feature("big", 50_000)], 8, "dhe", compression=10, sparse=True
    )
    collection(torch.tensor([[1, 2], [3, 40_000]])).sum().backward()
    small = collection.embeddings["small"].weight.grad  # the small feature's full table: sparse, as asked
    assert small.is_sparse
    assert not any(p.grad.is_sparse for p in collection.embeddings["big"].parameters())


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(lr=1e308), "lr 1e+308 is more than a float32 holds"),
        (dict(table_lr=1e39), "table_lr 1e+39 is more than a float32 holds"),
        (dict(method="hash", compression=None), "method 'hash' compresses the tables: give it a budget, compression"),
        (dict(method="hsh"), "unknown method 'hsh'; did you mean 'hash'?"),
    ],
)
def test_a_config_that_cannot_train_is_refused_naming_why(changes, expected):
    settings = {"data": "d", "out": "r", "method": "hash", "compression": 4, "lr": 0.1, **changes}
    with pytest.raises(ValueError, match=re.escape(expected)):
        TrainConfig(**settings)


def test_a_long_option_value_is_named_by_its_length_not_printed():
    from compemb import make_embedding

    with pytest.raises(ValueError) as error:
        make_embedding("offline", 1000, 8, compression=10, frequencies=[1.0] * 1000)
    assert str(error.value) == "offline: option frequencies must be Tensor | None, got list of 1,000 items"
