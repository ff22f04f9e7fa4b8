"""--protocol: a founding paper's settings as the defaults of a training command; flags beside it win."""

import pytest

from compemb.cli import build_parser
from compemb.cli.training import train_config
from compemb.protocols import PROTOCOLS, cli_defaults, get_protocol


def _config(*argv):
    parser = build_parser()
    args = parser.parse_args(list(argv))
    if args.protocol:  # as main() does
        args.training_parser.set_defaults(**cli_defaults(args.protocol))
        args = parser.parse_args(list(argv))
    return train_config(args, "runs/x")


def test_the_cce_protocol_is_dlrms_kaggle_script_with_six_validations():
    config = _config(
        "train", "--data", "d", "--out", "r", "--method", "cce-paper", "--compression", "100", "--protocol", "cce-paper"
    )
    # DLRM's Kaggle reference: SGD 0.1, mini-batch 128, bottom 13-512-256-64-16, top 512-256-1, dim 16
    assert (config.optimizer, config.lr, config.batch_size, config.epochs) == ("sgd", 0.1, 128, 1)
    assert (config.bottom, config.top, config.embedding_dim, config.evals_per_epoch) == (
        (512, 256, 64),
        (512, 256),
        16,
        6,
    )
    assert get_protocol("cce-paper").baseline == "ce"


def test_the_cafe_protocol_shares_one_table_and_its_baseline_is_the_per_field_hash():
    config = _config("bench", "quality", "--data", "d", "--out", "o", "--protocol", "cafe-paper")
    assert (config.optimizer, config.lr, config.batch_size, config.sharing) == ("sgd", 0.1, 128, "shared")
    assert PROTOCOLS["cafe-paper"].baseline == "hash-fields"


def test_flags_beside_a_protocol_win_and_without_one_the_defaults_stand():
    config = _config(
        "train",
        "--data",
        "d",
        "--out",
        "r",
        "--protocol",
        "cafe-paper",
        "--lr",
        "0.05",
        "--batch-size",
        "256",
        "--sharing",
        "per_feature",
    )
    assert (config.lr, config.batch_size, config.sharing, config.optimizer) == (0.05, 256, "per_feature", "sgd")
    plain = _config("train", "--data", "d", "--out", "r")
    assert plain.batch_size == 2048 and plain.evals_per_epoch == 1


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="unknown protocol 'cafe'; available: dlrm, cafe-paper, cce-paper"):
        get_protocol("cafe")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "r", "--protocol", "cafe"])


def test_the_protocols_train_tables_as_their_papers_did_not_as_the_defaults_do():
    for name in ("dlrm", "cafe-paper", "cce-paper"):  # SGD 0.1 for the MLPs and the tables alike
        config = _config("train", "--data", "d", "--out", "r", "--protocol", name)
        assert (config.optimizer, config.lr, config.table_optimizer, config.table_lr) == ("sgd", 0.1, "sgd", 0.1)
    dlrm = _config("train", "--data", "d", "--out", "r", "--protocol", "dlrm")
    assert (dlrm.batch_size, dlrm.evals_per_epoch, dlrm.bottom, dlrm.top) == (2048, 0, (512, 256, 64), (512, 256))
    plain = _config("train", "--data", "d", "--out", "r")  # the default recipe: Adam MLPs, row-wise Adagrad tables
    assert (plain.optimizer, plain.lr, plain.table_optimizer, plain.table_lr) == ("adam", 2e-3, "adagrad", 0.05)
