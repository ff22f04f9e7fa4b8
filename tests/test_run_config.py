"""A run is its config: config.toml in the run, --config FILE, --print-config, and --resume with nothing else."""

import json
from dataclasses import asdict

import pytest

from compemb.cli import main
from compemb.run_config import cli_defaults, config_text, method_spec, read_config_file
from compemb.train import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("config") / "synth"
    assert main(["synth", "--out", str(out), "--train-rows", "2048", "--eval-rows", "256", "--scale", "1e-4"]) == 0
    return str(out)


SMALL = ["--dim", "8", "--bottom", "8", "--top", "8", "--batch-size", "256", "--quiet"]


def _metrics(run):
    """The run's evaluations, less their throughput (a timing)."""
    return [
        {key: value for key, value in json.loads(line).items() if key != "samples_per_s"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_a_runs_config_file_trains_it_again_to_the_same_metrics(data, tmp_path, capsys):
    first = tmp_path / "first"
    assert (
        main(
            [
                "train",
                "--data",
                data,
                "--out",
                str(first),
                *SMALL,
                "--method",
                "cce:cluster_every=3",
                "--compression",
                "4",
                "--optimizer",
                "adagrad",
                "--lr",
                "0.05",
                "--seed",
                "3",
                "--evals-per-epoch",
                "2",
            ]
        )
        == 0
    )
    saved = read_config_file(first / "config.toml", TrainConfig)
    assert saved["method"] == "cce" and saved["method_options"] == {"cluster_every": 3}
    assert (saved["optimizer"], saved["lr"], saved["seed"], saved["bottom"]) == ("adagrad", 0.05, 3, [8])
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.toml"), "--out", str(again), "--quiet"]) == 0
    assert _metrics(again) == _metrics(first)  # every setting came back from the file
    assert read_config_file(again / "config.toml", TrainConfig) == {**saved, "out": str(again)}


def test_resume_with_nothing_but_the_run_continues_it(data, tmp_path, capsys):
    run = tmp_path / "run"
    straight = tmp_path / "straight"
    settings = [
        "--data",
        data,
        *SMALL,
        "--method",
        "hash",
        "--compression",
        "10",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--epochs",
        "3",
        "--checkpoint-every",
        "8",
    ]
    assert main(["train", *settings, "--out", str(straight)]) == 0
    from compemb.train import TrainConfig, Trainer

    config = TrainConfig(**{**read_config_file(straight / "config.toml", TrainConfig), "out": str(run)})
    Trainer(config, quiet=True).fit(stop_at=13)  # interrupted: its last checkpoint is step 8
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bce"] == _metrics(straight)[-1]["bce"]
    # a flag that differs from the checkpoint is refused, naming it; --override takes what may change
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.5"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "lr: checkpoint 0.01, now 0.5" in error and "--override lr=VALUE" in error
    assert main(["train", "--out", str(run), "--resume", "--seed", "5"]) == 2
    assert "seed: checkpoint 0, now 5" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--override", "epochs=4", "--quiet"]) == 0
    assert _metrics(run)[-1]["step"] == 32 and read_config_file(run / "config.toml", TrainConfig)["epochs"] == 4
    assert main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_flags_win_over_the_config_file_which_wins_over_a_protocol(data, tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text(
        f'data = "{data}"\nlr = 0.02\nbatch_size = 512\nbottom = [32, 8]\nembedding_dim = 8\n'
        f'method = "cce"\neval_batch_size = 100\n[method_options]\ncluster_every = 7\n'
    )
    capsys.readouterr()
    assert (
        main(
            [
                "train",
                "--config",
                str(path),
                "--out",
                str(tmp_path / "r"),
                "--protocol",
                "cce-paper",
                "--batch-size",
                "64",
                "--compression",
                "10",
                "--print-config",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    (tmp_path / "printed.toml").write_text(printed)
    config = TrainConfig(**read_config_file(tmp_path / "printed.toml", TrainConfig))
    assert config.batch_size == 64 and config.compression == 10  # the flags
    assert (config.lr, config.bottom, config.embedding_dim, config.eval_batch_size) == (0.02, (32, 8), 8, 100)
    assert config.method == "cce" and config.method_options == {"cluster_every": 7}  # the file
    assert (config.optimizer, config.evals_per_epoch, config.top) == ("sgd", 6, (512, 256))  # the protocol
    assert not (tmp_path / "r").exists()  # --print-config trains nothing


def test_a_yaml_config_reads_as_its_toml_twin(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "a.yaml").write_text(
        "data: d\nout: r\nlr: 0.02\nbottom: [32, 8]\nmethod_options: {rank: 2}\nmethod: lowrank\ncompression: null\n"
    )
    (tmp_path / "a.toml").write_text(
        'data = "d"\nout = "r"\nlr = 0.02\nbottom = [32, 8]\nmethod = "lowrank"\n[method_options]\nrank = 2\n'
    )
    assert read_config_file(tmp_path / "a.yaml", TrainConfig) == read_config_file(tmp_path / "a.toml", TrainConfig)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('data = "d"\nlearning_rate = 0.1\n', "unknown setting 'learning_rate'; the settings are TrainConfig's"),
        ('data = "d"\nlr = \n', "is not TOML"),
        ('lr = "fast"\ndata = "d"\nout = "r"\n', "bad.toml: lr must be a number, got 'fast'"),
        ('bottom = "64"\ndata = "d"\nout = "r"\n', "bad.toml: bottom must be a list of integers, got '64'"),
        ('shuffle = 1\ndata = "d"\nout = "r"\n', "bad.toml: shuffle must be true or false, got 1"),
        ('lr = -1\ndata = "d"\nout = "r"\n', "lr must be a positive number, got -1"),
        ('method = "nope"\ndata = "d"\nout = "r"\n', "nope"),
    ],
)
def test_a_bad_config_file_gets_one_line_naming_it(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("compemb: error: ") and expected in error and error.count("\n") == 1


def test_a_config_file_of_another_kind_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    assert main(["train", "--config", str(tmp_path / "run.json")]) == 2
    assert "give a .toml, .yaml or .yml file" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_a_users_config_toml_in_the_run_directory_is_not_replaced(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    mine = f'data = "{data}"\nlr = 0.02\n'
    (run / "config.toml").write_text(mine)
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(run), *SMALL]) == 2
    assert "is not a config a compemb run wrote" in capsys.readouterr().err
    assert (run / "config.toml").read_text() == mine


def test_the_config_text_and_cli_defaults_round_trip_every_setting(tmp_path):
    config = TrainConfig(
        data="d",
        out="r",
        method="cce",
        method_options={"cluster_every": 5, "accounting": "paper"},
        compression=12.5,
        bottom=(64, 16),
        table_optimizer="rowwise_adagrad",
        shuffle=True,
    )
    (tmp_path / "c.toml").write_text(config_text(config))
    assert TrainConfig(**read_config_file(tmp_path / "c.toml", TrainConfig)) == config
    defaults = cli_defaults(asdict(config))
    assert defaults["method"] == "cce:cluster_every=5:accounting=paper" and defaults["bottom"] == "64,16"
    assert defaults["dim"] == 16 and "embedding_dim" not in defaults
    assert method_spec("hash", {}) == "hash"


def test_a_users_train_log_in_the_run_directory_is_neither_appended_to_nor_removed(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("my own notes\n")
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--data", data, "--out", str(run), *SMALL, *extra]) == 2
        assert "train.log is not a log a compemb run wrote" in capsys.readouterr().err
    assert (run / "train.log").read_text() == "my own notes\n"
    # compemb's own log is the run's: --overwrite replaces it with the new run's lines
    other = tmp_path / "other"
    assert main(["train", "--data", data, "--out", str(other), *SMALL]) == 0
    first = (other / "train.log").read_text()
    assert main(["train", "--data", data, "--out", str(other), *SMALL, "--overwrite", "--seed", "4"]) == 0
    assert (other / "train.log").read_text().count(" eval val at step ") == first.count(" eval val at step ")
