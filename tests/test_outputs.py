"""One output rule for every command that writes: nothing it did not write is replaced without --overwrite, and
never a link, device, FIFO, the command's own input, or a file of another data set or run (refused before any
work, in one line)."""

import os
import shutil

import pytest

from compemb.cli import main
from compemb.data.synthetic import SyntheticConfig, generate_synthetic
from compemb.io import atomic_write_bytes
from compemb.outputs import OutputError, check_output_directory, check_output_file
from tests.cli_errors import one_line_error as _one_line_error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    generate_synthetic(
        root / "synth",
        SyntheticConfig(rows={"train": 1024, "val": 256, "test": 256}, scale=1e-4, seed=1),
        progress=False,
    )
    assert main(_train(root / "synth", root / "run")) == 0
    return root


def _train(data, out, *extra):
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
        "--quiet",
        *extra,
    ]


@pytest.fixture
def root(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "root")
    return tmp_path / "root"


def test_export_never_replaces_a_runs_checkpoint_or_a_users_file_but_replaces_its_own_model(root, capsys):
    best = root / "run" / "checkpoints" / "best.safetensors"
    before = best.read_bytes()
    line = _one_line_error(capsys, main(["export", "--run", str(root / "run"), "--out", str(best), "--overwrite"]))
    assert "inside the compemb run" in line and best.read_bytes() == before
    document = root / "thesis.txt"
    document.write_text("three years of work\n")
    line = _one_line_error(capsys, main(["export", "--run", str(root / "run"), "--out", str(document)]))
    assert "exists and is not a model file compemb wrote: --overwrite replaces it" in line
    assert document.read_text() == "three years of work\n"
    model = root / "m.compemb"
    assert main(["export", "--run", str(root / "run"), "--out", str(model)]) == 0
    assert main(["export", "--run", str(root / "run"), "--out", str(model)]) == 0  # its own kind: replaced
    assert main(["export", "--run", str(root / "run"), "--out", str(document), "--overwrite"]) == 0


def test_predict_never_writes_over_its_input_or_its_model_or_an_existing_file(root, capsys):
    tsv, model = root / "t.tsv", root / "m.compemb"
    tsv.write_text("1\t2\n")
    model.write_bytes(b"model bytes")
    line = _one_line_error(
        capsys, main(["predict", "--model", str(model), "--input", str(tsv), "--out", str(tsv), "--overwrite"])
    )
    assert "is also this command's input (--input)" in line and tsv.read_text() == "1\t2\n"
    line = _one_line_error(
        capsys, main(["predict", "--model", str(model), "--input", str(tsv), "--out", str(model), "--overwrite"])
    )
    assert "(--model)" in line and model.read_bytes() == b"model bytes"
    scores = root / "scores.txt"
    scores.write_text("mine\n")
    line = _one_line_error(capsys, main(["predict", "--model", str(model), "--input", str(tsv), "--out", str(scores)]))
    assert "--overwrite replaces it" in line and scores.read_text() == "mine\n"


@pytest.mark.parametrize("node", ["symlink", "dangling symlink", "fifo", "device"])
def test_no_output_replaces_a_link_a_fifo_or_a_device(root, capsys, node):
    target = root / "target.txt"
    target.write_text("the link's target\n")
    path = root / "x" / "out"
    path.parent.mkdir()
    if node == "symlink":
        path.symlink_to(target)
    elif node == "dangling symlink":
        path.symlink_to(root / "nowhere")
    elif node == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as /dev/null
        except PermissionError:
            pytest.skip("making a device node needs root")
    for args in (
        ["export", "--run", str(root / "run"), "--out", str(path), "--overwrite"],
        ["plot", "--run", str(root / "run"), "--out", str(path), "--overwrite"],
        [
            "synth",
            "--out",
            str(root / "s2"),
            "--train-rows",
            "100",
            "--eval-rows",
            "10",
            "--tsv",
            str(path),
            "--overwrite",
        ],
    ):
        line = _one_line_error(capsys, main(args))
        assert str(path) in line and ("symbolic link" in line or "FIFO" in line or "device" in line), line
    assert target.read_text() == "the link's target\n" and os.path.lexists(path) and not (root / "s2").exists()
    with pytest.raises(OutputError):  # and the writer itself, for every caller
        atomic_write_bytes(path, b"x")


