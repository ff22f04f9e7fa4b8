"""The preprocessed format: writing chunk by chunk, atomically, and reading back by memory map."""

import json

import numpy as np
import pytest

from compemb.data.dataset import DatasetWriter, open_dataset


def test_round_trip_with_facts(tmp_path):
    out = tmp_path / "data"
    with DatasetWriter(out, {"train": 3, "val": 1}, num_dense=2, cardinalities=[10, 3]) as writer:
        writer.write("train", np.ones((2, 2), np.float32), np.array([[9, 2], [0, 0]]), np.array([1, 0]))
        writer.write("train", np.zeros((1, 2), np.float32), np.array([[5, 1]]), np.array([1]))
        writer.write("val", np.zeros((1, 2), np.float32), np.array([[1, 1]]), np.array([0]))
        writer.facts["note"] = "hello"
    manifest, splits = open_dataset(out)
    assert manifest["rows"] == {"train": 3, "val": 1} and manifest["note"] == "hello"
    assert splits["train"].sparse.tolist() == [[9, 2], [0, 0], [5, 1]]
    assert splits["train"].labels.dtype == np.uint8 and splits["train"].sparse.dtype == np.int32
    assert isinstance(splits["train"].dense, np.memmap) and len(splits["val"]) == 1


def test_a_failed_write_leaves_nothing_and_an_old_set_untouched(tmp_path):
    out = tmp_path / "data"
    with DatasetWriter(out, {"train": 1}, 1, [4]) as writer:
        writer.write("train", np.zeros((1, 1), np.float32), np.array([[3]]), np.array([1]))
    with pytest.raises(ValueError, match="outside its feature's cardinality"):
        with DatasetWriter(out, {"train": 1}, 1, [4], overwrite=True) as writer:
            writer.write("train", np.zeros((1, 1), np.float32), np.array([[4]]), np.array([1]))
    assert open_dataset(out)[1]["train"].sparse.tolist() == [[3]]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_unfilled_or_overfilled_splits_are_errors(tmp_path):
    with pytest.raises(ValueError, match="not filled"):
        with DatasetWriter(tmp_path / "a", {"train": 2}, 1, [4]):
            pass
    with pytest.raises(ValueError, match="holds 1 rows"):
        with DatasetWriter(tmp_path / "b", {"train": 1}, 1, [4]) as writer:
            writer.write("train", np.zeros((2, 1), np.float32), np.zeros((2, 1), np.int64), np.zeros(2))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_opening_a_directory_that_is_not_a_data_set(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        open_dataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"rows": {}, "cardinalities": []}))
    assert open_dataset(tmp_path)[1] == {}


def test_append_fills_the_splits_in_order_and_refuses_extra_rows_or_missing_labels(tmp_path):
    import numpy as np
    import pytest

    from compemb.data.dataset import DatasetWriter, open_dataset

    sparse = np.arange(7).reshape(7, 1)
    with DatasetWriter(tmp_path / "d", {"train": 4, "val": 3}, 0, [7]) as writer:
        writer.append(np.zeros((5, 0), np.float32), sparse[:5], np.ones(5, np.uint8))
        writer.append(np.zeros((2, 0), np.float32), sparse[5:], np.ones(2, np.uint8))
        with pytest.raises(ValueError, match="1 rows more than the splits hold"):
            writer.append(np.zeros((1, 0), np.float32), sparse[:1], np.ones(1, np.uint8))
        with pytest.raises(ValueError, match="labeled"):
            writer.write("val", np.zeros((1, 0), np.float32), sparse[:1], None)
    splits = open_dataset(tmp_path / "d")[1]
    assert splits["train"].sparse[:, 0].tolist() == [0, 1, 2, 3] and splits["val"].sparse[:, 0].tolist() == [4, 5, 6]
