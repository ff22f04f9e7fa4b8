"""A run that could not end is refused before it trains: no rows to train on, an evaluation split without rows or
with one class (its AUC undefined), a synthetic set of non-finite parameters. Once, each trained a whole epoch and
then lost it at the first evaluation."""

import numpy as np
import pytest

from compemb.cli import main
from compemb.data.dataset import DatasetWriter
from tests.cli_errors import one_line_error as _one_line_error


def _write(out, labels: dict[str, np.ndarray]) -> None:
    rows = {split: len(values) for split, values in labels.items()}
    with DatasetWriter(out, rows, num_dense=2, cardinalities=[5, 7]) as writer:
        for split, values in labels.items():
            generator = np.random.default_rng(0)
            writer.write(
                split,
                generator.random((len(values), 2), dtype=np.float32),
                np.stack([generator.integers(0, 5, len(values)), generator.integers(0, 7, len(values))], 1),
                values.astype(np.uint8),
            )


@pytest.mark.parametrize(
    "labels, expected",
    [
        ({"train": np.zeros(0), "val": np.array([0, 1] * 8)}, "split 'train' has no rows to train on"),
        ({"train": np.array([0, 1] * 64), "val": np.zeros(0)}, "split 'val' has no rows to evaluate on"),
        ({"train": np.array([0, 1] * 64), "val": np.ones(16)}, "split 'val' holds only positives (16 rows)"),
        ({"train": np.array([0, 1] * 64), "val": np.zeros(16)}, "split 'val' holds only negatives (16 rows)"),
    ],
)
def test_a_run_that_could_not_evaluate_is_refused_before_training(tmp_path, capsys, labels, expected):
    _write(tmp_path / "data", labels)
    code = main(
        [
            "train",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "run"),
            "--method",
            "full",
            "--dim",
            "4",
            "--bottom",
            "8",
            "--top",
            "8",
            "--batch-size",
            "32",
            "--quiet",
        ]
    )
    assert expected in _one_line_error(capsys, code)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag, value", [("--zipf", "nan"), ("--signal", "nan"), ("--signal", "inf"), ("--zipf", "-1")])
def test_synth_refuses_non_finite_or_negative_parameters_before_generating(tmp_path, capsys, flag, value):
    line = _one_line_error(
        capsys, main(["synth", "--out", str(tmp_path / "s"), "--train-rows", "100", "--eval-rows", "10", flag, value])
    )
    assert flag.removeprefix("--") in line
    assert not (tmp_path / "s").exists()