def test_synth_tsv_never_lands_inside_another_data_set(root, capsys):
    labels = root / "synth" / "train" / "labels.npy"
    before = labels.read_bytes()
    line = _one_line_error(
        capsys,
        main(
            [
                "synth",
                "--out",
                str(root / "s2"),
                "--train-rows",
                "100",
                "--eval-rows",
                "10",
                "--tsv",
                str(labels),
                "--overwrite",
            ]
        ),
    )
    assert "inside the compemb data set" in line and labels.read_bytes() == before
    line = _one_line_error(
        capsys, main(["synth", "--out", str(root / "synth" / "inner"), "--train-rows", "100", "--eval-rows", "10"])
    )
    assert "inside the compemb data set" in line


def test_train_refuses_its_data_as_out_a_dangling_link_and_a_users_curves(root, capsys):
    data = root / "synth"
    for out in (data, data / "run"):
        line = _one_line_error(capsys, main(_train(data, out)))
        assert "--data" in line or "data set" in line
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in (root / "synth").iterdir())
    assert not (data / "metrics.jsonl").exists()
    (root / "link").symlink_to(root / "nowhere")
    line = _one_line_error(capsys, main(_train(data, root / "link")))
    assert "whose target does not exist" in line
    mine = root / "mine"
    mine.mkdir()
    (mine / "curves.png").write_bytes(b"\x89PNG my own figure")
    line = _one_line_error(capsys, main(_train(data, mine)))
    assert "curves.png exists and is not a png file compemb wrote" in line
    assert (mine / "curves.png").read_bytes() == b"\x89PNG my own figure" and not (mine / "metrics.jsonl").exists()
    assert main(_train(data, mine, "--overwrite")) == 0  # the user's word


def test_plot_replaces_its_own_png_and_refuses_a_users(root, capsys):
    curves = root / "run" / "curves.png"
    assert curves.is_file()  # written by train: signed
    assert main(["plot", "--run", str(root / "run")]) == 0
    figure = root / "figure.png"
    figure.write_bytes(b"not compemb's")
    line = _one_line_error(capsys, main(["plot", "--run", str(root / "run"), "--out", str(figure)]))
    assert "--overwrite" in line and figure.read_bytes() == b"not compemb's"
    assert main(["plot", "--run", str(root / "run"), "--out", str(figure), "--overwrite"]) == 0
    assert main(["plot", "--run", str(root / "run"), "--out", str(figure)]) == 0  # now compemb's own


def test_the_rule_itself(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(OutputError, match="inside the compemb run"):
        check_output_file(run / "metrics.jsonl", "text", overwrite=True)
    check_output_file(run / "model.compemb", "model")  # a run's directory may hold other things
    with pytest.raises(OutputError, match="inside the compemb run"):
        check_output_directory(run / "nested")
    with pytest.raises(OutputError, match="a file, not a directory"):
        check_output_directory(run / "metrics.jsonl")
    (tmp_path / "real").mkdir()
    (tmp_path / "to-real").symlink_to(tmp_path / "real")
    check_output_directory(tmp_path / "to-real")  # a link to a directory is written through, nothing replaced


def test_lstsq_and_bench_outputs_follow_the_rule(tmp_path, capsys):
    stem = tmp_path / "lstsq"
    (tmp_path / "lstsq.md").write_text("my notes\n")
    args = ["lstsq", "--n", "60", "--d1", "12", "--k", "3", "--d2", "2", "--iterations", "2", "--out", str(stem)]
    line = _one_line_error(capsys, main(args))
    assert "lstsq.md exists" in line and (tmp_path / "lstsq.md").read_text() == "my notes\n"
    assert main([*args, "--overwrite"]) == 0 and (tmp_path / "lstsq.png").is_file()
    (tmp_path / "result.md").symlink_to(tmp_path / "lstsq.md")
    line = _one_line_error(capsys, main(["bench", "syncs", "--output", str(tmp_path / "result")]))
    assert "symbolic link" in line
