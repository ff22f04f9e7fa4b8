"""Avazu preprocessing: the shared sample, bad rows, and a model trained on what it writes."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from compemb.collection import EmbeddingCollection, Feature
from compemb.data.avazu import preprocess_avazu
from compemb.data.dataset import open_dataset
from compemb.models import DLRM

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "avazu-sample" / "train.csv"
needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason=f"the shared Avazu sample is not at {SAMPLE}")
HEADER = "id,click,hour," + ",".join(f"f{i}" for i in range(21)) + "\n"
GOOD = "7,1,14102113," + ",".join(["a"] * 21) + "\n"


@needs_sample
def test_shared_sample_keeps_every_row_and_splits_hour(tmp_path):
    facts = preprocess_avazu(SAMPLE, tmp_path / "out")
    manifest, splits = open_dataset(tmp_path / "out")
    lines = SAMPLE.read_text().splitlines()[1:]
    assert facts["rows_read"] == facts["rows_kept"] == len(lines) == sum(len(s) for s in splits.values())
    assert len(manifest["cardinalities"]) == 23 and facts["features"][:3] == ["hour_of_day", "weekday", "C1"]
    site_ids = Counter(line.split(",")[5] for line in lines)  # column 5 is site_id, feature 4 here
    assert manifest["cardinalities"][4] == sum(1 for count in site_ids.values() if count >= 3) + 2
    assert splits["train"].dense.shape == (len(splits["train"]), 0)


@pytest.mark.parametrize(
    "bad, reason",
    [
        ("7,1,14102113,a\n", "columns"),
        (GOOD.replace(",1,", ",x,", 1), "label"),
        (GOOD.replace("14102113", "14139913"), "hour"),
    ],
)
def test_bad_rows_are_rejected_with_reason_and_line(tmp_path, bad, reason):
    source = tmp_path / "in.csv"
    source.write_text(HEADER + GOOD * 12 + bad)
    facts = preprocess_avazu(source, tmp_path / "out")
    assert facts["rejected"]["by_reason"] == {reason: 1} and facts["rejected"]["first_lines"] == {reason: [14]}
    assert facts["rows_read"] == 13 and facts["rows_kept"] == 12
    with pytest.raises(ValueError, match=rf"in.csv:14: bad row \({reason}\)"):
        preprocess_avazu(source, tmp_path / "strict", strict=True)


def test_a_file_without_the_avazu_header_is_refused(tmp_path):
    (tmp_path / "in.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="id,click,hour"):
        preprocess_avazu(tmp_path / "in.csv", tmp_path / "out")


@needs_sample
def test_dlrm_trains_on_avazu_without_dense_features(tmp_path):
    manifest, splits = open_dataset(preprocess_avazu(SAMPLE, tmp_path / "out") and tmp_path / "out")
    features = [Feature(str(i), n) for i, n in enumerate(manifest["cardinalities"])]
    model = DLRM(EmbeddingCollection(features, 8, "hash", compression=2), num_dense=0, bottom=(8,), top=(8,))
    train = splits["train"]
    logits = model(torch.from_numpy(train.dense[:64].copy()), torch.from_numpy(train.sparse[:64].astype("int64")))
    assert logits.shape == (64,) and bool(torch.isfinite(logits).all())


def test_a_line_longer_than_the_bound_is_refused_naming_it(tmp_path):
    from compemb.data.criteo import MAX_LINE_BYTES

    (tmp_path / "in.csv").write_text(HEADER + GOOD * 3 + "7,1,14102113," + "a" * MAX_LINE_BYTES + "\n")
    with pytest.raises(ValueError, match=r"in.csv:5: a line longer than 1,048,576 bytes"):
        preprocess_avazu(tmp_path / "in.csv", tmp_path / "out")
    (tmp_path / "header.csv").write_text("id,click,hour," + "x" * MAX_LINE_BYTES + "\n" + GOOD)
    with pytest.raises(ValueError, match=r"header.csv:1: a line longer than"):
        preprocess_avazu(tmp_path / "header.csv", tmp_path / "out2")
