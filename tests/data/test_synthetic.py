"""Synthetic Criteo-like data: determinism, the planted teacher, and the Bayes limit it reports."""

import numpy as np
import pytest

from compemb.data.dataset import open_dataset
from compemb.data.synthetic import CRITEO_KAGGLE_CARDINALITIES, SyntheticConfig, Teacher, generate_synthetic
from compemb.metrics import auc

SMALL = SyntheticConfig(rows={"train": 30_000, "val": 5_000}, chunk_rows=7_000, seed=3)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(out, SMALL, progress=False)
    return open_dataset(out)


def test_cardinalities_scale_criteo_kaggle_and_keep_small_features():
    cards = SyntheticConfig(scale=1e-3).cardinalities()
    assert len(cards) == 26 and 33_000 < sum(cards) < 35_000
    assert cards[2] == 10_132 and cards[8] == 3  # 10,131,227 / 1000 rounded up; 3 stays 3
    assert SyntheticConfig(scale=1.0).cardinalities() == list(CRITEO_KAGGLE_CARDINALITIES)


def test_the_same_config_gives_the_same_bytes_and_another_seed_does_not(small_set, tmp_path):
    manifest, splits = small_set
    generate_synthetic(tmp_path / "again", SMALL, progress=False)
    _, again = open_dataset(tmp_path / "again")
    for name in ("dense", "sparse", "labels"):
        assert np.array_equal(getattr(splits["train"], name), getattr(again["train"], name))
    other = SyntheticConfig(rows={"train": 1000}, seed=4)
    generate_synthetic(tmp_path / "other", other, progress=False)
    assert not np.array_equal(open_dataset(tmp_path / "other")[1]["train"].sparse, splits["train"].sparse[:1000])


def test_manifest_bayes_figures_are_the_teachers_on_the_written_labels(small_set):
    manifest, splits = small_set
    teacher = Teacher(SMALL)
    for name, split in splits.items():
        p = teacher.probabilities(np.asarray(split.dense), np.asarray(split.sparse, dtype=np.int64))
        y = np.asarray(split.labels)
        bce = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        assert manifest["bayes"][name]["bce"] == pytest.approx(bce, rel=1e-9)
        assert manifest["bayes"][name]["auc"] == pytest.approx(auc(p, y), abs=1e-12)


def test_click_rate_is_calibrated_and_the_task_is_learnable(small_set):
    manifest, splits = small_set
    train = manifest["bayes"]["train"]
    assert train["click_rate"] == pytest.approx(0.25, abs=0.015)
    rate = train["click_rate"]
    constant_bce = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert train["bce"] < 0.9 * constant_bce  # the features carry real signal
    assert 0.75 < train["auc"] < 0.97


def test_ids_follow_zipf_within_their_cardinalities(small_set):
    manifest, splits = small_set
    sparse = np.asarray(splits["train"].sparse)
    cards = np.array(manifest["cardinalities"])
    assert (sparse >= 0).all() and (sparse < cards).all()
    column = int(np.argmax(cards))  # the largest feature
    counts = np.sort(np.bincount(sparse[:, column], minlength=cards[column]))[::-1]
    n = cards[column]
    expected_top = 1 / np.sum(1.0 / np.arange(1, n + 1) ** SMALL.zipf)
    assert counts[0] / len(sparse) == pytest.approx(expected_top, rel=0.1)
    assert counts[0] > 5 * counts[9]  # rank 10 is (1/10)^1.1 as likely as rank 1


def test_first_order_share_mixes_the_two_normalised_parts():
    dense_rows = np.random.default_rng(0)
    for share in (0.0, 1.0):
        teacher = Teacher(SyntheticConfig(rows={"train": 10}, first_order=share, seed=2))
        dense, sparse = teacher.sample_features(dense_rows, 5_000)
        interactions, first_order = teacher._parts(dense, sparse)
        expected = first_order / teacher.first_order_sd if share else interactions / teacher.interaction_sd
        np.testing.assert_allclose(teacher.raw_logits(dense, sparse), expected)
        assert teacher.raw_logits(dense, sparse).std() == pytest.approx(1.0, rel=0.05)
